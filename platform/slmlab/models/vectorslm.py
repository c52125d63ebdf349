"""VectorSLM: a Llama-style decoder (optionally Mixtral-style MoE), read top to bottom.

    tokens -> tok_emb -> n_layers x Block -> norm -> lm_head (tied to tok_emb by default) -> logits
    Block:  h = x + attn(attn_norm(x));  out = h + ffn(ffn_norm(h))      (pre-norm residual)

Numerically it is HF ``LlamaForCausalLM`` (dense) / ``MixtralForCausalLM`` (``moe`` set); it differs only
in how weights are stored (fused QKV, fused gate/up) for speed. Export to transformers is therefore a
rename table (``slmlab.hf_interop`` applies it), with fused tensors split along dim 0:

    ours                                   transformers
    tok_emb.weight                         model.embed_tokens.weight
    layers.{i}.attn_norm.weight            model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.wqkv.weight            model.layers.{i}.self_attn.{q,k,v}_proj.weight  (split rows
                                             n_heads*hd | n_kv_heads*hd | n_kv_heads*hd)
    layers.{i}.attn.wo.weight              model.layers.{i}.self_attn.o_proj.weight
    layers.{i}.ffn_norm.weight             model.layers.{i}.post_attention_layernorm.weight
    dense:
    layers.{i}.ffn.w_gate_up.weight        model.layers.{i}.mlp.{gate,up}_proj.weight  (split rows in half)
    layers.{i}.ffn.w_down.weight           model.layers.{i}.mlp.down_proj.weight
    MoE (Mixtral checkpoint layout, as transformers' save_pretrained writes it):
    layers.{i}.ffn.router.weight           model.layers.{i}.block_sparse_moe.gate.weight
    layers.{i}.ffn.w_gate_up[e]            model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3}.weight
    layers.{i}.ffn.w_down[e]               model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight
    norm.weight                            model.norm.weight
    lm_head.weight                         lm_head.weight   (written only when untied)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
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
from slmlab.models.layers import Attention, KVCache, MoEConfig, MoEFeedForward, RMSNorm, RotaryEmbedding, SwiGLU

# ----------------------------------------------------------------------------------------------
# Config


class VectorSLMConfig(FamilyConfig):
    family: Literal["vectorslm"] = "vectorslm"  # selects this file in the family registry
    dim: int = Field(512, ge=1)  # residual stream width; sets most of the parameter count
    n_layers: int = Field(8, ge=1)  # depth; each layer adds ~12*dim^2 parameters (dense)
    n_heads: int = Field(8, ge=1)  # query heads; head_dim = dim / n_heads, must be even for rotary
    n_kv_heads: int = Field(8, ge=1)  # key/value heads (GQA); fewer shrink the KV cache and decode cost
    ffn_hidden: int | None = Field(None, ge=1)  # SwiGLU width; None -> Llama's 8/3*dim rounded up to multiple_of
    multiple_of: int = Field(64, ge=1)  # rounding for the derived ffn_hidden, keeps matmuls hardware-friendly
    rope_theta: float = Field(10000.0, gt=0)  # rotary base; larger values suit longer contexts
    norm_eps: float = Field(1e-5, gt=0)  # RMSNorm epsilon (Llama uses 1e-5/1e-6); guards tiny activations
    tie_embeddings: bool = True  # share input embedding and output head: saves vocab*dim params at small scale
    moe: MoEConfig | None = None  # None = dense SwiGLU FFN; set = Mixtral-style sparse experts in every layer
    init_std: float = Field(0.02, gt=0)  # std of the normal init; residual output projections get /sqrt(2*n_layers)

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_dim(cls, n_heads: int, info: ValidationInfo) -> int:
        dim = info.data.get("dim")
        if dim is None:  # dim itself failed validation; that error is already reported
            return n_heads
        if dim % n_heads:
            raise ValueError(f"expected a divisor of dim={dim}, found {n_heads}")
        if (dim // n_heads) % 2:
            raise ValueError(
                f"expected a head count giving an even head_dim for rotary embeddings (dim={dim}), "
                f"found {n_heads} (head_dim={dim // n_heads})"
            )
        return n_heads

    @field_validator("n_kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, n_kv_heads: int, info: ValidationInfo) -> int:
        n_heads = info.data.get("n_heads")
        if n_heads is not None and n_heads % n_kv_heads:
            raise ValueError(f"expected a divisor of n_heads={n_heads}, found {n_kv_heads}")
        return n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Resolved SwiGLU hidden width (per expert when MoE)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# ----------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    def __init__(self, cfg: VectorSLMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.moe) if cfg.moe else SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, cache=None, start_pos=0, key_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos, key_mask)
        h = self.ffn(self.ffn_norm(x))
        aux = None
        if isinstance(h, tuple):  # MoE returns (output, MoEAux)
            h, aux = h
        return x + h, aux


class VectorSLM(LanguageModel):
    def __init__(self, cfg: VectorSLMConfig):
        super().__init__()
        self.cfg = cfg
        # rotary tables bound the positions; the layout is Llama's, or Mixtral's with MoE
        self.capabilities = Capabilities(
            generation=True,
            padded_generation=True,
            max_positions=cfg.max_seq_len,
            fixed_shape_decode=cfg.moe is None,  # MoE dispatch sizes depend on routing: no fixed shapes
            hf_export="MixtralForCausalLM" if cfg.moe else "LlamaForCausalLM",
        )
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down.weight", "w_down")):  # writes into the residual stream
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """Static KV cache for generation: max_len positions for each of batch_size sequences."""
        p = self.tok_emb.weight
        return KVCache(
            self.cfg.n_layers,
            batch_size,
            self.cfg.n_kv_heads,
            max_len,
            self.cfg.head_dim,
            device=device if device is not None else p.device,
            dtype=dtype or p.dtype,
        )

    @staticmethod
    def _fixed_shape_step(input_ids, cache, start_pos, mask):
        """The key mask and rotary positions of a decode step whose position is a tensor: every shape is
        fixed (the query reads all cache slots, those after the position masked out), so the step compiles
        once and replays as a CUDA graph (``generation.generate(..., compile_step=True)``)."""
        if cache is None or input_ids.size(1) != 1 or start_pos.shape != (1,):
            raise ValueError(
                "a tensor start_pos is the fixed-shape decode step: expected one token, a cache and a position "
                f"of shape (1,), found {input_ids.size(1)} tokens, cache={cache is not None}, "
                f"position shape {tuple(start_pos.shape)}"
            )
        visible = (cache.slots <= start_pos)[None]  # (1, cache slots)
        if mask is None:
            return visible, start_pos.expand(input_ids.size(0), 1)
        if mask.shape != (input_ids.size(0), cache.max_len):
            raise ValueError(
                f"attention_mask: the fixed-shape step expects shape {(input_ids.size(0), cache.max_len)} (batch, "
                f"every cache slot), found {tuple(mask.shape)}"
            )
        mask = mask.bool()
        positions = (mask.cumsum(-1) - 1).clamp(min=0).index_select(1, start_pos)  # as in the unpadded path
        return mask & visible, positions

    def forward(
        self,
        batch: Batch,
        *,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """batch["input_ids"] (batch, seq) at positions [start_pos, start_pos+seq). With ``cache`` the keys/values
        are stored there and earlier positions are read from it. ``labels`` are aligned with the
        logits (labels[t] is the target at t). ``logits_to_keep=n`` computes only the last n logits
        (generation needs 1). Metrics (aux losses, expert load) are reported when labels are given.

        ``batch["attention_mask"]`` (optional, batch x start_pos+seq, 1 = real token, 0 = left padding)
        covers every position so far, the cached ones too: padded keys are masked out and each row's
        rotary positions count its real tokens only, so a left-padded prompt computes what it would alone."""
        input_ids, labels = batch["input_ids"], batch.get("labels")
        T = input_ids.size(1)
        key_mask = positions = None
        if isinstance(start_pos, torch.Tensor):
            key_mask, positions = self._fixed_shape_step(input_ids, cache, start_pos, batch.get("attention_mask"))
        elif (mask := batch.get("attention_mask")) is not None:
            if mask.shape != (input_ids.size(0), start_pos + T):
                raise ValueError(
                    f"attention_mask: expected shape {(input_ids.size(0), start_pos + T)} (batch, start_pos + "
                    f"seq: every position so far), found {tuple(mask.shape)}"
                )
            key_mask = mask.bool()
            # A row's first real token is position 0 (padding gets 0 too; it only attends to itself). Rotary
            # scores depend on relative positions only, so this buys exactness: the same cos/sin entries,
            # hence the same rounding, as the prompt alone (a shift by the padding differs in bf16).
            positions = (key_mask.cumsum(-1) - 1).clamp(min=0)[:, start_pos:]
        x = self.tok_emb(input_ids)
        cos, sin = self.rope(
            start_pos,
            T,
            x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type),
            positions,
        )
        auxes = []
        for layer in self.layers:
            x, aux = layer(x, cos, sin, cache, start_pos, key_mask)
            if aux is not None:
                auxes.append(aux)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)

        out = ModelOutput(logits=logits)
        if labels is None:
            return out
        out.lm_loss = lm_cross_entropy(logits, labels)
        out.loss = out.lm_loss
        if auxes:
            moe = self.cfg.moe
            lb = torch.stack([a.load_balance for a in auxes]).mean()  # mean over layers: weight is depth-free
            z = torch.stack([a.z_loss for a in auxes]).mean()
            out.loss = out.lm_loss + moe.load_balance_weight * lb + moe.z_loss_weight * z
            names, values = ["moe/load_balance", "moe/z_loss"], [lb, z]
            for i, a in enumerate(auxes):
                names += [f"moe/layer{i}/load_balance", f"moe/layer{i}/z_loss", f"moe/layer{i}/dropped_frac"]
                values += [a.load_balance, a.z_loss, a.dropped_frac]
                names += [f"moe/layer{i}/expert{e}_frac" for e in range(moe.num_experts)]
                values += list(a.expert_frac.unbind())
            out.metrics = dict(zip(names, torch.stack(values).detach().float().tolist()))  # one host sync
        return out


register_family("vectorslm", VectorSLMConfig, VectorSLM)
