"""ModularForge stages: can a language model be built from experts that never saw each other?

    partition  the pipeline's ``data.partition`` (topic | random | curriculum) checked against N and logged
    trunk      the dense model (embeddings, attention, norms, head, one SwiGLU per layer) on all data; registered
    experts    N independent Ray Train runs at once, each the trunk frozen + fresh FFNs on its own partition;
               MLflow child runs; each keeps an ``expert.safetensors`` with only its FFN tensors and logs its
               bits per byte on its own partition and on all validation data
    assemble   trunk + experts streamed into one MoE checkpoint (``slmlab.assemble``): hidden-state gates,
               REPAIR-calibrated norms, no gradient step; registered; a VectorSLM with ``moe``, so it generates
               and exports to ``MixtralForCausalLM`` like any other
    evaluate   on the whole validation split, every model evaluated the same way: the assembled MoE, each
               expert alone, the experts mixed uniformly, oracle routing by true partition, a dense model with
               the same active parameters trained on the same total tokens, and a router-only run (BTX-style:
               only the gates train); plus router analysis and the report's figures

Stages refer to each other by stage name (``trunk: trunk``, ...); see pipelines/modularforge.yaml.
"""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any, Literal

import mlflow
from pydantic import Field, field_validator

from slmlab.stages import StageConfig, StageContext, StageFailed, StageResult, register_stage

COMPARISON_ROLE = "modularforge-comparison"  # tag of the evaluate stage's own run (comparison.json)


def _train_overrides(v: dict[str, Any]) -> dict[str, Any]:
    """Overrides of the `train` section, checked when the pipeline loads (unknown keys, bad values)."""
    from pydantic import ValidationError

    from slmlab.config import TrainConfig

    try:
        TrainConfig.model_validate({**TrainConfig().model_dump(), **v})
    except ValidationError as err:
        e = err.errors()[0]
        raise ValueError(f"expected train fields, found {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    return v


class PartitionStage(StageConfig):
    kind: Literal["partition"] = "partition"
    num_experts: int = Field(ge=1)  # N: one expert per partition, so it must equal data.partition.num_partitions


class TrunkStage(StageConfig):
    kind: Literal["trunk"] = "trunk"
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the pipeline's `train` for the trunk run
    register_as: str | None = None  # default <pipeline>-trunk

    @field_validator("train")
    @classmethod
    def _check_train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _train_overrides(v)


class ExpertsStage(StageConfig):
    kind: Literal["experts"] = "experts"
    trunk: str = "trunk"  # the stage whose trunk every expert shares, frozen
    partition: str = "partition"  # the stage that fixed N
    # fresh: new FFNs (experts share nothing but the frozen trunk); trunk: start from the trunk's FFN (BTM's seed)
    init: Literal["fresh", "trunk"] = "fresh"
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the pipeline's `train` for every expert run
    max_concurrent: int | None = Field(None, ge=1)  # cap below what the cluster holds (None = as many as fit)

    @field_validator("train")
    @classmethod
    def _check_train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _train_overrides(v)


class AssembleStage(StageConfig):
    kind: Literal["assemble"] = "assemble"
    trunk: str = "trunk"
    experts: str = "experts"
    top_k: int = Field(2, ge=1)  # experts per token in the assembled MoE (at most N)
    gate_source: Literal["trunk", "expert"] = "trunk"  # whose hidden states give the gate rows (mergekit: the base)
    center_gates: bool = True  # subtract the mean over partitions before normalising (see assemble.gate_rows)
    calibrate: bool = True  # REPAIR-style norm calibration on the calibration sample
    calibration_sequences: int = Field(8, ge=1)  # per partition, from its training split: small on purpose
    degenerate_condition: float = Field(5.0, gt=1)  # warn when a layer's gate rows are worse conditioned than this
    register_as: str | None = None  # default <pipeline>-moe


class EvaluateStage(StageConfig):
    kind: Literal["evaluate"] = "evaluate"
    trunk: str = "trunk"
    experts: str = "experts"
    assemble: str = "assemble"
    dense_train: dict[str, Any] = Field(default_factory=dict)  # overrides for the dense baseline (its max_steps is
    # derived: trunk + expert tokens, unless given here)
    router_train: dict[str, Any] = Field(default_factory=lambda: {"max_steps": 200, "lr": 1e-3})  # the router-only run
    eval_batches: int | None = Field(None, ge=1)  # validation batches per model (None = the whole split)
    max_concurrent: int | None = Field(None, ge=1)  # the dense and router-only runs train at once when they fit

    @field_validator("dense_train", "router_train")
    @classmethod
    def _check_train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _train_overrides(v)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _with_train(cfg, overrides: dict[str, Any], **model_update):
    from slmlab.config import TrainConfig

    train = TrainConfig.model_validate({**cfg.train.model_dump(), **overrides})
    update: dict[str, Any] = {"train": train, "stages": []}
    if model_update:
        update["model"] = model_update["model"]
    return cfg.model_copy(update=update)


def tokens_per_step(cfg) -> int:
    t = cfg.train
    return t.micro_batch_size * t.grad_accum_steps * t.num_workers * cfg.data.seq_len


def _earlier(ctx: StageContext, stage: str, name: str) -> StageResult:
    result = ctx.results.get(name)
    if result is None:
        raise StageFailed(f"stage {stage}: expected the results of an earlier stage {name!r}, found none "
                          f"(stages so far: {sorted(ctx.results)})")
    return result


def _own_run(ctx: StageContext, stage: str, label: str, tags: dict[str, str]) -> str:
    """An MLflow run of this stage's own work (no training), created once per invocation."""
    from slmlab.tracking import ensure_experiment

    prior = ctx.state.run(stage, label)
    if prior and prior.get("mlflow_run_id"):
        return prior["mlflow_run_id"]
    experiment_id = ensure_experiment(ctx.client, ctx.cfg.experiment_name, ctx.cfg.run_dir)
    run = ctx.client.create_run(experiment_id, run_name=f"{ctx.state.data['invocation']}-{label}",
                                tags={"slmlab.stage": stage, "slmlab.pipeline": ctx.cfg.name, "slmlab.variant": label,
                                      **tags})
    ctx.state.record(stage, label, label=label, run_name=run.info.run_name, mlflow_run_id=run.info.run_id,
                     status="RUNNING")
    return run.info.run_id


def _log(ctx: StageContext, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from slmlab.tracking import MetricsLogger

    MetricsLogger.for_client(ctx.client, run_id).log({k: float(v) for k, v in metrics.items()}, step=step)


def _evaluate(model, folder: Path, ctx: StageContext, batches: int | None) -> dict[str, float]:
    """Bits per byte plus the sums they come from (nats, bytes), so partitions can be added up."""
    from slmlab.evaluate import evaluate_folder

    f = evaluate_folder(model, folder, ctx.shards.tokenizer_path, ctx.cfg.train.micro_batch_size, batches)
    nats = f["val/loss"] * f["val/targets"]
    return {"bpb": f["val/bpb"], "loss": f["val/loss"], "nats": nats,
            "bytes": nats / math.log(2) / f["val/bpb"] if f["val/bpb"] else 0.0}


def _blocks(folder: Path, batch: int, limit: int | None):
    import torch

    from slmlab.evaluate import read_blocks

    for i, raw in enumerate(read_blocks(folder, batch)):
        if limit and i >= limit:
            return
        block = torch.as_tensor(raw["input_ids"]).long()
        yield block[:, :-1], torch.as_tensor(raw["target_mask"])[:, 1:].bool()


# ----------------------------------------------------------------------------------------------
# partition


def check_pipeline(cfg) -> list[str]:
    """What makes a ModularForge pipeline impossible, one line each, from its config alone: checked by the
    partition stage before anything trains (and by `slmlab validate` where the pipeline asks stages)."""
    stages = list(enumerate(cfg.stage_list()))
    part = cfg.data.partition
    problems = []
    for i, st in stages:
        if isinstance(st, PartitionStage):
            if part is None:
                problems.append(f"stages.{i}: expected data.partition (topic | random | curriculum), found none")
            elif st.num_experts != part.num_partitions:
                problems.append(f"stages.{i}.num_experts: expected data.partition.num_partitions="
                                f"{part.num_partitions} (one expert per partition), found {st.num_experts}")
    n = next((st.num_experts for _, st in stages if isinstance(st, PartitionStage)), None)
    for i, st in stages:
        if isinstance(st, AssembleStage) and n is not None and st.top_k > n:
            problems.append(f"stages.{i}.top_k: expected at most the number of experts N={n}, found {st.top_k}")
    if any(isinstance(st, PartitionStage) for _, st in stages) and (
            cfg.model.family != "vectorslm" or getattr(cfg.model, "moe", None) is not None):
        problems.append(f"model: expected a dense vectorslm (the trunk; experts and the MoE derive from it), found "
                        f"family {cfg.model.family!r} with moe={getattr(cfg.model, 'moe', None)!r}")
    return problems


def run_partition(stage: PartitionStage, ctx: StageContext) -> StageResult:
    cfg, name = ctx.cfg, stage.stage_name
    problems = check_pipeline(cfg)
    if problems:
        raise StageFailed("\n".join(problems))
    part = cfg.data.partition
    summary = ctx.shards.summary["partitions"]
    if (ctx.state.run(name, "partition") or {}).get("status") != "FINISHED":
        run_id = _own_run(ctx, name, "partition", {"slmlab.partition_method": part.method})
        ctx.client.log_param(run_id, "partition.method", part.method)
        figures = {}
        for split in ("train", "val"):
            for p in summary[split]:
                figures[f"partition/{p['partition']}/{split}_tokens"] = p["tokens"]
                figures[f"partition/{p['partition']}/{split}_documents"] = p["documents"]
        _log(ctx, run_id, figures)
        ctx.client.set_terminated(run_id, "FINISHED")
        ctx.state.record(name, "partition", status="FINISHED")
    sizes = " / ".join(f"{p['tokens']:,}" for p in summary["train"])  # commas are inside the numbers
    ctx.progress(f"partition: {part.num_partitions} {part.method} partitions, training tokens {sizes}")
    return StageResult(name, outputs={"num_partitions": part.num_partitions, "method": part.method})


# ----------------------------------------------------------------------------------------------
# trunk


def run_trunk(stage: TrunkStage, ctx: StageContext) -> StageResult:
    from slmlab.assemble import write_trunk_view

    cfg, name = ctx.cfg, stage.stage_name
    tcfg = _with_train(cfg, stage.train)
    register_as = stage.register_as or f"{cfg.registered_model_name}-trunk"
    spec = ctx.spec("trunk", tcfg, register_as=register_as, tags={"slmlab.role": "modularforge-trunk"})
    result = ctx.train(name, spec)
    if result.status != "FINISHED":
        return StageResult(name, runs={"trunk": result}, stopped=True)
    view = write_trunk_view(result.model_dir, Path(cfg.run_dir) / "models" / f"{result.mlflow_run_id}-trunk-view")
    return StageResult(name, runs={"trunk": result}, outputs={
        "model_dir": result.model_dir, "model_uri": result.model_uri, "view_dir": view,
        "tokens": tcfg.train.max_steps * tokens_per_step(tcfg)})


# ----------------------------------------------------------------------------------------------
# experts


def _max_overlap(ctx: StageContext, run_ids: list[str]) -> tuple[int, float]:
    """(most runs active at once, seconds during which at least two were) from MLflow's run times."""
    spans = []
    for rid in run_ids:
        info = ctx.client.get_run(rid).info
        if info.start_time and info.end_time:
            spans.append((info.start_time / 1e3, info.end_time / 1e3))
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    active = most = 0
    both, last = 0.0, None
    for t, d in events:
        if last is not None and active >= 2:
            both += t - last
        active += d
        most, last = max(most, active), t
    return most, both


def run_experts(stage: ExpertsStage, ctx: StageContext) -> StageResult:
    import torch

    from slmlab.assemble import extract_expert, load_expert_model
    from slmlab.models.modularforge import expert_prefixes

    cfg, name = ctx.cfg, stage.stage_name
    trunk = _earlier(ctx, name, stage.trunk).outputs
    n = _earlier(ctx, name, stage.partition).outputs["num_partitions"]
    if ctx.shards.num_partitions != n:
        raise StageFailed(f"stages.{name}: expected shards with {n} partitions, found {ctx.shards.num_partitions}")
    prefixes = expert_prefixes(cfg.model.n_layers)
    ecfg = _with_train(cfg, {**stage.train, "trainable": list(prefixes)})
    fresh = stage.init == "fresh"
    specs = [ctx.spec(f"expert-{e}", ecfg, partition=e, init_from=Path(trunk["view_dir" if fresh else "model_dir"]),
                      allow_missing=prefixes if fresh else (),
                      tags={"slmlab.expert": str(e), "slmlab.role": "modularforge-expert"}) for e in range(n)]
    runs = ctx.train_many(name, specs, stage.max_concurrent)
    if any(r.status != "FINISHED" for r in runs.values()):
        return StageResult(name, runs=runs, stopped=True)

    files, figures = [], {}
    torch.set_num_threads(max(1, cfg.train.torch_threads or 1))
    for e in range(n):
        r = runs[f"expert-{e}"]
        f = extract_expert(r.model_dir, Path(r.model_dir) / "expert.safetensors")
        ctx.client.log_artifact(r.mlflow_run_id, str(f), "expert")
        model = load_expert_model(trunk["model_dir"], f)
        own = _evaluate(model, ctx.shards.partition_dir(e, "val"), ctx, None)
        every = _evaluate(model, ctx.shards.val_dir, ctx, None)
        _log(ctx, r.mlflow_run_id, {"expert/own_partition_bpb": own["bpb"], "expert/all_val_bpb": every["bpb"]})
        figures[f"expert{e}/own_partition_bpb"], figures[f"expert{e}/all_val_bpb"] = own["bpb"], every["bpb"]
        files.append(f)
        ctx.progress(f"experts: expert-{e}: val bpb {own['bpb']:.4f} on its own partition, {every['bpb']:.4f} on all")
    most, both = _max_overlap(ctx, [r.mlflow_run_id for r in runs.values()])
    parent = ctx.stage_run(name)
    _log(ctx, parent, {**figures, "experts/max_concurrent_runs": most, "experts/overlap_s": both})
    ctx.progress(f"experts: {n} runs, at most {most} at once, {both:.0f} s with two or more running")
    tokens = ecfg.train.max_steps * tokens_per_step(ecfg)
    return StageResult(name, runs=runs, outputs={"expert_files": files, "num_experts": n, "tokens_each": tokens,
                                                 "max_concurrent_runs": most, "overlap_s": both})


# ----------------------------------------------------------------------------------------------
# assemble


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS, so the next peak is this step's
        return True
    except OSError:
        return False


def _rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def assemble_from(stage: AssembleStage, ctx: StageContext, out_dir: Path, *, gate_mode: str = "hidden",
                  calibrate: bool | None = None):
    """Run one assembly of this stage's trunk and experts into ``out_dir``."""
    from slmlab.assemble import AssemblyError, assemble_streaming, calibration_sample

    trunk = _earlier(ctx, stage.stage_name, stage.trunk).outputs
    experts = _earlier(ctx, stage.stage_name, stage.experts).outputs
    files = experts["expert_files"]
    calib = [calibration_sample(ctx.shards.partition_dir(e, "train"), stage.calibration_sequences)
             for e in range(ctx.shards.num_partitions)]
    try:
        return assemble_streaming(trunk["model_dir"], files, calib, out_dir, top_k=stage.top_k, gate_mode=gate_mode,
                                  gate_source=stage.gate_source, center=stage.center_gates,
                                  calibrate=stage.calibrate if calibrate is None else calibrate,
                                  cond_limit=stage.degenerate_condition, progress=ctx.progress)
    except AssemblyError as err:
        msg = str(err)
        raise AssemblyError(f"stages.{stage.stage_name}.{msg}" if msg.startswith("top_k:") else msg) from None


def run_assemble(stage: AssembleStage, ctx: StageContext) -> StageResult:
    import torch

    from slmlab.lifecycle import sample_texts
    from slmlab.tracking import register_model
    from slmlab.train.checkpoint import load_model_dir

    cfg, name = ctx.cfg, stage.stage_name
    prior = ctx.state.run(name, "assembled")
    if prior and prior.get("status") == "FINISHED":
        ctx.progress(f"resume: {name} assembled earlier ({prior['model_uri']}), not assembled again")
        return StageResult(name, outputs={k: prior[k] for k in ("model_dir", "model_uri", "mlflow_run_id")} | {
            "model_dir": Path(prior["model_dir"])})
    run_id = _own_run(ctx, name, "assembled", {"slmlab.family": "vectorslm", "slmlab.role": "modularforge-assembled"})
    ctx.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in stage.model_dump().items()])
    out_dir = Path(cfg.run_dir) / "models" / run_id
    torch.set_num_threads(max(1, cfg.train.torch_threads or 1))
    exact = _peak_rss_reset()
    before, t0 = _rss("VmRSS"), time.perf_counter()
    try:
        report = assemble_from(stage, ctx, out_dir)
    except BaseException:
        ctx.client.set_terminated(run_id, "FAILED")
        raise
    seconds, added = time.perf_counter() - t0, _rss("VmHWM") - before
    figures = {"assemble/seconds": seconds, "assemble/peak_rss_added_mib": added / 2**20 if exact else float("nan"),
               "assemble/checkpoint_mib": (out_dir / "model.safetensors").stat().st_size / 2**20}
    for i, c in enumerate(report.gate_conditions):
        figures[f"gates/layer{i}/condition"] = min(c, 1e12)
        figures[f"gates/layer{i}/max_cosine"] = report.gate_max_cosine[i]
    for norm, (lo, hi) in report.factors.items():
        figures[f"repair/{norm}/min_factor"], figures[f"repair/{norm}/max_factor"] = lo, hi
    _log(ctx, run_id, figures)
    if report.warnings:
        ctx.client.log_text(run_id, "\n".join(report.warnings), "assemble/warnings.txt")
        for w in report.warnings:
            ctx.progress(f"assemble: WARNING {w}")
    for f in ("model.safetensors", "model_config.json", "tokenizer.json", "tokenizer_config.json"):
        ctx.client.log_artifact(run_id, str(out_dir / f), "model")
    _, model = load_model_dir(out_dir)
    samples = sample_texts(model, out_dir / "tokenizer.json", cfg)
    ctx.client.log_text(run_id, "\n\n".join(f"### {p!r}\n{s}" for p, s in samples), "samples.md")
    for _, text in samples:
        ctx.progress(f"sample (assembled): {text[:160]!r}")
    register_as = stage.register_as or f"{cfg.registered_model_name}-moe"
    version = register_model(ctx.client, register_as, run_id, "model",
                             description=f"ModularForge MoE assembled from {report.config.moe.num_experts} experts")
    uri = f"models:/{register_as}/{version}"
    ctx.client.set_tag(run_id, "slmlab.registered_version", f"{register_as}/{version}")
    ctx.client.set_terminated(run_id, "FINISHED")
    ctx.state.record(name, "assembled", status="FINISHED", model_dir=out_dir, model_uri=uri)
    ctx.progress(f"assemble: {uri} in {seconds:.1f} s, peak memory +{added / 2**20:.0f} MiB; "
                 f"gate condition numbers {[round(c, 1) for c in report.gate_conditions]}")
    return StageResult(name, outputs={"model_dir": out_dir, "model_uri": uri, "mlflow_run_id": run_id,
                                      "config": report.config})



# ----------------------------------------------------------------------------------------------
# evaluate


def _stage_config(ctx: StageContext, name: str):
    return next(st for st in ctx.cfg.stage_list() if st.stage_name == name)


def _trained_baselines(stage: EvaluateStage, ctx: StageContext, trunk: dict, experts: dict, asm: dict, moe_cfg):
    """The dense model with the assembled model's active parameters on the same total tokens, and the
    router-only run (BTX: only the gates learn, from the assembled weights), trained at once."""
    from slmlab.models.modularforge import dense_baseline_config

    cfg, name = ctx.cfg, stage.stage_name
    total = trunk["tokens"] + experts["num_experts"] * experts["tokens_each"]
    dcfg = _with_train(cfg, stage.dense_train, model=dense_baseline_config(cfg.model, moe_cfg.moe.top_k))
    if "max_steps" not in stage.dense_train:
        dcfg = _with_train(dcfg, {"max_steps": math.ceil(total / tokens_per_step(dcfg))})
    routers = [f"layers.{i}.ffn.router." for i in range(moe_cfg.n_layers)]
    rcfg = _with_train(cfg, {**stage.router_train, "trainable": routers}, model=moe_cfg)
    specs = [ctx.spec("dense", dcfg, register_as=f"{cfg.registered_model_name}-dense",
                      tags={"slmlab.role": "modularforge-dense-baseline"}),
             ctx.spec("router-only", rcfg, init_from=Path(asm["model_dir"]),
                      register_as=f"{cfg.registered_model_name}-router-only",
                      tags={"slmlab.role": "modularforge-router-only", "slmlab.base_model": asm["model_uri"]})]
    ctx.progress(f"evaluate: dense baseline {dcfg.train.max_steps} steps = {total:,} tokens (trunk + experts); "
                 f"router-only {rcfg.train.max_steps} steps")
    return ctx.train_many(name, specs, stage.max_concurrent)


def _config(model_dir):
    from slmlab.models.vectorslm import VectorSLMConfig

    return VectorSLMConfig.model_validate_json((Path(model_dir) / "model_config.json").read_text())


def run_evaluate(stage: EvaluateStage, ctx: StageContext) -> StageResult:
    import torch

    from slmlab.assemble import load_expert_model
    from slmlab.models.modularforge import active_parameters, routing_analysis
    from slmlab.train.checkpoint import load_model_dir

    cfg, name = ctx.cfg, stage.stage_name
    trunk = _earlier(ctx, name, stage.trunk).outputs
    experts = _earlier(ctx, name, stage.experts).outputs
    asm = _earlier(ctx, name, stage.assemble).outputs
    moe_cfg = _config(asm["model_dir"])
    runs = _trained_baselines(stage, ctx, trunk, experts, asm, moe_cfg)
    if any(r.status != "FINISHED" for r in runs.values()):
        return StageResult(name, runs=runs, stopped=True)

    torch.set_num_threads(max(1, cfg.train.torch_threads or 1))
    run_id = _own_run(ctx, name, "comparison", {"slmlab.role": COMPARISON_ROLE})
    extra = Path(cfg.run_dir) / "models" / run_id
    astage = _stage_config(ctx, stage.assemble)
    assemble_from(astage, ctx, extra / "uniform", gate_mode="uniform")
    assemble_from(astage, ctx, extra / "uncalibrated", calibrate=False)

    n, limit, val = experts["num_experts"], stage.eval_batches, ctx.shards.val_dir
    ev = lambda model, folder=val: _evaluate(model, folder, ctx, limit)
    rows: dict[str, dict] = {}
    _, moe = load_model_dir(asm["model_dir"])
    rows["assembled"] = ev(moe)
    own = [list(_blocks(ctx.shards.partition_dir(k, "val"), cfg.train.micro_batch_size, limit)) for k in range(n)]
    routing = routing_analysis(moe, own)
    del moe
    for label, folder in (("uniform", extra / "uniform"), ("assembled, no calibration", extra / "uncalibrated"),
                          ("trunk", trunk["model_dir"]), ("dense", runs["dense"].model_dir),
                          ("router-only", runs["router-only"].model_dir)):
        rows[label] = ev(load_model_dir(folder)[1])
    oracle = {"nats": 0.0, "bytes": 0.0}
    for e, f in enumerate(experts["expert_files"]):
        model = load_expert_model(trunk["model_dir"], f)
        rows[f"expert-{e}"] = ev(model)
        mine = ev(model, ctx.shards.partition_dir(e, "val"))
        oracle = {k: oracle[k] + mine[k] for k in oracle}
    rows["oracle"] = {**oracle, "bpb": oracle["nats"] / math.log(2) / max(oracle["bytes"], 1.0)}

    dense, assembled = rows["dense"]["bpb"], rows["assembled"]["bpb"]
    comparison = {
        "bpb": {k: v["bpb"] for k, v in rows.items()}, "routing": routing,
        "gap_vs_dense": assembled / dense - 1, "num_experts": n, "top_k": moe_cfg.moe.top_k,
        "active_parameters": {"assembled": active_parameters(moe_cfg),
                              "dense": active_parameters(_config(runs["dense"].model_dir))},
        "partition": cfg.data.partition.method, "runs": {k: r.mlflow_run_id for k, r in runs.items()}}
    figures = {f"compare/{k.replace(' ', '_').replace(',', '')}_bpb": v["bpb"] for k, v in rows.items()}
    figures["compare/gap_vs_dense"] = comparison["gap_vs_dense"]
    for i in range(moe_cfg.n_layers):
        figures[f"routing/layer{i}/entropy"] = routing["entropy"][i]
        figures[f"routing/layer{i}/own_expert_top1"] = sum(routing["top1"][i][k][k] for k in range(n)) / n
        for e in range(n):
            figures[f"routing/layer{i}/expert{e}_load"] = routing["load"][i][e]
    _log(ctx, run_id, figures)
    ctx.client.log_dict(run_id, comparison, "modularforge/comparison.json")
    # the assembled run carries the comparison too: `slmlab report` shows a run's eval/* metrics and the
    # figures under its report/ folder, and lists runs by val/bpb
    slug = lambda k: k.replace(", ", "_").replace(" ", "_").replace("-", "_")
    _log(ctx, asm["mlflow_run_id"], {"val/bpb": assembled, "val/loss": rows["assembled"]["loss"],
                                     **{f"eval/bpb_{slug(k)}": v["bpb"] for k, v in rows.items()},
                                     "eval/gap_vs_dense": comparison["gap_vs_dense"]})
    import matplotlib.pyplot as plt

    for title, fig in report_figures(comparison):
        ctx.client.log_figure(asm["mlflow_run_id"], fig, f"report/{title.replace(',', '').replace(' ', '_')}.png")
        plt.close(fig)
    ctx.client.set_terminated(run_id, "FINISHED")
    ctx.state.record(name, "comparison", status="FINISHED")
    table = "  ".join(f"{k} {v['bpb']:.4f}" for k, v in rows.items())
    ctx.progress(f"evaluate: val bits per byte: {table}")
    ctx.progress(f"evaluate: assembled vs dense (same active parameters, same total tokens): "
                 f"{100 * comparison['gap_vs_dense']:+.1f}% (aim: within +10%)")
    return StageResult(name, runs=runs, outputs={"comparison": comparison, "mlflow_run_id": run_id})


# ----------------------------------------------------------------------------------------------
# Report figures (logged under the assembled run's report/ folder, which `slmlab report` embeds)


def report_figures(comparison: dict) -> list[tuple[str, Any]]:
    """(title, matplotlib figure) for one comparison: bits per byte of the six models, the partition
    x expert routing matrix, and each layer's expert load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bpb, routing = comparison["bpb"], comparison["routing"]
    main = ["assembled", "uniform", "oracle", "dense", "router-only"]
    names = main + sorted(k for k in bpb if k.startswith("expert-"))
    colors = ["C0", "C1", "C2", "C3", "C4"] + ["C7"] * (len(names) - len(main))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(names)), [bpb[k] for k in names], color=colors)
    ax.set_xticks(range(len(names)), [k.replace("router-only", "router\nonly") for k in names], fontsize=8)
    lo = min(bpb[k] for k in names)
    ax.set(ylabel="validation bits per byte", ylim=(lo * 0.9, max(bpb[k] for k in names) * 1.02),
           title=f"ModularForge: {comparison['num_experts']} experts, top-{comparison['top_k']}, "
                 f"{comparison['partition']} partitions")
    out = [("bits per byte of the assembled MoE and its baselines", fig)]

    matrix = routing["top1"]
    L, n = len(matrix), len(matrix[0])
    fig, axes = plt.subplots(1, L, figsize=(2.6 * L, 2.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(matrix[i], vmin=0, vmax=1, cmap="viridis")
        for k in range(n):
            for e in range(len(matrix[i][k])):
                ax.text(e, k, f"{matrix[i][k][e]:.2f}", ha="center", va="center", fontsize=6, color="w")
        ax.set(title=f"layer {i}", xlabel="expert (first choice)", ylabel="partition" if i == 0 else None)
    out.append(("routing matrix, partition x first-choice expert", fig))

    load = routing["load"]
    fig, ax = plt.subplots(figsize=(6, 3))
    bottom = [0.0] * L
    for e in range(len(load[0])):
        ax.bar(range(L), [load[i][e] for i in range(L)], bottom=bottom, label=f"expert {e}")
        bottom = [b + load[i][e] for i, b in enumerate(bottom)]
    ax.plot(range(L), routing["entropy"], "k.-", label="routing entropy / ln N")
    ax.set(xlabel="layer", ylabel="share of routed slots", title="Expert load per layer")
    ax.set_xticks(range(L))
    ax.legend(fontsize=6, ncol=2)
    out.append(("expert load and routing entropy per layer", fig))
    return out


register_stage("partition", PartitionStage, run_partition)
register_stage("trunk", TrunkStage, run_trunk)
register_stage("experts", ExpertsStage, run_experts)
register_stage("assemble", AssembleStage, run_assemble)
register_stage("evaluate", EvaluateStage, run_evaluate)
