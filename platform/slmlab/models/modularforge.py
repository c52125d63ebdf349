"""ModularForge: a language model assembled from feed-forward experts that never saw each other.

    trunk      a dense VectorSLM (embeddings, attention, norms, LM head, one SwiGLU per layer) trained on
               every partition
    expert e   the same network with the trunk frozen and a fresh SwiGLU at every layer, trained on
               partition e alone; its artefact holds only the expert tensors below
    assembled  a VectorSLM with ``moe`` set: the trunk's tensors, the N experts' SwiGLUs stacked as the
               MoE experts, and a router that was never trained (``slmlab.assemble``)

The assembled model IS a ``VectorSLM`` with a ``MoEConfig``: training, evaluation, generation and the
export to ``MixtralForCausalLM`` need nothing new. Tensor names (VectorSLM's, a public contract):

    trunk      every tensor not under ``layers.{i}.ffn.``
    expert     layers.{i}.ffn.w_gate_up.weight (2H, dim), layers.{i}.ffn.w_down.weight (dim, H)
    assembled  layers.{i}.ffn.router.weight (N, dim), layers.{i}.ffn.w_gate_up (N, 2H, dim),
               layers.{i}.ffn.w_down (N, dim, H): expert e's tensors are row block e

Why the trunk trains WITH a dense SwiGLU of one expert's width, then drops it: attention and the
norms learn to read and write a residual stream that an FFN keeps rewriting; an attention-only trunk
would learn a stream no FFN ever touched, and every expert would first have to undo that. With an
FFN of exactly an expert's shape, each expert takes over the role that FFN played (same input
space, same output scale), so the frozen layers above it read what they were trained to read. The
trunk's FFN is also the reference "one FFN trained on everything" and, with ``expert_init: trunk``,
a shared starting point for the experts (Branch-Train-Merge's seed model).

Why an expert does not train its pre-FFN norm (``ffn_norm``): an RMSNorm gain directly before a
linear map adds no capacity (W diag(g) is just another W), and the Mixtral layout has one
``post_attention_layernorm`` per layer shared by every expert and the router; keeping it frozen
keeps every expert, and the gates, in one input space with no folding at assembly.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch

from slmlab.models.layers import MoEConfig
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig

EXPERT_TENSORS = ("ffn.w_gate_up.weight", "ffn.w_down.weight")  # per layer, what an expert artefact holds
_EXPERT_NAME = re.compile(r"^layers\.(\d+)\.ffn\.")


def is_expert_tensor(name: str) -> bool:
    return _EXPERT_NAME.match(name) is not None


def expert_prefixes(n_layers: int) -> tuple[str, ...]:
    """Name prefixes of the FFN at every layer: what an expert run trains (``train.trainable``) and
    may lack when it warm-starts from the trunk (``RunSpec.allow_missing``)."""
    return tuple(f"layers.{i}.ffn." for i in range(n_layers))


def expert_shapes(cfg: VectorSLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of one expert and its shape, for a dense config of the expert's width."""
    H, D = cfg.ffn_dim, cfg.dim
    shapes = {}
    for i in range(cfg.n_layers):
        shapes[f"layers.{i}.ffn.w_gate_up.weight"] = (2 * H, D)
        shapes[f"layers.{i}.ffn.w_down.weight"] = (D, H)
    return shapes


def trunk_config(cfg: VectorSLMConfig) -> VectorSLMConfig:
    """The trunk (and every expert run) is the dense form of the family config: one SwiGLU per layer
    of the expert's width."""
    return cfg.model_copy(update={"moe": None})


def assembled_config(trunk: VectorSLMConfig, num_experts: int, top_k: int) -> VectorSLMConfig:
    """The MoE an assembly writes: the trunk's shape with N experts of the trunk FFN's width.
    Dropless (no capacity factor) so evaluation never drops a token; the aux-loss weights only
    matter if the router is later trained (the router-only calibration run)."""
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, capacity_factor=None)
    return trunk.model_copy(update={"moe": moe, "ffn_hidden": trunk.ffn_dim})


def dense_baseline_config(trunk: VectorSLMConfig, top_k: int) -> VectorSLMConfig:
    """The honest baseline: a dense VectorSLM with the assembled model's ACTIVE parameters, i.e. one
    SwiGLU as wide as top_k experts together (same FLOPs per token; only the tiny router differs)."""
    return trunk.model_copy(update={"moe": None, "ffn_hidden": top_k * trunk.ffn_dim})


def active_parameters(cfg: VectorSLMConfig) -> int:
    """Parameters a token touches: everything but the experts it is not routed to (tied head once)."""
    D, H, V, L = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    attn = D * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * D
    k = cfg.moe.top_k if cfg.moe else 1
    router = cfg.moe.num_experts * D if cfg.moe else 0
    per_layer = attn + 2 * D + k * 3 * D * H + router
    return V * D * (1 if cfg.tie_embeddings else 2) + L * per_layer + D


# ----------------------------------------------------------------------------------------------
# Router analysis of an assembled model


@torch.no_grad()
def routing_analysis(model: VectorSLM, partitions: Sequence[Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> dict:
    """Where each partition's text goes, layer by layer. ``partitions[k]`` yields (ids, mask) batches
    of partition k's text (mask: which positions count). Returns numpy-free lists:

        matrix[l][k][e]  share of partition k's routed slots (top-k) that expert e takes at layer l
        top1[l][k][e]    the same for the first choice only
        load[l][e]       share of all routed slots that expert e takes at layer l
        entropy[l]       mean per-token router entropy at layer l / ln(N) (1 = uniform, 0 = one expert)
    """
    moe = model.cfg.moe
    if moe is None:
        raise TypeError("routing_analysis needs a VectorSLM with moe set")
    L, E, P = model.cfg.n_layers, moe.num_experts, len(partitions)
    slots = torch.zeros(L, P, E, dtype=torch.float64)
    first = torch.zeros(L, P, E, dtype=torch.float64)
    ent = torch.zeros(L, dtype=torch.float64)
    n_tok = 0.0
    state: dict = {}

    def hook(module, _inp, out, layer: int):
        logits = out[1].router_logits[state["mask"].reshape(-1)]
        probs = logits.softmax(-1)
        top = probs.topk(moe.top_k, dim=-1).indices
        k = state["partition"]
        slots[layer, k] += torch.bincount(top.reshape(-1), minlength=E).double()
        first[layer, k] += torch.bincount(top[:, 0], minlength=E).double()
        ent[layer] += -(probs * probs.clamp(min=1e-30).log()).sum(-1).double().sum()

    hooks = [layer.ffn.register_forward_hook(lambda m, i, o, at=at: hook(m, i, o, at))
             for at, layer in enumerate(model.layers)]
    model.eval()
    try:
        for k, batches in enumerate(partitions):
            for ids, mask in batches:
                state.update(partition=k, mask=mask.bool())
                model({"input_ids": ids})
                n_tok += float(mask.sum())
    finally:
        for h in hooks:
            h.remove()
    norm = lambda t: t / t.sum(-1, keepdim=True).clamp(min=1)
    return {"matrix": norm(slots).tolist(), "top1": norm(first).tolist(), "load": norm(slots.sum(1)).tolist(),
            "entropy": (ent / max(n_tok, 1) / math.log(E) if E > 1 else ent * 0).tolist()}
