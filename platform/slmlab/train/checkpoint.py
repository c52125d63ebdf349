"""Consolidated model files: what leaves a run (safetensors weights + the family config).

DeepSpeed's own checkpoint (``ds/``) is for resuming training; ``model.safetensors`` +
``model_config.json`` is the portable artefact that MLflow registers and every other command
(generate, export, evaluate) loads — safetensors only, never pickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

MODEL_FILE, CONFIG_FILE = "model.safetensors", "model_config.json"


def save_model_files(engine, model_cfg, out: Path, is_writer: bool) -> None:
    """Collective under ZeRO-3 (every rank must call it); only ``is_writer`` writes."""
    module = engine.module if hasattr(engine, "module") else engine
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if is_writer:
                write_model(module, model_cfg, out)
    elif is_writer:
        write_model(module, model_cfg, out)


def write_model(module: nn.Module, model_cfg, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
    tmp_w, tmp_c = out / f".{MODEL_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
    # save_model drops tied duplicates (shared storage) that safetensors refuses to store twice
    shadow = _clone_structure(module, cpu)
    save_model(shadow, str(tmp_w), metadata={"family": model_cfg.family})
    tmp_c.write_text(json.dumps(model_cfg.model_dump(mode="json"), indent=2))
    os.replace(tmp_w, out / MODEL_FILE)
    os.replace(tmp_c, out / CONFIG_FILE)


def _clone_structure(module: nn.Module, state: dict) -> nn.Module:
    import copy

    shadow = copy.deepcopy(module).float().cpu()
    shadow.load_state_dict(state)
    return shadow


def load_model_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(config, model) from a folder holding model.safetensors + model_config.json."""
    from slmlab.models import FAMILIES, build_model

    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: expected {CONFIG_FILE} and {MODEL_FILE}, found no {CONFIG_FILE}")
    raw = json.loads(cfg_file.read_text())
    family = raw.get("family")
    if family not in FAMILIES:
        raise ValueError(f"{cfg_file}: family: expected one of {sorted(FAMILIES)}, found {family!r}")
    cfg = FAMILIES[family].config_cls.model_validate(raw)
    model = build_model(cfg)
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    missing = [m for m in missing if not _is_tied_alias(model, m)]
    if missing or unexpected:
        raise ValueError(f"{path / MODEL_FILE}: expected weights for {cfg.family}, missing {missing[:5]} unexpected {list(unexpected)[:5]}")
    return cfg, model.to(device).eval()


def _is_tied_alias(model: nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return name in params and name not in unique
