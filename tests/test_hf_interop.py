"""Export to / import from transformers: real LlamaForCausalLM / MixtralForCausalLM, no mocks, no hub."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from slmlab.generation import generate  # noqa: E402
from slmlab.hf_interop import export_hf, import_hf  # noqa: E402
from slmlab.models.layers import MoEConfig  # noqa: E402
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig  # noqa: E402

V = 113

CASES = {  # GQA ratios 1/2/4, tied and untied, odd widths, dense and MoE
    "mha-tied": dict(dim=64, n_heads=4, n_kv_heads=4, tie_embeddings=True),
    "gqa2-untied": dict(dim=64, n_heads=4, n_kv_heads=2, tie_embeddings=False, ffn_hidden=100),
    "gqa4-tied": dict(dim=128, n_heads=8, n_kv_heads=2, tie_embeddings=True, rope_theta=500000.0),
    "odd96-mqa-untied": dict(dim=96, n_heads=3, n_kv_heads=1, tie_embeddings=False, norm_eps=1e-6),
    "moe-top2-gqa2": dict(dim=64, n_heads=4, n_kv_heads=2, moe=MoEConfig(num_experts=4, top_k=2)),
    "moe-top1-odd-untied": dict(dim=96, n_heads=3, n_kv_heads=3, tie_embeddings=False,
                                moe=MoEConfig(num_experts=3, top_k=1)),
}


def make(case: str, seed: int = 0) -> tuple[VectorSLMConfig, VectorSLM]:
    torch.manual_seed(seed)
    cfg = VectorSLMConfig(vocab_size=V, max_seq_len=64, n_layers=2, init_std=0.1, **CASES[case])
    model = VectorSLM(cfg).eval()
    if not cfg.tie_embeddings:  # make the head visibly different from the embedding
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.1)
    with torch.no_grad():  # non-trivial norm gains so a misplaced norm weight cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_matches_transformers(case, tmp_path):
    cfg, ours = make(case)
    export_hf(ours, cfg, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, MixtralForCausalLM if cfg.moe else LlamaForCausalLM)
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == cfg.tie_embeddings

    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        delta = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert delta <= 1e-4, delta

    prompt = ids[:, :6]
    mine = generate(ours, prompt, 16, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("case", ["mha-tied", "odd96-mqa-untied", "moe-top2-gqa2"])
def test_export_import_round_trip(case, tmp_path):
    cfg, ours = make(case)
    export_hf(ours, cfg, tmp_path / "hf")
    cfg2, back = import_hf(tmp_path / "hf")
    assert cfg2.tie_embeddings == cfg.tie_embeddings and cfg2.ffn_dim == cfg.ffn_dim
    assert (back.lm_head.weight is back.tok_emb.weight) == cfg.tie_embeddings
    assert cfg2.moe is None if cfg.moe is None else (cfg2.moe.num_experts, cfg2.moe.top_k) == (cfg.moe.num_experts, cfg.moe.top_k)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    if cfg.moe is not None:
        assert cfg2.moe.load_balance_weight == pytest.approx(cfg.moe.load_balance_weight)


def test_import_checkpoints_written_by_transformers(tmp_path):
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False, rope_parameters=rope)).eval()
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=1, num_local_experts=4,
                                               num_experts_per_tok=2, max_position_embeddings=64,
                                               rope_parameters=rope)).eval()
    ids = torch.randint(0, V, (2, 16))
    for name, hf in {"llama": llama, "mixtral": mixtral}.items():
        with torch.no_grad():  # HF's default init leaves norms at 1 and experts tiny; perturb everything
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        hf.save_pretrained(tmp_path / name)
        cfg, ours = import_hf(tmp_path / name)
        assert (cfg.moe is not None) == (name == "mixtral") and not cfg.tie_embeddings
        with torch.no_grad():
            delta = (ours.eval()(ids).logits - hf(ids).logits).abs().max().item()
        assert delta <= 1e-4, (name, delta)


def test_import_rejects_pickles_and_unsupported_features(tmp_path):
    cfg, ours = make("mha-tied")
    export_hf(ours, cfg, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        import_hf(tmp_path / "hf")
    export_hf(ours, cfg, tmp_path / "hf2")
    c = json.loads((tmp_path / "hf2" / "config.json").read_text())
    c["attention_bias"] = True
    (tmp_path / "hf2" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="attention_bias"):
        import_hf(tmp_path / "hf2")


def test_export_is_atomic_and_replaces(tmp_path):
    cfg, ours = make("mha-tied")
    out = tmp_path / "export"
    export_hf(ours, cfg, out)
    first = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        ours.norm.weight.add_(1.0)
    export_hf(ours, cfg, out)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or backup dirs left

    class Boom(RuntimeError):
        pass

    def bad_state_dict(*a, **k):
        raise Boom

    ours.state_dict = bad_state_dict
    with pytest.raises(Boom):
        export_hf(ours, cfg, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (out / "config.json").exists()  # the previous export is untouched


def test_export_with_tokenizer_gives_fast_autotokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "<pad>"] + [f"w{i}" for i in range(V - 2)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>", "<pad>"])
    tk.save(str(tmp_path / "tokenizer.json"))

    cfg, ours = make("gqa2-untied")
    export_hf(ours, cfg, tmp_path / "hf", tokenizer_file=tmp_path / "tokenizer.json")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.is_fast
    text = "w5 w17 w3"
    assert hf_tok(text)["input_ids"] == tk.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 0 and hf_tok.pad_token_id == 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.eos_token_id == 0 and hf.generation_config.eos_token_id == 0
