"""AleMoEVLM: a small vision-language sparse-MoE model trained from scratch, read top to bottom.

    pixels (B, C, H, W) -> ViT: Conv2d patches + CLS + learned positions, pre-norm RMSNorm blocks, 2-D RoPE
                        -> projector: CLS -> 1 token; s x s neighbouring patches -> 1 token (nanoVLM's pixel
                           shuffle) -> Linear to the decoder width: P = 1 + (grid / s)^2 image tokens
    tokens (B, T)       -> tok_emb
    [image tokens | text] -> the VectorSLM decoder (vectorslm.Block: attention + MoE FFN with a noisy
                           top-k router) -> norm -> lm_head -> logits of the T text positions only

``self.decoder`` *is* a Mixtral-style :class:`VectorSLM`: its blocks, router, load-balancing loss and
rename table are the shared ones, so the text-only path exports unchanged with
``hf_interop.export_hf(*model.text_decoder(), out)``. Image tokens sit at positions [0, P) and text at
[P, P + T); a batch without ``pixel_values`` (``use_images: false``: the plain corpus) starts text at 0,
exactly Mixtral. Logits and labels cover text positions only, so image positions never carry loss.

Generation: the image is encoded once, at the prefill, and its keys/values sit in the KV cache like a
prompt; the cache remembers the prefix length, so the generic decoder's text positions shift past it.

Besides the LM loss the model reports, per MoE layer, the share of image and of text token-slots each
expert receives (``metrics`` in training; exact ``eval_sums`` in evaluation, where router noise is off),
and in evaluation the answer loss with the true image, a blank image and another example's image
(MMStar's multi-modal gain: a model that ignores the image gains nothing).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from slmlab.models.base import (
    IGNORE_INDEX,
    Batch,
    Capabilities,
    FamilyConfig,
    LanguageModel,
    ModelOutput,
    lm_cross_entropy,
    register_family,
)
from slmlab.models.layers import Attention, KVCache, MoEConfig, RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig

# ----------------------------------------------------------------------------------------------
# Config


def _default_moe() -> MoEConfig:
    return MoEConfig(num_experts=4, top_k=2, router_noise=0.5)


class AleMoEVLMConfig(FamilyConfig):
    family: Literal["alemoe_vlm"] = "alemoe_vlm"  # selects this file in the family registry
    # decoder: a VectorSLM with a sparse MoE FFN in every layer
    dim: int = Field(128, ge=1)  # decoder width; image tokens are projected to it
    n_layers: int = Field(4, ge=1)  # decoder depth
    n_heads: int = Field(4, ge=1)  # decoder query heads; head_dim = dim / n_heads, even for rotary
    n_kv_heads: int = Field(4, ge=1)  # GQA key/value heads: fewer shrink the KV cache (image prefix included)
    ffn_hidden: int | None = Field(None, ge=1)  # per-expert SwiGLU width; None -> Llama's 8/3 * dim rounding
    moe: MoEConfig = Field(default_factory=_default_moe)  # experts, top-k, aux-loss weights, training-only router noise
    rope_theta: float = Field(10000.0, gt=0)  # rotary base of both the decoder and the ViT
    norm_eps: float = Field(1e-5, gt=0)  # RMSNorm epsilon everywhere
    tie_embeddings: bool = True  # tie lm_head to tok_emb: at a few-hundred-token vocabulary it saves params cheaply
    init_std: float = Field(0.02, gt=0)  # normal init std; residual output projections get / sqrt(2 * depth)
    # vision
    use_images: bool = True  # False: a text-only run (plain corpus); the ViT stays built so weights carry over
    image_size: int = Field(32, ge=1)  # side images are resized to in Ray Data; a multiple of patch_size
    channels: int = Field(3, ge=1)  # RGB; grey images are replicated to three channels when decoded
    patch_size: int = Field(4, ge=1)  # ViT patch side: grid = image_size / patch_size patches per side
    vit_dim: int = Field(128, ge=1)  # ViT width
    vit_layers: int = Field(4, ge=1)  # ViT depth
    vit_heads: int = Field(4, ge=1)  # ViT heads; head_dim divisible by 4 (half rotated by row, half by column)
    vit_ffn_hidden: int | None = Field(None, ge=1)  # ViT SwiGLU width; None -> 8/3 * vit_dim rounded to 64
    pixel_shuffle: int = Field(2, ge=1)  # s x s patches -> one decoder token: s^2 fewer image tokens (nanoVLM)
    # a learned absolute position per patch (ViT, SigLIP): RoPE only shapes attention *scores*, so without it
    # no image token's content says where it is, and "is the red object on the left?" cannot be answered
    # (600 steps without it: left/right 47%, up/down 47%, leftmost-colour 19%: chance). It starts as MAE's
    # fixed 2-D sin-cos table, not zeros: a colour lookup over zero- or 0.02-initialised positions stayed at
    # chance for 200 steps, one over O(1) positions read left/right at 98% by step 300
    vit_abs_pos: bool = True
    # std of the patch embedding's initial weights (None = init_std). 1 / sqrt(channels * patch_size^2) (LeCun)
    # starts a patch's content as large as its sincos position; at 0.02 it is ~0.1 of it, and a probe asking
    # "is the <colour> object at the top?" of 64 patch tokens (ViT blocks removed) stayed at chance for 400
    # steps, against 97.7% at step 400 with 0.15 (README: why the scene questions stay at chance)
    patch_init_std: float | None = Field(None, gt=0)
    pad_id: int = Field(0, ge=0)  # the tokenizer's PAD id: padded text is left out of the expert shares
    image_gain_eval: bool = True  # evaluation also scores answers with a blank and with another example's image

    @model_validator(mode="after")
    def _shapes(self) -> "AleMoEVLMConfig":
        problems = []
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            problems.append(f"n_heads: expected a divisor of dim={self.dim} giving an even head_dim, "
                            f"found {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_kv_heads: expected a divisor of n_heads={self.n_heads}, found {self.n_kv_heads}")
        if self.vit_dim % self.vit_heads or (self.vit_dim // self.vit_heads) % 4:
            problems.append(f"vit_heads: expected a divisor of vit_dim={self.vit_dim} giving a head_dim divisible by 4 "
                            f"(2-D rotary), found {self.vit_heads}")
        if self.image_size % self.patch_size:
            problems.append(f"patch_size: expected a divisor of image_size={self.image_size}, found {self.patch_size}")
        elif self.grid % self.pixel_shuffle:
            problems.append(f"pixel_shuffle: expected a divisor of the patch grid {self.grid}, "
                            f"found {self.pixel_shuffle}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_image_tokens(self) -> int:
        """Decoder positions one image takes: the CLS token plus the pixel-shuffled patch grid."""
        return 1 + (self.grid // self.pixel_shuffle) ** 2

    @property
    def decoder_config(self) -> VectorSLMConfig:
        """The decoder as a VectorSLM: its rotary table also covers the image prefix."""
        return VectorSLMConfig(
            dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            ffn_hidden=self.ffn_hidden, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
            tie_embeddings=self.tie_embeddings, moe=self.moe, init_std=self.init_std,
            vocab_size=self.vocab_size, max_seq_len=self.max_seq_len + self.n_image_tokens)


# ----------------------------------------------------------------------------------------------
# Vision encoder


def apply_rotary_2d(x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], cols: tuple[torch.Tensor, torch.Tensor]):
    """Axial RoPE: the first half of each head is rotated by the patch's row, the second by its column,
    so attention scores depend on the 2-D offset between patches (left/right, up/down)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((apply_rotary(a, *rows), apply_rotary(b, *cols)), dim=-1)


def sincos_positions_2d(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, (1 + grid^2, dim): CLS (zeros) then patches in raster order; the first
    half of each vector encodes the row, the second the column, at dim / 4 frequencies each."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    g = torch.arange(grid, dtype=torch.float64)
    rows, cols = g.repeat_interleave(grid), g.repeat(grid)

    def enc(p):
        a = p[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    table = torch.zeros(1 + grid * grid, dim, dtype=torch.float64)
    table[1:, : 2 * (dim // 4)] = enc(rows)
    table[1:, 2 * (dim // 4): 4 * (dim // 4)] = enc(cols)
    return table.float()


class ViTAttention(Attention):
    """The decoder's fused-QKV attention, made bidirectional: every patch sees every patch, no cache."""

    def forward(self, x, rows, cols):  # type: ignore[override]
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, 3 * self.n_heads, self.head_dim)
        qk, v = qkv.split((2 * self.n_heads, self.n_heads), dim=2)
        q, k = apply_rotary_2d(qk, rows, cols).split(self.n_heads, dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class ViTBlock(nn.Module):
    def __init__(self, cfg: AleMoEVLMConfig):
        super().__init__()
        hidden = cfg.vit_ffn_hidden or 64 * math.ceil(8 * cfg.vit_dim / 3 / 64)
        self.attn_norm = RMSNorm(cfg.vit_dim, cfg.norm_eps)
        self.attn = ViTAttention(cfg.vit_dim, cfg.vit_heads, cfg.vit_heads)
        self.ffn_norm = RMSNorm(cfg.vit_dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.vit_dim, hidden)

    def forward(self, x, rows, cols):
        x = x + self.attn(self.attn_norm(x), rows, cols)
        return x + self.ffn(self.ffn_norm(x))


class ViT(nn.Module):
    def __init__(self, cfg: AleMoEVLMConfig):
        super().__init__()
        self.patch = nn.Conv2d(cfg.channels, cfg.vit_dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.vit_dim))
        self.pos = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.vit_dim)) if cfg.vit_abs_pos else None
        self.rope = RotaryEmbedding(cfg.vit_dim // cfg.vit_heads // 2, cfg.grid + 1, cfg.rope_theta)
        g = torch.arange(cfg.grid) + 1  # CLS sits at (0, 0), patch (r, c) at (r + 1, c + 1), raster order
        zero = torch.zeros(1, dtype=torch.long)
        self.register_buffer("rows", torch.cat([zero, g.repeat_interleave(cfg.grid)]), persistent=False)
        self.register_buffer("cols", torch.cat([zero, g.repeat(cfg.grid)]), persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.vit_layers))
        self.norm = RMSNorm(cfg.vit_dim, cfg.norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + grid^2, vit_dim): CLS first, then patches in raster order."""
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1).to(x.dtype), x], dim=1)
        if self.pos is not None:
            x = x + self.pos.to(x.dtype)
        cos, sin = self.rope.cos.to(x.dtype), self.rope.sin.to(x.dtype)
        rows, cols = (cos[self.rows], sin[self.rows]), (cos[self.cols], sin[self.cols])
        for block in self.blocks:
            x = block(x, rows, cols)
        return self.norm(x)


class Projector(nn.Module):
    """ViT outputs -> decoder-width image tokens: [CLS, pixel-shuffled patches]."""

    def __init__(self, cfg: AleMoEVLMConfig):
        super().__init__()
        self.grid, self.s = cfg.grid, cfg.pixel_shuffle
        self.cls = nn.Linear(cfg.vit_dim, cfg.dim, bias=False)
        self.patches = nn.Linear(cfg.vit_dim * self.s ** 2, cfg.dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, _, D = h.shape
        g, s = self.grid, self.s
        p = h[:, 1:].reshape(B, g // s, s, g // s, s, D).permute(0, 1, 3, 2, 4, 5).reshape(B, (g // s) ** 2, s * s * D)
        return torch.cat([self.cls(h[:, :1]), self.patches(p)], dim=1)


# ----------------------------------------------------------------------------------------------
# The model


class PrefixKVCache(KVCache):
    """The decoder's static KV cache plus how many image tokens the prefill wrote before the text:
    text position t lives at cache slot ``prefix + t``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix = 0


class AleMoEVLM(LanguageModel):
    def __init__(self, cfg: AleMoEVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.capabilities = Capabilities(
            generation=True, max_positions=cfg.max_seq_len, hf_export="MixtralForCausalLM",  # the text decoder
            batch_fields=("input_ids", "labels") + (("pixel_values",) if cfg.use_images else ()))
        self.vit = ViT(cfg)
        self.projector = Projector(cfg)
        self.decoder = VectorSLM(cfg.decoder_config)  # initialised by its own reset_parameters
        self._init_vision()

    @torch.no_grad()
    def _init_vision(self) -> None:
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.vit_layers)
        for name, p in [*self.vit.named_parameters(), *self.projector.named_parameters()]:
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down.weight")):
                p.normal_(0.0, out_std)
            elif name == "pos":
                p.copy_(sincos_positions_2d(self.cfg.grid, self.cfg.vit_dim)[None])
            elif name == "patch.weight" and self.cfg.patch_init_std is not None:
                p.normal_(0.0, self.cfg.patch_init_std)
            elif name != "patch.bias":
                p.normal_(0.0, self.cfg.init_std)

    def text_decoder(self) -> tuple[VectorSLM, VectorSLMConfig]:
        """The text-only model (for export as MixtralForCausalLM)."""
        return self.decoder, self.decoder.cfg

    @property
    def n_image_tokens(self) -> int:
        return self.cfg.n_image_tokens

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> (B, P, dim) image tokens."""
        return self.projector(self.vit(pixels.to(self.vit.patch.weight.dtype)))

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None) -> PrefixKVCache:
        """KV cache for max_len text positions plus room for one image prefix."""
        p, c = self.decoder.tok_emb.weight, self.decoder.cfg
        return PrefixKVCache(c.n_layers, batch_size, c.n_kv_heads, max_len + self.n_image_tokens, c.head_dim,
                             device=device if device is not None else p.device, dtype=dtype or p.dtype)

    def _run(self, input_ids, pixels, cache=None, start_pos=0):
        """Decoder hidden states of the text positions (normed), plus each MoE layer's aux and the prefix length."""
        dec = self.decoder
        x = dec.tok_emb(input_ids)
        prefix = 0
        if pixels is not None:
            if start_pos != 0:
                raise ValueError(f"pixel_values go in with the prompt (start_pos 0), found start_pos {start_pos}")
            x = torch.cat([self.encode_image(pixels).to(x.dtype), x], dim=1)
            prefix = self.n_image_tokens
        if cache is not None and start_pos == 0:
            cache.prefix = prefix
        pos = start_pos + (cache.prefix if cache is not None and not prefix else 0)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = dec.rope(pos, x.size(1), dtype)
        auxes = []
        for layer in dec.layers:
            x, aux = layer(x, cos, sin, cache, pos)
            auxes.append(aux)
        return dec.norm(x[:, prefix:]), auxes, prefix

    def forward(self, batch: Batch, *, cache: PrefixKVCache | None = None, start_pos: int = 0,
                logits_to_keep: int = 0) -> ModelOutput:
        """``input_ids`` (B, T) text; ``pixel_values`` (B, C, H, W) optional (read only when use_images);
        ``labels`` (B, T) aligned with the text logits. Returns logits for the T text positions."""
        input_ids, labels = batch["input_ids"], batch.get("labels")
        pixels = batch.get("pixel_values") if self.cfg.use_images else None
        h, auxes, prefix = self._run(input_ids, pixels, cache, start_pos)
        logits = self.decoder.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        out = ModelOutput(logits=logits)
        if labels is None:
            return out
        moe = self.cfg.moe
        out.lm_loss = lm_cross_entropy(logits, labels)
        lb = torch.stack([a.load_balance for a in auxes]).mean()  # mean over layers: the weight is depth-free
        z = torch.stack([a.z_loss for a in auxes]).mean()
        out.loss = out.lm_loss + moe.load_balance_weight * lb + moe.z_loss_weight * z
        img, txt = self._slots_by_modality(auxes, input_ids, prefix)  # (layers, experts) each
        names = ["moe/load_balance", "moe/z_loss"]
        values = [lb, z]
        for i in range(len(auxes)):
            for e in range(moe.num_experts):
                if prefix:
                    names.append(f"moe/layer{i}/image_expert{e}_share")
                    values.append(img[i, e] / img[i].sum().clamp(min=1))
                names.append(f"moe/layer{i}/text_expert{e}_share")
                values.append(txt[i, e] / txt[i].sum().clamp(min=1))
        out.metrics = dict(zip(names, torch.stack(values).detach().float().tolist()))  # one host sync
        if not self.training:
            out.eval_sums = {f"moe/layer{i}/{m}{e}": t[i, e] for m, t in (("image_slots", img), ("text_slots", txt))
                             for i in range(len(auxes)) for e in range(moe.num_experts)}
            if prefix and self.cfg.image_gain_eval:
                out.eval_sums.update(self._image_gain(input_ids, labels, pixels, logits))
        return out

    def _slots_by_modality(self, auxes, input_ids, prefix):
        """Token-slots routed to each expert from image and from (non-pad) text positions. Recomputed from
        the noise-free router logits: exact in evaluation, the router's preference in noisy training."""
        B, T = input_ids.shape
        E, k = self.cfg.moe.num_experts, self.cfg.moe.top_k
        is_text = torch.cat([torch.zeros(B, prefix, dtype=torch.bool, device=input_ids.device),
                             input_ids != self.cfg.pad_id], dim=1).reshape(-1)
        is_img = torch.zeros_like(is_text)
        is_img.view(B, prefix + T)[:, :prefix] = True
        img, txt = [], []
        for a in auxes:
            hits = F.one_hot(a.router_logits.topk(k, dim=-1).indices, E).sum(1).float()  # (N, E)
            img.append(hits[is_img].sum(0))
            txt.append(hits[is_text].sum(0))
        return torch.stack(img).detach(), torch.stack(txt).detach()

    @torch.no_grad()
    def _image_gain(self, input_ids, labels, pixels, logits) -> dict[str, torch.Tensor]:
        """Answer nats with the true image, a blank one (all-zero normalised pixels: uniform grey) and the
        next example's image (rolled by one in the batch; needs two examples)."""
        def nats(lg):
            return F.cross_entropy(lg.float().reshape(-1, lg.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")

        def with_image(p):
            return nats(self.decoder.lm_head(self._run(input_ids, p)[0]))

        sums = {"gain/nats_true": nats(logits), "gain/nats_blank": with_image(torch.zeros_like(pixels)),
                "gain/targets": (labels != IGNORE_INDEX).sum().double()}
        if pixels.size(0) > 1:
            sums["gain/nats_other"] = with_image(pixels.roll(1, dims=0))
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        targets = sums.get("gain/targets", 0.0)
        if targets:
            for which in ("true", "blank", "other"):
                if f"gain/nats_{which}" in sums:
                    out[f"gain/loss_{which}"] = sums[f"gain/nats_{which}"] / targets
            out["gain/true_over_blank"] = out["gain/loss_true"] / max(out["gain/loss_blank"], 1e-12)
            if "gain/loss_other" in out:
                out["gain/true_over_other"] = out["gain/loss_true"] / max(out["gain/loss_other"], 1e-12)
        for m, share in (("image_slots", "image"), ("text_slots", "text")):
            for i in range(self.cfg.n_layers):
                counts = [sums.get(f"moe/layer{i}/{m}{e}", 0.0) for e in range(self.cfg.moe.num_experts)]
                total = sum(counts)
                if total:
                    out.update({f"moe/layer{i}/{share}_expert{e}_share": c / total for e, c in enumerate(counts)})
        return out


register_family("alemoe_vlm", AleMoEVLMConfig, AleMoEVLM)
