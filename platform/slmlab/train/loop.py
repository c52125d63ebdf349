"""The training loop — one for every family. Runs inside each Ray Train worker.

It knows nothing about a particular architecture: it builds ``build_model(cfg.model)``, wraps it
in a DeepSpeed engine, feeds packed blocks from the Ray Data shard, and calls the model as
``model(inputs, labels=labels) -> ModelOutput``. Everything else (ZeRO, precision, accumulation,
clipping) is DeepSpeed's, chosen by config.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

CLIENT_STATE = "slmlab_state.json"


def _setup_env(cfg) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first `import deepspeed`
    threads = cfg.train.torch_threads or max(1, round(cfg.train.cpus_per_worker))
    torch.set_num_threads(threads)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from slmlab.config import PipelineConfig

    cfg = PipelineConfig.model_validate(loop_config["pipeline"])
    _setup_env(cfg)
    import deepspeed
    import torch.distributed as dist

    from slmlab.data.tokenizer import load_tokenizer, token_byte_lengths
    from slmlab.evaluate import EvalTotals, batch_totals, split_block
    from slmlab.models import build_model, count_parameters
    from slmlab.train.checkpoint import save_model_files
    from slmlab.train.optim import build_optimizer, deepspeed_config
    from slmlab.tracking import MetricsLogger

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = cfg.train
    torch.manual_seed(cfg.seed)  # identical init on every rank

    model = build_model(cfg.model)
    if loop_config.get("init_from") and ray.train.get_checkpoint() is None:
        from safetensors.torch import load_model

        load_model(model, str(Path(loop_config["init_from"]) / "model.safetensors"), strict=False)
    optimizer, scheduler = build_optimizer(model, tc)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tc, world), dist_init_required=False
    )
    device = engine.device
    byte_lengths = torch.tensor(token_byte_lengths(load_tokenizer(loop_config["tokenizer_path"])), device=device)
    logger = MetricsLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None

    # ---- resume --------------------------------------------------------------------------
    step, epoch, micro_in_epoch = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag="ds")
            state = json.loads(Path(ckpt_dir, CLIENT_STATE).read_text())
        step, epoch, micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        if rank == 0:
            print(f"[slmlab] resumed at step {step} (epoch {epoch}, micro-batch {micro_in_epoch})", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    mb = tc.micro_batch_size
    tokens_per_step = mb * tc.grad_accum_steps * world * cfg.data.seq_len
    stop_at = tc.stop_at_step or tc.max_steps

    def evaluate() -> dict[str, float]:
        engine.eval()
        totals = EvalTotals()
        for i, batch in enumerate(val_shard.iter_torch_batches(batch_size=mb, drop_last=False)):
            if tc.eval_batches and i >= tc.eval_batches:
                break
            inputs, labels = split_block(batch["input_ids"].to(device), batch["target_mask"].to(device))
            totals.add(batch_totals(engine, inputs, labels, byte_lengths))
        t = totals.as_tensor()
        if world > 1:
            dist.all_reduce(t)
        engine.train()
        return EvalTotals.from_tensor(t).metrics("val")

    def save_and_report(metrics: dict, final: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="slmlab-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag="ds")
            if rank == 0:
                Path(tmp, CLIENT_STATE).write_text(json.dumps({"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch}))
            if final:
                save_model_files(engine, cfg.model, Path(tmp), is_writer=rank == 0)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    if rank == 0:
        params = count_parameters(model)
        print(f"[slmlab] {cfg.model.family}: {params:,} parameters, {tokens_per_step:,} tokens/step, world size {world}", flush=True)
        logger.log({"model/parameters": params}, step=step)

    last_val: dict[str, float] = {}  # carried in every report so Tune schedulers always see the metric

    if step == 0:
        metrics = last_val = evaluate()
        if logger:
            logger.log(metrics, step=0)
        ray.train.report({**metrics, "step": 0})

    # ---- train ---------------------------------------------------------------------------
    engine.train()
    done = step >= stop_at
    last_log_t, tokens_since = time.perf_counter(), 0
    while not done:
        batches = train_shard.iter_torch_batches(
            batch_size=mb,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + epoch if cfg.data.shuffle_buffer else None,
        )
        skip = micro_in_epoch
        for batch in batches:
            if skip:
                skip -= 1
                continue
            micro_in_epoch += 1
            inputs, labels = split_block(batch["input_ids"].to(device), batch["target_mask"].to(device))
            out = engine(inputs, labels=labels)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            tokens_since += inputs.numel()
            if not boundary:
                continue
            step += 1
            if logger and (step % tc.log_every == 0 or step == stop_at):
                now = time.perf_counter()
                metrics = {
                    "train/loss": float(out.lm_loss if out.lm_loss is not None else out.loss),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/tokens": step * tokens_per_step,
                    "train/tokens_per_s": tokens_since * world / max(now - last_log_t, 1e-9),
                    **{f"train/{k}": v for k, v in out.metrics.items()},
                }
                last_log_t, tokens_since = now, 0
                logger.log(metrics, step=step)
            final = step >= stop_at
            if final or step % tc.eval_every == 0 or step % tc.checkpoint_every == 0:
                if final or step % tc.eval_every == 0:
                    last_val = evaluate()
                metrics = {**last_val, "step": step, "epoch": epoch}
                if final or step % tc.eval_every == 0:
                    if logger:
                        logger.log({k: v for k, v in metrics.items() if k.startswith("val/")}, step=step)
                        print(f"[slmlab] step {step}/{tc.max_steps} val/bpb {metrics['val/bpb']:.4f} val/loss {metrics['val/loss']:.4f}", flush=True)
                if final or step % tc.checkpoint_every == 0:
                    save_and_report(metrics, final=final)
                else:
                    ray.train.report(metrics)
            _maybe_inject_failure(step)
            if final:
                done = True
                break
        else:
            epoch, micro_in_epoch = epoch + 1, 0


def _maybe_inject_failure(step: int) -> None:
    """Fault-injection hook for the fault-tolerance tests: SLMLAB_FAIL_AT_STEP=N kills this worker
    process once, after step N (a marker file makes the restarted attempt survive).

    It first waits a few seconds: Ray Train's controller collects reported checkpoints when it
    polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so a checkpoint reported
    moments before a crash can be lost and the retry starts from the one before. Real steps take
    longer than that; the tests' tiny steps do not."""
    at = os.environ.get("SLMLAB_FAIL_AT_STEP")
    marker = os.environ.get("SLMLAB_FAIL_MARKER")
    if at and marker and step == int(at) and not Path(marker).exists():
        time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
        Path(marker).write_text(str(step))
        os._exit(1)
