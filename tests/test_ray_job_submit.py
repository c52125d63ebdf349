"""`ray job submit` against a local head on 127.0.0.1: the documented cluster entry point."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import tiny_pipeline_dict

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_head(tmp_path):
    """A real `ray start --head`, bound to loopback, stopped afterwards. The in-process Ray of
    other tests is shut down first so the head gets both CPUs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    import tempfile

    temp_dir = Path(tempfile.mkdtemp(prefix="slmray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    cmd = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={free_port()}",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    started = subprocess.run(cmd, env=env, timeout=180, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster_under(temp_dir: Path) -> None:
    """Stop only this head's processes (those started with our --temp-dir), not every Ray on the
    machine as `ray stop` would."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in proc.info["cmdline"] or []):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        proc.terminate()
    # Ray's own processes exit on SIGTERM within a second or two; some leftover worker ignores it, and
    # waiting the old 30 s for it was a quarter of this test's time
    _, alive = psutil.wait_procs(mine, timeout=5)
    for proc in alive:
        proc.kill()


def test_pipeline_runs_under_ray_job_submit(local_head, tmp_path):
    address, env = local_head
    with urllib.request.urlopen(f"{address}/api/version", timeout=30) as resp:  # dashboard answers on loopback
        assert resp.status == 200
    nodes = json.loads(
        subprocess.run(
            [RAY, "list", "nodes", "--address", address, "--format", "json"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )
    assert [n["node_ip"] for n in nodes] == ["127.0.0.1"]

    pipeline = tmp_path / "tiny.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline_dict(tmp_path, train__max_steps=4, train__checkpoint_every=4)))
    job = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--", sys.executable, "-m", "slmlab.cli", "run", str(pipeline)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='tiny'")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and "val/bpb" in run.data.metrics
