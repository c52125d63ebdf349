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

Two speed options that keep the tokens: ``decode_layout(model)`` (a copy whose big weights go through
oneDNN's reordered-weight kernel, the CPU's fastest matrix-vector path; what ``slmlab generate`` decodes
with) and ``generate(..., compile_step=True)`` (one compiled fixed-shape step, a CUDA graph per token on a
GPU; see ``FixedShapeDecoder``).
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
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


# A weight at least this big is multiplied through oneDNN's reordered copy. Below it the weight stays in the
# cache between tokens and oneDNN's fixed ~15 us per call loses to nn.Linear's ~5 us (192 x 192: 16.6 us
# against 4.4); at 1 MiB the two tie (512 x 512: 23.2 against 23.5 us), above it oneDNN wins.
PACK_MIN_BYTES = 1 << 20


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered once into oneDNN's blocked layout (an opaque tensor only its linear reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


@functools.cache
def _onednn_linear_works() -> bool:
    """The two oneDNN ops are torch internals (what inductor calls), so a torch whose ops are missing or
    behave otherwise is found out once, on a small product, and decoding keeps ``nn.Linear`` there."""
    try:
        w, x = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)), torch.ones(2, 3, 16)
        y = torch.ops.mkldnn._linear_pointwise(x, _pack(w), None, "none", [], "")
        return torch.allclose(y, F.linear(x, w), atol=1e-4)
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN's reordered-weight linear serves this weight: fp32 on a CPU torch built with oneDNN."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and _onednn_linear_works()
    )


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` that multiplies with its weight reordered into oneDNN's blocked layout.

    A batch-1 decode step is matrix-vector products over weights read once per token from memory. On the
    2-core development machine (torch 2.13, fp32, 2 threads; ``benchmarks/bench_vectorslm_vs_hf.py``) those
    read at 10-23 GB/s through ``nn.Linear`` (MKL), at 20-30 GB/s through oneDNN's linear with the weight
    reordered once ahead of time (the kernel inductor's CPU freezing pass uses): 30.9M parameters decode
    at 138 tokens/s against 109 with the (in, out) layout and 82 plain, with the same greedy tokens.

    ``weight`` and ``bias`` stay the original Parameters (state_dict, ties and code that reads ``.weight``
    directly, like an MoE router, see the true values); ``packed`` is an opaque oneDNN tensor beside them
    that only ``forward`` reads. So a packed copy holds each big weight twice in memory, and it has no
    backward: decode with it, train and save the original.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = _pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inductor cannot take the opaque tensor; it plans its own kernels
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    # An opaque oneDNN tensor has no storage to copy or pickle: copies and pickles carry the weight, and
    # the packed tensor is rebuilt from it.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("packed")
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.packed = _pack(self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def decode_layout(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for CPU decoding, each big ``nn.Linear`` multiplied the fastest way this CPU knows.

    Batch-1 decoding reads every weight once per token through matrix-vector products, so how fast a
    weight streams through the kernel sets the speed. In the copy, each fp32 ``nn.Linear`` of at least
    ``PACK_MIN_BYTES`` becomes a ``PackedLinear`` (oneDNN, its weight reordered once). Every other one with
    out > in (a small weight, or a torch without oneDNN) keeps its values and shape but is stored as the
    transpose of an (in, out) tensor: ``nn.Linear``'s own kernel streamed such weights at 17-21 GB/s that
    way and ~9.5 GB/s in the (out, in) layout, while for out <= in (out, in) was the faster. A tied output
    head is packed on its own; the embedding keeps reading rows of the original. At 30.9M parameters:
    82 tokens/s plain, 109 with the (in, out) layout alone, 138 packed (same greedy tokens). For inference
    only: train and save ``model``, not the copy.
    """
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for parent in list(out.modules()):
            for name, module in list(parent.named_children()):
                if type(module) is not nn.Linear or not module.weight.is_floating_point():
                    continue
                w = module.weight
                if can_pack(w) and w.numel() * w.element_size() >= PACK_MIN_BYTES:
                    setattr(parent, name, PackedLinear(module))
                elif w.size(0) > w.size(1) and w.is_contiguous():  # contiguous: a tied weight is turned once
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
