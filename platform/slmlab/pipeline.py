"""``slmlab run``: config → Ray Data shards → stages (Ray Train runs) → evaluation → MLflow.

The pipeline builds its data once, then runs its stages in order (``PipelineConfig.stage_list``),
each reading the results of the stages before it. What each run did is recorded in the
invocation's state file (``slmlab.stages.PipelineState``), so ``--resume`` trains only what did
not finish.
"""

from __future__ import annotations

from typing import Callable

from slmlab.config import PipelineConfig
from slmlab.lifecycle import RunResult
from slmlab.stages import STAGES, PipelineState, StageContext, StageResult


def run_pipeline(
    cfg: PipelineConfig, resume: str | None = None, progress: Callable[[str], None] = print
) -> RunResult | None:
    """Run every stage; returns the last stage's first run (the fine-tuned model when fine-tuning
    ran, the pretrained one otherwise), or None when the last stage trained nothing."""
    results = run_stages(cfg, resume=resume, progress=progress)
    for result in reversed(list(results.values())):
        if result.runs:
            return next(iter(result.runs.values()))
    return None


def run_stages(
    cfg: PipelineConfig, resume: str | None = None, progress: Callable[[str], None] = print
) -> dict[str, StageResult]:
    from slmlab.data.shards import build_shards, resolve_sources
    from slmlab.runtime import ensure_ray
    from slmlab.tracking import client_for

    resolved = resolve_sources(cfg)  # a missing corpus or an oversized document fails before Ray starts
    ensure_ray()
    shards = build_shards(cfg, progress=progress, resolved=resolved)  # Ray Data stage (cached)
    # the model's vocabulary is the trained tokenizer's: a copy, the user's config is never mutated
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": shards.summary["vocab_size"]})})
    state = PipelineState.load(cfg, resume) if resume else PipelineState.new(cfg)
    if resume:
        progress(f"resume: {state.data['invocation']}")
    ctx = StageContext(cfg, shards, client_for(cfg.run_dir), state, progress=progress)
    for stage in cfg.stage_list():
        name = stage.stage_name
        progress(f"stage {name} ({stage.kind})")
        result = STAGES[stage.kind].run(stage, ctx)
        ctx.results[name] = result
        if result.stopped:  # train.stop_at_step: the next invocation (--resume) goes on from here
            break
    return ctx.results
