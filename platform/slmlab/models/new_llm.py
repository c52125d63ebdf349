"""New-LLM: an attention-free language model whose only memory is a fixed-size context vector.

    tokens -> tok_emb -> n_layers x ContextLayer -> norm -> lm_head (tied to tok_emb by default) -> logits

    ContextLayer (per position t; u_t is the layer's normalised input, c_t its context vector):
        u_t = norm_x(h_t)
        b_t = W_write u_t                                   what token t adds to the context
        a_t = exp(-MAX_FORGET * sigmoid(W_decay u_t + d))   how much of the old context survives (gate)
        c_t = a_t * c_{t-1} + b_t                           additive update, c_{-1} = 0 (or the cache)
        h_t <- h_t + FFN([norm_c(c_t), u_t])                nonlinear read of [context, token], SwiGLU

There is no attention and no positional embedding: the order of tokens reaches the model only through
the recurrence (the decay, and the depth: layer l writes from h_t, which already read layer l-1's
context). At inference a sequence costs ``n_layers * context_dim`` numbers of state whatever its
length (``NewLLMState``), so memory is constant in sequence length and a decode step is O(1).

``gate`` picks the decay a_t: "none" (a_t = 1, a pure running sum -- the original New-LLM's additive
context), "scalar" (one data-dependent decay per token, shared by all channels) or "vector" (one per
token and channel; the bias is initialised so channel half-lives are log-spaced from 1 token to
max_seq_len tokens). ``norm`` picks the normalisation of the token stream and of the context read.

Design choice: a linear recurrence, solved in parallel for training
-------------------------------------------------------------------
The original New-LLM updates the context with an FFN of [c_{t-1}, x_t], which is nonlinear in
c_{t-1} and forces a Python loop over positions during training (T sequential small matmuls). Here
the per-token coefficients a_t, b_t depend only on the token stream (the layer's input), never on
c_{t-1}, so c_t = a_t * c_{t-1} + b_t is a *linear* (diagonal) recurrence and the whole sequence is
solved at once (``linear_scan``): inside chunks of SCAN_CHUNK tokens by cumulative sums in log space,
c_t = exp(L_t) * cumsum_s(exp(-L_s) * b_s) with L_t = cumsum(log a) relative to the chunk start, and
across chunks by a log-depth (Hillis-Steele) scan over the chunk summaries. The nonlinear FFN then
acts on [c_t, u_t] for every position in parallel. A decode step uses the plain recurrence; both
forms agree to fp32 rounding (tests/test_new_llm.py checks 1e-5 on the logits).

What it costs:
  * Expressivity. Within one layer the context is a weighted sum of per-token writes with weights
    fixed by the tokens themselves; the model cannot decide what to write *given what it has already
    stored* (no "if already seen X, write Y"). Only depth provides that: layer l's writes are
    functions of layer l-1's context, so a stack of L layers has L rounds of nonlinear
    context->write interaction instead of one per token. With gate="none" and one layer the context is
    an order-free bag of the prefix. This is the same trade that linear RNNs / SSMs (S4, Mamba,
    minGRU, GLA) make for parallel training.
  * Numerics. The scan runs in fp32 whatever the model dtype (bf16 accumulation over thousands of
    tokens drifts), and the state is kept in fp32. exp(-L) overflows fp32 beyond e^88, so the decay
    is bounded, log a_t >= -MAX_FORGET (a_t >= e^-4 ~ 0.018: at least 98% forgotten per token is
    still available), and chunks are short, SCAN_CHUNK * MAX_FORGET = 64 < 88. Cross-chunk carries
    are products of decays (no exp), so they underflow gracefully to 0. With gate="none" the context
    norm grows with t (a running sum), which is why gate="none" requires a norm on the read.
  * Training memory. The parallel form keeps about six fp32 (batch, seq, context_dim) tensors per
    layer for backward (log-decay cumsum, its exp and exp(-), the weighted cumsum, the chunk-local
    state, the output), i.e. O(seq * context_dim) -- linear in length, no seq^2 term, but more than
    the O(context_dim) a nonlinear recurrence trained by a Python loop would store per *step* (the
    loop stores the same in total, plus being T times more sequential).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from slmlab.models.base import (
    Batch,
    Capabilities,
    FamilyConfig,
    LanguageModel,
    ModelOutput,
    lm_cross_entropy,
    register_family,
)
from slmlab.models.layers import RMSNorm

SCAN_CHUNK = 16  # tokens per chunk of the parallel scan; SCAN_CHUNK * MAX_FORGET must stay < 88 (fp32 exp)
MAX_FORGET = 4.0  # bound on -log(a_t): the strongest per-token decay is a_t = e^-4


# ----------------------------------------------------------------------------------------------
# Config


class NewLLMConfig(FamilyConfig):
    family: Literal["new_llm"] = "new_llm"  # selects this file in the family registry
    dim: int = Field(512, ge=1)  # token-stream (residual) width: embeddings, FFN outputs, the head's input
    context_dim: int = Field(512, ge=1)  # size of each layer's context vector = the model's whole memory per layer
    n_layers: int = Field(8, ge=1)  # depth; also the number of nonlinear context->write rounds (see docstring)
    ffn_hidden: int = Field(1536, ge=1)  # SwiGLU width of the read FFN on [context, token]; most parameters live here
    gate: Literal["none", "scalar", "vector"] = (
        "vector"  # decay of the old context: none = running sum, else learned forgetting
    )
    norm: Literal["rmsnorm", "layernorm", "none"] = (
        "rmsnorm"  # token stream and context read; keeps a growing sum usable
    )
    norm_eps: float = Field(1e-5, gt=0)  # epsilon of the norms; guards tiny activations
    tie_embeddings: bool = True  # share input embedding and output head: saves vocab*dim params at small scale
    init_std: float = Field(0.02, gt=0)  # std of the normal init; the FFN's residual output gets /sqrt(2*n_layers)

    @field_validator("gate")
    @classmethod
    def _sum_needs_norm_on_assignment(cls, gate: str, info: ValidationInfo) -> str:
        # norm is declared after gate, so this only fires on assignment (cfg.gate = "none" with norm "none")
        if gate == "none" and info.data.get("norm") == "none":
            raise ValueError(
                "expected 'scalar' or 'vector' when norm='none' "
                "(gate='none' makes the context an unbounded running sum), found 'none'"
            )
        return gate

    @field_validator("norm")
    @classmethod
    def _sum_needs_norm(cls, norm: str, info: ValidationInfo) -> str:
        # gate="none" makes the context a running sum whose size grows with t; read unnormalised, the
        # FFN input scale would depend on position and explode over long sequences.
        if norm == "none" and info.data.get("gate") == "none":
            raise ValueError(
                "expected 'rmsnorm' or 'layernorm' when gate='none' "
                "(the context is an unbounded running sum), found 'none'"
            )
        return norm


# ----------------------------------------------------------------------------------------------
# The parallel linear scan


def _scan_log_depth(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of x_n = a_n * x_{n-1} + b_n (x_{-1} = 0) along dim 1 in ceil(log2 n) steps
    (Hillis-Steele). Only products and sums of decays, no exp: stable for any a in [0, 1]."""
    n, d = b.size(1), 1
    while d < n:
        b = torch.cat([b[:, :d], b[:, d:] + a[:, d:] * b[:, :-d]], dim=1)  # compose with the element d back
        a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], dim=1)
        d *= 2
    return b


def linear_scan(log_a: torch.Tensor | None, b: torch.Tensor, c0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of c_t = exp(log_a_t) * c_{t-1} + b_t, t = 0..T-1, starting from c_{-1} = c0.

    log_a: (B, T, 1 or C) in [-MAX_FORGET, 0], or None for a_t = 1; b: (B, T, C); c0: (B, C) or None
    (zeros). Returns (B, T, C) in fp32. T == 1 is the plain recurrence step (decoding)."""
    B, T, C = b.shape
    with torch.autocast(device_type=b.device.type, enabled=False):
        b = b.float()
        c0 = b.new_zeros(B, C) if c0 is None else c0.float()
        if log_a is None:  # gate="none": a running sum
            return c0[:, None] + b.cumsum(dim=1)
        log_a = log_a.float()
        if T == 1:  # the recurrence itself
            return log_a.exp() * c0[:, None] + b

        K = SCAN_CHUNK
        pad = (-T) % K
        if pad:  # padded steps (a=1, b=0) only follow the real ones and are dropped at the end
            log_a, b = F.pad(log_a, (0, 0, 0, pad)), F.pad(b, (0, 0, 0, pad))
        N = (T + pad) // K
        L = log_a.reshape(B, N, K, -1).cumsum(dim=2)  # log of the decay from the chunk start through t, in [-64, 0]
        b = b.reshape(B, N, K, C)
        decay = L.exp()
        local = decay * (b * (-L).exp()).cumsum(dim=2)  # sum_{s<=t} exp(L_t - L_s) b_s: state if the chunk began at 0

        # carry across chunks: state entering chunk n is S_{n-1}, S_n = A_n * S_{n-1} + E_n, S_{-1} = c0
        A, E = decay[:, :, -1], local[:, :, -1]
        E = torch.cat([E[:, :1] + A[:, :1] * c0[:, None], E[:, 1:]], dim=1)
        S = _scan_log_depth(A, E)
        enter = torch.cat([c0[:, None], S[:, :-1]], dim=1)
        c = local + decay * enter[:, :, None]
        return c.reshape(B, N * K, C)[:, :T]


# ----------------------------------------------------------------------------------------------
# Inference state


@dataclass
class NewLLMState:
    """Everything New-LLM carries from one token to the next: one context vector per layer.

    Its size is n_layers * batch * context_dim, independent of how many tokens have been (or will
    be) processed; kept in fp32 since it is a long-running accumulator."""

    context: torch.Tensor  # (n_layers, batch, context_dim), updated in place
    pos: int = 0  # tokens consumed so far; forward checks start_pos against it (a state cannot rewind)

    @property
    def nbytes(self) -> int:
        return self.context.numel() * self.context.element_size()


# ----------------------------------------------------------------------------------------------
# Model


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    return nn.Identity()


class ReadFFN(nn.Module):
    """SwiGLU from [context, token] (context_dim + dim) back to the token stream (dim)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w_gate_up = nn.Linear(in_dim, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class ContextLayer(nn.Module):
    def __init__(self, cfg: NewLLMConfig):
        super().__init__()
        self.norm_x = _norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.write = nn.Linear(cfg.dim, cfg.context_dim, bias=False)  # b_t, the additive update
        self.decay = None  # a_t = 1
        if cfg.gate != "none":
            self.decay = nn.Linear(cfg.dim, 1 if cfg.gate == "scalar" else cfg.context_dim, bias=True)
        self.norm_c = _norm(cfg.norm, cfg.context_dim, cfg.norm_eps)
        self.ffn = ReadFFN(cfg.context_dim + cfg.dim, cfg.ffn_hidden, cfg.dim)

    def forward(self, h: torch.Tensor, c0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, T, dim) -> (h + FFN([c, u]), last context (B, context_dim) in fp32)."""
        u = self.norm_x(h)
        log_a = None
        if self.decay is not None:
            log_a = -MAX_FORGET * torch.sigmoid(self.decay(u).float())
        c = linear_scan(log_a, self.write(u), c0)
        read = self.norm_c(c.to(u.dtype))
        return h + self.ffn(torch.cat([read, u], dim=-1)), c[:, -1]


class NewLLM(LanguageModel):
    # no positions anywhere: a sequence can run past max_seq_len (the state is the same size)
    capabilities = Capabilities(generation=True, max_positions=None)

    def __init__(self, cfg: NewLLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(ContextLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, cfg.init_std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for layer in self.layers:
            layer.ffn.w_down.weight.normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))  # writes into the residual
            if layer.decay is not None:
                # half-lives log-spaced over [1, max_seq_len] tokens (one mid-range value for "scalar"):
                # a = 0.5 ** (1 / half_life)  <=>  MAX_FORGET * sigmoid(bias) = ln 2 / half_life
                n = layer.decay.bias.numel()
                t = torch.linspace(0, 1, n) if n > 1 else torch.full((1,), 0.5)
                half_life = float(cfg.max_seq_len) ** t
                layer.decay.bias.copy_(torch.logit(math.log(2) / (MAX_FORGET * half_life)))

    def new_cache(
        self, batch_size: int, max_len: int | None = None, device=None, dtype: torch.dtype | None = None
    ) -> NewLLMState:
        """Zero context for batch_size sequences. ``max_len`` is accepted for the generic generator
        and ignored: the state does not grow with length. Kept in fp32 (fp64 if asked) whatever the
        model dtype, since it accumulates over the whole sequence."""
        p = self.tok_emb.weight
        dtype = torch.promote_types(dtype or p.dtype, torch.float32)
        context = torch.zeros(
            self.cfg.n_layers,
            batch_size,
            self.cfg.context_dim,
            device=device if device is not None else p.device,
            dtype=dtype,
        )
        return NewLLMState(context)

    def forward(
        self, batch: Batch, *, cache: NewLLMState | None = None, start_pos: int = 0, logits_to_keep: int = 0
    ) -> ModelOutput:
        """batch["input_ids"] (batch, seq). With ``cache`` the sequence continues from the cached context (which
        must hold exactly ``start_pos`` tokens) and the cache is advanced in place; gradients do not
        flow into the cache. Without it, positions are irrelevant (no positional embeddings) and
        ``start_pos`` is ignored. ``labels`` are aligned with the logits; ``logits_to_keep=n`` computes
        only the last n logits."""
        input_ids, labels = batch["input_ids"], batch.get("labels")
        if cache is not None:
            if start_pos != cache.pos:
                raise ValueError(
                    f"start_pos: the New-LLM state holds {cache.pos} tokens and cannot rewind or "
                    f"skip; expected start_pos={cache.pos}, found {start_pos}"
                )
            if cache.context.size(1) != input_ids.size(0):
                raise ValueError(f"cache is for batch size {cache.context.size(1)}, input has {input_ids.size(0)}")
        x = self.tok_emb(input_ids)
        for i, layer in enumerate(self.layers):
            # a clone, so the in-place cache update below never touches a tensor autograd saved
            x, c_last = layer(x, cache.context[i].clone() if cache is not None else None)
            if cache is not None:
                cache.context[i].copy_(c_last.detach())
        if cache is not None:
            cache.pos += input_ids.size(1)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)

        out = ModelOutput(logits=logits)
        if labels is not None:
            out.lm_loss = lm_cross_entropy(logits, labels)
            out.loss = out.lm_loss
        return out


register_family("new_llm", NewLLMConfig, NewLLM)
