"""KV-cached autoregressive sampling, generic across model families.

Any model whose ``capabilities.generation`` is set works (the contract in ``models/base.py``): its
``new_cache`` holds the decoding state, ``forward({"input_ids": ...}, cache=..., start_pos=...,
logits_to_keep=1)`` computes only the last position's logits, and requests longer than
``capabilities.max_positions`` fail before any token is generated.

The prompt is run once (prefill), then one token per step through the cache. All sequences of a batch
share one prompt length (no padding support): batch prompts of equal length or call once per prompt.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus (smallest set of tokens whose
    probability sums to >= top_p; the most likely token is always kept). logits: (batch, vocab)."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        # drop a token when the tokens strictly more likely than it already reach top_p
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) token ids. temperature 0 = greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def state_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a decoding state should have: the model's compute dtype, i.e. its first floating
    parameter (an INT8-quantised model's integer weights are not it), or the autocast dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device_type = next(model.parameters()).device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` (batch, prompt_len) by up to ``max_new_tokens`` tokens.

    Returns (batch, prompt_len + n) with the prompt first, n <= max_new_tokens. A sequence that emits a
    token in ``stop_token_ids`` is finished: it keeps that stop token and is padded with it until every
    sequence has finished (generation then ends early). ``on_token(tokens)`` is called after every step
    with the token each sequence received (a list of ints, one per sequence) for streaming output;
    finished sequences report their stop token again. The model is put in eval mode for the call and
    restored afterwards. ``extra``: batch fields the prefill call also gets (e.g. ``pixel_values``, an
    image prefix a vision-language model encodes once into the cache); decode steps get tokens only.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens <= 0:
        return input_ids
    B, T = input_ids.shape
    caps = model.capabilities
    if not caps.generation:
        raise TypeError(f"{type(model).__name__} declares no generation capability")
    limit = caps.max_positions
    if limit is not None and T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's max_seq_len={limit}")
    device = input_ids.device
    dtype = state_dtype(model)
    stop = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, T + max_new_tokens, device=device, dtype=dtype)
        prefill = {**(extra or {}), "input_ids": input_ids}
        logits = model(prefill, cache=cache, start_pos=0, logits_to_keep=1).logits[:, -1]
        out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
        out[:, :T] = input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        fill = torch.zeros(B, dtype=torch.long, device=device)  # the stop token a finished sequence repeats
        n = 0
        for step in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            if stop.numel():
                tok = torch.where(finished, fill, tok)
                hit = torch.isin(tok, stop) & ~finished
                fill = torch.where(hit, tok, fill)
                finished |= hit
            out[:, T + step] = tok
            n = step + 1
            if on_token is not None:
                on_token(tok.tolist())
            if step == max_new_tokens - 1 or (stop.numel() and bool(finished.all())):
                break
            logits = model({"input_ids": tok[:, None]}, cache=cache, start_pos=T + step, logits_to_keep=1).logits[:, -1]
        return out[:, : T + n]
    finally:
        model.train(was_training)
