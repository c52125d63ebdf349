"""``compare``: every ``compare:`` variant trained on the pipeline's shards, tokenizer and budget.

One after another by default: the variants' tokens/s are part of the comparison and runs sharing
the machine would distort them. ``max_concurrent`` > 1 trades that figure for wall time."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slmlab.stages import StageConfig, StageContext, StageResult, register_stage


class CompareStage(StageConfig):
    kind: Literal["compare"] = "compare"
    of: str = "pretrain"  # the stage whose model the variants are compared with (tagged on their runs)
    max_concurrent: int = Field(1, ge=1)  # 1 keeps throughput figures honest; more shortens wall time


def run(stage: CompareStage, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    base = ctx.results.get(stage.of)
    tags = {"slmlab.compared_with": next(iter(base.runs.values())).mlflow_run_id} if base and base.runs else {}
    specs = []
    for variant in cfg.compare:
        model = variant.model.model_copy(update={"vocab_size": cfg.model.vocab_size})
        specs.append(
            ctx.spec(
                variant.name,
                cfg.model_copy(update={"model": model}),
                register_as=f"{cfg.registered_model_name}-{variant.name}",
                tags=tags,
            )
        )
    if stage.max_concurrent == 1:
        runs = {s.label: ctx.train(stage.stage_name, s) for s in specs}
    else:
        runs = ctx.train_many(stage.stage_name, specs, stage.max_concurrent)
    return StageResult(stage.stage_name, runs=runs)


register_stage("compare", CompareStage, run)
