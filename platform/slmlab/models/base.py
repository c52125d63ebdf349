"""The contract every architecture family honours, and the registry that finds them.

The training loop, evaluation, generation, export and the CLI only ever see this interface, so a
new family is one file under ``models/`` plus one ``register_family`` call: the loop is never
touched. What a model may be asked, in full:

``forward(batch, *, cache=None, start_pos=0, logits_to_keep=0) -> ModelOutput``
    ``batch`` is a dict of tensors. ``input_ids`` (batch, seq) is always there; ``labels``
    (aligned with the logits: labels[t] is the target at position t, IGNORE_INDEX where no loss
    falls) is there in training and evaluation. Anything else a family needs (images, a
    teacher's activations, extra masks) travels in the same dict, named in
    ``capabilities.batch_fields``, from the Ray Data shard straight to the model. Only when
    ``capabilities.padded_generation``: ``attention_mask`` (batch, start_pos + seq), 0 at the left
    padding of every position so far, for generating from prompts of different lengths at once.
``capabilities``
    What the model can do, declared once (never sniffed from signatures): see :class:`Capabilities`.
``new_cache(batch_size, max_len, device=None, dtype=None)``
    Only when ``capabilities.generation``: the state a decode step reads and writes in place.
``eval_metrics(sums) -> dict``
    Family-specific evaluation figures from the sums its forward put in ``ModelOutput.eval_sums``
    over a whole validation pass (summed across batches and ranks by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from slmlab.schema import StrictConfig

IGNORE_INDEX = -100  # label value excluded from the loss (padding, prompts in instruction data)

Batch = Mapping[str, torch.Tensor]


class FamilyConfig(StrictConfig):
    """Base of every family's typed config."""

    family: str
    vocab_size: int = 16384  # the trained tokenizer's size; a pipeline copies it in before building
    max_seq_len: int = 512  # longest context the model accepts; data.seq_len must not exceed it


@dataclass(frozen=True)
class Capabilities:
    """What a model declares about itself; callers branch on these, never on signatures."""

    generation: bool = False  # has new_cache() and decodes one token at a time through it
    # forward honours batch["attention_mask"] (left padding): prompts of different lengths share a batch
    padded_generation: bool = False
    max_positions: int | None = None  # longest sequence it can run (rotary tables); None = unbounded
    # forward accepts a tensor start_pos for one-token steps with every shape fixed (a static cache read in full
    # under a mask), so generate(compile_step=True) can compile the step once and replay it as a CUDA graph
    fixed_shape_decode: bool = False
    hf_export: str | None = None  # name of the transformers architecture it exports to, None = no export
    batch_fields: tuple[str, ...] = ("input_ids", "labels")  # the batch entries forward reads


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    loss: torch.Tensor | None = None  # total loss to backprop: LM cross-entropy + weighted aux losses
    lm_loss: torch.Tensor | None = None  # the cross-entropy alone, what perplexity/bpb are computed from
    metrics: dict[str, float] = field(
        default_factory=dict
    )  # family-specific scalars logged each step (aux losses, load)
    eval_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # summed over an eval pass → eval_metrics()
    hidden_states: list[torch.Tensor] | None = None  # per-layer outputs, when a caller asked for them


class LanguageModel(nn.Module):
    """Base class of every family's model: the defaults of the contract above."""

    capabilities: Capabilities = Capabilities()

    def forward(
        self, batch: Batch, *, cache: Any = None, start_pos: int = 0, logits_to_keep: int = 0
    ) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None):
        raise TypeError(f"{type(self).__name__} declares no generation capability")

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Figures from this family's eval sums (e.g. cosine per layer = sum / count). Default: none."""
        return {}


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
    build: Callable[[FamilyConfig], LanguageModel]


FAMILIES: dict[str, Family] = {}


def register_family(name: str, config_cls: type[FamilyConfig], build: Callable[[FamilyConfig], LanguageModel]) -> None:
    if name in FAMILIES:
        raise ValueError(f"model family {name!r} registered twice")
    FAMILIES[name] = Family(name, config_cls, build)


def build_model(cfg: FamilyConfig) -> LanguageModel:
    return FAMILIES[cfg.family].build(cfg)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
