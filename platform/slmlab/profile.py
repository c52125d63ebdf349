"""Inference profile of a trained model, logged with every run so reports compare families on it.

- ``infer/state_mib`` at step = sequence length: bytes of the generation state a model must hold
  to continue a sequence of that length (a transformer's KV cache, New-LLM's context vectors),
  measured by allocating the family's own cache object and summing its tensors. Only lengths the
  model can actually run are measured: a model with ``capabilities.max_positions`` below 16k gets
  the lengths under its limit plus the limit itself, never an extrapolation.
- ``infer/decode_tokens_per_s``: KV-cached (or state-carrying) greedy decoding speed, batch 1.
"""

from __future__ import annotations

import time

import torch
from torch import nn

SEQ_LENGTHS = (1024, 4096, 16384)


def _tensor_bytes(obj, seen: set | None = None) -> int:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(o, seen) for o in vars(obj).values())
    return 0


def state_bytes(model: nn.Module, seq_len: int) -> int:
    return _tensor_bytes(model.new_cache(1, seq_len))


def measurable_lengths(model: nn.Module) -> list[int]:
    limit = model.capabilities.max_positions
    if limit is None:
        return list(SEQ_LENGTHS)
    return sorted({n for n in SEQ_LENGTHS if n <= limit} | {limit})


@torch.inference_mode()
def decode_tokens_per_s(
    model: nn.Module, vocab_size: int, max_seq_len: int, prompt_len: int = 32, new_tokens: int = 64
) -> float:
    from slmlab.generation import generate

    prompt_len = min(prompt_len, max_seq_len // 4)
    new_tokens = min(new_tokens, max_seq_len - prompt_len)
    prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    generate(model, prompt, max_new_tokens=4, temperature=0)  # warm-up
    t0 = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=new_tokens, temperature=0)
    return (out.shape[1] - prompt_len) / (time.perf_counter() - t0)


def profile(model: nn.Module, cfg) -> dict[str, list[tuple[int, float]]]:
    """{metric key: [(step, value)]} ready for MLflow; ``cfg`` is the model's family config.
    Empty for a model that cannot generate."""
    if not model.capabilities.generation:
        return {}
    return {
        "infer/state_mib": [(n, state_bytes(model, n) / 2**20) for n in measurable_lengths(model)],
        "infer/decode_tokens_per_s": [(0, decode_tokens_per_s(model, cfg.vocab_size, cfg.max_seq_len))],
    }
