"""``pretrain``: train the pipeline's ``model`` on its data and register it as the pipeline's model."""

from __future__ import annotations

from typing import Literal

from slmlab.stages import StageConfig, StageContext, StageResult, register_stage


class PretrainStage(StageConfig):
    kind: Literal["pretrain"] = "pretrain"


def run(stage: PretrainStage, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    result = ctx.train(stage.stage_name, ctx.spec(cfg.label, register_as=cfg.registered_model_name))
    return StageResult(
        stage.stage_name,
        runs={result.label: result},
        stopped=result.status == "STOPPED",
        outputs={"model_uri": result.model_uri, "model_dir": result.model_dir},
    )


register_stage("pretrain", PretrainStage, run)
