"""A Ray Train worker killed mid-run is restarted by Ray (FailureConfig) from its last checkpoint
and the run finishes at the right step, replaying exactly the data after that checkpoint.

The killed run trains with DeepSpeed's CPU Adam and ZeRO-Offload (optimizer states in CPU memory,
held by DeepSpeed rather than torch): the exact replay shows those states are checkpointed and
restored too. CPU Adam is a C++ extension DeepSpeed JIT-builds on first use (~70 s here); the
environment set-up (bin/_env.sh) builds it once, so this test does not pay for it."""

from __future__ import annotations

import mlflow
import pytest

from slmlab.config import validate_pipeline
from tests.conftest import tiny_pipeline_dict

pytestmark = pytest.mark.slow


def test_killed_worker_resumes_from_last_checkpoint(ray_local, tmp_path, monkeypatch):
    from slmlab.pipeline import run_pipeline

    marker = tmp_path / "worker-was-killed"
    monkeypatch.setenv("SLMLAB_FAIL_AT_STEP", "6")  # checkpoints at 4 and 8: steps 5-6 must be redone
    monkeypatch.setenv("SLMLAB_FAIL_MARKER", str(marker))
    cfg = validate_pipeline(tiny_pipeline_dict(tmp_path, train__max_failures=1, train__optimizer="cpu_adam",
                                               train__offload_optimizer=True, train__zero_stage=1))

    result = run_pipeline(cfg)

    assert marker.read_text() == "6"  # the worker process really died at step 6
    assert result.metrics["step"] == 8 and result.model_version == "1"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    losses: dict[int, list[float]] = {}
    for m in sorted(client.get_metric_history(result.mlflow_run_id, "train/loss"), key=lambda m: m.timestamp):
        losses.setdefault(m.step, []).append(m.value)
    # steps after the last checkpoint were trained twice, everything else once: nothing lost
    assert {s: len(v) for s, v in losses.items()} == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 1, 8: 1}
    # and the replay saw the same batches from the same weights and optimizer state
    for step in (5, 6):
        first, replay = losses[step]
        assert replay == pytest.approx(first, rel=1e-5, abs=1e-6), step
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.params["train.optimizer"], run.data.params["train.offload_optimizer"]) == ("cpu_adam", "True")
    assert losses[8][0] < losses[1][0]  # and it learned


def test_nan_loss_stops_naming_the_step_keeps_the_checkpoint_and_resumes(ray_local, tmp_path, monkeypatch):
    from slmlab.pipeline import run_pipeline
    from slmlab.stages import StageFailed

    marker = tmp_path / "nan-was-injected"
    monkeypatch.setenv("SLMLAB_FAIL_NAN_AT_STEP", "6")  # checkpoints at 4 and 8
    monkeypatch.setenv("SLMLAB_FAIL_MARKER", str(marker))
    cfg = validate_pipeline(tiny_pipeline_dict(tmp_path))

    with pytest.raises(StageFailed) as failed:
        run_pipeline(cfg)
    message = str(failed.value)
    assert "\n" not in message
    assert "NonFiniteLoss: step 6: train/loss is nan" in message and "last good checkpoint (step 4)" in message
    client = mlflow.tracking.MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4, 5]

    result = run_pipeline(cfg, resume="latest")  # the poison was one-off (the marker says it fired)
    assert result.mlflow_run_id == run.info.run_id and result.metrics["step"] == 8 and result.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # resumed from the step-4 checkpoint
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
