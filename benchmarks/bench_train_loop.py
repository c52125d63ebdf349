"""Training throughput: the Ray Train + DeepSpeed loop against a plain PyTorch loop.

Same model (pipelines/vectorslm.yaml unless --pipeline), same packed shards, same micro-batch,
same torch thread count, one process run. Prints steady-state tokens/s of each (the first
--warmup steps excluded), their ratio, and the Ray Train run's fixed start-up cost.

    python benchmarks/bench_train_loop.py [--steps 40] [--pipeline pipelines/vectorslm.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default=str(REPO / "pipelines" / "vectorslm.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()

    import mlflow

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

    t0 = time.perf_counter()
    result = run_pipeline(cfg, progress=lambda m: None)
    ray_wall = time.perf_counter() - t0
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    hist = sorted(client.get_metric_history(result.mlflow_run_id, "train/tokens_per_s"), key=lambda m: m.step)
    ray_rate = statistics.median(m.value for m in hist if m.step > args.warmup)
    ray_compute_s = args.steps * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len / ray_rate

    torch.set_num_threads(threads)
    plain_rate = plain_loop(cfg, shards, args.steps, args.warmup)

    print(
        f"model: {cfg.model.family} dim={cfg.model.dim} layers={cfg.model.n_layers} seq={cfg.data.seq_len} "
        f"micro-batch={cfg.train.micro_batch_size}x{cfg.train.grad_accum_steps} threads={threads} "
        f"ZeRO-{cfg.train.zero_stage} {cfg.train.precision}"
    )
    print(f"plain PyTorch loop          : {plain_rate:10.0f} tokens/s")
    print(f"Ray Train + DeepSpeed loop  : {ray_rate:10.0f} tokens/s")
    print(f"ratio (Ray+DS / plain)      : {ray_rate / plain_rate:10.3f}x")
    print(
        f"Ray run wall time {ray_wall:.1f} s for {args.steps} steps; fixed "
        f"start-up + eval + export ≈ {ray_wall - ray_compute_s:.1f} s"
    )


if __name__ == "__main__":
    main()
