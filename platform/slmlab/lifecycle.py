"""One training run, start to finish — the only place that does it, for pipelines, stages and sweeps.

    MLflow run start → Ray Train fit → consolidated weights → evaluation → registration

:func:`train_run` takes a :class:`RunSpec` (what to train, on which data, from which weights) and
returns a :class:`RunResult`. It runs wherever it is called: in the driver for a single run, or in
a Ray task when a stage trains several runs at once (``slmlab.parallel``), so nothing here may rely
on the driver's process state. Data flows one way: the spec is read, never written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow

from slmlab.config import PipelineConfig
from slmlab.data.shards import Shards
from slmlab.tracking import MetricsLogger, client_for, ensure_experiment, flatten, register_model, tracking_uri
from slmlab.train.checkpoint import CONFIG_FILE, MODEL_FILE, load_model_dir

Progress = Callable[[str], None]


@dataclass
class RunSpec:
    label: str  # unique within its stage: part of the MLflow run name, and how results are looked up
    cfg: PipelineConfig  # everything this run trains: model (vocab_size set), train, data, eval
    shards: Shards  # the packed data (built by the driver; runs never build data)
    register_as: str | None = None  # registered model name; None = not registered
    init_from: Path | None = None  # model folder to warm-start from (fine-tuning, a frozen trunk)
    allow_missing: tuple[str, ...] = ()  # tensor-name prefixes init_from may lack (left as initialised)
    partition: int | None = None  # train on this data partition only (data.partition must be set)
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (stage, parent run, ...)
    run_name: str | None = None  # set to continue an earlier attempt (its Ray checkpoints and MLflow run)
    mlflow_run_id: str | None = None

    @property
    def train_dir(self) -> Path:
        return self.shards.train_dir if self.partition is None else self.shards.partition_dir(self.partition)


@dataclass
class RunResult:
    label: str
    run_name: str
    mlflow_run_id: str
    status: str  # FINISHED | STOPPED (train.stop_at_step reached on purpose) | FAILED
    model_version: str | None = None
    model_uri: str | None = None  # models:/name/version when registered
    model_dir: Path | None = None  # local folder: model.safetensors, model_config.json, tokenizer files
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # one line, when FAILED


def new_run_name(cfg: PipelineConfig, label: str) -> str:
    return f"{cfg.name}-{label}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def start_run(spec: RunSpec) -> RunSpec:
    """Create the run's MLflow run (once) and log what it starts from; returns the spec with its
    run name and MLflow id filled in."""
    cfg = spec.cfg
    client = client_for(cfg.run_dir)
    if spec.mlflow_run_id:
        client.update_run(spec.mlflow_run_id, status="RUNNING")
        return spec
    run_name = spec.run_name or new_run_name(cfg, spec.label)
    experiment_id = ensure_experiment(client, cfg.experiment_name, cfg.run_dir)
    tags = {"slmlab.family": cfg.model.family, "slmlab.pipeline": cfg.name, "slmlab.variant": spec.label, **spec.tags}
    if spec.partition is not None:
        tags["slmlab.partition"] = str(spec.partition)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    _log_start(client, run.info.run_id, cfg, spec.shards)
    return _replace(spec, run_name=run_name, mlflow_run_id=run.info.run_id)


def _replace(spec: RunSpec, **changes) -> RunSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def _log_start(client, run_id: str, cfg: PipelineConfig, shards: Shards) -> None:
    from slmlab.data.shards import summary_for_mlflow

    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    params.append(mlflow.entities.Param("data.cache_key", shards.key))
    for i in range(0, len(params), 90):
        client.log_batch(run_id, params=params[i : i + 90])
    MetricsLogger.for_client(client, run_id).log(summary_for_mlflow(shards), step=0)
    client.log_dict(run_id, shards.summary, "data/summary.json")
    client.log_artifact(run_id, str(shards.tokenizer_path), "model")
    client.log_artifact(run_id, str(shards.tokenizer_path.parent / "tokenizer_config.json"), "model")


def train_run(spec: RunSpec, progress: Progress = print, callbacks=None, datasets=None) -> RunResult:
    """Train one run to its end (or to train.stop_at_step), then finish and register it."""
    from slmlab.train.launch import build_trainer

    spec = start_run(spec)
    cfg, client = spec.cfg, client_for(spec.cfg.run_dir)
    trainer = build_trainer(spec, tracking_uri=tracking_uri(cfg.run_dir), callbacks=callbacks, datasets=datasets)
    progress(
        f"train: {spec.label}: Ray Train run {spec.run_name} ({cfg.train.num_workers} worker(s), "
        f"DeepSpeed ZeRO-{cfg.train.zero_stage}, {cfg.train.precision})"
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(spec.mlflow_run_id, status="FAILED")
        raise
    fit_s = time.perf_counter() - t0
    metrics = dict(result.metrics or {})
    if metrics.get("step", 0) < cfg.train.max_steps:
        client.set_terminated(spec.mlflow_run_id, status="KILLED")  # stopped on purpose: `--resume` continues
        progress(
            f"train: {spec.label} stopped at step {metrics.get('step')} of {cfg.train.max_steps}; "
            f"continue with --resume"
        )
        return RunResult(spec.label, spec.run_name, spec.mlflow_run_id, "STOPPED", metrics=metrics)
    try:
        t0 = time.perf_counter()
        model_dir = finish_run(spec, result.checkpoint, progress)
        # where a run's wall time goes: fit (Ray Train start-up + training), finish (weights, profile, samples)
        MetricsLogger.for_client(client, spec.mlflow_run_id).log(
            {"time/fit_s": fit_s, "time/finish_s": time.perf_counter() - t0}, step=0
        )
        version = uri = None
        if spec.register_as:
            version = register_model(
                client,
                spec.register_as,
                spec.mlflow_run_id,
                "model",
                description=f"{cfg.model.family} ({spec.label}) from pipeline {cfg.name}",
            )
            uri = f"models:/{spec.register_as}/{version}"
            client.set_tag(spec.mlflow_run_id, "slmlab.registered_version", f"{spec.register_as}/{version}")
            progress(f"mlflow: registered {uri}")
    except BaseException:
        client.set_terminated(spec.mlflow_run_id, status="FAILED")
        raise
    client.set_terminated(spec.mlflow_run_id, status="FINISHED")
    return RunResult(spec.label, spec.run_name, spec.mlflow_run_id, "FINISHED", version, uri, model_dir, metrics)


def finish_run(spec: RunSpec, checkpoint, progress: Progress) -> Path:
    """The consolidated weights into ``<run_dir>/models/<run id>`` (atomically) and MLflow; then the
    model is read back once, proving the artefact loads, and profiled, quantised and sampled."""
    cfg, run_id = spec.cfg, spec.mlflow_run_id
    client = client_for(cfg.run_dir)
    model_dir = Path(cfg.run_dir) / "models" / run_id
    with checkpoint.as_directory() as ckpt:
        tmp = Path(tempfile.mkdtemp(dir=Path(cfg.run_dir), prefix=".model-"))
        for name in (MODEL_FILE, CONFIG_FILE):
            shutil.copy2(Path(ckpt, name), tmp / name)
        shutil.copy2(spec.shards.tokenizer_path, tmp / "tokenizer.json")
        shutil.copy2(spec.shards.tokenizer_path.parent / "tokenizer_config.json", tmp / "tokenizer_config.json")
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        if model_dir.exists():
            shutil.rmtree(model_dir)  # our own earlier attempt at this run id, never a user's folder
        os.replace(tmp, model_dir)
    client.log_artifact(run_id, str(model_dir / MODEL_FILE), "model")
    client.log_artifact(run_id, str(model_dir / CONFIG_FILE), "model")
    model_cfg, model = load_model_dir(model_dir)
    logger = MetricsLogger.for_client(client, run_id)
    _log_profile(logger, model, model_cfg)
    if cfg.eval.quantize_int8:
        _log_int8(logger, model, spec, progress)
    if model.capabilities.generation and cfg.eval.prompts:
        samples = sample_texts(model, model_dir / "tokenizer.json", cfg)
        client.log_text(run_id, "\n\n".join(f"### {p!r}\n{s}" for p, s in samples), "samples.md")
        for prompt, text in samples:
            progress(f"sample ({spec.label}): {text[:160]!r}")
    return model_dir


def _log_profile(logger: MetricsLogger, model, model_cfg) -> None:
    from slmlab.profile import profile

    logger.log_series(profile(model, model_cfg))


def _log_int8(logger: MetricsLogger, model, spec: RunSpec, progress: Progress) -> None:
    from slmlab.evaluate import evaluate_folder
    from slmlab.quantize import model_size_bytes, quantize_int8

    cfg, shards = spec.cfg, spec.shards
    qmodel = quantize_int8(model)
    batches = cfg.train.eval_batches
    before = evaluate_folder(model, shards.val_dir, shards.tokenizer_path, cfg.train.micro_batch_size, batches)
    after = evaluate_folder(qmodel, shards.val_dir, shards.tokenizer_path, cfg.train.micro_batch_size, batches)
    figures = {
        "quant/fp32_bytes": model_size_bytes(model),
        "quant/int8_bytes": model_size_bytes(qmodel),
        "quant/fp32_bpb": before["val/bpb"],
        "quant/int8_bpb": after["val/bpb"],
    }
    logger.log(figures, step=0)
    progress(
        f"int8 ({spec.label}): {figures['quant/fp32_bytes'] / 2**20:.1f} → {figures['quant/int8_bytes'] / 2**20:.1f} "
        f"MiB, val bpb {figures['quant/fp32_bpb']:.4f} → {figures['quant/int8_bpb']:.4f}"
    )


def sample_texts(model, tokenizer_path: Path, cfg: PipelineConfig) -> list[tuple[str, str]]:
    import torch

    from slmlab.data.tokenizer import EOS, load_tokenizer
    from slmlab.generation import generate

    tok = load_tokenizer(tokenizer_path)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    for prompt in cfg.eval.prompts:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        new = generate(
            model,
            ids,
            max_new_tokens=cfg.eval.max_new_tokens,
            temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k,
            stop_token_ids=(tok.token_to_id(EOS),),
            generator=gen,
        )
        out.append((prompt, prompt + tok.decode(new[0, ids.shape[1] :].tolist())))
    return out
