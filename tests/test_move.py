"""MoVE: teacher capture, identity swaps, causality, decoding state, fitting, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from slmlab.models.move import (
    MODULE_KINDS,
    MoVE,
    MoVEConfig,
    MoVEInputError,
    load_module,
    load_teacher,
)
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig
from slmlab.train.checkpoint import write_model

V, L = 128, 48
TEACHER = VectorSLMConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=L, ffn_hidden=64)
SMALL = {"attention": {"window": 4, "dilation": 4, "long_edges": 3}, "ffn": {"num_experts": 4, "top_k": 2},
         "embedding": {"rank": 8}, "decoder": {"rank": 8}}


def make(swap, teacher: VectorSLM | None = None, from_teacher: bool = True, tcfg=TEACHER, **cfg) -> MoVE:
    move_cfg = MoVEConfig(vocab_size=tcfg.vocab_size, max_seq_len=tcfg.max_seq_len, teacher=tcfg, swap=list(swap),
                          **{**SMALL, **cfg})
    model = MoVE(move_cfg)
    if teacher is not None:
        model.load_state_dict(teacher.state_dict(), strict=False)  # the teacher's tensors, not the slots
    if from_teacher:
        model.init_from_teacher()
    return model


@pytest.fixture(scope="module")
def teacher(one_thread) -> VectorSLM:
    torch.manual_seed(0)
    return VectorSLM(TEACHER).eval()


def batch(seed: int, b: int = 2, t: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def metrics_of(model: MoVE, b: dict) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(b)
    return model.eval_metrics({k: float(v) for k, v in out.eval_sums.items()})


# ---------------------------------------------------------------------------------------------
# Capture


def test_trace_records_exactly_the_teachers_sublayers(teacher):
    """Forward hooks on the teacher's own modules see exactly what the trace records."""
    seen: dict[str, list] = {"attn": [], "ffn": [], "emb": [], "head": []}
    hooks = [teacher.tok_emb.register_forward_hook(lambda m, i, o: seen["emb"].append(o)),
             teacher.lm_head.register_forward_hook(lambda m, i, o: seen["head"].append((i[0], o)))]
    for layer in teacher.layers:
        hooks.append(layer.attn.register_forward_hook(lambda m, i, o: seen["attn"].append((i[0], o))))
        hooks.append(layer.ffn.register_forward_hook(lambda m, i, o: seen["ffn"].append((i[0], o))))
    b = batch(1)
    with torch.no_grad():
        logits = teacher(b).logits
        for h in hooks:
            h.remove()
        tr = make([], teacher).path(b["input_ids"], trace=True)
    assert torch.equal(tr.logits, logits)
    assert torch.equal(tr.emb, seen["emb"][0])
    for i in range(TEACHER.n_layers):
        assert torch.equal(tr.attn_in[i], seen["attn"][i][0]) and torch.equal(tr.attn_out[i], seen["attn"][i][1])
        assert torch.equal(tr.ffn_in[i], seen["ffn"][i][0]) and torch.equal(tr.ffn_out[i], seen["ffn"][i][1])
    assert torch.equal(teacher.norm(tr.final), seen["head"][0][0])


def test_identity_swap_gives_cosine_one_and_the_teachers_bpb(teacher):
    from slmlab.evaluate import batch_sums, eval_metrics

    model = make(MODULE_KINDS, teacher, identity=True).eval()
    b = batch(2)
    byte_lengths = torch.randint(1, 5, (V,))
    got = eval_metrics({k: float(v) for k, v in batch_sums(model, b, byte_lengths).items()}, model)
    want = eval_metrics({k: float(v) for k, v in batch_sums(teacher, b, byte_lengths).items()}, teacher)
    assert got["val/bpb"] == pytest.approx(want["val/bpb"], rel=1e-6)
    cosines = {k: v for k, v in got.items() if k.startswith("val/cos/")}
    assert len(cosines) >= 2 * (2 + 3 * TEACHER.n_layers)  # every module, every layer, both modes
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in cosines.values()), cosines
    assert got["val/kl"] == pytest.approx(0.0, abs=1e-6) and got["val/bpb_ratio"] == pytest.approx(1.0, rel=1e-6)


def test_modules_started_from_the_teacher_keep_what_they_can_represent(teacher):
    """With every expert selected the MoEfied FFN is the teacher's FFN (the clustering only permutes
    neurons); full-rank embedding and decoder are the teacher's up to the SVD's rounding."""
    d = TEACHER.dim
    model = make(["ffn", "embedding", "decoder"], teacher, ffn={"num_experts": 4, "top_k": 4},
                 embedding={"rank": d}, decoder={"rank": d})
    m = metrics_of(model, batch(3))
    for key in ("cos/ffn/teacher_in_min", "cos/embedding/teacher_in", "cos/decoder/teacher_in"):
        assert m[key] == pytest.approx(1.0, abs=1e-4), key


# ---------------------------------------------------------------------------------------------
# Causality and decoding


@pytest.mark.parametrize("variant", ["linear", "graph"])
def test_every_module_is_causal(teacher, variant):
    model = make(MODULE_KINDS, teacher, attention={**SMALL["attention"], "variant": variant}).eval()
    b = batch(4)["input_ids"]
    changed = b.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % V
    with torch.no_grad():
        a, c = model.path(b, model.swap, trace=True), model.path(changed, model.swap, trace=True)
    pairs = [("logits", a.logits, c.logits)]
    pairs += [(f"attn{i}", p, q) for i, (p, q) in enumerate(zip(a.attn_out, c.attn_out))]
    pairs += [(f"ffn{i}", p, q) for i, (p, q) in enumerate(zip(a.ffn_out, c.ffn_out))]
    for name, x, y in pairs:
        assert torch.equal(x[:, :15], y[:, :15]), name
        assert not torch.equal(x[:, 15:], y[:, 15:]), name  # and the change does reach the later positions


@pytest.mark.parametrize("variant", ["linear", "graph"])
def test_decoding_through_the_cache_matches_the_full_forward(teacher, variant):
    model = make(MODULE_KINDS, teacher, attention={**SMALL["attention"], "variant": variant}).eval()
    ids = batch(5, t=30)["input_ids"]
    with torch.no_grad():
        full = model({"input_ids": ids}).logits
        cache = model.new_cache(2, L)
        parts = [model({"input_ids": ids[:, :9]}, cache=cache, start_pos=0).logits]
        parts += [model({"input_ids": ids[:, t:t + 1]}, cache=cache, start_pos=t).logits for t in range(9, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_decoding_state_is_what_the_modules_hold(teacher):
    """Linear attention keeps a window and two sums whatever the context; the graph variant keeps
    the key/value history (kv heads only); the teacher's KV cache sits between them per position."""
    from slmlab.profile import state_bytes

    linear, graph = make(MODULE_KINDS, teacher), make(MODULE_KINDS, teacher, attention={"variant": "graph"})
    assert state_bytes(linear, 16) == state_bytes(linear, L) > 0
    assert state_bytes(graph, L) > state_bytes(graph, 16) > 0
    assert state_bytes(graph, L) == pytest.approx(state_bytes(make([], teacher), L), rel=0.1)


def test_generation_runs_through_the_student(teacher):
    from slmlab.generation import generate

    model = make(MODULE_KINDS, teacher)
    out = generate(model, batch(6)["input_ids"][:1, :5], max_new_tokens=8, temperature=0)
    assert out.shape == (1, 13)


def test_decode_profile_times_the_decode_steps_it_ran(teacher, monkeypatch):
    """Tokens/s is generated tokens after the first over the time between the first and the last;
    the old prefill subtraction went negative under load and logged 3.1e10 tokens/s. A fake clock that
    advances 0.25 s per call pins the arithmetic; the real clock gives a finite positive rate."""
    import itertools

    from slmlab.profile import state_bytes
    from slmlab.stages import move as move_stage

    model = make(MODULE_KINDS, teacher)
    real = move_stage.decode_profile(model, V, L, new_tokens=8)
    assert 0 < real["decode_tokens_per_s"] < float("inf")
    assert real["state_mib"] == state_bytes(model, L) / 2**20
    ticks = itertools.count(0.0, 0.25)
    monkeypatch.setattr(move_stage.time, "perf_counter", lambda: next(ticks))
    assert move_stage.decode_profile(model, V, L, new_tokens=8)["decode_tokens_per_s"] == pytest.approx(7 / 1.75)


# ---------------------------------------------------------------------------------------------
# Fitting


@pytest.mark.parametrize("kind,extra", [("embedding", {}), ("position", {}), ("attention", {}),
                                        ("attention", {"attention": {**SMALL["attention"], "variant": "graph"}}),
                                        ("ffn", {}), ("decoder", {})])
def test_a_tiny_fit_raises_the_modules_cosine(kind, extra):
    """Each module from a fresh start, a few optimizer steps on its fitting loss: its teacher-input
    cosine rises (a quarter of its gap to 1 closed). Attention starts from the teacher's (frozen)
    projections as in the pipeline, its feature maps / edge maps fresh; the others from random weights.
    The teacher's rope_theta differs from the position module's starting ladder."""
    torch.manual_seed(1)
    tcfg = TEACHER.model_copy(update={"rope_theta": 40000.0})
    teacher = VectorSLM(tcfg)
    model = make([kind], teacher, from_teacher=kind == "attention", tcfg=tcfg, **extra)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    key = f"cos/{kind}/teacher_in"
    before = metrics_of(model, batch(100))[key]
    model.train()
    for step in range(40):
        loss = model(batch(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = metrics_of(model, batch(100))[key]
    assert after > before and 1 - after < 0.75 * (1 - before), (kind, before, after)  # a quarter of the gap closed
    assert not any(p.grad is not None for n, p in model.named_parameters() if not n.startswith("move."))


def test_distill_objective_trains_the_assembled_student_end_to_end(teacher):
    model = make(MODULE_KINDS, teacher, objective="distill").train()
    out = model(batch(7))
    out.loss.backward()
    assert out.metrics["move/kl"] > 0
    grads = {n.split(".")[1] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(MODULE_KINDS)
    assert model.move["attention"][0].wqkv.weight.grad is not None  # end to end, the projections learn too


# ---------------------------------------------------------------------------------------------
# Bad input


def test_an_unknown_module_name_is_refused():
    with pytest.raises(ValueError, match="embedding.*position.*attention.*ffn.*decoder"):
        MoVEConfig(vocab_size=V, max_seq_len=L, teacher=TEACHER, swap=["attention", "mlp"])


def test_a_teacher_that_is_not_llama_shaped_is_refused(tmp_path):
    from slmlab.models.layers import MoEConfig
    from slmlab.models.new_llm import NewLLMConfig

    with pytest.raises(ValueError, match="dense Llama-shaped teacher"):
        MoVEConfig(vocab_size=V, max_seq_len=L, teacher=TEACHER.model_copy(update={"moe": MoEConfig(num_experts=2)}))
    from slmlab.models import build_model

    other = NewLLMConfig(vocab_size=V)
    write_model(build_model(other), other, tmp_path / "newllm")
    with pytest.raises(MoVEInputError, match=r"model_config.json: family: expected a Llama-shaped teacher .*'new_llm'"):
        load_teacher(tmp_path / "newllm")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(MoVEInputError, match=r"config.json: model_type: expected 'llama'.*'gpt2'"):
        load_teacher(tmp_path / "gpt2")


def test_a_module_checkpoint_that_does_not_fit_its_slot_is_refused(teacher, tmp_path):
    fitted = make(["attention"], teacher)
    write_model(fitted, fitted.move_cfg, tmp_path / "attn")
    graph = make(["attention"], teacher, attention={**SMALL["attention"], "variant": "graph"})
    with pytest.raises(MoVEInputError, match=r"'attention' slot .*'graph'.*(missing|unexpected) move\.attention"):
        load_module(graph, "attention", tmp_path / "attn")
    with pytest.raises(MoVEInputError, match=r"holding the 'ffn' module, found family 'move' with modules"):
        load_module(make(["ffn"], teacher), "ffn", tmp_path / "attn")
    ranked = make(["attention", "embedding"], teacher)
    emb = make(["embedding"], teacher, embedding={"rank": 4})
    write_model(emb, emb.move_cfg, tmp_path / "emb")
    with pytest.raises(MoVEInputError, match=r"wrong shape move\.embedding\.a\.weight \(128, 4\) \(slot \(128, 8\)\)"):
        load_module(ranked, "embedding", tmp_path / "emb")
    load_module(ranked, "attention", tmp_path / "attn")  # the right one loads
    assert torch.equal(ranked.move["attention"][0].fq, fitted.move["attention"][0].fq)


# ---------------------------------------------------------------------------------------------
# Stages


TINY_MODULES = {"kind": "move_modules", "embedding": {"rank": 8}, "decoder": {"rank": 8}, "ffn": {"num_experts": 4},
                "attention": {"window": 8},
                "train": {"max_steps": 4, "eval_every": 4, "checkpoint_every": 4, "lr": 0.01, "weight_decay": 0.0,
                          "warmup_steps": 1}}
TINY_DISTILL = {"kind": "move_distill", "train": {"max_steps": 3, "eval_every": 3, "checkpoint_every": 3, "lr": 0.003}}


def move_pipeline(tmp_path, teacher: str, **extra):
    from tests.conftest import tiny_pipeline_dict

    return tiny_pipeline_dict(tmp_path, name="movetiny", stages=[
        {"kind": "move_teacher", "teacher": teacher, **extra}, TINY_MODULES, {"kind": "move_assemble"}, TINY_DISTILL])


def test_a_missing_registered_teacher_names_the_command_that_trains_it(tmp_path):
    from slmlab.config import validate_pipeline
    from slmlab.stages import PipelineState, StageContext, StageFailed
    from slmlab.stages.move import TeacherStage, run_teacher
    from slmlab.tracking import client_for

    cfg = validate_pipeline(move_pipeline(tmp_path, "models:/nowhere", train_if_missing=False))
    ctx = StageContext(cfg, shards=None, client=client_for(cfg.run_dir), state=PipelineState.new(cfg))
    with pytest.raises(StageFailed, match=r"expected models:/nowhere registered in .*found none: run `slmlab run "
                                          r"pipelines/vectorslm.yaml --set tracking.register_as=nowhere"):
        run_teacher(TeacherStage(teacher="models:/nowhere", train_if_missing=False), ctx)


def test_pipeline_errors_name_the_stage_field(tmp_path):
    from slmlab.config import ConfigError, validate_pipeline

    raw = move_pipeline(tmp_path, "models:/t")
    raw["stages"][1] = {**TINY_MODULES, "modules": ["attention", "mlp"]}
    with pytest.raises(ConfigError, match=r"stages\.1\..*modules\.1: expected 'embedding', 'position', 'attention', "
                                          r"'ffn' or 'decoder', found 'mlp'"):
        validate_pipeline(raw, "move.yaml")
    raw["stages"][1] = {**TINY_MODULES, "train": {"lrr": 0.1}}
    with pytest.raises(ConfigError, match=r"stages\.1\..*train\.lrr: expected no such field"):
        validate_pipeline(raw, "move.yaml")


def _summary(cfg):
    from slmlab.tracking import client_for

    client = client_for(cfg.run_dir)
    exp = client.get_experiment_by_name(cfg.experiment_name).experiment_id
    runs = client.search_runs([exp])
    (summary,) = [r for r in runs if r.data.tags.get("slmlab.role") == "move-summary"]
    modules = [r for r in runs if r.data.tags.get("slmlab.move.module")]
    return client, summary, modules


def _check_metric_set(cfg) -> set[str]:
    """Five module runs (two at a time), per-layer cosine for each, the assembled student registered
    with its bpb next to the teacher's, before and after the final stage; returns the metric names."""
    client, summary, modules = _summary(cfg)
    assert sorted(r.data.tags["slmlab.move.module"] for r in modules) == sorted(MODULE_KINDS)
    assert all(r.info.status == "FINISHED" for r in modules)
    spans = sorted((r.info.start_time, r.info.end_time) for r in modules)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "expected module runs overlapping in time"
    for r in modules:
        kind = r.data.tags["slmlab.move.module"]
        layers = [k for k in r.data.metrics if k.startswith(f"val/cos/{kind}/") and k.endswith("/teacher_in")
                  and "/layer" in k or k == f"val/cos/{kind}/teacher_in" and kind in ("embedding", "decoder")]
        assert len(layers) == (2 if kind in ("position", "attention", "ffn") else 1), (kind, layers)
        assert -1.0 <= r.data.metrics[f"val/cos/{kind}/teacher_in"] <= 1.0
    m = summary.data.metrics
    for key in ["move/bpb/teacher", "move/bpb/assembled", "move/bpb/distilled", "move/kl/assembled",
                "move/params/student", "move/decode_tokens_per_s/assembled", "move/memory_mib/teacher"] + [
                f"move/bpb/swap_{k}" for k in MODULE_KINDS]:
        assert key in m, key
    versions = client.search_model_versions("name='movetiny-assembled'")
    assert versions and versions[0].run_id == summary.info.run_id
    assert client.search_model_versions("name='movetiny-distilled'")
    mem = {s.step: s.value for s in client.get_metric_history(summary.info.run_id, "move/memory_mib/assembled")}
    assert sorted(mem) == [512, 2048]
    return {k.rsplit("/layer", 1)[0] for k in m}


@pytest.mark.slow
def test_a_missing_teacher_is_trained_and_registered_once_then_reused(ray_local, tmp_path):
    """The teacher stage alone (the module stages are the same whatever the teacher's source, and run
    end to end in the next test): a registered name with no version yet is trained through the one
    run lifecycle and registered; a second pipeline run resolves it without training again."""
    from slmlab.config import validate_pipeline
    from slmlab.pipeline import run_stages
    from slmlab.tracking import client_for

    raw = move_pipeline(tmp_path, "models:/tinyteacher")
    raw["stages"] = raw["stages"][:1]
    cfg = validate_pipeline(raw)
    first = run_stages(cfg, progress=lambda m: None)["move_teacher"]
    assert first.runs["teacher"].status == "FINISHED"
    assert first.runs["teacher"].model_uri == "models:/tinyteacher/1"
    assert first.outputs["teacher_ref"] == "models:/tinyteacher/1"
    again = run_stages(cfg, progress=lambda m: None)["move_teacher"]
    assert again.runs == {} and again.outputs["teacher_ref"] == "models:/tinyteacher/1"
    assert [str(v.version) for v in client_for(cfg.run_dir).search_model_versions("name='tinyteacher'")] == ["1"]
    assert again.outputs["teacher_cfg"].n_layers == cfg.model.n_layers


@pytest.mark.slow
def test_move_pipeline_runs_on_a_transformers_llama_folder(ray_local, tmp_path):
    """A teacher saved by transformers itself (nothing downloaded): same stages, same metric set."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmlab.config import validate_pipeline
    from slmlab.data.shards import build_shards
    from slmlab.pipeline import run_stages

    cfg = validate_pipeline(move_pipeline(tmp_path, str(tmp_path / "hf")))
    vocab = build_shards(cfg, progress=lambda m: None).summary["vocab_size"]  # cached: the pipeline reuses it
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "hf")
    run_stages(cfg, progress=lambda m: None)
    names = _check_metric_set(cfg)
    assert {"move/cos/attention", "move/cos/ffn", "move/cos/position", "move/bpb/swap_decoder"} <= names


def test_report_figures_plot_cosine_by_layer_and_bpb_by_swap(tmp_path):
    import base64

    from slmlab.stages.move import report_figures
    from slmlab.tracking import MetricsLogger, client_for, ensure_experiment

    client = client_for(tmp_path)
    exp = ensure_experiment(client, "m", tmp_path)
    assert report_figures(client, exp) == []
    run = client.create_run(exp, tags={"slmlab.role": "move-summary"}).info.run_id
    metrics = {"move/bpb/teacher": 2.0, "move/bpb/assembled": 2.3, "move/bpb/distilled": 2.1,
               **{f"move/bpb/swap_{k}": 2.05 for k in MODULE_KINDS},
               "move/cos/embedding/teacher_in/module": 0.97, "move/cos/decoder/student_in/assembled": 0.9}
    for kind in ("position", "attention", "ffn"):
        for i in range(2):
            metrics[f"move/cos/{kind}/layer{i}/teacher_in/module"] = 0.96
            metrics[f"move/cos/{kind}/layer{i}/student_in/assembled"] = 0.9 - 0.1 * i
    MetricsLogger.for_client(client, run).log(metrics, step=0)
    figs = report_figures(client, exp)
    assert [t.split(":")[0] for t, _ in figs] == ["MoVE", "MoVE"]
    assert all(base64.b64decode(png)[:4] == b"\x89PNG" for _, png in figs)
    # and `slmlab report` embeds them
    import html

    from slmlab.report import write_report

    MetricsLogger.for_client(client, run).log({"val/bpb": 2.3}, step=0)
    client.set_terminated(run, "FINISHED")
    page = write_report("m", tmp_path / "r.html", run_dir=tmp_path).read_text()
    assert all(f"<figcaption>{html.escape(title)}</figcaption>" in page for title, _ in figs)
