"""The spine end to end on the real stack: Ray Data → Ray Train + DeepSpeed → MLflow registry.

While the module's pipeline trains, every listening socket of this process and its descendants is
sampled: a local run must listen on loopback only (Ray, its dashboard, Ray Data, and the Ray Train
workers' torch.distributed rendezvous store and gloo sockets).

Slow tier: every test here starts real Ray Train runs (~20-40 s each on 2 cores).
"""

from __future__ import annotations

import math

import mlflow
import pytest

from slmlab.config import validate_pipeline
from slmlab.data.shards import build_shards

pytestmark = pytest.mark.slow


def history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


FINETUNE = {
    "data": {
        "sources": [{"kind": "embedded", "format": "chat", "max_documents": 200}],
        "seq_len": 32,
        "val_fraction": 0.1,
    },
    "train": {"max_steps": 4, "eval_every": 2, "checkpoint_every": 4, "lr": 0.003},
}


@pytest.fixture(scope="module")
def pipeline_runs(ray_local, tmp_path_factory):
    """One tiny pipeline (pretrain, then instruction fine-tuning) run to completion."""
    from slmlab.pipeline import run_pipeline
    from tests.conftest import tiny_pipeline_dict
    from tests.sockets import ListenSampler

    raw = tiny_pipeline_dict(tmp_path_factory.mktemp("e2e"), finetune=FINETUNE)
    cfg = validate_pipeline(raw)
    sampler = ListenSampler()
    sampler.start()
    try:
        sft = run_pipeline(cfg)
    finally:
        sampler.stop.set()
        sampler.join()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    return cfg, sft, client, sampler.seen


@pytest.fixture(scope="module")
def finished_run(pipeline_runs):
    """The pretraining stage of that pipeline, as if it had run alone."""
    from slmlab.lifecycle import RunResult

    cfg, sft, client, _ = pipeline_runs
    pre_id = client.get_run(sft.mlflow_run_id).data.tags["slmlab.parent_run_id"]
    pre = client.get_run(pre_id)
    version = pre.data.tags["slmlab.registered_version"].split("/")[-1]
    result = RunResult(cfg.label, pre.info.run_name, pre_id, "FINISHED", version, metrics=pre.data.metrics)
    return cfg.model_copy(update={"finetune": None}), result, client


def test_run_registers_a_model_with_its_metrics(finished_run):
    cfg, result, client = finished_run
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "val/loss", "val/ppl", "val/bpb", "train/tokens_per_s"):
        assert key in run.data.metrics, key
    assert run.data.params["model.family"] == "vectorslm"
    versions = client.search_model_versions(f"name='{cfg.registered_model_name}'")
    assert [str(v.version) for v in versions] == [result.model_version]
    assert versions[0].run_id == result.mlflow_run_id
    # the registered version resolves to loadable safetensors weights + config + tokenizer
    from slmlab.tracking import resolve_model_dir
    from slmlab.train.checkpoint import load_model_dir

    local = resolve_model_dir(f"models:/{cfg.registered_model_name}/{result.model_version}", cfg.run_dir)
    loaded_cfg, model = load_model_dir(local)
    assert loaded_cfg.vocab_size == cfg.tokenizer.vocab_size
    assert sum(p.numel() for p in model.parameters()) > 0


def test_validation_bits_per_byte_fall(finished_run):
    cfg, result, client = finished_run
    bpb = history(client, result.mlflow_run_id, "val/bpb")
    assert sorted(bpb) == [0, 4, 8]
    assert bpb[8] < bpb[4] < bpb[0], bpb
    assert bpb[8] < 0.92 * bpb[0], bpb  # 8 tiny steps: ~12% measured; the main pipeline falls 34%
    # perplexity and loss are the same measurement in other units
    loss, ppl = history(client, result.mlflow_run_id, "val/loss"), history(client, result.mlflow_run_id, "val/ppl")
    assert math.isclose(ppl[8], math.exp(loss[8]), rel_tol=1e-6)


def test_resume_continues_at_the_right_step_with_the_same_data(finished_run, tmp_path):
    """Stop a second, identical run at step 4, resume it with train.compile on, and compare its steps 5..8
    with the uninterrupted run: same losses means same weights, optimizer state and data order, and a
    compiled model that computes what the eager one does."""
    from slmlab.pipeline import run_pipeline

    cfg, full, client_full = finished_run
    raw = cfg.model_dump(mode="json")
    raw["train"]["stop_at_step"] = 4
    first = run_pipeline(validate_pipeline(raw))
    assert first.model_version is None and first.metrics["step"] == 4

    raw["train"]["stop_at_step"] = None
    raw["train"]["compile"] = True  # the resumed half runs compiled: a speed switch must not change the curve
    resumed = run_pipeline(validate_pipeline(raw), resume=first.run_name)
    assert resumed.mlflow_run_id == first.mlflow_run_id and resumed.metrics["step"] == 8

    interrupted = history(client_full, first.mlflow_run_id, "train/loss")
    uninterrupted = history(client_full, full.mlflow_run_id, "train/loss")
    assert sorted(interrupted) == list(range(1, 9))
    for step in range(1, 5):
        assert interrupted[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step
    for step in range(5, 9):  # compiled kernels round differently: within the 1e-4 every speed-up must keep
        assert interrupted[step] == pytest.approx(uninterrupted[step], rel=0, abs=1e-4), step


def test_finetune_starts_from_the_registered_model_and_registers_its_own(pipeline_runs, finished_run):
    cfg, sft, client, _ = pipeline_runs
    _, pre, _ = finished_run
    run = client.get_run(sft.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["slmlab.stage"] == "finetune"
    assert run.data.tags["mlflow.parentRunId"] == pre.mlflow_run_id
    assert run.data.tags["slmlab.base_model"] == f"models:/tiny/{pre.model_version}"
    assert [str(v.version) for v in client.search_model_versions("name='tiny-sft'")] == [sft.model_version]
    # the loss is on answers only: far fewer target tokens than tokens in the chat shards
    assert run.data.metrics["data/train_tokens"] > 0
    # fine-tuning starts from the pretrained weights, not from scratch: its step-0 loss on chat
    # data is already below that of a fresh model (uniform-ish over the vocabulary)
    first = min(client.get_metric_history(sft.mlflow_run_id, "val/loss"), key=lambda m: m.step)
    assert first.step == 0 and first.value < math.log(cfg.tokenizer.vocab_size)


def test_cached_shards_are_reused(ray_local, finished_run):
    cfg, _, _ = finished_run
    messages = []
    again = build_shards(cfg, progress=messages.append)
    assert messages == [f"data: reusing cached shards {again.root}"]
    changed = cfg.model_copy(deep=True)
    changed.data.seq_len = 16
    from slmlab.data.shards import cache_key

    assert cache_key(changed) != again.key


def test_local_run_listens_on_loopback_only(pipeline_runs):
    from tests.sockets import is_loopback

    seen = pipeline_runs[3]
    # the premise: the sampler saw the training workers' own listeners (the rendezvous store at least)
    assert any("RayTrainWorker" in name for name, _, _ in seen), sorted(seen)
    assert not is_loopback("::") and not is_loopback("0.0.0.0") and is_loopback("::ffff:127.0.0.1")
    exposed = sorted(s for s in seen if not is_loopback(s[1]))
    assert exposed == [], exposed


def test_two_data_parallel_workers_validate_every_batch_exactly_once(ray_local, tmp_path):
    """Two Ray Train workers (DeepSpeed data parallel): the unsplit validation set is shared out
    batch by batch, so the step-0 validation loss over the whole set equals the same seeded model's
    loss computed here in one process, every row counted once (none twice, none missed)."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq
    import torch

    from slmlab.data.tokenizer import load_tokenizer, token_byte_lengths
    from slmlab.evaluate import evaluate_batches
    from slmlab.models import build_model
    from slmlab.pipeline import run_pipeline
    from tests.conftest import tiny_pipeline_dict

    raw = tiny_pipeline_dict(tmp_path, train__num_workers=2, train__micro_batch_size=2, train__max_steps=1,
                             train__eval_every=1, train__checkpoint_every=1, train__eval_batches=100_000)
    cfg = validate_pipeline(raw)
    result = run_pipeline(cfg)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    ray_loss = history(client, result.mlflow_run_id, "val/loss")[0]
    ray_targets = history(client, result.mlflow_run_id, "val/targets")[0]

    model_cfg = json.loads((result.model_dir / "model_config.json").read_text())
    torch.manual_seed(cfg.seed)  # the loop's initialisation, on every rank
    model = build_model(type(cfg.model).model_validate(model_cfg))
    val_dir = next(p for p in (Path(cfg.run_dir) / "cache" / "data").iterdir() if (p / "val").is_dir()) / "val"
    table = pq.read_table(val_dir)
    batches = [table.slice(i, 64).to_pydict() for i in range(0, table.num_rows, 64)]
    tokenizer = load_tokenizer(result.model_dir / "tokenizer.json")
    local = evaluate_batches(model, batches, torch.tensor(token_byte_lengths(tokenizer)), "cpu")
    assert ray_targets == local["val/targets"]  # every target once: none counted twice, none missed
    assert math.isclose(ray_loss, local["val/loss"], rel_tol=1e-6), (ray_loss, local["val/loss"])
