"""Hugging Face ``transformers`` interop for VectorSLM: export and import, no custom code either way.

``export_hf`` writes a directory that ``AutoModelForCausalLM.from_pretrained`` loads as a stock
``LlamaForCausalLM`` (dense) or ``MixtralForCausalLM`` (MoE), plus the tokenizer so
``AutoTokenizer.from_pretrained`` returns a fast tokenizer. ``import_hf`` reads a local Llama/Mixtral
checkpoint (safetensors only, never pickles, never ``trust_remote_code``) into a platform model.

The weight mapping is the rename table documented at the top of ``slmlab.models.vectorslm``; fused
tensors (QKV, gate/up, stacked experts) are split on export and concatenated on import.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slmlab.errors import ExportError
from slmlab.models.layers import MoEConfig
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig

MANIFEST = ".slmlab-export.json"  # names of the files an export wrote: --force replaces exactly those

# Special-token spellings recognised in a tokenizer.json when the caller does not name them.
_SPECIAL_GUESSES = {
    "bos_token": ("<|begin_of_text|>", "<|bos|>", "<bos>", "<s>", "[BOS]"),
    "eos_token": ("<|endoftext|>", "<|end_of_text|>", "<|eos|>", "<eos>", "</s>", "[EOS]"),
    "pad_token": ("<|pad|>", "<pad>", "[PAD]"),
    "unk_token": ("<|unk|>", "<unk>", "[UNK]"),
}
# End-of-turn spellings: a chat model's reply ends here, so generation stops here as well as at the eos.
_END_OF_TURN_GUESSES = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")


# ----------------------------------------------------------------------------------------------
# Export


def _hf_state_dict(model: VectorSLM, cfg: VectorSLMConfig) -> dict[str, torch.Tensor]:
    """Apply the rename table: our fused tensors -> transformers' (legacy Mixtral expert layout, which is
    what transformers' own save_pretrained writes and what every version of it loads)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "ffn_norm.weight"]
        q, k, v = sd[ours + "attn.wqkv.weight"].split((nh * hd, nkv * hd, nkv * hd), dim=0)
        out[hf + "self_attn.q_proj.weight"], out[hf + "self_attn.k_proj.weight"] = q, k
        out[hf + "self_attn.v_proj.weight"] = v
        out[hf + "self_attn.o_proj.weight"] = sd[ours + "attn.wo.weight"]
        if cfg.moe is None:
            gate, up = sd[ours + "ffn.w_gate_up.weight"].chunk(2, dim=0)
            out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
            out[hf + "mlp.down_proj.weight"] = sd[ours + "ffn.w_down.weight"]
        else:
            moe = hf + "block_sparse_moe."
            out[moe + "gate.weight"] = sd[ours + "ffn.router.weight"]
            for e in range(cfg.moe.num_experts):
                w1, w3 = sd[ours + "ffn.w_gate_up"][e].chunk(2, dim=0)
                out[moe + f"experts.{e}.w1.weight"], out[moe + f"experts.{e}.w3.weight"] = w1, w3
                out[moe + f"experts.{e}.w2.weight"] = sd[ours + "ffn.w_down"][e]
    # safetensors refuses views that share storage: give every tensor its own contiguous CPU copy
    return {k: v.to("cpu", copy=True).contiguous() for k, v in out.items()}


def _special_tokens(tokenizer_file: Path, special_tokens: dict[str, str] | None) -> tuple[dict[str, str], set[str]]:
    """(role -> token string, every token string the tokenizer has)."""
    tok = json.loads(tokenizer_file.read_text())
    present = {t["content"] for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})
    present |= set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab}
    if special_tokens is not None:
        missing = {k: v for k, v in special_tokens.items() if v not in present}
        if missing:
            raise ExportError(f"{tokenizer_file}: expected the special tokens {missing}, found no such tokens")
        return dict(special_tokens), present
    found = {}
    for role, spellings in _SPECIAL_GUESSES.items():
        for s in spellings:
            if s in present:
                found[role] = s
                break
    return found, present


def _hf_config(cfg: VectorSLMConfig, dtype: torch.dtype, token_ids: dict[str, int | None]):
    from transformers import LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=token_ids.get("bos_token"), eos_token_id=token_ids.get("eos_token"),
        pad_token_id=token_ids.get("pad_token"),
    )
    if cfg.moe is None:
        hf = LlamaConfig(**common, attention_bias=False, mlp_bias=False)
        hf.architectures = ["LlamaForCausalLM"]
    else:
        hf = MixtralConfig(
            **common, num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
            # HF's aux loss sums over the k routing slots, i.e. top_k times ours: same gradient signal
            router_aux_loss_coef=cfg.moe.load_balance_weight / cfg.moe.top_k,
            router_jitter_noise=0.0, sliding_window=None,
        )
        hf.architectures = ["MixtralForCausalLM"]
    hf.dtype = dtype
    return hf


def _chat_settings(tokenizer_file: Path, present: set[str], chat_template: str | None) -> tuple[str | None, str | None]:
    """(chat template, end-of-turn token) for the exported tokenizer: the template given, else the one in
    the tokenizer_config.json beside ``tokenizer_file``, else slmlab's own when the tokenizer has its role
    tokens (the rendering ``slmlab generate --chat`` uses)."""
    from slmlab.data.tokenizer import ASSISTANT, CHAT_TEMPLATE, END_TURN, USER

    end = next((t for t in _END_OF_TURN_GUESSES if t in present), None)
    if chat_template is None:
        beside = tokenizer_file.parent / "tokenizer_config.json"
        if beside.exists():
            chat_template = json.loads(beside.read_text()).get("chat_template")
    if chat_template is None and {USER, ASSISTANT, END_TURN} <= present:
        chat_template = CHAT_TEMPLATE
    return chat_template, end


def check_export_target(out_dir: str | os.PathLike, force: bool = False) -> None:
    """Refuse a target that holds anything unless ``force``: an export never silently replaces a folder."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: expected a folder to export into, found a file")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ExportError(f"{out}: expected an empty or new folder, found {len(entries)} entries ({shown}); "
                          "--force writes the export's files into it and leaves the others")


def _previous_export(out: Path) -> set[str]:
    """Files a previous export listed in its manifest: plain names only, so a crafted manifest cannot
    point outside the folder."""
    try:
        names = json.loads((out / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")}


def _install(tmp: Path, out: Path) -> None:
    """Move the export from ``tmp`` into ``out``. A new or empty ``out`` becomes ``tmp`` by one rename;
    a non-empty one (``--force``) gets the export's files one by one, and loses only the files a
    previous export wrote there and this one did not. Nothing else in it is touched."""
    if not out.exists():
        tmp.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        tmp.rename(out)
        return
    names = sorted(p.name for p in tmp.iterdir())
    blocked = [n for n in names if (out / n).is_dir() and not (out / n).is_symlink()]
    if blocked:
        raise ExportError(f"{out}: expected files or nothing at {blocked}, found folders; nothing was written")
    stale = _previous_export(out) - set(names)
    for name in [n for n in names if n != MANIFEST] + [MANIFEST]:  # the manifest last: it vouches for the rest
        os.replace(tmp / name, out / name)
    for name in stale:
        if (out / name).is_file():
            (out / name).unlink()
    tmp.rmdir()


def export_hf(model: VectorSLM, cfg: VectorSLMConfig, out_dir: str | os.PathLike,
              tokenizer_file: str | os.PathLike | None = None, *,
              special_tokens: dict[str, str] | None = None, chat_template: str | None = None,
              force: bool = False) -> Path:
    """Write ``out_dir`` (config.json, generation_config.json, model.safetensors and, with
    ``tokenizer_file`` (a ``tokenizers`` tokenizer.json), tokenizer.json + tokenizer_config.json).

    ``special_tokens`` maps roles (bos_token, eos_token, pad_token, unk_token) to token strings; when
    omitted, common spellings are looked up in the tokenizer. Generation stops at the eos and, when the
    tokenizer has one, at the end-of-turn token (``<|end|>``), like ``slmlab generate``; the chat
    template (``chat_template``, else the tokenizer's own, see :func:`_chat_settings`) goes into
    tokenizer_config.json so ``apply_chat_template`` renders prompts as ``slmlab generate --chat`` does.

    ``out_dir`` must be new or empty unless ``force`` (see :func:`check_export_target`). The export is
    written to a temporary sibling first, so a crash never leaves a half-written folder.
    """
    out_dir = Path(out_dir)
    check_export_target(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        token_ids: dict[str, int | None] = {}
        stop_ids: list[int] = []
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            tokenizer_file = Path(tokenizer_file)
            specials, present = _special_tokens(tokenizer_file, special_tokens)
            tk = Tokenizer.from_file(str(tokenizer_file))
            token_ids = {role: tk.token_to_id(s) for role, s in specials.items()}
            template, end_of_turn = _chat_settings(tokenizer_file, present, chat_template)
            stop_ids = [i for i in (token_ids.get("eos_token"), tk.token_to_id(end_of_turn) if end_of_turn else None)
                        if i is not None]
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                       "clean_up_tokenization_spaces": False, **specials}
            if template is not None:
                tok_cfg["chat_template"] = template
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
            (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")

        dtype = model.tok_emb.weight.dtype
        hf_cfg = _hf_config(cfg, dtype, token_ids)
        hf_cfg.save_pretrained(tmp)
        from transformers import GenerationConfig

        gen = GenerationConfig.from_model_config(hf_cfg)
        if len(stop_ids) > 1:
            gen.eos_token_id = stop_ids  # transformers stops at any of them
        gen.save_pretrained(tmp)
        save_file(_hf_state_dict(model, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = sorted(p.name for p in tmp.iterdir()) + [MANIFEST]
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "slmlab export", "files": files}, indent=2) + "\n")
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------
# Import


def _load_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        outside = [s for s in shards if Path(s).name != s or s in ("", ".", "..")]
        if outside:  # a crafted index must not make us read files elsewhere
            raise ValueError(f"{index}: expected shard file names inside {hf_dir}, found {outside[:3]}")
    elif (hf_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {hf_dir} "
                                "(pickled .bin checkpoints are not loaded)")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(load_file(str(hf_dir / shard)))
    return sd


def _config_from_hf(c: dict, max_seq_len: int | None) -> VectorSLMConfig:
    model_type = c.get("model_type")
    if model_type not in ("llama", "mixtral"):
        raise ValueError(f"import_hf supports llama and mixtral checkpoints, found model_type={model_type!r}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    unsupported = {
        "hidden_act": c.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(c.get("attention_bias", False)),
        "mlp_bias": bool(c.get("mlp_bias", False)),
        "rope_type": rope.get("rope_type", rope.get("type", "default")) != "default",
        "sliding_window": c.get("sliding_window") is not None,
        "head_dim": c.get("head_dim") not in (None, c["hidden_size"] // c["num_attention_heads"]),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"checkpoint uses features VectorSLM does not implement: {bad}")
    moe = None
    if model_type == "mixtral":
        top_k = c.get("num_experts_per_tok", 2)
        moe = MoEConfig(num_experts=c.get("num_local_experts", 8), top_k=top_k,
                        load_balance_weight=c.get("router_aux_loss_coef", 0.001) * top_k,
                        z_loss_weight=0.0, capacity_factor=None, router_noise=0.0)
    theta = rope.get("rope_theta", c.get("rope_theta", 1e6 if model_type == "mixtral" else 1e4))
    return VectorSLMConfig(
        vocab_size=c["vocab_size"], max_seq_len=max_seq_len or c.get("max_position_embeddings", 2048),
        dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], ffn_hidden=c["intermediate_size"],
        rope_theta=float(theta), norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), moe=moe,
        init_std=c.get("initializer_range", 0.02),
    )


def import_hf(hf_dir: str | os.PathLike, max_seq_len: int | None = None) -> tuple[VectorSLMConfig, VectorSLM]:
    """Local Llama/Mixtral checkpoint directory -> (config, model) holding its weights (dtype kept).
    ``max_seq_len`` overrides max_position_embeddings (rotary tables are sized by it)."""
    hf_dir = Path(hf_dir)
    cfg = _config_from_hf(json.loads((hf_dir / "config.json").read_text()), max_seq_len)
    hf = _load_safetensors(hf_dir)

    def take(key: str) -> torch.Tensor:
        try:
            return hf.pop(key)
        except KeyError:
            raise KeyError(f"{hf_dir}: checkpoint lacks {key}") from None

    sd = {"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    else:
        sd["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        ours, p = f"layers.{i}.", f"model.layers.{i}."
        sd[ours + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        sd[ours + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        sd[ours + "attn.wqkv.weight"] = torch.cat(
            [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
        sd[ours + "attn.wo.weight"] = take(p + "self_attn.o_proj.weight")
        if cfg.moe is None:
            sd[ours + "ffn.w_gate_up.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"),
                                                           take(p + "mlp.up_proj.weight")])
            sd[ours + "ffn.w_down.weight"] = take(p + "mlp.down_proj.weight")
        elif p + "mlp.experts.gate_up_proj" in hf:  # transformers-5 fused in-memory layout
            sd[ours + "ffn.router.weight"] = take(p + "mlp.gate.weight")
            sd[ours + "ffn.w_gate_up"] = take(p + "mlp.experts.gate_up_proj")
            sd[ours + "ffn.w_down"] = take(p + "mlp.experts.down_proj")
        else:  # Mixtral checkpoint layout (per-expert w1 gate, w3 up, w2 down)
            moe = p + "block_sparse_moe."
            E = cfg.moe.num_experts
            sd[ours + "ffn.router.weight"] = take(moe + "gate.weight")
            sd[ours + "ffn.w_gate_up"] = torch.stack(
                [torch.cat([take(moe + f"experts.{e}.w1.weight"), take(moe + f"experts.{e}.w3.weight")])
                 for e in range(E)])
            sd[ours + "ffn.w_down"] = torch.stack([take(moe + f"experts.{e}.w2.weight") for e in range(E)])
    leftover = [k for k in hf if "rotary_emb" not in k]
    if leftover:
        raise ValueError(f"{hf_dir}: unexpected tensors not mapped to VectorSLM: {leftover[:5]}")

    dtype = sd["tok_emb.weight"].dtype
    model = VectorSLM(cfg).to(dtype)  # built normally (not on meta) so the tied embedding stays one Parameter
    model.load_state_dict(sd, strict=True)
    return cfg, model
