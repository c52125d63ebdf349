"""``finetune``: instruction fine-tuning of an earlier stage's registered model.

Chat data with the loss on assistant answers only, the pretrained tokenizer reused (never
retrained), starting from the *registered* version (not a local leftover). Its own MLflow run,
linked to the pretraining run (``mlflow.parentRunId``), registered as ``<pipeline>-sft``."""

from __future__ import annotations

from typing import Literal

from slmlab.stages import StageConfig, StageContext, StageFailed, StageResult, register_stage


class FinetuneStage(StageConfig):
    kind: Literal["finetune"] = "finetune"
    of: str = "pretrain"  # the stage whose registered model is fine-tuned


def finetune_config(cfg):
    """The pretraining pipeline with the fine-tuning data and train overrides swapped in."""
    return cfg.model_copy(
        update={
            "name": f"{cfg.name}-sft",
            "data": cfg.finetune.data,
            "train": cfg.finetune_train(),
            "compare": [],
            "finetune": None,
            "stages": [],
        }
    )


def run(stage: FinetuneStage, ctx: StageContext) -> StageResult:
    from slmlab.tracking import resolve_model_dir

    cfg = ctx.cfg
    base = ctx.results.get(stage.of)
    if base is None or not base.outputs.get("model_uri"):
        raise StageFailed(f"stage {stage.stage_name}: expected a registered model from stage {stage.of!r}, found none")
    ft = finetune_config(cfg)
    shards = ctx.build_shards(ft, tokenizer_path=ctx.shards.tokenizer_path)
    if shards.summary["vocab_size"] != cfg.model.vocab_size:
        raise StageFailed(
            f"finetune.data: expected the pretrained tokenizer's vocabulary ({cfg.model.vocab_size}), "
            f"found {shards.summary['vocab_size']}"
        )
    base_uri = base.outputs["model_uri"]
    base_run = next(iter(base.runs.values())).mlflow_run_id
    ctx.progress(f"finetune: from {base_uri} on {shards.summary['train']['tokens']:,} answer-masked tokens")
    spec = ctx.spec(
        f"{cfg.label}-sft",
        ft,
        shards=shards,
        init_from=resolve_model_dir(base_uri, cfg.run_dir),
        register_as=cfg.finetune.register_as or f"{cfg.registered_model_name}-sft",
        tags={"slmlab.parent_run_id": base_run, "mlflow.parentRunId": base_run, "slmlab.base_model": base_uri},
    )
    result = ctx.train(stage.stage_name, spec)
    return StageResult(
        stage.stage_name,
        runs={result.label: result},
        stopped=result.status == "STOPPED",
        outputs={"model_uri": result.model_uri, "model_dir": result.model_dir},
    )


register_stage("finetune", FinetuneStage, run)
