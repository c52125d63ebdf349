"""``independent``: N runs that share nothing but the pipeline's data, trained at the same time.

Each run is the pipeline with its own overrides (``set:``, dotted paths as with ``--set``) and
optionally its own data partition; each is an MLflow child run of the stage's parent run and is
registered as ``<pipeline>-<run name>``. How many train together is bounded by the cluster's
free resources and ``max_concurrent`` (see ``slmlab.parallel``). A failing run is reported by
name while the others finish; ``slmlab run ... --resume latest`` then trains only what did not
finish."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from slmlab.schema import StrictConfig
from slmlab.stages import StageConfig, StageContext, StageResult, register_stage


class IndependentRun(StrictConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the run's label in MLflow and in the registry
    set: dict[str, Any] = Field(default_factory=dict)  # overrides of the pipeline: {"train.lr": 0.01}
    partition: int | None = Field(None, ge=0)  # train on this data partition only (data.partition must be set)


class IndependentStage(StageConfig):
    kind: Literal["independent"] = "independent"
    runs: list[IndependentRun] = Field(min_length=1)
    max_concurrent: int | None = Field(None, ge=1)  # cap below what the cluster holds (None = as many as fit)
    register_models: bool = True  # register each run as <pipeline>-<run name>


def run_config(cfg, run: IndependentRun):
    """The pipeline as this run sees it: overrides applied, validated, vocabulary kept."""
    from slmlab.config import apply_overrides, validate_pipeline

    raw = apply_overrides(cfg.model_dump(mode="json"), run.set)
    raw["stages"] = []
    return validate_pipeline(raw, f"stages.{run.name}")


def run(stage: IndependentStage, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    specs = [
        ctx.spec(
            r.name,
            run_config(cfg, r),
            partition=r.partition,
            register_as=f"{cfg.registered_model_name}-{r.name}" if stage.register_models else None,
        )
        for r in stage.runs
    ]
    return StageResult(stage.stage_name, runs=ctx.train_many(stage.stage_name, specs, stage.max_concurrent))


register_stage("independent", IndependentStage, run)
