"""The contract every architecture family honours, and the registry that finds them.

The training loop, evaluation, export and the CLI only ever see this interface, so a new family
is one file under ``models/`` plus one ``register_family`` call — the loop is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

IGNORE_INDEX = -100  # label value excluded from the loss (padding, prompts in instruction data)


class FamilyConfig(BaseModel):
    """Base of every family's typed config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: str
    vocab_size: int = 16384  # overwritten with the trained tokenizer's size before building
    max_seq_len: int = 512  # longest context the model accepts; data.seq_len must not exceed it


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    loss: torch.Tensor | None = None  # total loss to backprop: LM cross-entropy + weighted aux losses
    lm_loss: torch.Tensor | None = None  # the cross-entropy alone, what perplexity/bpb are computed from
    metrics: dict[str, float] = field(default_factory=dict)  # family-specific scalars to log (aux losses, expert load)


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; ``labels`` are already aligned with ``logits`` (labels[t] is the
    target for position t) and IGNORE_INDEX positions do not count. Computed in fp32 so bf16
    training reports the same loss scale as fp32."""
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type[FamilyConfig]
    build: Callable[[FamilyConfig], nn.Module]


FAMILIES: dict[str, Family] = {}


def register_family(name: str, config_cls: type[FamilyConfig], build: Callable[[FamilyConfig], nn.Module]) -> None:
    if name in FAMILIES:
        raise ValueError(f"model family {name!r} registered twice")
    FAMILIES[name] = Family(name, config_cls, build)


def build_model(cfg: FamilyConfig) -> nn.Module:
    return FAMILIES[cfg.family].build(cfg)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
