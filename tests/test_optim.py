"""Optimizer, schedule and DeepSpeed configuration built from the typed train config."""

from __future__ import annotations

import math

import pytest
import torch

from slmlab.config import TrainConfig
from slmlab.train.optim import build_optimizer, deepspeed_config, param_groups, warmup_cosine


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    mult = [warmup_cosine(s, cfg) for s in range(101)]
    assert all(a < b for a, b in zip(mult[:10], mult[1:11]))  # strictly rising during warmup
    assert mult[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(mult[10:], mult[11:]))  # never rising after it
    assert mult[100] == pytest.approx(0.1)
    assert mult[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_norms_and_biases_are_not_decayed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert sorted(p.dim() for p in no_decay["params"]) == [1, 1, 1] and no_decay["weight_decay"] == 0.0


def test_deepspeed_config_follows_the_train_config():
    cfg = TrainConfig(
        micro_batch_size=4, grad_accum_steps=3, zero_stage=2, precision="bf16", offload_optimizer=True, grad_clip=0.5
    )
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["gradient_clipping"] == 0.5
    assert "offload_optimizer" not in deepspeed_config(TrainConfig(), 1)["zero_optimization"]


def test_adamw_is_the_default_client_optimizer():
    model = torch.nn.Linear(3, 3)
    opt, sched = build_optimizer(model, TrainConfig(lr=0.01, warmup_steps=0))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_no_empty_parameter_group_when_only_matrices_train():
    """An expert run trains only FFN matrices (no norms, no biases): an empty no-decay group made
    DeepSpeed's optimizer and the LR scheduler disagree on the number of groups at the first step."""
    import torch.nn as nn

    from slmlab.train.optim import param_groups

    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4))
    model[1].requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1] and groups[0]["weight_decay"] == 0.1
    assert [len(g["params"]) for g in param_groups(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), 0.1)] == [1, 3]


def test_lr_scale_gives_matching_parameters_their_own_learning_rate_through_the_schedule():
    vit = torch.nn.ModuleDict({"blocks": torch.nn.Linear(4, 4), "patch": torch.nn.Linear(4, 4)})
    model = torch.nn.ModuleDict({"vit": vit, "decoder": torch.nn.Linear(4, 4)})
    cfg = TrainConfig(lr=0.01, warmup_steps=0, max_steps=10, lr_scale={"vit": 0.5, "vit.blocks": 0.1})
    opt, sched = build_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model["decoder"].weight)] == pytest.approx(0.01)
    assert lr_of[id(model["vit"]["patch"].weight)] == pytest.approx(0.005)
    assert lr_of[id(model["vit"]["blocks"].weight)] == pytest.approx(0.001)  # the longest prefix wins
    assert sched.get_last_lr()[0] == pytest.approx(0.01)  # the first group is the base schedule (train/lr)
    for _ in range(5):
        opt.step()
        sched.step()
    ratios = {round(g["lr"] / sched.get_last_lr()[0], 6) for g in opt.param_groups}
    assert ratios == {1.0, 0.5, 0.1}  # the multipliers ride the cosine schedule
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_lr_scale_without_scales_keeps_the_old_groups_and_rejects_a_prefix_that_matches_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    plain = param_groups(model, 0.1)
    assert all("lr" not in g for g in plain) and [len(g["params"]) for g in plain] == [1, 3]
    with pytest.raises(ValueError, match=r"train\.lr_scale.*'vit'"):
        param_groups(model, 0.1, 0.01, {"vit": 0.1})
    with pytest.raises(ValueError, match="lr_scale"):
        TrainConfig(lr_scale={"vit": 0.0})
