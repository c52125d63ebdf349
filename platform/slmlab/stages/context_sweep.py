"""``context_sweep``: the pipeline's model and every ``compare:`` variant at several context lengths.

Each cell is one Ray Train run of one model at one ``data.seq_len``, and every cell trains on the
same tokens per step (``train.tokens_per_step``: the micro-batch follows the context length) and
the same number of steps, so the total training tokens are equal too. Every cell reuses the
pipeline's tokenizer, and the document split depends on the seed and the text alone, so the
validation split holds the same documents at every length; packing makes each held-out token a
target exactly once whatever the block size, and ``train.eval_batches`` must be unset so each
cell is scored on the whole split, i.e. on the same bytes. The stage checks both and fails
rather than compare cells evaluated on different text.

Cells run one after another by default: training tokens/s against context length is one of the
figures, and runs sharing the machine would distort it."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from slmlab.stages import StageConfig, StageContext, StageFailed, StageResult, register_stage


class ContextSweepStage(StageConfig):
    kind: Literal["context_sweep"] = "context_sweep"
    seq_lens: list[int] = Field(min_length=1)  # data.seq_len of each cell (each model runs at every length)
    max_concurrent: int = Field(1, ge=1)  # 1 keeps tokens/s comparable across cells; more shortens wall time
    register_models: bool = True  # register each cell as <pipeline>-<label>-ctx<seq_len>


def cell_config(cfg, model, seq_len: int):
    """The pipeline at one context length, for one model: validated again so that the micro-batch
    is derived from train.tokens_per_step and this seq_len (and bad combinations fail here). The
    model's max_seq_len is left as written (it sets New-LLM's decay init), so it must cover every
    length of the sweep."""
    from slmlab.config import validate_pipeline

    raw = cfg.model_dump(mode="json")
    raw["model"] = model.model_dump(mode="json")
    raw["data"]["seq_len"] = seq_len
    raw["compare"], raw["stages"] = [], []
    return validate_pipeline(raw, f"context_sweep (seq_len {seq_len}, {model.family})")


def run(stage: ContextSweepStage, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if cfg.train.tokens_per_step is None:
        raise StageFailed(f"stage {stage.stage_name}: expected train.tokens_per_step (equal tokens per step in every "
                          "cell), found none")
    if cfg.train.eval_batches is not None:
        raise StageFailed(f"stage {stage.stage_name}: expected train.eval_batches unset (every cell scored on the "
                          f"whole validation split), found {cfg.train.eval_batches}")
    vocab = cfg.model.vocab_size
    models = [(cfg.label, cfg.model)]
    models += [(v.name, v.model.model_copy(update={"vocab_size": vocab})) for v in cfg.compare]
    specs, val = [], {}
    for seq_len in stage.seq_lens:
        base = cell_config(cfg, cfg.model, seq_len)
        same = base.data == cfg.data  # the pipeline's own shards; other lengths reuse its tokenizer
        shards = ctx.shards if same else ctx.build_shards(base, tokenizer_path=ctx.shards.tokenizer_path)
        val[seq_len] = (shards.summary["val"]["tokens"], shards.summary["val"]["bytes"])
        for label, model in models:
            ccfg = cell_config(cfg, model, seq_len)
            name = f"{label}-ctx{seq_len}"
            specs.append(ctx.spec(name, ccfg, shards=shards,
                                  register_as=f"{cfg.registered_model_name}-{name}" if stage.register_models else None,
                                  tags={"slmlab.context_model": label, "slmlab.context": str(seq_len)}))
    if len(set(val.values())) != 1:
        raise StageFailed(f"stage {stage.stage_name}: expected the same held-out tokens and bytes at every context "
                          f"length, found (tokens, bytes) {val}")
    ctx.progress(f"{stage.stage_name}: {len(specs)} cells, each scored on {val[stage.seq_lens[0]][1]:,} held-out bytes")
    if stage.max_concurrent == 1:
        runs = {s.label: ctx.train(stage.stage_name, s) for s in specs}
    else:
        runs = ctx.train_many(stage.stage_name, specs, stage.max_concurrent)
    return StageResult(stage.stage_name, runs=runs, outputs={"val_tokens_bytes": val[stage.seq_lens[0]]})


register_stage("context_sweep", ContextSweepStage, run)
