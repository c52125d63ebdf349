"""Independent runs in parallel vs one after another, and where a run's fixed cost goes.

Baseline: the same 4 tiny independent runs (one ``independent`` stage) with ``max_concurrent: 1``
(sequential), then with the cluster's capacity (2 at a time on 2 cores at 1 CPU per run), in the
same process and Ray session. Prints both wall times, their ratio, and per run the fixed-cost parts
MLflow recorded: Ray Train fit minus training (start-up: placement, worker processes, DeepSpeed
engine, first evaluation) and finishing (weights to MLflow, profile, samples).

    .venv/bin/python benchmarks/bench_parallel_runs.py [--steps 30] [--runs 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_config(run_dir: str, name: str, runs: int, steps: int, max_concurrent: int | None):
    from slmlab.config import validate_pipeline

    raw = {
        "name": name,
        "seed": 7,
        "run_dir": run_dir,
        "data": {"sources": [{"kind": "embedded", "max_documents": 200}], "seq_len": 64, "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 1024},
        "model": {"family": "vectorslm", "dim": 96, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128},
        "train": {
            "micro_batch_size": 8,
            "max_steps": steps,
            "warmup_steps": 2,
            "eval_every": steps,
            "eval_batches": 4,
            "checkpoint_every": steps,
            "lr": 0.01,
            "cpus_per_worker": 1,
            "torch_threads": 1,
        },
        "eval": {"prompts": ["The "], "max_new_tokens": 8},
        "stages": [
            {
                "kind": "independent",
                "name": "runs",
                "max_concurrent": max_concurrent,
                "register_models": False,
                "runs": [{"name": f"r{i}", "set": {"train.lr": 0.005 * (i + 1)}} for i in range(runs)],
            }
        ],
    }
    return validate_pipeline(raw, name)


def fixed_costs(cfg, results) -> list[dict]:
    from slmlab.tracking import client_for

    client = client_for(cfg.run_dir)
    out = []
    for r in results.values():
        m = client.get_run(r.mlflow_run_id).data.metrics
        out.append(
            {
                "startup_s": m["time/fit_s"] - m["time/train_s"],
                "worker_setup_s": m["time/worker_setup_s"],
                "worker_imports_s": m["time/worker_imports_s"],
                "engine_init_s": m["time/engine_init_s"],
                "first_eval_s": m["time/first_eval_s"],
                "finish_s": m["time/finish_s"],
                "fit_s": m["time/fit_s"],
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    from slmlab.data.shards import build_shards
    from slmlab.pipeline import run_stages
    from slmlab.runtime import ensure_ray

    ensure_ray()
    run_dir = tempfile.mkdtemp(prefix="slmlab-bench-parallel-")
    walls, costs = {}, {}
    # one untimed run first: the first Ray Train run of a Ray session pays one-off costs (worker pool,
    # first imports from a cold page cache): 108 s against 33 s for the next ones, here, which would
    # count against whichever arm ran first
    warm = stage_config(run_dir, "bench-warmup", 1, 2, 1)
    build_shards(warm, progress=lambda m: None)
    run_stages(warm, progress=lambda m: None)
    for label, cap in (("sequential", 1), ("parallel", None)):
        cfg = stage_config(run_dir, f"bench-{label}", args.runs, args.steps, cap)
        build_shards(cfg, progress=lambda m: None)  # data built once, outside the timed part
        t0 = time.perf_counter()
        results = run_stages(cfg, progress=lambda m: None)["runs"].runs
        walls[label] = time.perf_counter() - t0
        costs[label] = fixed_costs(cfg, results)
    print(f"{args.runs} independent runs x {args.steps} steps (VectorSLM dim 96, 1 CPU per run)")
    print(f"sequential (max_concurrent 1) : {walls['sequential']:7.1f} s")
    print(f"parallel (cluster capacity)   : {walls['parallel']:7.1f} s")
    print(f"ratio sequential / parallel   : {walls['sequential'] / walls['parallel']:7.2f}x")
    seq = costs["sequential"]
    parts = ("fit_s", "startup_s", "worker_setup_s", "worker_imports_s", "engine_init_s", "first_eval_s", "finish_s")
    for key in parts:
        print(f"per run, sequential, median {key:16s}: {statistics.median(c[key] for c in seq):6.1f} s")
    par = costs["parallel"]
    print(f"per run, parallel, median fit_s            : {statistics.median(c['fit_s'] for c in par):6.1f} s")
    training = statistics.median(c["fit_s"] - c["startup_s"] for c in seq)
    print(f"per run, sequential, median training       : {training:6.1f} s")


if __name__ == "__main__":
    main()
