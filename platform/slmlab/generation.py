"""KV-cached autoregressive sampling, generic across model families.

Any model whose ``capabilities.generation`` is set works (the contract in ``models/base.py``): its
``new_cache`` holds the decoding state, ``forward({"input_ids": ...}, cache=..., start_pos=...,
logits_to_keep=1)`` computes only the last position's logits, and requests longer than
``capabilities.max_positions`` fail before any token is generated.

The prompt is run once (prefill), then one token per step through the cache. Prompts of one length
batch as they are. Prompts of different lengths go in left-padded with an ``attention_mask`` (1 = real
token, 0 = padding), or as a list through ``generate_ragged``, which pads them: every padded key is
masked out in prefill and in each decode step, and each row's rotary positions start at its first real
token, so each prompt gets what it would alone (greedy: the same tokens; logits to float rounding).
That needs a family whose ``capabilities.padded_generation`` is set (VectorSLM, dense and MoE); the
others (recurrent state, image prefix, swapped-in attention modules) refuse padding before any work. A
mask with no padding is dropped, so equal-length batches take the unmasked path on every family.

Two speed options that keep the tokens: ``decode_layout(model)`` (a copy whose wide weights suit the CPU's
matrix-vector kernels; what ``slmlab generate`` decodes with) and ``generate(..., compile_step=True)`` (one
compiled fixed-shape step, a CUDA graph per token on a GPU; see ``FixedShapeDecoder``).
"""

from __future__ import annotations

import copy
import weakref
from typing import Callable, Iterable, Mapping, Sequence

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
    attention_mask: torch.Tensor | None = None,
    compile_step: bool = False,
) -> torch.Tensor:
    """Continue ``input_ids`` (batch, prompt_len) by up to ``max_new_tokens`` tokens.

    Returns (batch, prompt_len + n) with the prompt first, n <= max_new_tokens. A sequence that emits a
    token in ``stop_token_ids`` is finished: it keeps that stop token and is padded with it until every
    sequence has finished (generation then ends early). ``on_token(tokens)`` is called after every step
    with the token each sequence received (a list of ints, one per sequence) for streaming output;
    finished sequences report their stop token again. The model is put in eval mode for the call and
    restored afterwards. ``extra``: batch fields the prefill call also gets (e.g. ``pixel_values``, an
    image prefix a vision-language model encodes once into the cache); decode steps get tokens only.
    ``attention_mask`` (batch, prompt_len): 1 at real tokens, 0 at padding, which must be on the left
    (prompts of different lengths; the output keeps the padding in front of each prompt).
    ``compile_step``: decode through one ``torch.compile``d fixed-shape step (a family with
    ``capabilities.fixed_shape_decode``), replayed as a CUDA graph on a GPU; see ``FixedShapeDecoder``.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is not None and attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if max_new_tokens <= 0:
        return input_ids
    B, T = input_ids.shape
    caps = model.capabilities
    if not caps.generation:
        raise TypeError(f"{type(model).__name__} declares no generation capability")
    mask = None if attention_mask is None else _padding_mask(model, attention_mask, input_ids)
    limit = caps.max_positions
    if limit is not None and T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's max_seq_len={limit}")
    device = input_ids.device
    dtype = state_dtype(model)
    stop = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        if compile_step:
            decoder = FixedShapeDecoder.of(model)
            cache = decoder.cache(B, T + max_new_tokens, device, dtype)
        else:
            cache = model.new_cache(B, T + max_new_tokens, device=device, dtype=dtype)
        prefill = {**(extra or {}), "input_ids": input_ids}
        if mask is not None:  # generated tokens are real: step s reads the view mask[:, :T + s + 1]
            mask = torch.cat([mask, mask.new_ones(B, cache.max_len - T)], dim=1)
            prefill["attention_mask"] = mask[:, :T]
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
            if compile_step:
                logits = decoder.step(tok[:, None], cache, T + step, mask)
            else:
                batch = {"input_ids": tok[:, None]}
                if mask is not None:
                    batch["attention_mask"] = mask[:, : T + step + 1]
                logits = model(batch, cache=cache, start_pos=T + step, logits_to_keep=1).logits[:, -1]
        return out[:, : T + n]
    finally:
        model.train(was_training)


def decode_layout(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for CPU decoding, its wide ``nn.Linear`` weights stored the other way round.

    Batch-1 decoding reads every weight once per token through matrix-vector products. On the 2-core
    development machine (torch 2.13, fp32) a weight in ``nn.Linear``'s (out, in) layout that does not fit in
    the cache streamed at ~9.5 GB/s for out > in (16384 x 512, 2816 x 512), but at 17-21 GB/s stored (in, out),
    where the kernel accumulates whole rows of the input; for out <= in the (out, in) layout was the faster
    (13.8 against 10.6 GB/s at 512 x 1408). So each Linear with out > in gets a weight of the same shape and
    values that is the transpose of an (in, out) tensor: at 30.9M parameters, 64.9 -> 99.2 tokens/s (1.53x,
    ``benchmarks/bench_vectorslm_vs_hf.py``) with identical greedy tokens. A tied embedding shares the new
    storage (a row lookup reads it strided, once per token). For inference: such weights are not contiguous,
    so train and save ``model``, not the copy.
    """
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in out.modules():
            if type(module) is not nn.Linear:
                continue
            w = module.weight
            if w.is_floating_point() and w.size(0) > w.size(1) and w.is_contiguous():  # contiguous: a tie is done once
                w.data = w.data.t().contiguous().t()  # the Parameter stays (ties and optimiser references hold)
    return out


class FixedShapeDecoder:
    """One model's compiled decode step and the static cache it runs on.

    Eager decoding pays Python and kernel-launch overhead per op per layer per token; at small sizes that,
    not compute or memory, bounds it (on a GPU it is launch-bound). The fixed-shape step (a tensor position,
    the whole cache read under a mask: ``capabilities.fixed_shape_decode``) has no shape that changes from
    token to token, so ``torch.compile`` traces it once, and on CUDA it is captured once as a CUDA graph
    (by hand, not mode "reduce-overhead": the cache is written inside the graph, and one ``replay`` has no
    per-call bookkeeping) and replayed: one launch per token. A graph is bound to its tensors' addresses, so
    the cache is kept and reused across calls with the same batch size, dtype and device, its length rounded
    up to ``LENGTH_BUCKET`` (a longer request builds a longer one): successive ``generate`` calls reuse the
    compiled step and its graph. Slots past the current position are masked out, so what an earlier call left
    there is never read. ``of(model)`` finds a model's decoder in a weak table beside it, not on it: the model
    still pickles and copies as before, and a decoder goes when its model does.
    """

    LENGTH_BUCKET = 256

    def __init__(self, model: nn.Module):
        if not model.capabilities.fixed_shape_decode:
            raise TypeError(
                f"{type(model).__name__} has no fixed-shape decode step (capabilities.fixed_shape_decode): "
                f"generate with compile_step=False"
            )
        self._model = weakref.ref(model)
        self._step = torch.compile(_fixed_shape_step, fullgraph=True, dynamic=False)
        self._cache = self._graph = self._weights = None

    @classmethod
    def of(cls, model: nn.Module) -> "FixedShapeDecoder":
        decoder = _DECODERS.get(model)
        if decoder is None:
            decoder = _DECODERS[model] = cls(model)
        return decoder

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("FixedShapeDecoder: its model no longer exists")
        return model

    def cache(self, batch_size: int, length: int, device: torch.device, dtype: torch.dtype):
        # A graph reads the weights where they were at capture: if any has moved since (.to(), new Parameter
        # objects, .data reassigned), capture again rather than replay stale addresses.
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        if weights != self._weights:
            self._graph, self._weights = None, weights
        c = self._cache
        if c is None or (c.batch_size, c.k.dtype, c.k.device) != (batch_size, dtype, device) or c.max_len < length:
            bucketed = -(-length // self.LENGTH_BUCKET) * self.LENGTH_BUCKET
            limit = self.model.capabilities.max_positions  # generate has checked that length fits it
            c = self.model.new_cache(batch_size, min(bucketed, limit or bucketed), device=device, dtype=dtype)
            self._cache, self._graph = c, None
        return c

    def step(self, tokens: torch.Tensor, cache, position: int, mask: torch.Tensor | None) -> torch.Tensor:
        """The logits after ``tokens`` (batch, 1) at ``position``; ``mask`` (batch, cache slots) or None."""
        if tokens.device.type != "cuda":
            return self._step(self.model, tokens, cache, torch.tensor([position], device=tokens.device), mask)
        g = self._graph
        if g is None or g["cache"] is not cache or (g["mask"] is None) != (mask is None):
            g = self._graph = self._capture(tokens, cache, mask)
        g["tokens"].copy_(tokens)
        g["pos"].fill_(position)
        if mask is not None:
            g["mask"].copy_(mask)
        g["graph"].replay()
        return g["logits"].clone()  # the next replay overwrites the graph's output

    def _capture(self, tokens, cache, mask) -> dict:
        # Inputs at fixed addresses; warm-up runs (compilation, autotuning) happen before capture on a side
        # stream, as torch.cuda.graphs requires. They write the last slot, which no real step reads before
        # writing it itself.
        g = {"cache": cache, "tokens": tokens.clone(), "mask": None if mask is None else mask.clone()}
        g["pos"] = torch.full((1,), cache.max_len - 1, dtype=torch.long, device=tokens.device)
        model = self.model
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(model, g["tokens"], cache, g["pos"], g["mask"])
        torch.cuda.current_stream().wait_stream(side)
        g["graph"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g["graph"]):
            g["logits"] = self._step(model, g["tokens"], cache, g["pos"], g["mask"])
        return g


def _fixed_shape_step(model, tokens, cache, pos, mask):
    """What FixedShapeDecoder compiles: one token's logits, the model an argument (the decoder holds it weakly)."""
    batch = {"input_ids": tokens} if mask is None else {"input_ids": tokens, "attention_mask": mask}
    return model(batch, cache=cache, start_pos=pos, logits_to_keep=1).logits[:, -1]


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, FixedShapeDecoder]" = weakref.WeakKeyDictionary()


def _padding_mask(model: nn.Module, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The checked bool mask, or None when there is no padding (the plain path, on any family)."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
            f"found {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    if bool(mask.all()):
        return None
    if not model.capabilities.padded_generation:
        raise TypeError(
            f"{type(model).__name__} cannot generate from padded prompts (no padded_generation capability): "
            f"prompts must be equal length; batch equal-length prompts or generate one prompt at a time"
        )
    empty = (~mask.any(dim=1)).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"attention_mask: expected at least one real token per row, rows {empty} are all padding")
    gaps = (mask[:, :-1] & ~mask[:, 1:]).any(dim=1).nonzero()[:, 0].tolist()  # a 1 followed by a 0
    if gaps:
        raise ValueError(
            f"attention_mask: expected left padding (zeros, then ones), rows {gaps} have padding after a real "
            f"token (right padding or gaps)"
        )
    return mask


def generate_ragged(
    model: nn.Module,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    pad_id: int = 0,
    max_new_tokens: int = 64,
    **kwargs,
) -> list[list[int]]:
    """Continue prompts of any lengths in one batch: each is left-padded with ``pad_id`` (any valid token
    id; padding is masked out, so it changes nothing), and ``generate`` runs with the padding mask.
    ``kwargs`` are generate's (temperature, top_k, top_p, stop_token_ids, generator, on_token, extra).

    Returns one list per prompt: the prompt, then its continuation, ending at (and keeping) its first stop
    token; the stop-token fill that waits for the rest of the batch is dropped, so each list is what
    generating that prompt alone returns (for greedy decoding, token for token).
    """
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, found none")
    rows = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    lengths = [len(r) for r in rows]
    if empty := [i for i, n in enumerate(lengths) if n == 0]:
        raise ValueError(f"prompts: expected at least one token per prompt, prompts {empty} are empty")
    device = next((p.device for p in prompts if isinstance(p, torch.Tensor)), next(model.parameters()).device)
    T = max(lengths)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows], device=device)
    out = generate(model, ids, max_new_tokens, attention_mask=mask, **kwargs).tolist()
    stop = set(kwargs.get("stop_token_ids", ()))
    result = []
    for row, n in zip(out, lengths):
        new = row[T:]
        end = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
        result.append(row[T - n : T] + new[:end])
    return result
