"""Held-out metrics that are comparable across tokenizers and families, plus whatever a family declares.

Bits per byte = (sum of next-token cross-entropy in nats) / ln 2 / (UTF-8 bytes of the predicted
tokens). Because the tokenizer is byte-level, every target token's byte count is exact
(:func:`slmlab.data.tokenizer.token_byte_lengths`); special tokens count 0 bytes but their loss is
kept, so a model is never rewarded for skipping document ends. The first token of a block is never
a target (nothing precedes it), so it is never counted.

An evaluation pass sums named quantities over batches (and ranks): ``nats``, ``targets``, ``bytes``
for every family, plus the model's own ``ModelOutput.eval_sums`` (e.g. cosine sums per layer for a
distilled student); :func:`eval_metrics` turns the sums into figures, asking the model for its own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from slmlab.models.base import IGNORE_INDEX

LM_SUMS = ("nats", "targets", "bytes")


def split_block(block: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed block of seq_len + 1 tokens → (inputs, aligned labels with -100 where masked)."""
    block = block.long()
    labels = block[:, 1:].masked_fill(target_mask[:, 1:] == 0, IGNORE_INDEX)
    return block[:, :-1].contiguous(), labels.contiguous()


def to_model_batch(raw: Mapping, device: torch.device | str, fields: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """A batch as the shard stores it → the dict a model's forward reads.

    Packed blocks (``input_ids`` of seq_len + 1 tokens with a ``target_mask``) become aligned
    ``input_ids``/``labels``; every other field the model declares (images, teacher targets) is
    moved to the device as it is. Columns the model does not read are left behind."""
    wanted = set(fields) | {"input_ids"}
    batch = {k: _tensor(v).to(device) for k, v in raw.items() if k in wanted and k != "labels"}
    if "target_mask" in raw:
        batch["input_ids"], batch["labels"] = split_block(batch["input_ids"], _tensor(raw["target_mask"]).to(device))
    return batch


def _tensor(value) -> torch.Tensor:
    """A column as a tensor; a list of per-row arrays (tensor-typed columns can arrive so) is stacked first:
    torch builds a tensor from a list of arrays element by element (32 rows of 65 tokens: 229 us, 15x)."""
    if isinstance(value, (list, tuple)) and value and hasattr(value[0], "shape"):
        value = np.stack(value)
    return torch.as_tensor(value)


@torch.no_grad()
def batch_sums(
    model: nn.Module, batch: Mapping[str, torch.Tensor], byte_lengths: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The quantities one batch adds to an evaluation pass (as tensors: no host sync per batch)."""
    out = model(batch)
    logits, labels = out.logits, batch["labels"]
    nats = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    valid = labels != IGNORE_INDEX
    sums = {
        "nats": nats.double(),
        "targets": valid.sum().double(),
        "bytes": byte_lengths[labels.clamp(min=0)][valid].sum().double(),
    }
    sums.update({k: v.detach().double().sum() for k, v in out.eval_sums.items()})
    return sums


class EvalSums:
    """Named running sums over a pass; ``all_reduce`` makes every rank hold the global totals."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))

    def add(self, sums: Mapping[str, torch.Tensor]) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums[k].to(v.device) + v

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        names: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(names, sorted(self.sums))  # a rank that saw no batch still joins
        keys = sorted(set().union(*names) | set(LM_SUMS))
        t = torch.stack([self.sums[k].cpu() for k in keys])
        dist.all_reduce(t)
        self.sums.update(dict(zip(keys, t.unbind())))

    def floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.sums.items()}


def eval_metrics(sums: Mapping[str, float], model: nn.Module | None = None, prefix: str = "val") -> dict[str, float]:
    """Figures from a pass's sums: loss (nats/token), perplexity, bits per byte, the number of
    targets, and whatever the model's family computes from its own sums."""
    nats, targets, n_bytes = (float(sums.get(k, 0.0)) for k in LM_SUMS)
    loss = nats / max(1.0, targets)
    figures = {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": nats / math.log(2) / max(1.0, n_bytes),
        "targets": targets,
    }
    if model is not None and hasattr(model, "eval_metrics"):
        figures.update(model.eval_metrics({k: v for k, v in sums.items() if k not in LM_SUMS}))
    return {f"{prefix}/{k}": v for k, v in figures.items()}


def evaluate_batches(
    model: nn.Module,
    batches: Iterable[Mapping],
    byte_lengths: torch.Tensor,
    device,
    max_batches: int | None = None,
    prefix: str = "val",
) -> dict[str, float]:
    """One pass over raw shard batches on this process (all-reduced when distributed)."""
    fields = getattr(getattr(model, "capabilities", None), "batch_fields", ())
    was_training = model.training
    model.eval()
    totals = EvalSums()
    try:
        for i, raw in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            totals.add(batch_sums(model, to_model_batch(raw, device, fields), byte_lengths.to(device)))
    finally:
        model.train(was_training)
    totals.all_reduce()
    return eval_metrics(totals.floats(), _unwrap(model), prefix)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine holds the family's model


def _dense(values):
    """A chunk as one (rows, ...) array. Without ``ray.data`` imported, pyarrow does not know Ray's tensor
    extension type and returns an object array of per-row arrays: stack those."""
    import numpy as np

    values = np.asarray(values)
    if values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
        return np.stack(values)
    return values


def read_blocks(folder, batch_size: int):
    """Raw batches of a shard folder, in file order, read here (no Ray): every column the shards hold."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(str(folder))
    # tensor columns (Ray's ArrowTensorArray) come back as (rows, ...) arrays, chunk by chunk
    columns = {
        name: np.concatenate([_dense(c.to_numpy(zero_copy_only=False)) for c in table.column(name).chunks])
        for name in table.column_names
    }
    for start in range(0, table.num_rows, batch_size):
        yield {k: v[start : start + batch_size] for k, v in columns.items()}


def evaluate_folder(
    model: nn.Module, val_dir, tokenizer_path, batch_size: int = 16, max_batches: int | None = None
) -> dict[str, float]:
    """Validation metrics of ``model`` on a shard folder, in this process (no Ray): used after
    training, e.g. to compare a quantised model with the one it came from."""
    from slmlab.data.tokenizer import load_tokenizer, token_byte_lengths

    byte_lengths = torch.tensor(token_byte_lengths(load_tokenizer(tokenizer_path)))
    device = next(model.parameters()).device
    return evaluate_batches(model, read_blocks(val_dir, batch_size), byte_lengths, device, max_batches)
