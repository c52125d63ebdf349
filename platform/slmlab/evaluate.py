"""Held-out metrics that are comparable across tokenizers and families.

Bits per byte = (sum of next-token cross-entropy in nats) / ln 2 / (UTF-8 bytes of the
predicted tokens). Because the tokenizer is byte-level, every target token's byte count is exact
(:func:`slmlab.data.tokenizer.token_byte_lengths`); special tokens count 0 bytes but their loss
is kept, so a model is never rewarded for skipping document ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slmlab.models.base import IGNORE_INDEX


def split_block(block: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed block of seq_len + 1 tokens → (inputs, aligned labels with -100 where masked)."""
    block = block.long()
    labels = block[:, 1:].masked_fill(target_mask[:, 1:] == 0, IGNORE_INDEX)
    return block[:, :-1].contiguous(), labels.contiguous()


@dataclass
class EvalTotals:
    nats: float = 0.0
    targets: int = 0
    bytes: int = 0

    def add(self, other: "EvalTotals") -> None:
        self.nats += other.nats
        self.targets += other.targets
        self.bytes += other.bytes

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.nats, float(self.targets), float(self.bytes)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "EvalTotals":
        return cls(float(t[0]), int(t[1]), int(t[2]))

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        loss = self.nats / max(1, self.targets)
        return {
            f"{prefix}/loss": loss,
            f"{prefix}/ppl": math.exp(min(loss, 50.0)),
            f"{prefix}/bpb": self.nats / math.log(2) / max(1, self.bytes),
            f"{prefix}/targets": float(self.targets),
        }


@torch.no_grad()
def batch_totals(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, byte_lengths: torch.Tensor) -> EvalTotals:
    out = model(inputs)
    logits = out.logits if hasattr(out, "logits") else out
    nats = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    valid = labels != IGNORE_INDEX
    n_bytes = byte_lengths[labels.clamp(min=0)][valid].sum()
    return EvalTotals(float(nats), int(valid.sum()), int(n_bytes))


def evaluate_folder(model: nn.Module, val_dir, tokenizer_path, batch_size: int = 16, max_batches: int | None = None) -> dict[str, float]:
    """Validation metrics of ``model`` on a shard folder, in this process (no Ray): used after
    training, e.g. to compare a quantised model with the one it came from."""
    import pyarrow.parquet as pq

    from slmlab.data.tokenizer import load_tokenizer, token_byte_lengths

    table = pq.read_table(str(val_dir), columns=["input_ids", "target_mask"])
    ids = torch.tensor(table.column("input_ids").to_pylist(), dtype=torch.long)
    mask = torch.tensor(table.column("target_mask").to_pylist(), dtype=torch.int8)
    byte_lengths = torch.tensor(token_byte_lengths(load_tokenizer(tokenizer_path)))
    totals = EvalTotals()
    model.eval()
    for i, start in enumerate(range(0, len(ids), batch_size)):
        if max_batches and i >= max_batches:
            break
        inputs, labels = split_block(ids[start:start + batch_size], mask[start:start + batch_size])
        totals.add(batch_totals(model, inputs, labels, byte_lengths))
    return totals.metrics("val")
