"""Training throughput: the Ray Train + DeepSpeed loop against a plain PyTorch loop.

Same model (pipelines/vectorslm.yaml unless --pipeline), same packed shards, same micro-batch,
same torch thread count, one process run. The two loops run interleaved, --repeats times each (each
side going first half the time), so that drifting background load hits both: the ratio is printed per
pair as a median with its spread, beside MFU against the roofline measured in the same run
(``roofline.py``), and the Ray Train run's fixed cost per run broken into its parts.

    python benchmarks/bench_train_loop.py [--steps 40] [--repeats 3] [--pipeline pipelines/vectorslm.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def plain_loop(cfg, shards, steps: int, warmup: int) -> float:
    from slmlab.evaluate import split_block
    from slmlab.models import build_model
    from slmlab.train.optim import build_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).train()
    opt, sched = build_optimizer(model, cfg.train)
    table = pq.read_table(str(shards.train_dir))
    ids = torch.tensor(table.column("input_ids").to_pylist(), dtype=torch.long)
    mask = torch.tensor(table.column("target_mask").to_pylist(), dtype=torch.int8)
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    rates, cursor = [], 0
    for step in range(steps):
        t0 = time.perf_counter()
        for _ in range(accum):
            sl = slice(cursor, cursor + mb)
            cursor = (cursor + mb) % (len(ids) - mb)
            inputs, labels = split_block(ids[sl], mask[sl])
            out = model({"input_ids": inputs, "labels": labels})
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            rates.append(mb * accum * cfg.data.seq_len / (time.perf_counter() - t0))
    return statistics.median(rates)


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f}, min {min(xs):.3f}, max {max(xs):.3f} over {len(xs)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default=str(REPO / "pipelines" / "vectorslm.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (platform, plain) pairs")
    args = ap.parse_args()

    import mlflow

    import roofline
    from slmlab.config import load_pipeline
    from slmlab.data.shards import build_shards
    from slmlab.pipeline import run_pipeline
    from slmlab.runtime import ensure_ray

    run_dir = tempfile.mkdtemp(prefix="slmlab-bench-")
    cfg = load_pipeline(
        args.pipeline,
        [
            f"run_dir={run_dir}",
            f"train.max_steps={args.steps}",
            f"train.eval_every={args.steps}",
            f"train.checkpoint_every={args.steps}",
            "train.eval_batches=1",
            "eval.max_new_tokens=1",
        ],
    )
    cfg = cfg.model_copy(update={"finetune": None, "compare": []})  # the pretraining stage alone
    ensure_ray()
    shards = build_shards(cfg, progress=lambda m: None)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": shards.summary["vocab_size"]})})
    threads = cfg.train.torch_threads or max(1, round(cfg.train.cpus_per_worker))
    torch.set_num_threads(threads)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    roof = roofline.measure(shapes=roofline.vectorslm_train_shapes(cfg.model, tokens))
    print("\n".join(roof.lines()[:2]))
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir}/mlflow.db")

    def platform_run() -> dict[str, float]:
        t0 = time.perf_counter()
        result = run_pipeline(cfg, progress=lambda m: None)
        wall = time.perf_counter() - t0
        run = client.get_run(result.mlflow_run_id)
        hist = sorted(client.get_metric_history(run.info.run_id, "train/tokens_per_s"), key=lambda m: m.step)
        rate = statistics.median(m.value for m in hist if m.step > args.warmup)
        compute = args.steps * tokens * cfg.train.grad_accum_steps / rate
        parts = {k.removeprefix("time/"): v for k, v in run.data.metrics.items() if k.startswith("time/")}
        return {"rate": rate, "wall": wall, "fixed": wall - compute, **parts}

    platform, plain = [], []
    for i in range(args.repeats):  # interleaved, and each side goes first half the time
        order = ("platform", "plain") if i % 2 == 0 else ("plain", "platform")
        for side in order:
            if side == "platform":
                platform.append(platform_run())
            else:
                plain.append(plain_loop(cfg, shards, args.steps, args.warmup))
    ratios = [p["rate"] / q for p, q in zip(platform, plain)]
    fpt = roofline.vectorslm_train_flops_per_token(cfg.model, cfg.data.seq_len)
    shapes_peak = roof.shapes_flops(roofline.vectorslm_train_shapes(cfg.model, tokens))
    print(
        f"model: {cfg.model.family} dim={cfg.model.dim} layers={cfg.model.n_layers} seq={cfg.data.seq_len} "
        f"micro-batch={cfg.train.micro_batch_size}x{cfg.train.grad_accum_steps} threads={threads} "
        f"ZeRO-{cfg.train.zero_stage} {cfg.train.precision}; {args.steps} steps per run, first {args.warmup} excluded"
    )
    for name, rates in (("plain PyTorch loop", plain), ("Ray Train + DeepSpeed loop", [p["rate"] for p in platform])):
        med = statistics.median(rates)
        print(
            f"{name:27s}: {med:8.0f} tokens/s median ({', '.join(f'{r:.0f}' for r in rates)}); MFU "
            f"{med * fpt / roof.peak_flops * 100:.0f}% of the 2048^3 peak, {med * fpt / shapes_peak * 100:.0f}% of "
            f"this model's matmul shapes' peak ({shapes_peak / 1e9:.0f} GFLOP/s)"
        )
    print(f"ratio platform / plain     : {spread(ratios)} interleaved pairs")
    fixed = [p["fixed"] for p in platform]
    print(f"fixed cost per platform run: {spread(fixed)} s (wall time minus steps x tokens / steady rate)")
    keys = ["worker_imports_s", "engine_init_s", "first_eval_s"]
    med = {k: statistics.median(p.get(k, float("nan")) for p in platform) for k in keys}
    setup = statistics.median(p.get("worker_setup_s", float("nan")) for p in platform)
    train = statistics.median(p.get("train_s", float("nan")) for p in platform)
    ray_s = statistics.median(p.get("fit_s", 0) - p.get("worker_setup_s", 0) - p.get("train_s", 0) for p in platform)
    finish = statistics.median(p.get("finish_s", float("nan")) for p in platform)
    rest = statistics.median(p["wall"] - p.get("fit_s", 0) - p.get("finish_s", 0) for p in platform)
    print(
        "  of which (medians): worker imports {worker_imports_s:.1f} s, DeepSpeed engine {engine_init_s:.1f} s, "
        "first evaluation {first_eval_s:.1f} s".format(**med)
        + f"; worker set-up total {setup:.1f} s; training loop {train:.1f} s (evaluations and checkpoints included); "
        f"Ray Train start-up and teardown around the worker {ray_s:.1f} s; finishing (weights, profile, samples) "
        f"{finish:.1f} s; the rest (MLflow run, data ingest, registration) {rest:.1f} s"
    )


if __name__ == "__main__":
    main()
