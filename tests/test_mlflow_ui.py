"""`slmlab ui` serves a pipeline's runs to MLflow's UI: started as a user starts it, read through the
REST endpoints its run comparison uses, stopped by SIGTERM with every child process gone.

The pipeline it serves is itself a test of the real stack: New-LLM compared with VectorSLM through
Ray Train + DeepSpeed in bf16, each followed by the INT8 step on the trained model."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_pipeline(ray_local, tmp_path_factory):
    """A tiny VectorSLM pipeline and a New-LLM variant compared with it, in bf16, with the INT8 step:
    two finished runs in one experiment."""
    from slmlab.config import validate_pipeline
    from slmlab.pipeline import run_pipeline
    from tests.conftest import tiny_pipeline_dict

    variant = {"family": "new_llm", "dim": 32, "context_dim": 32, "n_layers": 2, "ffn_hidden": 64, "max_seq_len": 64}
    raw = tiny_pipeline_dict(
        tmp_path_factory.mktemp("ui"),
        compare=[{"name": "newllm", "model": variant}],
        train__precision="bf16",
        eval__quantize_int8=True,
    )
    cfg = validate_pipeline(raw)
    run_pipeline(cfg)
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _api(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def ui(finished_pipeline, tmp_path_factory):
    import psutil

    cfg = finished_pipeline
    port = _free_port()
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "slmlab.cli", "ui", "--run-dir", cfg.run_dir, "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"slmlab ui exited {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                if _get(base + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /health answer: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        yield base, proc, children
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ui_listens_on_loopback_only(ui):
    import psutil

    base, proc, children = ui
    pids = {proc.pid} | {c.pid for c in children}
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids}
    assert listening and all(ip == "127.0.0.1" for ip, _ in listening), listening


def test_runs_and_bpb_histories_through_the_rest_api(ui, finished_pipeline):
    from mlflow.tracking import MlflowClient

    base, _, _ = ui
    cfg = finished_pipeline
    exp = _api(base, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={cfg.experiment_name}")["experiment"]
    runs = _api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    finished = [r for r in runs if r["info"]["status"] == "FINISHED"]
    variants = {t["value"] for r in finished for t in r["data"].get("tags", []) if t["key"] == "slmlab.variant"}
    assert len(finished) == 2 and variants == {cfg.label, "newllm"}, (len(finished), variants)

    store = MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    for run in finished:
        run_id = run["info"]["run_id"]
        history = _api(base, f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=val/bpb")["metrics"]
        served = {m["step"]: m["value"] for m in history}
        assert served == {m.step: m.value for m in store.get_metric_history(run_id, "val/bpb")}
        assert sorted(served) == [0, 4, 8] and served[8] < served[0], served
        latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert latest["val/bpb"] == served[8]

    # the UI's comparison charts read every selected run's history in one request
    ids = "&".join(f"run_ids={r['info']['run_id']}" for r in finished)
    bulk = _api(base, f"/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval?{ids}&metric_key=val/bpb")
    assert {m["run_id"] for m in bulk["metrics"]} == {r["info"]["run_id"] for r in finished}


def test_new_llm_and_vectorslm_train_in_bf16_and_are_quantised(finished_pipeline):
    from mlflow.tracking import MlflowClient

    cfg = finished_pipeline
    store = MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    runs = store.search_runs([store.get_experiment_by_name(cfg.experiment_name).experiment_id])
    by_family = {r.data.tags["slmlab.family"]: r for r in runs if r.info.status == "FINISHED"}
    assert sorted(by_family) == ["new_llm", "vectorslm"]
    for family, run in by_family.items():
        m = run.data.metrics
        assert run.data.params["train.precision"] == "bf16", family
        history = store.get_metric_history(run.info.run_id, "val/bpb")
        first, last = min(history, key=lambda x: x.step).value, max(history, key=lambda x: x.step).value
        assert last < first, (family, first, last)  # bf16 training learned something
        # INT8 on the real trained model: under half the fp32 bytes' worth of weights plus
        # scales, and bits per byte within 0.1 of the fp32 model's on the same validation blocks
        assert m["quant/int8_bytes"] < 0.5 * m["quant/fp32_bytes"], family
        assert abs(m["quant/int8_bpb"] - m["quant/fp32_bpb"]) < 0.1, family


def test_sigterm_stops_the_server_and_its_children(ui):
    import psutil

    base, proc, children = ui
    assert children, "mlflow ui runs as a child of slmlab ui"
    proc.send_signal(signal.SIGTERM)  # to `slmlab ui` only, as a service manager would
    assert proc.wait(timeout=60) is not None
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert alive == [], [(p.pid, p.name()) for p in alive]
    with pytest.raises(OSError):
        _get(base + "/health", timeout=5)
