"""Optimizer, learning-rate schedule and the DeepSpeed engine configuration."""
from __future__ import annotations

import math

import torch
from torch import nn

from slmlab.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Decay matrices (embeddings, projections); never norms' gains or biases. With ``lr_scale``
    ({name prefix: multiplier}, longest prefix wins) each multiplier gets its own groups at lr * multiplier;
    the unscaled groups come first, so ``get_last_lr()[0]`` stays the base schedule."""
    scales = dict(lr_scale or {})
    if scales and lr is None:
        raise ValueError("param_groups: lr_scale needs the base lr")
    by_key: dict[tuple[float, bool], list] = {}
    seen: set[int] = set()
    matched: set[str] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        prefixes = [k for k in scales if name.startswith(k)]
        matched.update(prefixes)  # a prefix a longer one overrides still matched
        prefix = max(prefixes, key=len, default=None)
        by_key.setdefault((scales[prefix] if prefix else 1.0, p.dim() >= 2), []).append(p)
    if unmatched := sorted(set(scales) - matched):
        raise ValueError(f"train.lr_scale: expected prefixes of trainable parameter names, found {unmatched} "
                         f"matching none")
    groups = []
    for scale, decay in sorted(by_key, key=lambda k: (k[0] != 1.0, k[0], not k[1])):
        group = {"params": by_key[(scale, decay)], "weight_decay": weight_decay if decay else 0.0}
        if scales:
            group["lr"] = lr * scale
        groups.append(group)
    # no empty group: DeepSpeed drops them from the optimizer, and the LR scheduler (built on the
    # groups we pass) then fails its zip with the optimizer's fewer groups (an FFN-only expert)
    return groups


def warmup_cosine(step: int, cfg: TrainConfig) -> float:
    """Multiplier on cfg.lr: linear warmup, then cosine down to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_scale)
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
