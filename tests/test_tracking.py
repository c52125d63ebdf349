"""The MLflow store a run dir gets: a new one starts from this process's migrated empty store."""

from __future__ import annotations

import sqlite3

from slmlab.tracking import client_for, ensure_experiment


def test_new_stores_are_complete_and_an_existing_store_is_never_replaced(tmp_path):
    first = client_for(tmp_path / "a")
    exp = ensure_experiment(first, "kept", tmp_path / "a")
    run = first.create_run(exp)
    first.log_metric(run.info.run_id, "val/bpb", 1.5)
    first.create_registered_model("m")

    again = client_for(tmp_path / "a")  # the same run dir: its runs are still there
    assert again.get_metric_history(run.info.run_id, "val/bpb")[0].value == 1.5

    second = client_for(tmp_path / "b")  # a copy of the empty store: tracking and registry both work
    assert [e.name for e in second.search_experiments()] == ["Default"]
    assert second.search_registered_models() == []
    exp_b = ensure_experiment(second, "other", tmp_path / "b")
    second.create_registered_model("m")
    assert second.get_experiment(exp_b).artifact_location.endswith("b/mlartifacts/other")
    with sqlite3.connect(tmp_path / "b" / "mlflow.db") as db:  # migrated to the same schema revision
        rev_b = db.execute("select version_num from alembic_version").fetchall()
    with sqlite3.connect(tmp_path / "a" / "mlflow.db") as db:
        assert db.execute("select version_num from alembic_version").fetchall() == rev_b
    assert not list((tmp_path / "b").glob(".mlflow.db.*"))  # no staged copy left behind
