"""The fixed cost of one Ray Train run, and what slmlab's controller poll interval saves.

A Ray Train run's controller notices that its worker group started, reported or finished only when
it polls (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``). Baseline: Ray's default (2 s). slmlab sets 0.5 s
(``slmlab/__init__.py``). Each arm runs the same do-nothing ``TorchTrainer.fit()`` (1 worker, no data,
one report), alternating arms so that neither profits from running second; the first fit of the Ray
session is untimed. What is left at 0.5 s is process start-up: the controller, the worker and
three helper actors are each a new Python process importing torch and Ray Train.

    .venv/bin/python benchmarks/bench_run_fixed_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import slmlab  # noqa: F401  (sets slmlab's Ray environment before ray is imported)


def noop_loop(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def one_fit(storage: str, name: str, poll_s: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = poll_s  # read when the trainer is built
    trainer = TorchTrainer(
        noop_loop,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from slmlab.runtime import ensure_ray

    ensure_ray()
    storage = tempfile.mkdtemp(prefix="slmlab-bench-fixed-")
    arms = {"ray default (2 s poll)": "2.0", "slmlab (0.5 s poll)": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}
    one_fit(storage, "warmup", "0.5")
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for i in range(args.repeats):
        for arm, poll in arms.items():
            times[arm].append(one_fit(storage, f"r{i}-{poll}", poll))
    print(f"do-nothing TorchTrainer.fit(), 1 worker, {args.repeats} repeats per arm (alternating)")
    for arm, ts in times.items():
        print(f"{arm:24s}: median {statistics.median(ts):5.1f} s  ({', '.join(f'{t:.1f}' for t in ts)})")
    base, ours = (statistics.median(ts) for ts in times.values())
    print(f"ratio default / slmlab    : {base / ours:5.2f}x  ({base - ours:.1f} s saved per run)")


if __name__ == "__main__":
    main()
