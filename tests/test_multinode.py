"""Multi-node behaviour, simulated on this machine with Ray's own multi-node harness
(``ray.cluster_utils.Cluster``: a 0-CPU head and two 1-CPU worker nodes, all on loopback).

This is how a ``ray up`` cluster behaves when a spot node disappears: the stage's independent
runs land on different nodes; a node is removed mid-run; the run that lost its worker resumes on
the surviving node from its last checkpoint and ends with the same loss as its undisturbed twin."""

from __future__ import annotations

import time

import mlflow
import pytest

from slmlab.config import validate_pipeline
from tests.conftest import tiny_pipeline_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # 3 min alone on a quiet machine


@pytest.fixture
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the module-level local Ray of other tests; they start it again on demand
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"},
    )
    workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _train_workers():
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "RayTrainWorker"]


def test_runs_spread_over_nodes_and_survive_losing_one(three_nodes, tmp_path, monkeypatch):
    import ray

    from slmlab.pipeline import run_stages

    cluster, workers = three_nodes
    monkeypatch.setenv("SLMLAB_FAIL_SLOW_STEP_S", "0.5")  # tiny steps, slowed so the node goes mid-run
    # two identical runs (same seed, data and config): the undisturbed one is the other's reference
    raw = tiny_pipeline_dict(
        tmp_path,
        name="nodes",
        train__cpus_per_worker=1,
        train__max_steps=16,
        train__checkpoint_every=2,
        train__eval_every=8,
        train__max_failures=3,
        stages=[
            {"kind": "independent", "name": "pair", "register_models": False, "runs": [{"name": "a"}, {"name": "b"}]}
        ],
    )
    cfg = validate_pipeline(raw)

    import threading

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(run_stages(cfg, progress=lambda m: None)))
    thread.start()
    deadline = time.time() + 600
    while len(_train_workers()) < 2 and time.time() < deadline:
        time.sleep(1)
    actors = _train_workers()
    assert len({a.node_id for a in actors}) == 2  # one run per worker node

    client = mlflow.tracking.MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    exp = client.get_experiment_by_name("nodes")

    def steps_done():
        runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("slmlab.variant") in ("a", "b")]
        return min((len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs), default=0)

    while steps_done() < 5 and time.time() < deadline:  # past the step-4 checkpoint in both runs
        time.sleep(0.5)
    victim = next(w for w in workers if w.node_id == actors[0].node_id)
    cluster.remove_node(victim)
    thread.join(timeout=900)
    assert not thread.is_alive()

    runs = outcome["pair"].runs
    assert {k: r.status for k, r in runs.items()} == {"a": "FINISHED", "b": "FINISHED"}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert victim.node_id not in alive
    histories = {
        k: sorted((m.timestamp, m.step, m.value) for m in client.get_metric_history(r.mlflow_run_id, "train/loss"))
        for k, r in runs.items()
    }
    replayed = {k: len(h) - len({step for _, step, _ in h}) for k, h in histories.items()}
    assert sorted(replayed.values())[0] == 0 and sorted(replayed.values())[1] > 0  # exactly one run lost its worker
    final = {k: [v for _, step, v in h if step == 16][-1] for k, h in histories.items()}
    assert final["a"] == pytest.approx(final["b"], rel=1e-5, abs=1e-6)
