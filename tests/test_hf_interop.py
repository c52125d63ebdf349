"""Export to / import from transformers: real LlamaForCausalLM / MixtralForCausalLM, no mocks, no hub."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

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
        delta = (ours({"input_ids": ids}).logits - hf(ids).logits).abs().max().item()
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
    if cfg.moe is None:
        assert cfg2.moe is None
    else:
        assert (cfg2.moe.num_experts, cfg2.moe.top_k) == (cfg.moe.num_experts, cfg.moe.top_k)
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
            delta = (ours.eval()({"input_ids": ids}).logits - hf(ids).logits).abs().max().item()
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
    export_hf(ours, cfg, out, force=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or backup dirs left

    class Boom(RuntimeError):
        pass

    def bad_state_dict(*a, **k):
        raise Boom

    ours.state_dict = bad_state_dict
    with pytest.raises(Boom):
        export_hf(ours, cfg, out, force=True)
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


# ----------------------------------------------------------------------------------------------
# An export never deletes what it did not write


def test_export_refuses_a_folder_with_files_and_keeps_them(tmp_path):
    from slmlab.errors import ExportError

    cfg, ours = make("mha-tied")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ExportError, match="expected an empty or new folder, found 1 entries"):
        export_hf(ours, cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left beside it
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="found a file"):
        export_hf(ours, cfg, tmp_path / "afile", force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(ours, cfg, empty)  # an empty folder is fine without --force
    assert (empty / "model.safetensors").exists()


def test_forced_export_replaces_only_its_own_files(tmp_path):
    from tokenizers import Tokenizer, models

    cfg, ours = make("mha-tied")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "config.json").write_text("{}")  # a name the export writes: --force means replace it
    tok = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="a")).save(str(tok))
    export_hf(ours, cfg, out, tokenizer_file=tok, force=True)
    assert (out / "notes.txt").read_text() == "my notes"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").exists()
    # a later export without a tokenizer drops the tokenizer files the first one wrote, nothing else
    (out / ".slmlab-export.json").write_text(json.dumps({"files": json.loads(
        (out / ".slmlab-export.json").read_text())["files"] + ["../outside.txt", "notes.txt/.."]}))
    (tmp_path / "outside.txt").write_text("keep")
    export_hf(ours, cfg, out, force=True)
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    assert (out / "notes.txt").read_text() == "my notes" and (tmp_path / "outside.txt").read_text() == "keep"
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == V
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "outside.txt", "tokenizer.json"]


def test_forced_export_blocked_by_a_folder_writes_nothing(tmp_path):
    from slmlab.errors import ExportError

    cfg, ours = make("mha-tied")
    out = tmp_path / "mine"
    (out / "model.safetensors").mkdir(parents=True)  # a folder where the export writes a file
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ExportError, match="found folders"):
        export_hf(ours, cfg, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# ----------------------------------------------------------------------------------------------
# Chat models: transformers stops where `slmlab generate` stops and renders the same prompt

QUESTION, REPLY = "how are you today?", " fine, thanks for asking"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny VectorSLM that has learnt one exchange, so its greedy reply ends with <|end|> early."""
    from slmlab.data.tokenizer import ASSISTANT, END_TURN, USER, load_tokenizer, train_bpe
    from slmlab.train.checkpoint import write_model

    folder = tmp_path_factory.mktemp("chat") / "model"
    tok_path = train_bpe([QUESTION, REPLY, "some other text about asking how things are"] * 5, vocab_size=300,
                         min_frequency=1, out=folder / "tokenizer.json")
    tk = load_tokenizer(tok_path)
    ids = torch.tensor([tk.encode(f"{USER}{QUESTION}{END_TURN}{ASSISTANT}{REPLY}{END_TURN}").ids])
    torch.manual_seed(0)
    cfg = VectorSLMConfig(vocab_size=tk.get_vocab_size(), max_seq_len=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2)
    model = VectorSLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        logits = model({"input_ids": ids[:, :-1]}).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    write_model(model.eval(), cfg, folder)
    return folder, cfg, model.eval(), tk


def test_exported_chat_model_stops_at_end_of_turn_like_slmlab_generate(chat_model, tmp_path):
    from typer.testing import CliRunner

    from slmlab.cli import app
    from slmlab.data.tokenizer import ASSISTANT, END_TURN, EOS, USER

    folder, cfg, ours, tk = chat_model
    export_hf(ours, cfg, tmp_path / "hf", tokenizer_file=folder / "tokenizer.json")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    end, eos = tk.token_to_id(END_TURN), tk.token_to_id(EOS)
    assert hf.generation_config.eos_token_id == [eos, end]

    # the same prompt: apply_chat_template == what `slmlab generate --chat` encodes
    ours_prompt = tk.encode(f"{USER}{QUESTION}{END_TURN}{ASSISTANT}", add_special_tokens=False).ids
    hf_prompt = hf_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert list(hf_prompt) == ours_prompt

    prompt = torch.tensor([ours_prompt])
    mine = generate(ours, prompt, 30, temperature=0, stop_token_ids=[eos, end])
    assert mine[0, -1].item() == end and mine.shape[1] < prompt.shape[1] + 30  # the premise: it stops early
    theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False)
    assert torch.equal(theirs, mine)  # same tokens, and transformers stops at <|end|> too

    shown = CliRunner().invoke(app, ["generate", str(folder), "--prompt", QUESTION, "--chat", "-t", "0", "-n", "30"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.strip() == hf_tok.decode(theirs[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    assert shown.stdout.strip() == REPLY.strip()


def test_import_refuses_an_index_pointing_outside_the_folder(tmp_path):
    cfg, ours = make("mha-tied")
    export_hf(ours, cfg, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "elsewhere.safetensors"), framework="pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "../elsewhere.safetensors" for n in names}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="expected shard file names inside"):
        import_hf(tmp_path / "hf")
