"""Several independent training runs at once — each a whole :func:`slmlab.lifecycle.train_run`.

Mechanism: one Ray task per run (0 CPUs, pinned to the driver's node), each calling
``TorchTrainer.fit()`` for its own run, launched no faster than the cluster can hold them. Why
not Ray Tune with fixed configs, the other mechanism Ray offers:

* Tune adds nothing a fixed list of runs needs (no search, no scheduler) but brings its own
  experiment state, trial actors and resume protocol beside ours; the pipeline's state file
  already knows which runs finished, so ``--resume`` simply re-launches the others.
* A Tune trial nests the Train run's placement group inside the trial's (ray#47439) and Ray
  Data inside a fractional-CPU trial waits forever (measured here for sweeps, see sweep.py). A
  plain 0-CPU task has no placement group, so the Train run's workers and its data reads are
  scheduled like a top-level run's.
* Failures stay separate for free: a run that raises fails its own task only; the driver
  reports it by label and the others go on.

Pinning the coordinating tasks to the driver's node keeps them off worker nodes that may
disappear (spot nodes): a lost node then costs only the Ray Train workers on it, which Train
restarts from the last checkpoint (``train.max_failures``), not the run's bookkeeping.

How many run together: the cluster's CPUs (and GPUs) divided by what one run's workers ask for,
capped by the stage's ``max_concurrent``: 2 runs of 1 CPU on this 2-core machine, as many as fit
on a cluster. Waiting in the driver, rather than launching everything and letting Train wait for
resources, keeps runs from half-starting and timing out while their peers hold the CPUs.
"""

from __future__ import annotations

import math
from typing import Callable

from slmlab.lifecycle import RunResult, RunSpec, train_run

Progress = Callable[[str], None]


def capacity(spec: RunSpec, max_concurrent: int | None = None, reserve_cpus: float = 0.0) -> int:
    """How many runs like ``spec`` the cluster holds at once (at least 1, at most max_concurrent),
    leaving ``reserve_cpus`` free (for read tasks of data that streams during training)."""
    import ray

    total = ray.cluster_resources()
    tc = spec.cfg.train
    fits = math.floor((total.get("CPU", 0) - reserve_cpus) / (tc.num_workers * tc.cpus_per_worker) + 1e-9)
    if tc.use_gpu:
        fits = min(fits, math.floor(total.get("GPU", 0) / tc.num_workers))
    return max(1, min(fits, max_concurrent or fits))


def _remote_train(spec: RunSpec, datasets: dict) -> RunResult:
    return train_run(spec, progress=lambda m: print(f"[slmlab] {m}", flush=True), datasets=datasets)


def train_concurrently(
    specs: list[RunSpec],
    max_concurrent: int | None = None,
    progress: Progress = print,
    prepare: Callable[[RunSpec], RunSpec] | None = None,
    on_done: Callable[[RunResult], None] | None = None,
) -> dict[str, RunResult]:
    """Train every spec, at most ``capacity`` at a time; returns {label: RunResult}, failures
    included as status FAILED. ``prepare`` runs in the driver just before a run is launched (e.g.
    to create its MLflow run); ``on_done`` as each result arrives."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not specs:
        return {}
    here = ray.get_runtime_context().get_node_id()
    task = ray.remote(_remote_train).options(
        num_cpus=0,
        max_retries=0,
        name="slmlab-run",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    )
    # Every run's data is read here, before any run starts: a read task launched while the other
    # runs' workers hold every CPU waits forever (its file listing asks for a whole CPU; PR #41603).
    # Small shards are materialized (the driver owns them); larger ones stream, and then one CPU
    # stays free for their reads.
    from slmlab.train.launch import ingest, streams

    data: dict[tuple, dict] = {}
    for spec in specs:
        key = (str(spec.train_dir), str(spec.shards.val_dir))
        if key not in data:
            data[key] = ingest(spec)
    streaming = any(streams(d) for d in data.values())
    limit = capacity(specs[0], max_concurrent, reserve_cpus=1.0 if streaming else 0.0)
    progress(f"runs: {len(specs)} independent run(s), {limit} at a time")
    waiting, running, results = list(specs), {}, {}
    while waiting or running:
        while waiting and len(running) < limit:
            spec = waiting.pop(0)
            try:
                spec = prepare(spec) if prepare else spec
            except Exception as err:
                results[spec.label] = RunResult(
                    spec.label, spec.run_name or "", spec.mlflow_run_id or "", "FAILED", error=one_line(err)
                )
                progress(f"runs: {spec.label} FAILED: {results[spec.label].error}")
                continue
            running[task.remote(spec, data[(str(spec.train_dir), str(spec.shards.val_dir))])] = spec
        if not running:
            break
        done, _ = ray.wait(list(running), num_returns=1)
        spec = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as err:  # the run's own failure: reported by label, the others go on
            result = RunResult(spec.label, spec.run_name or "", spec.mlflow_run_id or "", "FAILED", error=one_line(err))
            progress(f"runs: {spec.label} FAILED: {result.error}")
        else:
            progress(f"runs: {spec.label} {result.status}" + (f" → {result.model_uri}" if result.model_uri else ""))
        results[spec.label] = result
        if on_done:
            on_done(result)
    return results


def one_line(err: BaseException) -> str:
    """The user-facing line of an error raised in a Ray task or a Ray Train worker: the innermost
    cause's message, without Ray's wrapping and tracebacks."""
    cause = err
    for _ in range(10):  # RayTaskError → TrainingFailedError → the worker's exception
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None or inner is cause:
            break
        cause = inner
    text = str(cause).strip().splitlines()
    lines = [ln for ln in text if ln.strip() and not ln.startswith(("Traceback", "  File", "    "))]
    return f"{type(cause).__name__}: {lines[-1] if lines else cause!r}"[:500]
