"""`slmlab sweep --resume` after the sweep's driver (and its local Ray) was killed mid-way: every trial
ends exactly once. A file of its own so that it runs beside the other sweep tests under xdist."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from tests.conftest import tiny_pipeline_dict


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 7.5 min alone: two drivers, each starting its own Ray
def test_killed_sweep_driver_resumes_every_trial_exactly_once(tmp_path):
    """`slmlab sweep` killed mid-way (driver and its local Ray), then `--resume`: every trial ends
    once, none lost, none repeated, and MLflow's parent and children agree."""
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = tiny_pipeline_dict(tmp_path, name="killed", train__max_steps=8, train__checkpoint_every=2)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    # grace = max_t (max_steps + 1): ASHA has no rung to stop a trial at, so every trial must finish
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump(
            {
                "num_samples": 1,
                "grace_steps": 9,
                "max_concurrent_trials": 1,
                "params": {"train.lr": {"grid": [0.01, 0.02, 0.03]}},
            }
        )
    )
    env = {**os.environ, "SLMLAB_FAIL_SLOW_STEP_S": "0.5", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    cli = [sys.executable, "-m", "slmlab.cli", "sweep", str(tmp_path / "p.yaml")]
    driver = subprocess.Popen(
        cli + [str(tmp_path / "s.yaml")],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = mlflow.tracking.MlflowClient(f"sqlite:///{raw['run_dir']}/mlflow.db")

    def children():
        exp = client.get_experiment_by_name("killed") if (tmp_path / "runs" / "mlflow.db").exists() else None
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return [r for r in runs if r.data.tags.get("slmlab.trial_id")]

    deadline = time.time() + 900
    while time.time() < deadline and driver.poll() is None:
        if any(r.info.status == "FINISHED" for r in children()) and any(r.info.status == "RUNNING" for r in children()):
            break  # one trial done, one mid-run: the worst moment to lose the driver
        time.sleep(1)
    assert driver.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(5)

    resumed = subprocess.run(cli + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    runs = children()
    trial_ids = [r.data.tags["slmlab.trial_id"] for r in runs]
    assert len(trial_ids) == 3 and len(set(trial_ids)) == 3  # none lost, none repeated
    assert {r.info.status for r in runs} == {"FINISHED"}
    (parent,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("killed").experiment_id])
        if r.data.tags.get("slmlab.role") == "sweep-parent"
    ]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["slmlab.best_run_id"] in {r.info.run_id for r in runs}
