"""``slmlab run``: config → Ray Data shards → Ray Train (DeepSpeed) → evaluation → MLflow.

Each arrow is one call below; data flows one way. A run's identity (Ray Train run name, MLflow
run id) is kept in ``<run_dir>/<pipeline>/<run name>.json`` so ``--resume`` reattaches both.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from slmlab.config import PipelineConfig
from slmlab.data.shards import build_shards
from slmlab.runtime import ensure_ray
from slmlab.tracking import client_for, ensure_experiment, flatten, register_model, tracking_uri
from slmlab.train.checkpoint import CONFIG_FILE, MODEL_FILE, load_model_dir


@dataclass
class RunResult:
    run_name: str
    mlflow_run_id: str
    model_version: str | None
    metrics: dict
    model_dir: Path | None


def _state_file(cfg: PipelineConfig, run_name: str) -> Path:
    return Path(cfg.run_dir) / "state" / cfg.name / f"{run_name}.json"


def latest_run_name(cfg: PipelineConfig) -> str | None:
    folder = Path(cfg.run_dir) / "state" / cfg.name
    runs = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return runs[-1].stem if runs else None


def run_pipeline(cfg: PipelineConfig, resume: str | None = None, progress=print) -> RunResult:
    """Run every stage of a pipeline: the main model, each `compare` variant on the same shards
    and budget, then the optional instruction fine-tuning of the main model. Returns the main
    model's result (the fine-tuned one when fine-tuning ran)."""
    ensure_ray()
    client = client_for(cfg.run_dir)
    shards = build_shards(cfg, progress=progress)  # Ray Data stage (cached)
    cfg.model.vocab_size = shards.summary["vocab_size"]  # the model's vocabulary is the trained tokenizer's

    main = train_stage(cfg, shards, client, label=cfg.label, register_as=cfg.registered_model_name,
                       tags={"slmlab.stage": "pretrain"}, resume=resume, progress=progress)
    if main.model_version is None:
        return main  # stopped early on purpose (train.stop_at_step)
    for variant in cfg.compare:
        vcfg = cfg.model_copy(update={"model": variant.model.model_copy(update={"vocab_size": cfg.model.vocab_size})})
        train_stage(vcfg, shards, client, label=variant.name, register_as=f"{cfg.registered_model_name}-{variant.name}",
                    tags={"slmlab.stage": "pretrain", "slmlab.compared_with": main.mlflow_run_id}, progress=progress)
    if cfg.finetune is not None:
        from slmlab.finetune import run_finetune

        return run_finetune(cfg, main, shards, client, progress=progress)
    return main


def train_stage(cfg: PipelineConfig, shards, client, *, label: str, register_as: str, tags: dict,
                resume: str | None = None, init_from: Path | None = None, progress=print) -> RunResult:
    """One Ray Train run of one model: MLflow run, fit, consolidated weights, registered version."""
    uri = tracking_uri(cfg.run_dir)
    if resume:
        run_name = latest_run_name(cfg) if resume == "latest" else resume
        state_file = _state_file(cfg, run_name or "?")
        if not run_name or not state_file.exists():
            raise FileNotFoundError(f"--resume {resume}: expected a previous run of {cfg.name!r} under {state_file.parent}, found none")
        run_id = json.loads(state_file.read_text())["mlflow_run_id"]
        client.update_run(run_id, status="RUNNING")
        progress(f"train: resuming {run_name} (MLflow run {run_id})")
    else:
        run_name = f"{cfg.name}-{label}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        run_id, uri = start_run(client, cfg, shards, run_name, tags={"slmlab.variant": label, **tags})
        state_file = _state_file(cfg, run_name)
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"mlflow_run_id": run_id, "data_key": shards.key}))

    from slmlab.train.launch import build_trainer

    trainer = build_trainer(cfg, shards, run_name=run_name, tracking_uri=uri, mlflow_run_id=run_id, init_from=init_from)
    progress(f"train: {label}: Ray Train run {run_name} ({cfg.train.num_workers} worker(s), DeepSpeed ZeRO-{cfg.train.zero_stage}, {cfg.train.precision})")
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    metrics = dict(result.metrics or {})
    if metrics.get("step", 0) < cfg.train.max_steps:
        client.set_terminated(run_id, status="KILLED")  # stopped early on purpose: `--resume` continues
        progress(f"train: stopped at step {metrics.get('step')} of {cfg.train.max_steps}; continue with --resume {run_name}")
        return RunResult(run_name, run_id, None, metrics, None)

    model_dir = finish_run(client, cfg, run_id, result.checkpoint, shards, progress)
    version = register_model(client, register_as, run_id, "model", description=f"{cfg.model.family} ({label}) from pipeline {cfg.name}")
    client.set_tag(run_id, "slmlab.registered_version", f"{register_as}/{version}")
    client.set_terminated(run_id, status="FINISHED")
    progress(f"mlflow: registered {register_as} version {version} (models:/{register_as}/{version})")
    return RunResult(run_name, run_id, version, metrics, model_dir)


def start_run(client, cfg: PipelineConfig, shards, run_name: str, tags: dict) -> tuple[str, str]:
    """Create the MLflow run for one training stage and log what it starts from; (run id, tracking URI)."""
    experiment_id = ensure_experiment(client, cfg.experiment_name, cfg.run_dir)
    run = client.create_run(experiment_id, run_name=run_name, tags={"slmlab.family": cfg.model.family, "slmlab.pipeline": cfg.name, **tags})
    _log_start(client, run.info.run_id, cfg, shards)
    return run.info.run_id, tracking_uri(cfg.run_dir)


def _log_start(client, run_id: str, cfg: PipelineConfig, shards) -> None:
    params = flatten(cfg.model_dump(mode="json"))
    for i in range(0, len(params), 90):
        chunk = list(params.items())[i : i + 90]
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in chunk])
    from slmlab.data.shards import summary_for_mlflow

    summary = shards.summary
    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[mlflow.entities.Param("data.cache_key", shards.key)], metrics=[
        mlflow.entities.Metric(k, float(v), now, 0) for k, v in summary_for_mlflow(shards).items()])
    client.log_dict(run_id, summary, "data/summary.json")
    client.log_artifact(run_id, str(shards.tokenizer_path), "model")
    client.log_artifact(run_id, str(shards.tokenizer_path.parent / "tokenizer_config.json"), "model")


def finish_run(client, cfg: PipelineConfig, run_id: str, checkpoint, shards, progress) -> Path:
    """Copy the consolidated weights into MLflow and log generated samples."""
    with checkpoint.as_directory() as ckpt:
        model_dir = Path(cfg.run_dir) / "models" / run_id
        tmp = Path(tempfile.mkdtemp(dir=Path(cfg.run_dir)))
        for name in (MODEL_FILE, CONFIG_FILE):
            shutil.copy2(Path(ckpt, name), tmp / name)
        shutil.copy2(shards.tokenizer_path, tmp / "tokenizer.json")
        shutil.copy2(shards.tokenizer_path.parent / "tokenizer_config.json", tmp / "tokenizer_config.json")
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    client.log_artifact(run_id, str(model_dir / MODEL_FILE), "model")
    client.log_artifact(run_id, str(model_dir / CONFIG_FILE), "model")
    model_cfg, model = load_model_dir(model_dir)  # read back once: proves the artefact loads, then evaluated
    _log_profile(client, run_id, model, model_cfg)
    if cfg.eval.quantize_int8:
        _log_int8(client, run_id, model, shards, cfg, progress)
    samples = sample_texts(model, model_dir / "tokenizer.json", cfg)
    client.log_text(run_id, "\n\n".join(f"### {p!r}\n{s}" for p, s in samples), "samples.md")
    for prompt, text in samples:
        progress(f"sample: {prompt!r} → {text[:160]!r}")
    return model_dir


def _log_profile(client, run_id: str, model, model_cfg) -> None:
    from slmlab.profile import profile

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step)
                                      for k, points in profile(model, model_cfg).items() for step, v in points])


def _log_int8(client, run_id: str, model, shards, cfg: PipelineConfig, progress) -> None:
    from slmlab.evaluate import evaluate_folder
    from slmlab.quantize import model_size_bytes, quantize_int8

    qmodel = quantize_int8(model)
    batches = cfg.train.eval_batches
    before = evaluate_folder(model, shards.val_dir, shards.tokenizer_path, cfg.train.micro_batch_size, batches)
    after = evaluate_folder(qmodel, shards.val_dir, shards.tokenizer_path, cfg.train.micro_batch_size, batches)
    figures = {"quant/fp32_bytes": model_size_bytes(model), "quant/int8_bytes": model_size_bytes(qmodel),
               "quant/fp32_bpb": before["val/bpb"], "quant/int8_bpb": after["val/bpb"]}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in figures.items()])
    progress(f"int8: {figures['quant/fp32_bytes'] / 2**20:.1f} → {figures['quant/int8_bytes'] / 2**20:.1f} MiB, "
             f"val bpb {figures['quant/fp32_bpb']:.4f} → {figures['quant/int8_bpb']:.4f}")


def sample_texts(model, tokenizer_path: Path, cfg: PipelineConfig) -> list[tuple[str, str]]:
    import torch

    from slmlab.data.tokenizer import EOS, load_tokenizer
    from slmlab.generation import generate

    tok = load_tokenizer(tokenizer_path)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    for prompt in cfg.eval.prompts:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        new = generate(model, ids, max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                       top_k=cfg.eval.top_k, stop_token_ids=(tok.token_to_id(EOS),), generator=gen)
        out.append((prompt, prompt + tok.decode(new[0, ids.shape[1]:].tolist())))
    return out
