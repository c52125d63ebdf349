"""Stages of the AleMoEVLM family: image-text training runs and the evaluation that shows the image is used.

``vlm_train``: one Ray Train run of the pipeline's ``alemoe_vlm`` model on image-text shards (built on Ray
Data from ``data:``, with the pipeline's tokenizer, cached), optionally warm-started from an earlier stage.
Its ``train:`` overrides the pipeline's train section (steps, lr, ``trainable`` prefixes for a frozen part).
A pipeline lists two, as LLaVA does: captions first, then question/answer conversations.

``vlm_eval``: on the held-out images of a ``vlm_train`` stage, in the driver:
- exact-match accuracy of greedy answers per question type (``eval/acc/<type>``, plus attribute /
  relational means);
- image gain (MMStar's multi-modal gain): answer loss with the true image vs a blank image vs another
  example's image, over the whole held-out split (``eval/gain/*``);
- expert utilisation by modality: the share of image and of text token-slots each expert receives, per
  layer (``eval/moe/layer<i>/<image|text>_expert<e>_share``).
Everything is logged into the evaluated training run (metrics, two figures under ``report/`` that
``slmlab report`` embeds, and a predictions sample).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slmlab.data.images import ATTRIBUTE_TYPES, RELATIONAL_TYPES, ImageDataConfig
from slmlab.stages import StageConfig, StageContext, StageFailed, StageResult, register_stage


class VLMTrainStage(StageConfig):
    kind: Literal["vlm_train"] = "vlm_train"
    data: ImageDataConfig  # the image-text rows this stage trains on (held-out images are never trained on)
    init_from: str | None = None  # an earlier stage whose model this run starts from (None: from scratch)
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the pipeline's train section for this run
    register_as: str | None = None  # registered model name (default: <pipeline>-<stage name>)


class VLMEvalStage(StageConfig):
    kind: Literal["vlm_eval"] = "vlm_eval"
    of: str  # the vlm_train stage whose model is evaluated on its held-out images
    max_new_tokens: int = Field(8, ge=1)  # answers are a word or two; longer outputs are wrong anyway
    # a held-out caption's budget (a scene's is ~50 tokens; at 8 every caption was cut short and scored 0%),
    # capped where prompt + caption reach the model's max_seq_len
    caption_max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)  # held-out questions decoded together (same prompt length)


# ----------------------------------------------------------------------------------------------
# vlm_train


def _check_image_shape(stage: VLMTrainStage, model) -> None:
    """The stage's images must be what the model's ViT takes; unset, they are."""
    where = f"stages.{stage.stage_name}"
    if model.family != "alemoe_vlm":
        raise StageFailed(f"{where}: expected model.family alemoe_vlm, found {model.family!r}")
    for name in ("image_size", "channels"):
        if getattr(stage.data, name) is not None and getattr(model, name) != getattr(stage.data, name):
            raise StageFailed(f"{where}.data.{name}: expected model.{name}={getattr(model, name)}, "
                              f"found {getattr(stage.data, name)}")


def _run_config(stage: VLMTrainStage, ctx: StageContext, vocab_size: int):
    from pydantic import ValidationError

    from slmlab.config import TrainConfig

    cfg, m, d = ctx.cfg, ctx.cfg.model, stage.data
    where = f"stages.{stage.stage_name}"
    _check_image_shape(stage, m)
    if d.seq_len > m.max_seq_len:
        raise StageFailed(f"{where}.data.seq_len: expected at most model.max_seq_len={m.max_seq_len}, "
                          f"found {d.seq_len}")
    try:
        train = TrainConfig.model_validate({**cfg.train.model_dump(), **stage.train})
    except ValidationError as err:
        raise StageFailed(f"{where}.train: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from None
    return cfg.model_copy(update={
        "model": m.model_copy(update={"vocab_size": vocab_size, "use_images": True}),
        "data": cfg.data.model_copy(update={"seq_len": d.seq_len}),  # tokens per row: the loop's token count
        "train": train, "stages": []})


def run_train(stage: VLMTrainStage, ctx: StageContext) -> StageResult:
    from slmlab.data.images import build_image_shards

    cfg = ctx.cfg
    _check_image_shape(stage, cfg.model)  # before a minute of decoding, not after
    data = stage.data.model_copy(update={name: getattr(cfg.model, name) for name in ("image_size", "channels")})
    shards = build_image_shards(data, cfg.run_dir, ctx.shards.tokenizer_path, cfg.seed, ctx.progress)
    run_cfg = _run_config(stage, ctx, shards.summary["vocab_size"])
    init = None
    if stage.init_from:
        base = ctx.results.get(stage.init_from)
        if base is None or not base.outputs.get("model_dir"):
            raise StageFailed(f"stage {stage.stage_name}: expected a trained model from stage "
                              f"{stage.init_from!r}, found none")
        init = Path(base.outputs["model_dir"])
    tc = run_cfg.train
    frozen = f", learning only {', '.join(tc.trainable)}" if tc.trainable else ""
    ctx.progress(f"vlm: {stage.stage_name}: {shards.summary['train']['blocks']:,} {stage.data.task} rows of "
                 f"{shards.summary['train']['documents']:,} images, {tc.max_steps} steps"
                 + (f", from stage {stage.init_from}" if init else ", from scratch") + frozen)
    spec = ctx.spec(stage.stage_name, run_cfg, shards=shards, init_from=init,
                    register_as=stage.register_as or f"{cfg.registered_model_name}-{stage.stage_name}",
                    tags={"slmlab.vlm_task": stage.data.task})
    result = ctx.train(stage.stage_name, spec)
    return StageResult(stage.stage_name, runs={result.label: result}, stopped=result.status == "STOPPED",
                       outputs={"model_uri": result.model_uri, "model_dir": result.model_dir,
                                "shards": str(shards.root)})


# ----------------------------------------------------------------------------------------------
# vlm_eval


def answer_questions(model, tok, questions: list[str], pixels, max_new_tokens: int | list[int] = 8,
                     batch_size: int = 64) -> list[str]:
    """Greedy, KV-cached answers, one per (question, image); prompts of equal length and budget decode together.
    ``max_new_tokens``: one budget, or one per question; each is capped at the model's positions left after
    the prompt."""
    import torch

    from slmlab.data.chat import prompt_ids
    from slmlab.data.tokenizer import END_TURN, EOS
    from slmlab.generation import generate

    stops = [i for i in (tok.token_to_id(END_TURN), tok.token_to_id(EOS)) if i is not None]
    budgets = [max_new_tokens] * len(questions) if isinstance(max_new_tokens, int) else max_new_tokens
    limit = model.capabilities.max_positions
    groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
    for i, q in enumerate(questions):
        ids = prompt_ids(tok, [("user", q)])
        budget = budgets[i] if limit is None else max(1, min(budgets[i], limit - len(ids)))
        groups.setdefault((len(ids), budget), []).append((i, ids))
    answers = [""] * len(questions)
    for (length, budget), items in groups.items():
        for j in range(0, len(items), batch_size):
            chunk = items[j:j + batch_size]
            ids = torch.tensor([c[1] for c in chunk])
            pix = torch.as_tensor(pixels[[c[0] for c in chunk]])
            out = generate(model, ids, budget, temperature=0, stop_token_ids=stops, extra={"pixel_values": pix})
            for (i, _), row in zip(chunk, out[:, length:].tolist()):
                cut = next((k for k, t in enumerate(row) if t in stops), len(row))
                answers[i] = tok.decode(row[:cut]).strip()
    return answers


def accuracy_by_type(qtypes: list[str], answers: list[str], truth: list[str]) -> dict[str, float]:
    by: dict[str, list[bool]] = {}
    for t, a, y in zip(qtypes, answers, truth):
        by.setdefault(t, []).append(a == y.strip())
    acc = {t: sum(v) / len(v) for t, v in sorted(by.items())}
    for group, types in (("attribute", ATTRIBUTE_TYPES), ("relational", RELATIONAL_TYPES)):
        hits = [x for t in types for x in by.get(t, [])]
        if hits:
            acc[group] = sum(hits) / len(hits)
    return acc


def _figures(acc: dict[str, float], moe: dict[str, float], n_layers: int, n_experts: int) -> dict[str, bytes]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    out = {}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(acc)
    colours = ["#d62728" if n in RELATIONAL_TYPES or n == "relational" else
               "#1f77b4" if n in ATTRIBUTE_TYPES or n == "attribute" else "#2ca02c" for n in names]
    ax.bar(range(len(names)), [acc[n] for n in names], color=colours)
    for i, n in enumerate(names):
        ax.annotate(f"{acc[n]:.0%}", (i, acc[n]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.08), ylabel="exact-match accuracy", title="Held-out accuracy per question type")
    out["accuracy_by_question_type.png"] = png(fig)

    fig, axes = plt.subplots(1, n_layers, figsize=(2.6 * n_layers, 3), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        xs = range(n_experts)
        for dx, modality in ((-0.2, "image"), (0.2, "text")):
            shares = [moe.get(f"moe/layer{i}/{modality}_expert{e}_share", 0) for e in xs]
            ax.bar([x + dx for x in xs], shares, 0.4, label=modality)
        ax.axhline(1 / n_experts, color="grey", lw=0.8, ls="--")
        ax.set(title=f"layer {i}", xlabel="expert", xticks=list(xs))
    axes[0][0].set_ylabel("share of token-slots")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Expert utilisation by modality (held-out)", y=1.04)
    out["expert_share_by_modality.png"] = png(fig)
    return out


def run_eval(stage: VLMEvalStage, ctx: StageContext) -> StageResult:
    import torch

    from slmlab.data.images import read_eval
    from slmlab.data.shards import Shards
    from slmlab.data.tokenizer import load_tokenizer
    from slmlab.evaluate import evaluate_folder
    from slmlab.tracking import MetricsLogger
    from slmlab.train.checkpoint import load_model_dir

    base = ctx.results.get(stage.of)
    if base is None or not base.outputs.get("model_dir") or not base.outputs.get("shards"):
        raise StageFailed(f"stage {stage.stage_name}: expected a trained model from vlm_train stage {stage.of!r}, "
                          "found none")
    model_dir, shards = Path(base.outputs["model_dir"]), Shards(Path(base.outputs["shards"]), "")
    run_id = next(iter(base.runs.values())).mlflow_run_id
    model_cfg, model = load_model_dir(model_dir)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    t0 = time.perf_counter()
    ev = read_eval(shards.root)
    with torch.inference_mode():
        budgets = [stage.caption_max_new_tokens if t == "caption" else stage.max_new_tokens for t in ev["qtype"]]
        answers = answer_questions(model, tok, ev["question"], ev["pixel_values"], budgets, stage.batch_size)
    acc = accuracy_by_type(ev["qtype"], answers, ev["answer"])
    ctx.progress(f"vlm_eval: {len(answers):,} held-out questions in {time.perf_counter() - t0:.0f}s: "
                 + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    val = evaluate_folder(model, shards.val_dir, shards.tokenizer_path, batch_size=32)  # the whole held-out split
    gain = {k.removeprefix("val/"): v for k, v in val.items() if k.startswith("val/gain/")}
    moe = {k.removeprefix("val/"): v for k, v in val.items() if k.startswith("val/moe/")}
    g = {k: gain.get(f"gain/{k}", float("nan")) for k in ("loss_true", "loss_blank", "loss_other", "true_over_blank")}
    ctx.progress(f"vlm_eval: answer loss with the true image {g['loss_true']:.3f}, "
                 f"a blank image {g['loss_blank']:.3f}, another image {g['loss_other']:.3f} "
                 f"(true/blank {g['true_over_blank']:.3f})")
    metrics = {**{f"eval/acc/{k}": v for k, v in acc.items()}, **{f"eval/{k}": v for k, v in {**gain, **moe}.items()},
               "eval/questions": float(len(answers))}
    client = ctx.client
    MetricsLogger.for_client(client, run_id).log(metrics, step=0)
    for name, data in _figures(acc, moe, model_cfg.n_layers, model_cfg.moe.num_experts).items():
        tmp = Path(ctx.cfg.run_dir) / "reports" / ".figures" / run_id
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
        client.log_artifact(run_id, str(tmp / name), "report")
    sample = [{"image_id": i, "qtype": t, "question": q, "answer": a, "truth": y}
              for i, t, q, a, y in list(zip(ev["image_id"], ev["qtype"], ev["question"], answers, ev["answer"]))[:300]]
    client.log_text(run_id, "\n".join(json.dumps(s) for s in sample), "eval/predictions.jsonl")
    return StageResult(stage.stage_name, outputs={"metrics": metrics, "run_id": run_id})


register_stage("vlm_train", VLMTrainStage, run_train)
register_stage("vlm_eval", VLMEvalStage, run_eval)
