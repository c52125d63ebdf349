"""Consolidated model files: what leaves a run (safetensors weights + the family config).

DeepSpeed's own checkpoint (``ds/``) is for resuming training; ``model.safetensors`` +
``model_config.json`` is the portable artefact that MLflow registers and every other command
(generate, export, evaluate) loads — safetensors only, never pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_model
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
    load_weights(model, path / MODEL_FILE)
    return cfg, model.to(device).eval()


class WeightsMismatch(ValueError):
    """A weights file whose tensor names or shapes do not fit the model it is loaded into."""


def load_weights(model: nn.Module, file: str | Path, allow_missing: Iterable[str] = ()) -> list[str]:
    """Load a safetensors file into ``model``, strictly: every tensor the model saves must be in the
    file (under any of its names, for tied weights) and every tensor in the file must be one of the
    model's, with the same shape. ``allow_missing`` are name prefixes a caller deliberately leaves
    as initialised (e.g. fresh expert FFNs on a trained trunk); the names left so are returned.
    Anything else is a :class:`WeightsMismatch` listing the names."""
    from safetensors import safe_open

    allow = tuple(allow_missing)
    state = model.state_dict(keep_vars=True)
    tied: dict[int, list[str]] = {}  # one entry per distinct tensor, with all its names
    for name, tensor in state.items():
        tied.setdefault(id(tensor), []).append(name)
    with safe_open(str(file), framework="pt") as f:
        stored = set(f.keys())
        unexpected = sorted(stored - set(state))
        missing, left, load = [], [], []
        for names in tied.values():
            present = [n for n in names if n in stored]
            if present:
                load.append((names[0], present[0]))
            elif names[0].startswith(allow):
                left.append(names[0])
            else:
                missing.append(names[0])
        shapes = {n: tuple(f.get_slice(n).get_shape()) for _, n in load}
        wrong = [
            f"{n} {shapes[n]} (model {tuple(state[m].shape)})" for m, n in load if shapes[n] != tuple(state[m].shape)
        ]
        if missing or unexpected or wrong:
            problems = [
                f"missing {_names(missing)}" if missing else "",
                f"unexpected {_names(unexpected)}" if unexpected else "",
                f"wrong shape {_names(wrong)}" if wrong else "",
            ]
            raise WeightsMismatch(
                f"{file}: expected the tensors of {type(model).__name__}, found " + "; ".join(p for p in problems if p)
            )
        with torch.no_grad():
            for model_name, file_name in load:
                state[model_name].copy_(f.get_tensor(file_name))
    return sorted(left)


def _names(names: list[str], show: int = 8) -> str:
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return ", ".join(names[:show]) + more
