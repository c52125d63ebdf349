"""The training loop — one for every family. Runs inside each Ray Train worker.

It knows nothing about a particular architecture: it builds ``build_model(cfg.model)``, wraps it in
a DeepSpeed engine, turns each Ray Data batch into the dict the model declares it reads
(``capabilities.batch_fields``: tokens and labels, images, teacher targets...) and calls
``model(batch) -> ModelOutput``. Everything else (ZeRO, precision, accumulation, clipping) is
DeepSpeed's, chosen by config. Evaluation is the same generic pass for every family: loss,
perplexity and bits per byte, plus the figures the family computes from its own eval sums.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from slmlab.errors import SlmlabError

CLIENT_STATE = "slmlab_state.json"


class NonFiniteLoss(SlmlabError, RuntimeError):
    """The training loss became NaN or infinite; the run stops before the step is applied."""


def _setup_env(cfg) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first `import deepspeed`
    threads = cfg.train.torch_threads or max(1, round(cfg.train.cpus_per_worker))
    torch.set_num_threads(threads)


def _freeze(model: torch.nn.Module, trainable: list[str] | None) -> int:
    """Only parameters whose names start with one of ``trainable`` learn; returns how many do."""
    if trainable is None:
        return sum(p.numel() for p in model.parameters())
    names = tuple(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(names))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"train.trainable: expected prefixes of parameter names, found none matching {trainable}")
    return n


def _quiet_ray_train_worker_logs() -> None:
    """Ray Train logs "Reporting training result N: TrainingReport(...)" at INFO on a logger named
    after its source file, which LoggingConfig's level does not reach: one line per report, every
    evaluation and checkpoint. Quiet unless --verbose."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray Train layout: its lines stay
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def train_loop_per_worker(loop_config: dict) -> None:
    t_enter = time.perf_counter()
    import ray.train
    from ray.train import Checkpoint

    from slmlab.config import PipelineConfig

    cfg = PipelineConfig.model_validate(loop_config["pipeline"])
    _setup_env(cfg)
    import deepspeed
    import torch.distributed as dist

    from slmlab.data.tokenizer import load_tokenizer, token_byte_lengths
    from slmlab.evaluate import evaluate_batches, to_model_batch
    from slmlab.models import build_model, count_parameters
    from slmlab.runtime import verbose
    from slmlab.tracking import MetricsLogger
    from slmlab.train.checkpoint import load_weights, save_model_files
    from slmlab.train.optim import build_optimizer, deepspeed_config

    t_imported = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = cfg.train
    torch.manual_seed(cfg.seed)  # identical init on every rank

    model = build_model(cfg.model)
    init = loop_config.get("init_from")
    if init and ray.train.get_checkpoint() is None:
        left = load_weights(
            model, Path(init["path"]) / "model.safetensors", allow_missing=init.get("allow_missing", ())
        )
        if rank == 0 and left:
            print(
                f"[slmlab] warm start from {init['path']}: {len(left)} tensors left as initialised "
                f"({', '.join(left[:4])}{' ...' if len(left) > 4 else ''})",
                flush=True,
            )
    trainable = _freeze(model, tc.trainable)
    if tc.compile:
        # in place, so parameter names (checkpoints, DeepSpeed's state, safetensors export) stay the model's own
        model.compile()
    optimizer, scheduler = build_optimizer(model, tc)
    quiet = not verbose()
    if quiet:
        _quiet_ray_train_worker_logs()
    # DeepSpeed print()s "... built successfully" for its CPU comm op at every start (--verbose keeps it)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(tc, world),
            dist_init_required=False,
        )
    device = engine.device
    t_engine = time.perf_counter()
    fields = model.capabilities.batch_fields
    byte_lengths = torch.tensor(token_byte_lengths(load_tokenizer(loop_config["tokenizer_path"])), device=device)
    logger = MetricsLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    if logger:
        # which node trains this attempt: after a node is lost the tag moves with the resumed attempt
        logger.set_tags({"slmlab.node_id": ray.get_runtime_context().get_node_id()})

    # ---- resume --------------------------------------------------------------------------
    step, epoch, micro_in_epoch = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from slmlab.train.safe_resume import load_checkpoint

        with checkpoint.as_directory() as ckpt_dir:
            load_checkpoint(engine, ckpt_dir, tag="ds")  # weights_only: shared storage is a trust boundary
            state = json.loads(Path(ckpt_dir, CLIENT_STATE).read_text())
        step, epoch, micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        if rank == 0:
            print(f"[slmlab] resumed at step {step} (epoch {epoch}, micro-batch {micro_in_epoch})", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    mb = tc.micro_batch_size
    tokens_per_step = mb * tc.grad_accum_steps * world * cfg.data.seq_len
    stop_at = tc.stop_at_step or tc.max_steps
    last_checkpoint_step = step

    def evaluate() -> dict[str, float]:
        # validation reaches every rank whole (unsplit: no coordinator actor to start): rank r takes
        # batches r, r + world, ...; the sums are all-reduced
        batches = val_shard.iter_torch_batches(batch_size=mb, drop_last=False)
        return evaluate_batches(
            engine,
            itertools.islice(batches, rank, None, world),
            byte_lengths,
            device,
            max_batches=tc.eval_batches,
        )

    def save_and_report(metrics: dict, final: bool) -> None:
        nonlocal last_checkpoint_step
        with tempfile.TemporaryDirectory(prefix="slmlab-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag="ds")
            if rank == 0:
                Path(tmp, CLIENT_STATE).write_text(
                    json.dumps({"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch})
                )
            if final:
                save_model_files(engine, cfg.model, Path(tmp), is_writer=rank == 0)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        last_checkpoint_step = step

    if rank == 0:
        params = count_parameters(model)
        note = f" ({trainable:,} trainable)" if trainable != sum(p.numel() for p in model.parameters()) else ""
        print(
            f"[slmlab] {cfg.model.family}: {params:,} parameters{note}, {tokens_per_step:,} tokens/step, "
            f"world size {world}",
            flush=True,
        )
        logger.log({"model/parameters": params, "model/trainable_parameters": trainable}, step=step)

    last_val: dict[str, float] = {}  # carried in every report so Tune schedulers always see the metric

    t_eval0 = time.perf_counter()
    if step == 0:
        metrics = last_val = evaluate()
        if logger:
            logger.log(metrics, step=0)
            print(f"[slmlab] step 0/{tc.max_steps} val/bpb {metrics['val/bpb']:.4f}", flush=True)
        ray.train.report({**metrics, "step": 0})

    # ---- train ---------------------------------------------------------------------------
    engine.train()
    done = step >= stop_at
    start_step, t_start = step, time.perf_counter()
    last_log_t, tokens_since = t_start, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # over this step's micro-batches
    show_every = max(1, tc.max_steps // 10)  # about ten progress lines per run
    while not done:
        batches = train_shard.iter_torch_batches(
            batch_size=mb,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + epoch if cfg.data.shuffle_buffer else None,
        )
        skip = micro_in_epoch
        for raw in batches:
            if skip:
                skip -= 1
                continue
            micro_in_epoch += 1
            batch = to_model_batch(raw, device, fields)
            out = engine(batch)
            loss, lm_loss = out.loss, out.lm_loss if out.lm_loss is not None else out.loss
            if _inject_nan(step + 1):
                loss, lm_loss = loss * float("nan"), lm_loss * float("nan")
            engine.backward(loss)
            loss_sum += lm_loss.detach().double()
            tokens_since += batch["input_ids"].numel()
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                # the step's loss: mean over its micro-batches and every rank, checked before it is applied
                mean_loss = loss_sum / tc.grad_accum_steps
                if world > 1:
                    dist.all_reduce(mean_loss)
                    mean_loss /= world
                step_loss = float(mean_loss)
                loss_sum.zero_()
                if not math.isfinite(step_loss):
                    raise NonFiniteLoss(
                        f"step {step + 1}: train/loss is {step_loss}; the step was not applied and the run stopped. "
                        f"The last good checkpoint (step {last_checkpoint_step}) is kept: lower train.lr or fix the "
                        f"data, then continue with --resume"
                    )
            engine.step()
            if not boundary:
                continue
            step += 1
            now = time.perf_counter()
            if logger and (step % tc.log_every == 0 or step == stop_at):
                metrics = {
                    "train/loss": step_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/tokens": step * tokens_per_step,
                    "train/tokens_per_s": tokens_since * world / max(now - last_log_t, 1e-9),
                    **{f"train/{k}": v for k, v in out.metrics.items()},
                }
                last_log_t, tokens_since = now, 0
                logger.log(metrics, step=step)
            if rank == 0 and (step % show_every == 0 or step == stop_at):
                rate = (step - start_step) / max(now - t_start, 1e-9)
                print(
                    f"[slmlab] step {step}/{tc.max_steps} loss {step_loss:.4f} "
                    f"{rate * tokens_per_step:,.0f} tok/s eta {_fmt_eta((stop_at - step) / max(rate, 1e-9))}",
                    flush=True,
                )
            final = step >= stop_at
            if final or step % tc.eval_every == 0 or step % tc.checkpoint_every == 0:
                if final or step % tc.eval_every == 0:
                    last_val = evaluate()
                metrics = {**last_val, "step": step, "epoch": epoch}
                if (final or step % tc.eval_every == 0) and logger:
                    logger.log({k: v for k, v in metrics.items() if k.startswith("val/")}, step=step)
                    print(
                        f"[slmlab] step {step}/{tc.max_steps} val/bpb {metrics['val/bpb']:.4f} "
                        f"val/loss {metrics['val/loss']:.4f}",
                        flush=True,
                    )
                if final or step % tc.checkpoint_every == 0:
                    save_and_report(metrics, final=final)
                else:
                    ray.train.report(metrics)
            _maybe_inject_failure(step)
            _maybe_slow_down()
            if final:
                done = True
                break
        else:
            epoch, micro_in_epoch = epoch + 1, 0
    if logger:
        # the worker's share of a run's fixed cost: imports, DeepSpeed engine, first evaluation
        logger.log(
            {
                "time/worker_setup_s": t_start - t_enter,
                "time/worker_imports_s": t_imported - t_enter,
                "time/engine_init_s": t_engine - t_imported,
                "time/first_eval_s": t_start - t_eval0,
                "time/train_s": time.perf_counter() - t_start,
            },
            step=step,
        )


def _once(env_step: str, step: int) -> bool:
    """True once for the fault-injection knob ``env_step`` at ``step`` (a marker file remembers)."""
    at, marker = os.environ.get(env_step), os.environ.get("SLMLAB_FAIL_MARKER")
    if not (at and marker and step == int(at) and not Path(marker).exists()):
        return False
    Path(marker).write_text(str(step))
    return True


def _inject_nan(step: int) -> bool:
    """Fault-injection hook for the NaN test: SLMLAB_FAIL_NAN_AT_STEP=N poisons step N's loss once."""
    return _once("SLMLAB_FAIL_NAN_AT_STEP", step)


def _maybe_slow_down() -> None:
    """Test knob: SLMLAB_FAIL_SLOW_STEP_S=x makes each step last at least x seconds longer, so that a
    test can act (remove a node) while tiny runs are still training."""
    delay = float(os.environ.get("SLMLAB_FAIL_SLOW_STEP_S", "0"))
    if delay:
        time.sleep(delay)


def _maybe_inject_failure(step: int) -> None:
    """Fault-injection hook for the fault-tolerance tests: SLMLAB_FAIL_AT_STEP=N kills this worker
    process once, after step N (a marker file makes the restarted attempt survive).

    It first waits a few seconds: Ray Train's controller collects reported checkpoints when it
    polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 0.5 s as slmlab sets it), so a checkpoint reported
    moments before a crash can be lost and the retry starts from the one before. Real steps take
    longer than that; the tests' tiny steps do not."""
    at = os.environ.get("SLMLAB_FAIL_AT_STEP")
    if (
        at
        and int(at) == step
        and os.environ.get("SLMLAB_FAIL_MARKER")
        and not Path(os.environ["SLMLAB_FAIL_MARKER"]).exists()
    ):
        time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
        if _once("SLMLAB_FAIL_AT_STEP", step):
            os._exit(1)
