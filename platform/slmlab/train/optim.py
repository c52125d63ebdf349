"""Optimizer, learning-rate schedule and the DeepSpeed engine configuration."""
from __future__ import annotations

import math

import torch
from torch import nn

from slmlab.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections); never norms' gains or biases."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # no empty group: DeepSpeed drops them from the optimizer, and the LR scheduler (built on the
    # groups we pass) then fails its zip with the optimizer's fewer groups (an FFN-only expert)
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, cfg: TrainConfig) -> float:
    """Multiplier on cfg.lr: linear warmup, then cosine down to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg))
    return opt, sched


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """A DeepSpeed config that runs on CPU (gloo) and on GPUs (NCCL) unchanged."""
    ds: dict = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 10**9,  # we log through MLflow; DeepSpeed's own prints are noise
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 12},
        "zero_allow_untested_optimizer": True,  # torch AdamW as client optimizer: starts instantly, no JIT build
    }
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
        # DeepSpeed insists on its own CPU Adam with offload unless told a torch optimizer is fine
        ds["zero_force_ds_cpu_optimizer"] = cfg.optimizer == "cpu_adam"
    if cfg.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds
