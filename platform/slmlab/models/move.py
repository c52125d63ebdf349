"""MoVE: a Llama teacher rebuilt from independently fitted modules, one per vector transformation.

    teacher (frozen VectorSLM): ids → tok_emb ─ rope ─ L × [x += attn(attn_norm x); x += ffn(ffn_norm x)] → norm+lm_head
    student slots (``move.*``): embedding   position        attention[i]              ffn[i]               decoder

A ``move`` model holds the frozen teacher (its tensors keep the teacher's own names, so a teacher
folder warm-starts it strictly) and the modules named in ``swap`` under ``move.<kind>``. One
forward path serves both: every slot not swapped is the teacher's own sublayer, and the path can
record each sublayer's input and output (a :class:`Trace`). The teacher's trace is that path with
nothing swapped, so the capture is exactly the teacher's computation (no hooks to drift from it).

Objectives (``objective``):
  ``fit``      each swapped module is fitted alone to its teacher sublayer, fed the teacher's own
               input to that sublayer (LoLCATs "attention transfer", MOHAWK stage 2): loss is the
               per-token relative squared error of the sublayer output, KL for the decoder.
  ``distill``  the assembled student end to end: KL(teacher ‖ student) on the logits (MOHAWK stage 3).
In evaluation both modes are measured for every swapped module (cosine and MSE of each sublayer
output, fed the teacher's inputs / fed the student's own), plus the residual-stream cosine (reported,
not a target: the skip path keeps it high), KL vs the teacher, and the student/teacher nats ratio
(= the bits-per-byte ratio: same text, same bytes). ``logits`` are the student's, so the generic
loop's val/bpb is the bpb of the teacher with these modules swapped in.

Where the teacher's targets come from: computed on the fly inside each run, in the same forward.
Measured on this machine (2-core CPU, the 2.4M-parameter default teacher, 16 x 128-token batch):
one teacher forward that records every sublayer takes ~41 ms per 1,000 tokens on 1 thread. The
same targets written as activation shards cost 5,880 floats per token (embedding, 4 layers x 4
sublayer in/outs, final stream, 4,096 logits): 23.5 KB per token, ~96 GB for the 4.1M tokens of a
200-step module run at fp32 (logits alone ~16 KB/token), and reading 23.5 KB at ~2 GB/s from disk
takes ~12 ms per 1,000 tokens only if the page cache held them, which 96 GB does not. Recomputing is
cheaper than storing at these sizes, and no run waits on a batch-inference job first.

The five modules (each ``init_from_teacher`` starts it from the teacher's weights, as the anchors do):
  embedding  :class:`LowRankEmbedding`, ids → A[ids] B (rank r), started from the truncated SVD.
  position   :class:`PositionPredictor` (below: what it predicts and why).
  attention  per layer, ``linear`` (:class:`HedgehogAttention`: LoLCATs sliding window + Hedgehog
             feature-map linear attention) or ``graph`` (:class:`GraphAttention`: softmax message
             passing over local, dilated and sink edges), q/k/v/o started from the teacher's.
  ffn        per layer, :class:`MoEfiedFFN`: the teacher's SwiGLU neurons split into experts by
             balanced k-means on their gate vectors (MoEfication), top-k router fitted to pick the
             experts whose outputs are largest for the token.
  decoder    :class:`LowRankDecoder`, its own RMSNorm and a rank-r head, started from the SVD.
``identity: true`` builds every slot as an exact copy of the teacher's sublayer: the test that the
capture and the swap are right (cosine 1, the teacher's bpb).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from slmlab.data.topics import balanced_assign
from slmlab.errors import SlmlabError
from slmlab.models.base import Batch, Capabilities, FamilyConfig, ModelOutput, lm_cross_entropy, register_family
from slmlab.models.layers import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig
from slmlab.schema import StrictConfig

MODULE_KINDS = ("embedding", "position", "attention", "ffn", "decoder")
ModuleKind = Literal["embedding", "position", "attention", "ffn", "decoder"]
PER_LAYER = ("position", "attention", "ffn")


# ----------------------------------------------------------------------------------------------
# Config


class EmbeddingSlot(StrictConfig):
    rank: int = Field(64, ge=1)  # factorisation rank: vocab*r + r*dim parameters instead of vocab*dim


class PositionSlot(StrictConfig):
    hidden: int = Field(16, ge=1)  # width of the MLP from frequency index to log-frequency
    init_base: float = Field(10000.0, gt=1)  # the frequency ladder it starts from (Llama's default base)


class AttentionSlot(StrictConfig):
    variant: Literal["linear", "graph"] = "linear"  # linear: LoLCATs/Hedgehog; graph: sparse message passing
    window: int = Field(16, ge=1)  # exact softmax over the last `window` keys (linear) / local edges (graph)
    feature_dim: int | None = Field(None, ge=1)  # Hedgehog feature map width per sign (None = head_dim)
    dilation: int = Field(16, ge=1)  # graph: long-range edges every `dilation` positions beyond the window
    long_edges: int = Field(7, ge=0)  # graph: how many dilated edges each token receives
    sink: bool = True  # graph: every token also reads position 0 (Llama puts much attention there)
    # LoLCATs' attention transfer fits only the new parts (feature maps, edge weights); q/k/v/o stay the
    # teacher's: Adam's steps on already-right projections cost more than they gain (measured in tests)
    train_projections: bool = False


class FFNSlot(StrictConfig):
    num_experts: int = Field(8, ge=2)  # experts the teacher's FFN neurons are clustered into
    top_k: int = Field(4, ge=1)  # experts run per token: top_k/num_experts of the FFN is active
    router_weight: float = Field(0.1, ge=0)  # weight of the router's BCE against the ideal expert set
    cluster_iters: int = Field(25, ge=1)  # balanced k-means iterations on the neurons' gate vectors


class DecoderSlot(StrictConfig):
    rank: int = Field(96, ge=1)  # rank of the output head: dim*r + r*vocab parameters


class MoVEConfig(FamilyConfig):
    family: Literal["move"] = "move"  # selects this file in the family registry
    teacher: VectorSLMConfig  # the frozen teacher's architecture (its weights come from a model folder)
    swap: list[ModuleKind] = Field(default_factory=list)  # slots holding a module; the rest is the teacher's own
    objective: Literal["fit", "distill"] = "fit"  # fit: each module alone on teacher inputs; distill: end-to-end KL
    identity: bool = False  # every module an exact copy of its teacher sublayer (tests the capture and swap)
    embedding: EmbeddingSlot = Field(default_factory=EmbeddingSlot)
    position: PositionSlot = Field(default_factory=PositionSlot)
    attention: AttentionSlot = Field(default_factory=AttentionSlot)
    ffn: FFNSlot = Field(default_factory=FFNSlot)
    decoder: DecoderSlot = Field(default_factory=DecoderSlot)

    @model_validator(mode="after")
    def _fits_teacher(self) -> "MoVEConfig":
        t = self.teacher
        if (self.vocab_size, self.max_seq_len) != (t.vocab_size, t.max_seq_len):
            raise ValueError(f"expected vocab_size/max_seq_len equal to the teacher's ({t.vocab_size}, "
                             f"{t.max_seq_len}), found ({self.vocab_size}, {self.max_seq_len})")
        if t.moe is not None:
            raise ValueError("teacher: expected a dense Llama-shaped teacher (SwiGLU FFN), found a mixture of experts")
        if len(set(self.swap)) != len(self.swap):
            raise ValueError(f"swap: expected each module once, found {self.swap}")
        if "ffn" in self.swap and not self.identity:
            if t.ffn_dim % self.ffn.num_experts:
                raise ValueError(f"ffn.num_experts: expected a divisor of the teacher's FFN width {t.ffn_dim}, "
                                 f"found {self.ffn.num_experts}")
            if self.ffn.top_k > self.ffn.num_experts:
                raise ValueError(f"ffn.top_k: expected at most num_experts={self.ffn.num_experts}, "
                                 f"found {self.ffn.top_k}")
        return self

    def with_vocab(self, vocab_size: int) -> "MoVEConfig":
        return self.model_copy(update={"vocab_size": vocab_size,
                                       "teacher": self.teacher.model_copy(update={"vocab_size": vocab_size})})


# ----------------------------------------------------------------------------------------------
# Decoding state


class MoVECache:
    """Generation state: a KV cache for the teacher attention layers the student still uses, plus
    each module's own state by layer (recurrent sums and a key window, or a key history)."""

    def __init__(self, kv: KVCache | None, batch_size: int, max_len: int):
        self.kv, self.batch_size, self.max_len = kv, batch_size, max_len
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        return self.kv.update(layer, start_pos, k, v)


# ----------------------------------------------------------------------------------------------
# Modules


class LowRankEmbedding(nn.Module):
    """ids → A[ids] @ B: vocab x r and r x dim, started from the best rank-r approximation (SVD)."""

    def __init__(self, vocab: int, dim: int, rank: int):
        super().__init__()
        self.a = nn.Embedding(vocab, rank)
        self.b = nn.Linear(rank, dim, bias=False)
        nn.init.normal_(self.a.weight, std=0.02)
        nn.init.normal_(self.b.weight, std=rank ** -0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(ids))

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        r = self.a.weight.size(1)
        self.a.weight.copy_(u[:, :r] * s[:r])
        self.b.weight.copy_(vh[:r].T)


class PositionPredictor(nn.Module):
    """The positional signal the student attention consumes: a rotation angle per frequency pair and
    position, angle_f(p) = p * exp(log_omega_f), returned as RoPE's (cos, sin) tables.

    What it predicts and why: the teacher's q/k projections were trained against RoPE's rotations, and
    every attention module here keeps those projections, so the signal they need is RoPE's rotation
    itself, not some other position code. Predicting an *angle* (not free cos/sin values) keeps every
    output a rotation (norms preserved) and keeps the angle linear in position, which is what makes
    attention depend on relative position only and lets the module run at positions never seen in
    fitting (fitted on 128-token blocks, decoding at 2,048). The learned part is the frequency ladder:
    a small MLP maps each pair's index f/F to a correction of its log-frequency, on top of a generic
    ladder (``init_base``); it recovers a teacher's rope_theta, or a non-geometric ladder such as
    Llama 3's scaled RoPE. Fitted by the error of the rotated teacher q/k it produces at every layer."""

    def __init__(self, head_dim: int, hidden: int, init_base: float):
        super().__init__()
        n = head_dim // 2
        self.register_buffer("index", torch.arange(n, dtype=torch.float32)[:, None] / n, persistent=False)
        self.register_buffer("prior", -(torch.arange(n, dtype=torch.float32) * 2 / head_dim) * math.log(init_base),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)  # starts as the generic ladder exactly
        nn.init.zeros_(self.mlp[2].bias)

    def log_omega(self) -> torch.Tensor:
        return self.prior + self.mlp(self.index).squeeze(-1)

    def forward(self, start_pos: int, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start_pos, start_pos + seq_len, dtype=torch.float32, device=self.index.device)
        with torch.autocast(device_type=pos.device.type, enabled=False):  # angles need fp32 at long positions
            angle = pos[:, None] * self.log_omega().float().exp()[None, :]
        return angle.cos().to(dtype), angle.sin().to(dtype)


class _Projections(nn.Module):
    """q/k/v/o projections laid out as the teacher's (fused QKV), so they start as copies of it."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer_idx = n_heads, n_kv_heads, dim // n_heads, layer_idx
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def qkv(self, x, cos, sin, expand: bool = True):
        """(B, heads, T, hd) q, k, v; with ``expand`` k and v are repeated to the query heads (the GQA
        grouping of SDPA), else they keep n_kv_heads."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk, v = qkv.split((self.n_heads + self.n_kv_heads, self.n_kv_heads), dim=2)
        q, k = apply_rotary(qk, cos, sin).split((self.n_heads, self.n_kv_heads), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if not expand:
            return q, k, v
        group = self.n_heads // self.n_kv_heads
        return q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def out(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def _check_prefill(cache, start_pos: int, T: int) -> None:
    if cache is not None and T > 1 and start_pos != 0:
        raise ValueError(f"MoVE attention modules prefill from position 0 only, asked for {T} tokens at {start_pos}")


class HedgehogAttention(_Projections):
    """LoLCATs linear attention: exact softmax over the last ``window`` keys, Hedgehog feature-map
    linear attention over all older keys, one shared normaliser (LoLCATs' hedgehog_window_attention):

        y_i = (g * sum_{i-j<w} exp(s_ij - m_i) v_j + sum_{i-j>=w} phi(q_i).phi(k_j) v_j) / (same without v)
        phi(x) = [softmax(x W + b), softmax(-(x W + b))]   (per head; W starts as the identity)

    Decoding keeps O(1) state per layer: the window's keys/values and the running sums of phi(k) v^T
    and phi(k) over the keys that left it."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, layer_idx: int, cfg: AttentionSlot):
        super().__init__(dim, n_heads, n_kv_heads, layer_idx)
        f = cfg.feature_dim or self.head_dim
        self.window = cfg.window
        self.fq = nn.Parameter(torch.eye(self.head_dim, f).repeat(n_heads, 1, 1))
        self.fk = nn.Parameter(torch.eye(self.head_dim, f).repeat(n_heads, 1, 1))
        self.bq = nn.Parameter(torch.zeros(n_heads, 1, f))
        self.bk = nn.Parameter(torch.zeros(n_heads, 1, f))
        self.gate = nn.Parameter(torch.zeros(n_heads, 1, 1))  # g = sigmoid(gate): weight of the exact window

    @staticmethod
    def _phi(x, w, b):
        z = torch.matmul(x, w) + b  # (B, H, T, f)
        return torch.cat((z.softmax(-1), (-z).softmax(-1)), dim=-1)

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0):
        B, T, _ = x.shape
        _check_prefill(cache, start_pos, T)
        q, k, v = self.qkv(x, cos, sin)
        g = torch.sigmoid(self.gate)
        if cache is not None and T == 1:
            return self.out(self._step(q, k, v, g, cache.state[self.layer_idx], start_pos))
        pq, pk = self._phi(q, self.fq, self.bq), self._phi(k, self.fk, self.bk)
        d = torch.arange(T, device=x.device)[:, None] - torch.arange(T, device=x.device)[None, :]
        s = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5
        s = s.masked_fill(~((d >= 0) & (d < self.window)), float("-inf"))
        a = g * torch.exp(s - s.amax(-1, keepdim=True)) + torch.matmul(pq, pk.transpose(-1, -2)) * (d >= self.window)
        y = torch.matmul(a, v) / a.sum(-1, keepdim=True)
        if cache is not None:  # prefill: keys that left the window go into the sums, the rest into the window
            state, w, cut = cache.state[self.layer_idx], self.window, max(0, T - self.window)
            slots = torch.arange(cut, T, device=x.device) % w
            state["kw"][:, :, slots], state["vw"][:, :, slots] = k[:, :, cut:], v[:, :, cut:]
            state["s"].copy_(torch.matmul(pk[:, :, :cut].transpose(-1, -2), v[:, :, :cut]))
            state["z"].copy_(pk[:, :, :cut].sum(2))
        return self.out(y)

    def new_state(self, batch: int, max_len: int, device, dtype) -> dict[str, torch.Tensor]:
        """Decoding state, constant in the context length: the window's keys/values and the sums."""
        f2 = 2 * self.fq.size(-1)
        new = lambda *shape: torch.zeros(batch, self.n_heads, *shape, device=device, dtype=dtype)  # noqa: E731
        return {"kw": new(self.window, self.head_dim), "vw": new(self.window, self.head_dim),
                "s": new(f2, self.head_dim), "z": new(f2)}

    def _step(self, q, k, v, g, state, p: int):
        w, slot = self.window, p % self.window
        if p >= w:  # the key at p - w leaves the window: fold it into the linear sums
            old_k, old_v = state["kw"][:, :, slot:slot + 1], state["vw"][:, :, slot:slot + 1]
            pk = self._phi(old_k, self.fk, self.bk)
            state["s"] += torch.matmul(pk.transpose(-1, -2), old_v)
            state["z"] += pk.squeeze(2)
        state["kw"][:, :, slot:slot + 1], state["vw"][:, :, slot:slot + 1] = k, v
        n = min(p + 1, w)
        kw, vw = state["kw"][:, :, :n], state["vw"][:, :, :n]
        s = torch.matmul(q, kw.transpose(-1, -2)) * self.head_dim ** -0.5
        a = g * torch.exp(s - s.amax(-1, keepdim=True))
        pq = self._phi(q, self.fq, self.bq)
        num = torch.matmul(a, vw) + torch.matmul(pq, state["s"])
        den = a.sum(-1, keepdim=True) + (pq * state["z"][:, :, None]).sum(-1, keepdim=True)
        return num / den


class GraphAttention(_Projections):
    """Message passing over a sparse causal graph. Token i receives softmax-weighted messages v_j from
    its ``window`` predecessors (local edges), from every ``dilation``-th position beyond them
    (``long_edges`` dilated edges), from position 0 (the sink) and from a summary node holding the
    running mean of all its past keys and values (a virtual node standing for the keys the graph
    drops, with O(1) state: its score is q·mean(k) plus log(number of dropped keys), so attention that
    is uniform over them is reproduced exactly). Scores are (q M_q)·(k M_k)/sqrt(d) plus a learned
    per-head bias per edge kind; M_q, M_k start as the identity, so the module starts as the teacher's
    attention over the graph plus that summary. A decode step reads a fixed number of keys."""

    KINDS = ("local", "dilated", "sink", "summary")

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, layer_idx: int, cfg: AttentionSlot):
        super().__init__(dim, n_heads, n_kv_heads, layer_idx)
        self.window, self.dilation, self.long_edges, self.sink = cfg.window, cfg.dilation, cfg.long_edges, cfg.sink
        self.mq = nn.Parameter(torch.eye(self.head_dim).repeat(n_heads, 1, 1))
        self.mk = nn.Parameter(torch.eye(self.head_dim).repeat(n_kv_heads, 1, 1))
        self.edge_bias = nn.Parameter(torch.zeros(n_heads, len(self.KINDS)))

    def new_state(self, batch: int, max_len: int, device, dtype) -> dict[str, torch.Tensor]:
        """Decoding state: the (mapped) key/value history the edges read, and the summary's sums."""
        new = lambda *shape: torch.zeros(batch, self.n_kv_heads, *shape, device=device, dtype=dtype)  # noqa: E731
        return {"k": new(max_len, self.head_dim), "v": new(max_len, self.head_dim),
                "ksum": new(self.head_dim), "vsum": new(self.head_dim)}

    def offsets(self) -> list[int]:
        """Distances back along which a token receives messages (besides the sink and summary)."""
        far = [self.dilation * m for m in range(1, self.long_edges + 1) if self.dilation * m >= self.window]
        return list(range(self.window)) + far

    def edges(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(heads, Tq, Tk) additive mask: the edge kind's bias on edges, -inf elsewhere."""
        d = q_pos[:, None] - k_pos[None, :]
        local = (d >= 0) & (d < self.window)
        far = (d >= self.window) & (d % self.dilation == 0) & (d <= self.dilation * self.long_edges)
        sink = ((k_pos[None, :] == 0) & (d >= 0)) if self.sink else torch.zeros_like(local)
        b = self.edge_bias[:, :, None, None]  # (heads, kind, 1, 1)
        mask = torch.where(sink, b[:, 2], torch.full_like(b[:, 2], float("-inf")))
        mask = torch.where(far, b[:, 1], mask)
        return torch.where(local, b[:, 0], mask)

    def _messages(self, q, k, v, mask, k_mean, v_mean, dropped):
        """Softmax over the edges plus the summary node; k/v (B, H, S, hd), k_mean/v_mean (B, H, T, hd),
        dropped (T, 1): how many earlier keys have no edge to each query."""
        scale = self.head_dim ** -0.5
        s = torch.matmul(q, k.transpose(-1, -2)) * scale + mask
        prior = torch.where(dropped > 0, dropped.clamp(min=1).log(), float("-inf"))
        s_sum = (q * k_mean).sum(-1, keepdim=True) * scale + prior + self.edge_bias[:, 3, None, None]
        p = torch.cat((s, s_sum), dim=-1).float().softmax(-1).to(q.dtype)
        return torch.matmul(p[..., :-1], v) + p[..., -1:] * v_mean

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0):
        B, T, _ = x.shape
        _check_prefill(cache, start_pos, T)
        q, k, v = self.qkv(x, cos, sin, expand=False)
        q, k = torch.matmul(q, self.mq), torch.matmul(k, self.mk)
        group = self.n_heads // self.n_kv_heads
        count = torch.arange(start_pos + 1, start_pos + T + 1, device=x.device, dtype=q.dtype)[:, None]
        if cache is not None and T == 1:  # read only the in-edges of the new token
            st, p = cache.state[self.layer_idx], start_pos
            st["k"][:, :, p:p + 1], st["v"][:, :, p:p + 1] = k, v
            st["ksum"] += k[:, :, 0]
            st["vsum"] += v[:, :, 0]
            idx = torch.tensor(sorted({p - o for o in self.offsets() if p - o >= 0} | ({0} if self.sink else set())),
                               device=x.device)
            ke, ve = st["k"].index_select(2, idx), st["v"].index_select(2, idx)
            k_mean, v_mean = (st["ksum"] / (p + 1))[:, :, None], (st["vsum"] / (p + 1))[:, :, None]
            mask = self.edges(torch.tensor([p], device=x.device), idx).to(q.dtype)
            dropped = torch.tensor([[p + 1 - idx.numel()]], device=x.device, dtype=q.dtype)
        else:
            if cache is not None:  # prefill: the key/value history and the running sums
                st = cache.state[self.layer_idx]
                st["k"][:, :, :T], st["v"][:, :, :T] = k, v
                st["ksum"].copy_(k.sum(2))
                st["vsum"].copy_(v.sum(2))
            ke, ve = k, v
            k_mean, v_mean = k.cumsum(2) / count, v.cumsum(2) / count
            pos = torch.arange(start_pos, start_pos + T, device=x.device)
            mask = self.edges(pos, pos).to(q.dtype)
            dropped = count - mask[0].isfinite().sum(-1, keepdim=True)
        expand = lambda t: t.repeat_interleave(group, 1)  # noqa: E731
        y = self._messages(q, expand(ke), expand(ve), mask, expand(k_mean), expand(v_mean), dropped)
        return self.out(y)


class MoEfiedFFN(nn.Module):
    """The teacher's SwiGLU with its neurons regrouped into experts (expert e owns neurons
    [e*h, (e+1)*h) of the gate, up and down weights after a permutation), and a router that picks
    ``top_k`` experts per token. The selected experts' outputs are summed unweighted: with every
    expert selected this is the teacher's FFN exactly (MoEfication), so the router only decides what
    to skip. Training and prefill compute the masked dense form; one-token decoding gathers only the
    selected experts' weights."""

    def __init__(self, dim: int, hidden: int, cfg: FFNSlot):
        super().__init__()
        self.num_experts, self.top_k, self.h = cfg.num_experts, cfg.top_k, hidden // cfg.num_experts
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # [gate | up] rows, each expert-major
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.router = nn.Linear(dim, cfg.num_experts, bias=False)
        for p in (self.w_gate_up.weight, self.w_down.weight, self.router.weight):
            nn.init.normal_(p, std=0.02)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def expert_acts(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return (F.silu(gate) * up).unflatten(-1, (self.num_experts, self.h))  # (..., E, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.route(x).topk(self.top_k, dim=-1).indices
        if x.shape[:-1].numel() == 1:  # decode: run the selected experts only
            e = top.reshape(-1)
            rows = (e[:, None] * self.h + torch.arange(self.h, device=x.device)).reshape(-1)
            half = self.w_down.weight.size(1)
            wg, wu = self.w_gate_up.weight[rows], self.w_gate_up.weight[rows + half]
            act = F.silu(F.linear(x, wg)) * F.linear(x, wu)
            return F.linear(act, self.w_down.weight[:, rows])
        mask = torch.zeros(*top.shape[:-1], self.num_experts, device=x.device, dtype=x.dtype).scatter_(-1, top, 1.0)
        return self.w_down((self.expert_acts(x) * mask[..., None]).flatten(-2))

    def router_loss(self, x: torch.Tensor) -> torch.Tensor:
        """BCE of the router's logits against the ideal expert set: the top_k experts whose outputs
        have the largest norms for this token (MoEfication's router target)."""
        with torch.no_grad():
            acts = self.expert_acts(x)
            w = self.w_down.weight.unflatten(1, (self.num_experts, self.h))  # (dim, E, h)
            norms = torch.einsum("...eh,deh->...ed", acts, w).norm(dim=-1)
            target = torch.zeros_like(norms).scatter_(-1, norms.topk(self.top_k, dim=-1).indices, 1.0)
        return F.binary_cross_entropy_with_logits(self.route(x), target.float())

    @torch.no_grad()
    def init_from(self, teacher: SwiGLU, iters: int, seed: int = 0) -> None:
        gate, up = teacher.w_gate_up.weight.chunk(2, dim=0)
        labels, centroids = balanced_kmeans(F.normalize(gate.float(), dim=-1), self.num_experts, iters, seed)
        perm = torch.argsort(labels, stable=True)
        self.w_gate_up.weight.copy_(torch.cat((gate[perm], up[perm])))
        self.w_down.weight.copy_(teacher.w_down.weight[:, perm])
        # a centroid of gate directions scores the tokens that open its experts' gates
        self.router.weight.copy_(centroids * gate.norm(dim=-1).mean())


def balanced_kmeans(x: torch.Tensor, k: int, iters: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means with equal cluster sizes (len(x) / k each): assignments are made greedily in
    order of similarity, skipping full clusters (``balanced_assign``, shared with the topic partitions).
    Returns (labels, unit centroids)."""
    n = x.size(0)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iters):
        labels = torch.from_numpy(balanced_assign((x @ centroids.T).double().numpy(), np.ones(n), 0.0))
        new = torch.stack([F.normalize(x[labels == c].mean(0), dim=0) for c in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return labels, centroids


class LowRankDecoder(nn.Module):
    """final stream → RMSNorm → rank-r head → logits; started from the teacher's norm and the SVD
    of its output head, fitted by KL to the teacher's logits."""

    def __init__(self, dim: int, vocab: int, rank: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(rank, vocab, bias=False)
        nn.init.normal_(self.u.weight, std=dim ** -0.5)
        nn.init.normal_(self.v.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.u(self.norm(x)))

    @torch.no_grad()
    def init_from(self, norm: RMSNorm, head: torch.Tensor) -> None:
        self.norm.weight.copy_(norm.weight)
        u, s, vh = torch.linalg.svd(head.float(), full_matrices=False)
        r = self.u.weight.size(0)
        self.v.weight.copy_(u[:, :r] * s[:r])
        self.u.weight.copy_(vh[:r])


def build_slot(kind: str, cfg: MoVEConfig) -> nn.Module:
    t = cfg.teacher
    if kind not in MODULE_KINDS:
        raise ValueError(f"module: expected one of {list(MODULE_KINDS)}, found {kind!r}")
    layers = range(t.n_layers)
    if cfg.identity:  # exact copies of the teacher's sublayers
        return {"embedding": lambda: nn.Embedding(t.vocab_size, t.dim),
                "position": lambda: RotaryEmbedding(t.head_dim, t.max_seq_len, t.rope_theta),
                "attention": lambda: nn.ModuleList(Attention(t.dim, t.n_heads, t.n_kv_heads, i) for i in layers),
                "ffn": lambda: nn.ModuleList(SwiGLU(t.dim, t.ffn_dim) for _ in layers),
                "decoder": lambda: nn.Sequential(RMSNorm(t.dim, t.norm_eps),
                                                 nn.Linear(t.dim, t.vocab_size, bias=False))}[kind]()
    if kind == "embedding":
        return LowRankEmbedding(t.vocab_size, t.dim, cfg.embedding.rank)
    if kind == "position":
        return PositionPredictor(t.head_dim, cfg.position.hidden, cfg.position.init_base)
    if kind == "attention":
        cls = HedgehogAttention if cfg.attention.variant == "linear" else GraphAttention
        mods = nn.ModuleList(cls(t.dim, t.n_heads, t.n_kv_heads, i, cfg.attention) for i in layers)
        if not cfg.attention.train_projections and cfg.objective == "fit":
            for mod in mods:
                mod.wqkv.weight.requires_grad_(False)
                mod.wo.weight.requires_grad_(False)
        return mods
    if kind == "ffn":
        return nn.ModuleList(MoEfiedFFN(t.dim, t.ffn_dim, cfg.ffn) for _ in layers)
    return LowRankDecoder(t.dim, t.vocab_size, cfg.decoder.rank, t.norm_eps)


# ----------------------------------------------------------------------------------------------
# The model: teacher + slots, one forward path


@dataclass
class Trace:
    """Every sublayer's input and output along one forward path."""

    emb: torch.Tensor  # embedding output (B, T, dim)
    cos: torch.Tensor  # the positional signal (T, head_dim/2)
    sin: torch.Tensor
    attn_in: list[torch.Tensor] = field(default_factory=list)  # attn_norm(x), what attention reads
    attn_out: list[torch.Tensor] = field(default_factory=list)  # attention output, before the residual add
    ffn_in: list[torch.Tensor] = field(default_factory=list)
    ffn_out: list[torch.Tensor] = field(default_factory=list)
    resid: list[torch.Tensor] = field(default_factory=list)  # residual stream after each layer
    final: torch.Tensor | None = None  # the decoder's input (last residual stream, before the final norm)
    logits: torch.Tensor | None = None


class MoVE(VectorSLM):
    def __init__(self, cfg: MoVEConfig):
        super().__init__(cfg.teacher)  # the teacher's tensors under its own names
        self.move_cfg = cfg
        self.swap = frozenset(cfg.swap)
        for p in self.parameters():
            p.requires_grad_(False)  # the teacher is frozen whatever train.trainable says
        self.move = nn.ModuleDict({kind: build_slot(kind, cfg) for kind in MODULE_KINDS if kind in self.swap})
        self.capabilities = Capabilities(generation=True, max_positions=cfg.max_seq_len)

    # -- building ---------------------------------------------------------------------------

    @torch.no_grad()
    def init_from_teacher(self, seed: int = 0) -> None:
        """Start every module from the teacher's (already loaded) weights."""
        m, t = self.move, self.move_cfg
        if t.identity:
            own = {"embedding": self.tok_emb, "position": self.rope, "decoder": nn.Sequential(self.norm, self.lm_head)}
            for kind in self.swap:
                if kind in ("attention", "ffn"):
                    for mod, layer in zip(m[kind], self.layers):
                        mod.load_state_dict((layer.attn if kind == "attention" else layer.ffn).state_dict())
                else:
                    m[kind].load_state_dict(own[kind].state_dict())
            return
        if "embedding" in m:
            m["embedding"].init_from(self.tok_emb.weight)
        if "attention" in m:
            for mod, layer in zip(m["attention"], self.layers):
                mod.wqkv.weight.copy_(layer.attn.wqkv.weight)
                mod.wo.weight.copy_(layer.attn.wo.weight)
        if "ffn" in m:
            for i, (mod, layer) in enumerate(zip(m["ffn"], self.layers)):
                mod.init_from(layer.ffn, t.ffn.cluster_iters, seed + i)
        if "decoder" in m:
            m["decoder"].init_from(self.norm, self.lm_head.weight)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None) -> MoVECache:
        kv = None
        if "attention" not in self.swap or self.move_cfg.identity:
            kv = super().new_cache(batch_size, max_len, device, dtype)
        cache = MoVECache(kv, batch_size, max_len)
        if kv is None:  # every layer's attention is a module with its own state
            p = self.tok_emb.weight
            for i, mod in enumerate(self.move["attention"]):
                cache.state[i] = mod.new_state(batch_size, max_len, device if device is not None else p.device,
                                               dtype or p.dtype)
        return cache

    def student_parameters(self) -> int:
        """Parameters on the student's path (the teacher's unswapped sublayers included)."""
        used = [self.move]
        for i, layer in enumerate(self.layers):
            used += [layer.attn_norm, layer.ffn_norm]
            used += [] if "attention" in self.swap else [layer.attn]
            used += [] if "ffn" in self.swap else [layer.ffn]
        used += [] if "embedding" in self.swap else [self.tok_emb]
        used += [] if "decoder" in self.swap else [self.norm, self.lm_head]
        return sum(p.numel() for p in {id(p): p for mod in used for p in mod.parameters()}.values())

    # -- the forward path -------------------------------------------------------------------

    def path(self, ids: torch.Tensor, use: frozenset = frozenset(), cache=None, start_pos: int = 0,
             logits_to_keep: int = 0, trace: bool = False) -> Trace:
        """The teacher's forward with the slots in ``use`` replaced by their modules."""
        m = self.move
        x = m["embedding"](ids) if "embedding" in use else self.tok_emb(ids)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = (m["position"] if "position" in use else self.rope)(start_pos, ids.size(1), dtype)
        tr = Trace(emb=x, cos=cos, sin=sin)
        for i, layer in enumerate(self.layers):
            a_in = layer.attn_norm(x)
            a = (m["attention"][i] if "attention" in use else layer.attn)(a_in, cos, sin, cache, start_pos)
            x = x + a
            f_in = layer.ffn_norm(x)
            f = (m["ffn"][i] if "ffn" in use else layer.ffn)(f_in)
            x = x + f
            if trace:
                tr.attn_in.append(a_in), tr.attn_out.append(a), tr.ffn_in.append(f_in), tr.ffn_out.append(f)
                tr.resid.append(x)
        tr.final = x
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        tr.logits = m["decoder"](x) if "decoder" in use else self.lm_head(self.norm(x))
        return tr

    def _rotated_qk(self, i: int, a_in: torch.Tensor, cos, sin) -> torch.Tensor:
        """The teacher's layer-i q and k heads for input a_in, rotated by (cos, sin): what the
        positional signal is consumed as."""
        attn = self.layers[i].attn
        B, T, _ = a_in.shape
        with torch.no_grad():
            qkv = attn.wqkv(a_in).view(B, T, attn.n_heads + 2 * attn.n_kv_heads, attn.head_dim)
            qk = qkv[:, :, : attn.n_heads + attn.n_kv_heads]
        return apply_rotary(qk, cos, sin).flatten(-2)

    def module_outputs(self, kind: str, ids: torch.Tensor, t: Trace,
                       s: Trace | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, output, teacher's output) per slot of ``kind``: the module fed the teacher's inputs
        (``t``), or, given the student's trace ``s``, the output it produced fed its own inputs."""
        m = self.move[kind]
        layers = range(len(self.layers))
        if kind == "embedding":
            return [("embedding", s.emb if s else m(ids), t.emb)]
        if kind == "decoder":
            return [("decoder", s.logits if s else m(t.final), t.logits)]
        if kind == "attention":
            return [(f"attention/layer{i}", s.attn_out[i] if s else m[i](t.attn_in[i], t.cos, t.sin), t.attn_out[i])
                    for i in layers]
        if kind == "ffn":
            return [(f"ffn/layer{i}", s.ffn_out[i] if s else m[i](t.ffn_in[i]), t.ffn_out[i]) for i in layers]
        src = s or t  # position: the student's own q/k input (its stream), rotated by the predicted signal
        cos, sin = (s.cos, s.sin) if s else m(0, t.emb.size(1), t.cos.dtype)
        return [(f"position/layer{i}", self._rotated_qk(i, src.attn_in[i], cos, sin),
                 self._rotated_qk(i, t.attn_in[i], t.cos, t.sin)) for i in layers]

    def fit_loss(self, ids: torch.Tensor, t: Trace) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each swapped module on the teacher's inputs: relative squared error of its output (KL for
        the decoder, plus the router's BCE for the MoE FFN), averaged over its layers."""
        losses, logs = [], {}
        for kind in sorted(self.swap):
            outs = self.module_outputs(kind, ids, t)
            if kind == "decoder":
                loss = kl_div(outs[0][1], t.logits).mean()
            else:
                loss = torch.stack([rel_err(p, y) for _, p, y in outs]).mean()
            if kind == "ffn" and not self.move_cfg.identity:
                router = torch.stack([mod.router_loss(x) for mod, x in zip(self.move["ffn"], t.ffn_in)]).mean()
                logs["move/ffn/router_bce"] = router.detach()
                loss = loss + self.move_cfg.ffn.router_weight * router
            logs[f"move/{kind}/loss"] = loss.detach()
            cos = torch.stack([cos_sim(p, y, kind == "decoder").mean() for _, p, y in outs]).mean()
            logs[f"move/{kind}/cos"] = cos.detach()
            losses.append(loss)
        return torch.stack(losses).sum(), logs

    def forward(self, batch: Batch, *, cache=None, start_pos: int = 0, logits_to_keep: int = 0) -> ModelOutput:
        ids, labels = batch["input_ids"], batch.get("labels")
        if labels is None or cache is not None:  # generation: the student alone
            return ModelOutput(logits=self.path(ids, self.swap, cache, start_pos, logits_to_keep).logits)
        with torch.no_grad():
            t = self.path(ids, trace=True)
        if self.training and self.move_cfg.objective == "fit":
            loss, logs = self.fit_loss(ids, t)
            return ModelOutput(logits=t.logits, loss=loss, metrics=_floats(logs))
        s = self.path(ids, self.swap, trace=not self.training)
        kl = kl_div(s.logits, t.logits)
        if self.training:  # distill: the assembled student end to end on the teacher's logits
            loss = kl.mean()
            ce = lm_cross_entropy(s.logits.detach(), labels)
            return ModelOutput(logits=s.logits, loss=loss, metrics=_floats({"move/kl": loss.detach(), "move/ce": ce}))
        return ModelOutput(logits=s.logits, lm_loss=lm_cross_entropy(s.logits, labels),
                           eval_sums=self.eval_sums(ids, labels, t, s, kl))

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def eval_sums(self, ids, labels, t: Trace, s: Trace, kl: torch.Tensor) -> dict[str, torch.Tensor]:
        sums = {"tokens": torch.tensor(float(ids.numel())), "kl": kl.sum()}
        valid = labels != -100
        ce = lambda lg: F.cross_entropy(lg.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")  # noqa: E731
        sums.update(label_tokens=valid.sum().float(), teacher_nats=ce(t.logits), student_nats=ce(s.logits))
        for kind in self.swap:
            for mode, outs in (("teacher_in", self.module_outputs(kind, ids, t)),
                               ("student_in", self.module_outputs(kind, ids, t, s))):
                for name, p, y in outs:
                    sums[f"cos/{name}/{mode}"] = cos_sim(p, y, kind == "decoder").sum()
                    sums[f"mse/{name}/{mode}"] = (p.float() - y.float()).pow(2).mean(-1).sum()
        for i, (x, y) in enumerate(zip(s.resid, t.resid)):
            sums[f"cos/resid/layer{i}"] = cos_sim(x, y).sum()
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("tokens", 0.0), 1.0)
        out = {k: v / n for k, v in sums.items() if k.startswith(("cos/", "mse/"))}
        for kind in PER_LAYER:
            for mode in ("teacher_in", "student_in"):
                layers = [v for k, v in out.items() if k.startswith(f"cos/{kind}/layer") and k.endswith(mode)]
                if layers:
                    out[f"cos/{kind}/{mode}"] = sum(layers) / len(layers)
                    out[f"cos/{kind}/{mode}_min"] = min(layers)
        if "kl" in sums:
            out["kl"] = sums["kl"] / n
        if sums.get("teacher_nats"):
            out["teacher_loss"] = sums["teacher_nats"] / max(sums.get("label_tokens", 0.0), 1.0)
            out["bpb_ratio"] = sums["student_nats"] / sums["teacher_nats"]  # same bytes: bpb(student)/bpb(teacher)
        return out


def rel_err(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of |p - y|^2 / |y|^2: scale-free, so every layer weighs the same (≈ 2(1 - cos))."""
    p, y = p.float(), y.float()
    return ((p - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(1e-12)).mean()


def cos_sim(p: torch.Tensor, y: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Per-token cosine over the last dim; ``centre`` removes each row's mean first (logits: a shift
    of every logit changes nothing after the softmax, so it must not count)."""
    p, y = p.float(), y.float()
    if centre:
        p, y = p - p.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    return F.cosine_similarity(p, y, dim=-1, eps=1e-8)


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, in nats."""
    lt, ls = teacher_logits.float().log_softmax(-1), student_logits.float().log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def _floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    return dict(zip(logs, torch.stack([v.float() for v in logs.values()]).tolist())) if logs else {}


# ----------------------------------------------------------------------------------------------
# Teachers and module checkpoints


class MoVEInputError(SlmlabError, ValueError):
    """A teacher that is not Llama-shaped, or a module checkpoint that does not fit its slot."""


def load_teacher(path: str | Path) -> tuple[VectorSLMConfig, VectorSLM]:
    """A frozen fp32 teacher from a platform model folder (model.safetensors + model_config.json of
    a dense VectorSLM) or a transformers Llama folder (config.json + safetensors)."""
    from slmlab.train.checkpoint import CONFIG_FILE, load_model_dir

    path = Path(path)
    if (path / CONFIG_FILE).exists():
        family = json.loads((path / CONFIG_FILE).read_text()).get("family")
        if family != "vectorslm":
            raise MoVEInputError(f"{path / CONFIG_FILE}: family: expected a Llama-shaped teacher ('vectorslm'), "
                                 f"found {family!r}")
        cfg, model = load_model_dir(path)
    elif (path / "config.json").exists():
        from slmlab.hf_interop import import_hf

        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "llama":
            raise MoVEInputError(f"{path / 'config.json'}: model_type: expected 'llama' (a Llama-shaped teacher), "
                                 f"found {model_type!r}")
        try:
            cfg, model = import_hf(path)
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise MoVEInputError(f"{path}: expected a Llama checkpoint VectorSLM can load, found: {err}") from None
    else:
        raise MoVEInputError(f"{path}: expected a model folder (model_config.json) or a transformers Llama folder "
                             f"(config.json), found neither")
    if cfg.moe is not None:
        raise MoVEInputError(f"{path}: expected a dense Llama-shaped teacher (SwiGLU FFN), found a mixture of experts")
    return cfg, model.float().eval()


def load_module(model: MoVE, kind: str, folder: str | Path) -> None:
    """Copy the ``move.<kind>.*`` tensors of a module run's model folder into ``model``'s slot;
    a checkpoint of another kind, variant or size is an error naming the folder and the tensors."""
    from safetensors import safe_open

    from slmlab.train.checkpoint import CONFIG_FILE, MODEL_FILE

    folder = Path(folder)
    if kind not in model.move:
        raise MoVEInputError(f"module {kind!r}: expected one of the model's slots {sorted(model.move)}, found none")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise MoVEInputError(f"{folder}: expected a module checkpoint ({CONFIG_FILE}), found no such file") from None
    if raw.get("family") != "move" or kind not in raw.get("swap", []):
        raise MoVEInputError(f"{folder / CONFIG_FILE}: expected a MoVE checkpoint holding the {kind!r} module, found "
                             f"family {raw.get('family')!r} with modules {raw.get('swap')}")
    prefix = f"move.{kind}."
    want = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    with safe_open(str(folder / MODEL_FILE), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}
        wrong = [f"{k} {have[k]} (slot {tuple(v.shape)})" for k, v in want.items()
                 if k in have and have[k] != tuple(v.shape)]
        missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if wrong or missing or unexpected:
            slot = getattr(model.move_cfg, kind).model_dump()
            parts = [f"wrong shape {', '.join(wrong[:4])}" if wrong else "",
                     f"missing {', '.join(missing[:4])}" if missing else "",
                     f"unexpected {', '.join(unexpected[:4])}" if unexpected else ""]
            raise MoVEInputError(f"{folder / MODEL_FILE}: expected the tensors of the {kind!r} slot {slot}, found "
                                 + "; ".join(p for p in parts if p))
        with torch.no_grad():
            for k, v in want.items():
                v.copy_(f.get_tensor(k))


register_family("move", MoVEConfig, MoVE)
