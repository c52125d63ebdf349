"""`slmlab sweep`: Ray Tune over Ray Train runs, ASHA on val/bpb, MLflow parent/child runs."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from slmlab.config import ConfigError, validate_pipeline
from slmlab.sweep import SearchSpace, apply_overrides, load_space
from tests.conftest import REPO, tiny_pipeline_dict


def test_shipped_search_spaces_load_and_apply():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = load_space(path)
        assert space.params and space.metric == "val/bpb"
        assert set(space.tune_space()) == set(space.params)


def test_bad_search_space_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"params": {"model.dim": {"normal": [0, 1]}}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: params: model.dim: expected one of"):
        load_space(bad)


def test_overrides_reach_nested_fields(tmp_path):
    raw = apply_overrides(tiny_pipeline_dict(tmp_path), {"model.moe.num_experts": 4, "train.lr": 0.01})
    cfg = validate_pipeline(raw)
    assert cfg.model.moe.num_experts == 4 and cfg.train.lr == 0.01


@pytest.mark.slow
def test_sweep_survives_a_failing_trial_and_registers_the_best(ray_local, tmp_path):
    from slmlab.sweep import run_sweep

    cfg = validate_pipeline(tiny_pipeline_dict(tmp_path, model__moe={"num_experts": 2, "top_k": 1}))
    # top_k=3 > num_experts=2: that trial fails validation inside Tune; the sweep must go on
    space = SearchSpace(num_samples=1, params={"model.moe.top_k": {"grid": [1, 3, 2]}}, grace_steps=4)
    summary = run_sweep(cfg, space, progress=lambda m: None)

    assert len(summary["trials"]) == 3 and summary["errored"] == 1
    assert summary["best"] is not None and summary["best"]["model_version"] == "1"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    exp = client.get_experiment_by_name(cfg.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("slmlab.role") == "sweep-parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2  # the invalid trial never got as far as a run
    assert parent.data.tags["slmlab.best_run_id"] == summary["best"]["run_id"]
    assert {c.data.params["model.moe.top_k"] for c in children} == {"1", "2"}
    best = client.get_run(summary["best"]["run_id"])
    assert best.data.metrics["val/bpb"] == min(
        c.data.metrics["val/bpb"] for c in children if "val/bpb" in c.data.metrics and c.info.status == "FINISHED"
    )
