"""MoVE stages: a Llama teacher rebuilt from five independently fitted modules (``slmlab.models.move``).

    move_teacher   the teacher: a registered VectorSLM (``models:/name[/version|@alias]``), a model folder,
                   or a transformers Llama folder (safetensors); a registry name not registered yet is
                   trained first, here, from the pipeline's ``model`` (``train_if_missing``)
    move_modules   one Ray Train run per module, at once (``ctx.train_many``): each run's model holds the
                   frozen teacher and its one module and fits it on the teacher's sublayer inputs and
                   outputs computed in the same forward; its val/bpb is the teacher with that module
                   swapped in, its val/cos/... the per-layer cosines in both modes
    move_assemble  every module swapped in at once, evaluated, profiled (decode tokens/s and memory at
                   512 and 2,048 tokens vs the teacher) and registered; one summary MLflow run holds
                   the comparison: bpb of teacher / one-module swaps / all modules, cosine by layer
    move_distill   optional: the assembled student distilled end to end on the teacher's logits
                   (MOHAWK stage 3: blocks aligned one at a time are not enough), registered; before
                   and after go into the summary run
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from slmlab.models.move import (
    MODULE_KINDS,
    PER_LAYER,
    AttentionSlot,
    DecoderSlot,
    EmbeddingSlot,
    FFNSlot,
    ModuleKind,
    PositionSlot,
)
from slmlab.stages import StageConfig, StageContext, StageFailed, StageResult, register_stage

PROFILE_CONTEXTS = (512, 2048)  # decode speed and memory are measured with this much context


def _check_train(overrides: dict[str, Any]) -> dict[str, Any]:
    from slmlab.config import TrainConfig

    TrainConfig.model_validate({**TrainConfig().model_dump(), **overrides})  # unknown keys / bad values fail here
    return overrides


# ---------------------------------------------------------------------------------------------
# Teacher


class TeacherStage(StageConfig):
    kind: Literal["move_teacher"] = "move_teacher"
    # models:/name (latest version), models:/name/version, models:/name@alias, a model folder, or a
    # transformers Llama folder (config.json + safetensors, with its tokenizer.json when it has one)
    teacher: str = "models:/vectorslm"
    train_if_missing: bool = True  # a models:/name not registered yet: train the pipeline's `model` and register it


def _latest_version(client, name: str) -> str | None:
    import mlflow

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None


def run_teacher(stage: TeacherStage, ctx: StageContext) -> StageResult:
    from slmlab.models.move import load_teacher
    from slmlab.tracking import resolve_model_dir
    from slmlab.train.checkpoint import write_model

    cfg, ref, runs = ctx.cfg, stage.teacher, {}
    if ref.startswith("models:/") and "/" not in ref[len("models:/"):] and "@" not in ref:
        name = ref[len("models:/"):]
        version = _latest_version(ctx.client, name)
        if version is None:
            if not stage.train_if_missing:
                raise StageFailed(f"stages.{stage.stage_name}.teacher: expected {ref} registered in {cfg.run_dir}, "
                                  f"found none: run `slmlab run pipelines/vectorslm.yaml --set tracking.register_as="
                                  f"{name} --set run_dir={cfg.run_dir}` first, or set train_if_missing: true")
            if cfg.model.family != "vectorslm":
                raise StageFailed(f"model.family: expected 'vectorslm' to train the missing teacher {ref}, "
                                  f"found {cfg.model.family!r}")
            ctx.progress(f"move: teacher {ref} is not registered yet: training it first")
            result = ctx.train(stage.stage_name, ctx.spec("teacher", register_as=name))
            if result.status != "FINISHED":
                return StageResult(stage.stage_name, runs={"teacher": result}, stopped=True)
            runs, version = {"teacher": result}, result.model_version
        ref = f"models:/{name}/{version}"
    folder = resolve_model_dir(ref, cfg.run_dir) if ref.startswith(("models:/", "runs:/")) else Path(ref)
    tcfg, teacher = load_teacher(folder)
    # one platform folder whatever the source: module runs warm-start from it strictly
    digest = hashlib.sha256(f"{folder.resolve()}".encode()).hexdigest()[:12]
    out = Path(cfg.run_dir) / "move" / "teachers" / digest
    write_model(teacher, tcfg, out)
    tokenizer = folder / "tokenizer.json"
    shards = ctx.shards
    if tokenizer.exists() and tokenizer.read_bytes() != ctx.shards.tokenizer_path.read_bytes():
        ctx.progress(f"move: tokenizing the data with the teacher's own tokenizer ({tokenizer})")
        shards = ctx.build_shards(cfg, tokenizer_path=tokenizer)
    if shards.summary["vocab_size"] != tcfg.vocab_size:
        raise StageFailed(f"stages.{stage.stage_name}.teacher: expected a teacher with the tokenizer's vocabulary "
                          f"({shards.summary['vocab_size']}; put the teacher's tokenizer.json in {folder}), found "
                          f"vocab_size {tcfg.vocab_size}")
    ctx.progress(f"move: teacher {ref}: {tcfg.n_layers} layers, dim {tcfg.dim}, {count(teacher):,} parameters")
    return StageResult(stage.stage_name, runs=runs, outputs={"teacher_dir": out, "teacher_ref": ref, "shards": shards,
                                                             "teacher_cfg": tcfg})


def count(model) -> int:
    from slmlab.models import count_parameters

    return count_parameters(model)


# ---------------------------------------------------------------------------------------------
# Module runs


class ModulesStage(StageConfig):
    kind: Literal["move_modules"] = "move_modules"
    teacher: str = "move_teacher"  # the stage that resolved the teacher
    modules: list[ModuleKind] = Field(default_factory=lambda: list(MODULE_KINDS), min_length=1)  # one run each
    embedding: EmbeddingSlot = Field(default_factory=EmbeddingSlot)
    position: PositionSlot = Field(default_factory=PositionSlot)
    attention: AttentionSlot = Field(default_factory=AttentionSlot)  # variant: linear | graph
    ffn: FFNSlot = Field(default_factory=FFNSlot)
    decoder: DecoderSlot = Field(default_factory=DecoderSlot)
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the pipeline's `train` for every module run
    train_by_module: dict[ModuleKind, dict[str, Any]] = Field(default_factory=dict)  # and per module (lr, steps)
    max_concurrent: int | None = Field(None, ge=1)  # cap below what the cluster holds (None = as many as fit)

    @field_validator("modules")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"expected each module once, found {v}")
        return v

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_train(v)

    @field_validator("train_by_module")
    @classmethod
    def _train_by_module(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for overrides in v.values():
            _check_train(overrides)
        return v


def _teacher_outputs(ctx: StageContext, name: str, stage: str) -> dict:
    base = ctx.results.get(name)
    if base is None or "teacher_dir" not in base.outputs:
        raise StageFailed(f"stages.{stage}.teacher: expected an earlier move_teacher stage named {name!r}, found "
                          f"{sorted(ctx.results)}")
    return base.outputs


def module_config(tcfg, kinds: list[str], objective: str, slots: dict[str, Any]):
    """The MoVE family config for ``kinds`` swapped into a teacher; the teacher's context is raised
    to the profiled length (rotary tables are not weights, so the teacher's tensors still fit)."""
    from slmlab.models.move import MoVEConfig

    longest = max(tcfg.max_seq_len, max(PROFILE_CONTEXTS))
    teacher = tcfg.model_copy(update={"max_seq_len": longest})
    return MoVEConfig(vocab_size=tcfg.vocab_size, max_seq_len=longest, teacher=teacher, swap=list(kinds),
                      objective=objective, **{k: v for k, v in slots.items() if k in MODULE_KINDS})


def prepare_init(mcfg, teacher_dir: Path, out: Path, seed: int) -> list[str]:
    """Write the model folder a module run starts from: the teacher's tensors plus the module
    started from them; returns the names of the tensors that learn."""
    import torch

    from slmlab.models.move import MoVE
    from slmlab.train.checkpoint import load_weights, write_model

    torch.manual_seed(seed)
    model = MoVE(mcfg)
    load_weights(model, teacher_dir / "model.safetensors", allow_missing=("move.",))
    model.init_from_teacher(seed)
    write_model(model, mcfg, out)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def run_modules(stage: ModulesStage, ctx: StageContext) -> StageResult:
    from slmlab.config import TrainConfig

    cfg = ctx.cfg
    t = _teacher_outputs(ctx, stage.teacher, stage.stage_name)
    slots = {k: getattr(stage, k) for k in MODULE_KINDS}
    specs = []
    for kind in stage.modules:
        mcfg = module_config(t["teacher_cfg"], [kind], "fit", slots)
        init = Path(cfg.run_dir) / "move" / "init" / ctx.state.data["invocation"] / kind
        trainable = prepare_init(mcfg, t["teacher_dir"], init, cfg.seed)
        train = TrainConfig.model_validate({**cfg.train.model_dump(), **stage.train,
                                            **stage.train_by_module.get(kind, {}), "trainable": trainable})
        run_cfg = cfg.model_copy(update={"model": mcfg, "train": train, "stages": [], "compare": [], "finetune": None})
        specs.append(ctx.spec(kind, run_cfg, shards=t["shards"], init_from=init,
                              tags={"slmlab.move.module": kind, "slmlab.move.teacher": t["teacher_ref"]}))
    ctx.progress(f"move: fitting {len(specs)} modules ({', '.join(stage.modules)}) as independent runs")
    runs = ctx.train_many(stage.stage_name, specs, stage.max_concurrent)
    for kind, r in runs.items():
        ctx.progress(f"move: {kind}: " + ", ".join(f"{k.removeprefix('val/')} {r.metrics[k]:.4f}" for k in (
            f"val/cos/{kind}/teacher_in", f"val/cos/{kind}/student_in", "val/bpb", "val/bpb_ratio") if k in r.metrics))
    return StageResult(stage.stage_name, runs=runs, outputs={"module_dirs": {k: r.model_dir for k, r in runs.items()}})


# ---------------------------------------------------------------------------------------------
# Assembly, evaluation, profile


class AssembleStage(StageConfig):
    kind: Literal["move_assemble"] = "move_assemble"
    modules: str = "move_modules"  # the stage whose module runs are assembled
    register_as: str | None = None  # registered name of the assembled student (default: <pipeline>-assembled)
    profile: bool = True  # decode tokens/s and memory at 512 and 2,048 tokens of context, student vs teacher


def assemble(teacher_dir: Path, tcfg, module_dirs: dict[str, Path], objective: str = "distill"):
    """The teacher with every module swapped in, each read from its own run's folder (slot settings
    from that run's config, so a module always lands in a slot shaped like the one it was fitted in)."""
    from slmlab.models.move import MoVE, load_module
    from slmlab.train.checkpoint import CONFIG_FILE, load_weights

    slots = {}
    for kind, folder in module_dirs.items():
        raw = json.loads((Path(folder) / CONFIG_FILE).read_text())
        slots[kind] = raw.get(kind, {})
    mcfg = module_config(tcfg, [k for k in MODULE_KINDS if k in module_dirs], objective, slots)
    model = MoVE(mcfg)
    load_weights(model, teacher_dir / "model.safetensors", allow_missing=("move.",))
    for kind, folder in module_dirs.items():
        load_module(model, kind, folder)
    return mcfg, model.eval()


def decode_profile(model, vocab_size: int, context: int, new_tokens: int = 32) -> dict[str, float]:
    """Batch-1 greedy decoding after ``context - new_tokens`` prompt tokens: tokens/s of the decode
    steps alone (timed from the first generated token, which ends the prefill, to the last) and the
    generation state's MiB at ``context``. (Subtracting a separately timed prefill, as this did before,
    went to zero or below under load and logged 3.1e10 tokens/s.)"""
    import torch

    from slmlab.generation import generate
    from slmlab.profile import state_bytes

    prompt = torch.randint(0, vocab_size, (1, context - new_tokens), generator=torch.Generator().manual_seed(0))
    generate(model, prompt[:, :16], max_new_tokens=4, temperature=0)  # warm-up
    stamps: list[float] = []
    generate(model, prompt, max_new_tokens=new_tokens, temperature=0,
             on_token=lambda _: stamps.append(time.perf_counter()))
    return {"decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "state_mib": state_bytes(model, context) / 2**20}


def _log(ctx: StageContext, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from slmlab.tracking import MetricsLogger

    MetricsLogger.for_client(ctx.client, run_id).log({k: float(v) for k, v in metrics.items()}, step=step)


def _cosines(metrics: dict[str, float], setting: str) -> dict[str, float]:
    """val/cos/<kind>/layer<i>/<mode> → move/cos/<kind>/layer<i>/<mode>/<setting> (and mse likewise)."""
    out = {}
    for k, v in metrics.items():
        if k.startswith(("val/cos/", "val/mse/")) and not k.endswith("_min"):
            out[f"move/{k[len('val/'):]}/{setting}"] = v
    return out


def run_assemble(stage: AssembleStage, ctx: StageContext) -> StageResult:
    import torch

    from slmlab.evaluate import evaluate_folder
    from slmlab.lifecycle import sample_texts
    from slmlab.models.vectorslm import VectorSLM
    from slmlab.tracking import ensure_experiment, register_model
    from slmlab.train.checkpoint import load_weights, write_model

    cfg = ctx.cfg
    mods = ctx.results.get(stage.modules)
    if mods is None or "module_dirs" not in mods.outputs:
        raise StageFailed(f"stages.{stage.stage_name}.modules: expected an earlier move_modules stage named "
                          f"{stage.modules!r}, found {sorted(ctx.results)}")
    first = next(iter(mods.runs.values()))
    teacher_stage = next(r for r in ctx.results.values() if "teacher_dir" in r.outputs)
    t = teacher_stage.outputs
    shards, batches = t["shards"], cfg.train.eval_batches
    mcfg, student = assemble(t["teacher_dir"], t["teacher_cfg"], mods.outputs["module_dirs"])
    teacher = VectorSLM(mcfg.teacher)
    load_weights(teacher, t["teacher_dir"] / "model.safetensors")
    teacher.eval()

    ctx.progress("move: evaluating the teacher and the assembled student on the validation split")
    mb = cfg.train.micro_batch_size
    with torch.inference_mode():
        t_val = evaluate_folder(teacher, shards.val_dir, shards.tokenizer_path, mb, batches)
        s_val = evaluate_folder(student, shards.val_dir, shards.tokenizer_path, mb, batches)
    summary = {"move/bpb/teacher": t_val["val/bpb"], "move/bpb/assembled": s_val["val/bpb"],
               "move/kl/assembled": s_val["val/kl"], "move/params/teacher": count(teacher),
               "move/params/student": student.student_parameters()}
    for kind, r in mods.runs.items():  # one module swapped in: each module run's own final evaluation
        if "val/bpb" in r.metrics:
            summary[f"move/bpb/swap_{kind}"] = r.metrics["val/bpb"]
            summary.update(_cosines(r.metrics, "module"))
    summary.update(_cosines(s_val, "assembled"))

    experiment_id = ensure_experiment(ctx.client, cfg.experiment_name, cfg.run_dir)
    run = ctx.client.create_run(experiment_id, run_name=f"{ctx.state.data['invocation']}-assembled", tags={
        "slmlab.stage": stage.stage_name, "slmlab.role": "move-summary", "slmlab.family": "move",
        "slmlab.variant": "assembled", "slmlab.pipeline": cfg.name, "slmlab.move.teacher": t["teacher_ref"]})
    run_id = run.info.run_id
    _log(ctx, run_id, {**s_val, **summary, "model/parameters": summary["move/params/student"]})
    if stage.profile:
        ctx.progress(f"move: profiling decode at {', '.join(map(str, PROFILE_CONTEXTS))} tokens of context")
        for who, model in (("teacher", teacher), ("assembled", student)):
            params_mib = summary[f"move/params/{'student' if who == 'assembled' else who}"] * 4 / 2**20
            for n in PROFILE_CONTEXTS:
                prof = decode_profile(model, mcfg.vocab_size, n)
                _log(ctx, run_id, {f"move/decode_tokens_per_s/{who}": prof["decode_tokens_per_s"],
                                   f"move/state_mib/{who}": prof["state_mib"],
                                   f"move/memory_mib/{who}": prof["state_mib"] + params_mib}, step=n)
                summary[f"move/decode_tokens_per_s/{who}/ctx{n}"] = prof["decode_tokens_per_s"]
                summary[f"move/memory_mib/{who}/ctx{n}"] = prof["state_mib"] + params_mib

    out = Path(cfg.run_dir) / "models" / run_id
    write_model(student, mcfg, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(shards.tokenizer_path.parent / name, out / name)
    for name in ("model.safetensors", "model_config.json", "tokenizer.json", "tokenizer_config.json"):
        ctx.client.log_artifact(run_id, str(out / name), "model")
    samples = [(who, p, s) for who, model in (("teacher", teacher), ("assembled", student))
               for p, s in sample_texts(model, out / "tokenizer.json", cfg)]
    ctx.client.log_text(run_id, "\n\n".join(f"### {who} {p!r}\n{s}" for who, p, s in samples), "samples.md")
    name = stage.register_as or f"{cfg.registered_model_name}-assembled"
    version = register_model(ctx.client, name, run_id, "model",
                             description=f"MoVE student of {t['teacher_ref']}: bpb {s_val['val/bpb']:.4f} vs the "
                                         f"teacher's {t_val['val/bpb']:.4f}")
    ctx.client.set_tag(run_id, "slmlab.registered_version", f"{name}/{version}")
    ctx.client.set_terminated(run_id, status="FINISHED")
    swaps = ", ".join(f"{k} {summary[f'move/bpb/swap_{k}']:.4f}" for k in MODULE_KINDS
                      if f"move/bpb/swap_{k}" in summary)
    ctx.progress(f"move: bpb teacher {t_val['val/bpb']:.4f}; one module swapped: {swaps}; all: {s_val['val/bpb']:.4f} "
                 f"(KL {s_val['val/kl']:.4f}); registered models:/{name}/{version}")
    for who, p, s in samples:
        ctx.progress(f"sample ({who}): {s[:120]!r}")
    del first
    return StageResult(stage.stage_name, outputs={"model_dir": out, "model_uri": f"models:/{name}/{version}",
                                                  "run_id": run_id, "summary": summary, "config": mcfg})


# ---------------------------------------------------------------------------------------------
# End-to-end distillation


class DistillStage(StageConfig):
    kind: Literal["move_distill"] = "move_distill"
    of: str = "move_assemble"  # the assembly stage whose student is distilled
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the pipeline's `train` section
    register_as: str | None = None  # default: <pipeline>-distilled

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_train(v)


def run_distill(stage: DistillStage, ctx: StageContext) -> StageResult:
    from slmlab.config import TrainConfig

    cfg = ctx.cfg
    base = ctx.results.get(stage.of)
    if base is None or "model_dir" not in base.outputs or "summary" not in base.outputs:
        raise StageFailed(f"stages.{stage.stage_name}.of: expected an earlier move_assemble stage named {stage.of!r}, "
                          f"found {sorted(ctx.results)}")
    t = next(r for r in ctx.results.values() if "teacher_dir" in r.outputs).outputs
    mcfg = base.outputs["config"]
    train = TrainConfig.model_validate({**cfg.train.model_dump(), **stage.train, "trainable": ["move."]})
    run_cfg = cfg.model_copy(update={"model": mcfg, "train": train, "stages": [], "compare": [], "finetune": None})
    name = stage.register_as or f"{cfg.registered_model_name}-distilled"
    spec = ctx.spec("distilled", run_cfg, shards=t["shards"], init_from=base.outputs["model_dir"], register_as=name,
                    tags={"slmlab.move.assembled": base.outputs["model_uri"]})
    result = ctx.train(stage.stage_name, spec)
    if result.status != "FINISHED":
        return StageResult(stage.stage_name, runs={"distilled": result}, stopped=True)
    before = base.outputs["summary"]
    after = {"move/bpb/distilled": result.metrics["val/bpb"], "move/kl/distilled": result.metrics.get("val/kl", 0.0),
             **_cosines(result.metrics, "distilled")}
    _log(ctx, base.outputs["run_id"], after)
    b0, b1 = before["move/bpb/assembled"], after["move/bpb/distilled"]
    gap = lambda bpb: 100 * (bpb / before["move/bpb/teacher"] - 1)  # noqa: E731
    ctx.progress(f"move: final stage: bpb {b0:.4f} ({gap(b0):+.1f}% vs the teacher) → {b1:.4f} ({gap(b1):+.1f}%); "
                 f"KL {before['move/kl/assembled']:.4f} → {after['move/kl/distilled']:.4f}")
    return StageResult(stage.stage_name, runs={"distilled": result},
                       outputs={"model_uri": result.model_uri, "model_dir": result.model_dir, "summary": after})


# ---------------------------------------------------------------------------------------------
# Report figures (``slmlab report``)


def report_figures(client, experiment_id: str) -> list[tuple[str, str]]:
    """(title, base64 PNG) of the latest MoVE summary run in an experiment: cosine by layer and
    module, and bits per byte of the teacher, each one-module swap, all modules, and all after the
    final stage. Empty when the experiment has no MoVE run."""
    import matplotlib.pyplot as plt

    from slmlab.report import _png

    runs = client.search_runs([experiment_id], filter_string="tags.`slmlab.role` = 'move-summary'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return []
    m = runs[0].data.metrics
    figs = []
    settings = [("teacher_in", "module", "fitted alone, teacher's inputs"),
                ("student_in", "module", "one module swapped in, its own inputs"),
                ("student_in", "assembled", "all modules, own inputs"),
                ("student_in", "distilled", "all modules after the final stage")]
    fig, axes = plt.subplots(1, len(PER_LAYER) + 1, figsize=(4 * (len(PER_LAYER) + 1), 3.6), sharey=True)
    for ax, kind in zip(axes, PER_LAYER):
        for mode, setting, label in settings:
            pts = sorted((int(k.split("/layer")[1].split("/")[0]), v) for k, v in m.items()
                         if k.startswith(f"move/cos/{kind}/layer") and k.endswith(f"/{mode}/{setting}"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(0.95, color="grey", ls=":", lw=1)
        ax.set(title=kind, xlabel="layer")
    axes[0].set_ylabel("cosine of the sublayer output")
    ax = axes[-1]
    for i, (mode, setting, label) in enumerate(settings):
        vals = [m.get(f"move/cos/{kind}/{mode}/{setting}") for kind in ("embedding", "decoder")]
        ax.bar([j + 0.2 * i for j in range(2)], [v or 0 for v in vals], width=0.2, label=label)
    ax.set_xticks([0.3, 1.3], ["embedding", "decoder"])
    ax.axhline(0.95, color="grey", ls=":", lw=1)
    ax.legend(fontsize=6, loc="lower left")
    figs.append(("MoVE: cosine of each module's sublayer output with the teacher's, by layer", _png(fig)))

    bars = [("teacher", m.get("move/bpb/teacher"))] + [
        (f"swap {k}", m.get(f"move/bpb/swap_{k}")) for k in MODULE_KINDS] + [
        ("all modules", m.get("move/bpb/assembled")), ("all + final stage", m.get("move/bpb/distilled"))]
    bars = [(n, v) for n, v in bars if v is not None]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(range(len(bars)), [v for _, v in bars], color=["black"] + ["tab:blue"] * (len(bars) - 1))
    ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="validation bits per byte", ylim=(0.9 * min(v for _, v in bars), 1.02 * max(v for _, v in bars)),
           title="MoVE: teacher vs one-module swaps vs all modules")
    figs.append(("MoVE: bits per byte, teacher vs swaps vs the assembled student", _png(fig)))
    return figs


register_stage("move_teacher", TeacherStage, run_teacher)
register_stage("move_modules", ModulesStage, run_modules)
register_stage("move_assemble", AssembleStage, run_assemble)
register_stage("move_distill", DistillStage, run_distill)
__all__ = ["PER_LAYER"]
