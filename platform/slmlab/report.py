"""``slmlab report EXPERIMENT``: a self-contained HTML comparison of an experiment's runs, from MLflow.

One page, no external files (plots are embedded PNGs): a table of every finished training run
(family, parameters, tokens, final validation bits per byte and perplexity, training tokens/s,
decode tokens/s) and four plots — validation bpb vs training tokens, bpb vs parameters,
generation-state memory vs sequence length, and training tokens/s.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from slmlab.tracking import client_for  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    latest: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        latest[m.step] = m.value  # a step replayed after a restart keeps its last value
    return sorted(latest.items())


def collect(client, experiment: str) -> list[dict]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"experiment {experiment!r}: expected one of {names}, found no such experiment")
    rows = []
    for run in client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]
    ):
        m, tags = run.data.metrics, run.data.tags
        if "val/bpb" not in m or tags.get("slmlab.role") == "sweep-parent":
            continue
        tokens_per_step = {s: v for s, v in _series(client, run.info.run_id, "train/tokens")}
        bpb_curve = [(tokens_per_step.get(s, 0.0), v) for s, v in _series(client, run.info.run_id, "val/bpb")]
        rows.append(
            {
                "run": run.info.run_name,
                "run_id": run.info.run_id,
                "label": tags.get("slmlab.variant") or tags.get("slmlab.family", "?"),
                "family": tags.get("slmlab.family", "?"),
                "stage": tags.get("slmlab.stage", ""),
                "params": m.get("model/parameters"),
                "tokens": m.get("train/tokens"),
                "bpb": m["val/bpb"],
                "ppl": m.get("val/ppl"),
                "train_tps": _median([v for _, v in _series(client, run.info.run_id, "train/tokens_per_s")]),
                "decode_tps": m.get("infer/decode_tokens_per_s"),
                "bpb_curve": bpb_curve,
                "state_mib": _series(client, run.info.run_id, "infer/state_mib"),
                **_family_figures(client, run),
            }
        )
    return rows


def _family_figures(client, run) -> dict:
    """What a family's own evaluation left on a run: ``eval/*`` metrics and PNG figures logged under the
    run's ``report/`` artefact folder (e.g. accuracy per question type), embedded as they are."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a report is one line of output
    figures = []
    try:
        for f in client.list_artifacts(run.info.run_id, "report"):
            if f.path.endswith(".png"):
                local = mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path=f.path, tracking_uri=client.tracking_uri
                )
                png = base64.b64encode(Path(local).read_bytes()).decode()
                figures.append((Path(f.path).stem.replace("_", " "), png))
    except (OSError, mlflow.exceptions.MlflowException):
        figures = []
    evals = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/") and "/moe/" not in k}
    return {"figures": figures, "eval": evals}


def _family_section(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if not r.get("figures") and not r.get("eval"):
            continue
        cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in sorted(r["eval"].items()))
        imgs = "".join(
            f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(t)}'>"
            f"<figcaption>{html.escape(t)}</figcaption></figure>"
            for t, b64 in r["figures"]
        )
        parts.append(
            f"<h2>{html.escape(r['label'])} <small>({html.escape(r['run'])})</small></h2>"
            + (f"<table>{cells}</table>" if cells else "")
            + imgs
        )
    return "".join(parts)


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def render(experiment: str, rows: list[dict]) -> str:
    figs = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["bpb_curve"]:
            xs, ys = zip(*r["bpb_curve"])
            ax.plot(xs, ys, marker="o", ms=3, label=f"{r['label']} ({r['run'][-4:]})")
    ax.set(xlabel="training tokens", ylabel="validation bits per byte", title="Loss vs tokens")
    ax.legend(fontsize=7)
    figs.append(("Validation bits per byte vs training tokens", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["params"]:
            ax.scatter(r["params"], r["bpb"], label=r["label"])
            ax.annotate(r["label"], (r["params"], r["bpb"]), fontsize=7)
    ax.set(
        xscale="log", xlabel="parameters", ylabel="final validation bits per byte", title="Bits per byte vs parameters"
    )
    figs.append(("Bits per byte vs parameters", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["state_mib"]:
            xs, ys = zip(*r["state_mib"])
            ax.plot(xs, ys, marker="o", label=r["label"])
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length (tokens)",
        ylabel="generation state (MiB)",
        title="Inference memory vs sequence length",
    )
    ax.legend(fontsize=7)
    figs.append(("Generation-state memory vs sequence length", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['label']}\n{r['run'][-4:]}" for r in rows]
    ax.bar([i - 0.2 for i in range(len(rows))], [r["train_tps"] or 0 for r in rows], width=0.4, label="training")
    ax.bar(
        [i + 0.2 for i in range(len(rows))], [r["decode_tps"] or 0 for r in rows], width=0.4, label="decode (batch 1)"
    )
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="tokens / s", title="Throughput")
    ax.legend(fontsize=7)
    figs.append(("Tokens per second", _png(fig)))

    head = (
        "<tr><th>run</th><th>model</th><th>stage</th><th>parameters</th>"
        "<th>training tokens</th><th>val bits/byte</th><th>val perplexity</th>"
        "<th>train tokens/s</th><th>decode tokens/s</th></tr>"
    )
    body = "".join(
        f"<tr><td>{html.escape(r['run'])}</td><td>{html.escape(r['label'])}</td>"
        f"<td>{html.escape(r['stage'])}</td><td>{_fmt(r['params'], ',.0f')}</td>"
        f"<td>{_fmt(r['tokens'], ',.0f')}</td><td>{r['bpb']:.4f}</td><td>{_fmt(r['ppl'], '.2f')}</td>"
        f"<td>{_fmt(r['train_tps'], ',.0f')}</td><td>{_fmt(r['decode_tps'], ',.0f')}</td></tr>"
        for r in rows
    )
    plots = "".join(
        f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(t)}'>"
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, b64 in figs
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>slmlab report: {html.escape(experiment)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,td:nth-child(2),td:nth-child(3){{text-align:left}}figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>Experiment <code>{html.escape(experiment)}</code></h1>
<p>{len(rows)} finished runs. Bits per byte are measured on held-out text and are comparable across tokenizers;
perplexity is per token at each run's vocabulary.</p>
<table>{head}{body}</table>{plots}{_family_section(rows)}</body></html>"""


def write_report(experiment: str, out: Path, run_dir: str | Path = "runs") -> Path:
    client = client_for(run_dir)
    rows = collect(client, experiment)
    if not rows:
        raise ValueError(f"experiment {experiment!r}: expected finished runs with val/bpb, found none")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    page = render(experiment, rows).replace("</body>", extra_sections(client, experiment, rows) + "</body>")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# Context sweep, MQAR probe, the seed's setting: extra sections, each only when the experiment has
# such runs (context_sweep and mqar stages; a pipeline trained on WikiText).

SEED_NEW_LLM = {"ppl": 23.34, "bpb": 1.77, "params": 2.74e6}  # the seed's WikiText-2 validation figures, 1k vocab


def _finished(client, experiment: str, where: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.status = 'FINISHED' and {where}",
        order_by=["attributes.start_time ASC"],
    )


def collect_context(client, experiment: str) -> list[dict]:
    """One row per (model, context length) of a context sweep (a later invocation replaces an earlier one)."""
    cells: dict[tuple[str, int], dict] = {}
    for run in _finished(client, experiment, "tags.`slmlab.context` != ''"):
        m, tags = run.data.metrics, run.data.tags
        if "val/bpb" not in m:
            continue
        tps = _median([v for _, v in _series(client, run.info.run_id, "train/tokens_per_s")])
        row = {
            "model": tags["slmlab.context_model"],
            "seq_len": int(tags["slmlab.context"]),
            "params": m.get("model/parameters"),
            "tokens": m.get("train/tokens"),
            "val_targets": m.get("val/targets"),
            "val_bytes": m.get("data/val_bytes"),
            "bpb": m["val/bpb"],
            "ppl": m.get("val/ppl"),
            "train_tps": tps,
        }
        cells[(row["model"], row["seq_len"])] = row
    return sorted(cells.values(), key=lambda r: (r["model"], r["seq_len"]))


def collect_mqar(client, experiment: str) -> list[dict]:
    """One row per MQAR cell and pair count (a later invocation replaces an earlier one)."""
    cells: dict[tuple[str, int], dict] = {}
    for run in _finished(client, experiment, "tags.`slmlab.probe` = 'mqar'"):
        m, tags, params = run.data.metrics, run.data.tags, run.data.params
        cd = params.get("model.context_dim")
        for key, acc in m.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "mqar" or parts[2] != "accuracy" or not parts[1][1:].isdigit():
                continue
            pairs = int(parts[1][1:])
            cells[(tags.get("slmlab.probe_cell", run.info.run_name), pairs)] = {
                "model": tags.get("slmlab.variant", "?"),
                "family": tags.get("slmlab.family", "?"),
                "base": tags.get("slmlab.probe_base", "true") == "true",
                "pairs": pairs,
                "context_dim": int(cd) if cd not in (None, "None") else None,
                "accuracy": acc,
                "chance": m.get("mqar/chance"),
                "params": m.get("model/parameters"),
            }
    return sorted(cells.values(), key=lambda r: (r["model"], r["context_dim"] or 0, r["pairs"]))


def _by(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    tr = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{th}</tr>{tr}</table>"


def _figure(title: str, fig) -> str:
    alt = html.escape(title)
    return f"<figure><img src='data:image/png;base64,{_png(fig)}' alt='{alt}'><figcaption>{alt}</figcaption></figure>"


def context_section(rows: list[dict]) -> str:
    lengths = sorted({r["seq_len"] for r in rows})
    figs = []
    for key, ylabel, title in (
        ("bpb", "validation bits per byte", "Bits per byte vs context length"),
        ("train_tps", "training tokens / s", "Training tokens/s vs context length"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, rs in _by(rows, "model").items():
            pts = [(r["seq_len"], r[key]) for r in rs if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=model)
        ax.set(xscale="log", xlabel="context length (tokens)", ylabel=ylabel, title=title)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.legend(fontsize=7)
        figs.append(_figure(title, fig))
    body = [
        [
            r["model"],
            str(r["seq_len"]),
            _fmt(r["params"], ",.0f"),
            _fmt(r["tokens"], ",.0f"),
            _fmt(r["val_targets"], ",.0f"),
            _fmt(r["val_bytes"], ",.0f"),
            f"{r['bpb']:.4f}",
            _fmt(r["ppl"], ".2f"),
            _fmt(r["train_tps"], ",.0f"),
        ]
        for r in rows
    ]
    table = _table(
        [
            "model",
            "context",
            "parameters",
            "training tokens",
            "val tokens",
            "val bytes",
            "val bits/byte",
            "val perplexity",
            "train tokens/s",
        ],
        body,
    )
    return (
        "<h2>Context length</h2><p>Every cell trains on the same tokens per step and in total and is scored on "
        f"the same held-out bytes.</p>{table}{''.join(figs)}"
    )


def mqar_section(rows: list[dict]) -> str:
    figs = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, rs in _by([r for r in rows if r["base"]], "model").items():
        ax.plot([r["pairs"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=model)
    if rows[0]["chance"]:
        ax.axhline(rows[0]["chance"], color="grey", ls=":", label="chance")
    ax.set(xscale="log", ylim=(0, 1.02), xlabel="key-value pairs", ylabel="recall accuracy", title="MQAR vs pairs")
    ax.legend(fontsize=7)
    figs.append(_figure("MQAR accuracy vs number of pairs", fig))
    widths = [r for r in rows if r["context_dim"] is not None]
    if len({r["context_dim"] for r in widths}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for pairs, rs in sorted(_by(widths, "pairs").items()):
            rs = sorted(rs, key=lambda r: r["context_dim"])
            ax.plot([r["context_dim"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=f"{pairs} pairs")
        ax.set(
            xscale="log",
            ylim=(0, 1.02),
            xlabel="New-LLM context_dim (state per layer)",
            ylabel="recall accuracy",
            title="MQAR vs New-LLM context size",
        )
        ax.legend(fontsize=7)
        figs.append(_figure("MQAR accuracy vs New-LLM context_dim", fig))
    body = [
        [
            r["model"],
            r["family"],
            "–" if r["context_dim"] is None else str(r["context_dim"]),
            _fmt(r["params"], ",.0f"),
            str(r["pairs"]),
            f"{r['accuracy']:.3f}",
            _fmt(r["chance"], ".3f"),
        ]
        for r in rows
    ]
    table = _table(["model", "family", "context_dim", "parameters", "pairs", "accuracy", "chance"], body)
    return f"<h2>Associative recall (MQAR)</h2>{table}{''.join(figs)}"


def seed_section(client, rows: list[dict]) -> str:
    """Our WikiText runs beside the seed's reported figures, with what differs."""
    body, notes = [], []
    for r in rows:
        m = client.get_run(r["run_id"]).data.metrics
        body.append(
            [
                r["label"],
                _fmt(r["params"], ",.0f"),
                _fmt(r["tokens"], ",.0f"),
                _fmt(m.get("data/train_tokens"), ",.0f"),
                _fmt(m.get("data/val_bytes"), ",.0f"),
                f"{r['bpb']:.4f}",
                _fmt(r["ppl"], ".2f"),
            ]
        )
        if not notes and m.get("data/val_bytes_per_token"):
            bpt, bits = m["data/val_bytes_per_token"], math.log2(SEED_NEW_LLM["ppl"])
            notes.append(
                f"At our tokenizer's {bpt:.2f} bytes/token the seed's perplexity {SEED_NEW_LLM['ppl']} "
                f"would be {bits / bpt:.2f} bits/byte (the issue's ≈{SEED_NEW_LLM['bpb']} assumes "
                f"{bits / SEED_NEW_LLM['bpb']:.2f} bytes/token); bits per byte is the comparable figure, "
                "perplexity depends on each tokenizer."
            )
    s = SEED_NEW_LLM
    body.append(
        [
            "seed New-LLM (reported)",
            f"≈{s['params']:,.0f}",
            "many passes",
            "full WikiText-2 train",
            "full valid",
            f"≈{s['bpb']:.2f}",
            f"{s['ppl']:.2f}",
        ]
    )
    table = _table(
        [
            "model",
            "parameters",
            "training tokens",
            "train split tokens",
            "val bytes",
            "val bits/byte",
            "val perplexity",
        ],
        body,
    )
    return (
        "<h2>The seed's setting: WikiText-2, 1k vocabulary</h2>"
        + table
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    )


def _gap_text(context: list[dict]) -> tuple[list[str], dict]:
    out, by = [], _by(context, "model")
    for model, rs in by.items():
        rs = sorted(rs, key=lambda r: r["seq_len"])
        out.append(
            f"{model} goes from {rs[0]['bpb']:.3f} bits/byte at {rs[0]['seq_len']} tokens of context to "
            f"{rs[-1]['bpb']:.3f} at {rs[-1]['seq_len']}."
        )
    gaps = {}
    if len(by) == 2:
        a, b = by
        bpb = {(r["model"], r["seq_len"]): r["bpb"] for r in context}
        gaps = {
            n: bpb[(a, n)] - bpb[(b, n)]
            for n in sorted({r["seq_len"] for r in context})
            if (a, n) in bpb and (b, n) in bpb
        }
        out.append(f"{a} minus {b}: " + ", ".join(f"{g:+.3f} at {n}" for n, g in gaps.items()) + " bits/byte.")
    return out, gaps


def summary(context: list[dict], mqar: list[dict]) -> str:
    """One paragraph from the numbers; its last sentence answers "can an LLM work without attention
    where attention should matter?" only where both the context sweep and the probe decide it."""
    out, gaps = _gap_text(context)
    solved = {}  # model -> largest pair count recalled at >= 90%
    base = [r for r in mqar if r["base"]]
    for model, rs in _by(base, "model").items():
        recall = ", ".join(f"{r['accuracy']:.0%} at {r['pairs']} pairs" for r in rs)
        out.append(f"MQAR recall, {model}: {recall}.")
        solved[model] = max([r["pairs"] for r in rs if r["accuracy"] >= 0.9], default=0)
    fams = {r["model"]: r["family"] for r in base}
    free = [m for m, f in fams.items() if f != "vectorslm"]
    attn = [m for m, f in fams.items() if f == "vectorslm"]
    widths = sorted((r for r in mqar if r["context_dim"] is not None), key=lambda r: (r["pairs"], r["context_dim"]))
    for pairs, rs in _by(widths, "pairs").items():
        if len(rs) > 1:
            out.append(
                f"At {pairs} pairs New-LLM's recall by context_dim: "
                + ", ".join(f"{r['context_dim']}: {r['accuracy']:.0%}" for r in rs)
                + "."
            )
    if gaps and free and attn:
        n_max = max(gaps)
        a, t = free[0], attn[0]
        if solved[t] > solved[a]:
            how = "no worse" if gaps[n_max] <= 0 else "close"
            out.append(
                f"Answer: on this text a fixed-size state is {how} in bits per byte up to {n_max} tokens "
                f"({gaps[n_max]:+.3f}), but it does not do what attention does: the transformer recalls "
                f"{solved[t]} key-value pairs at >= 90% and New-LLM only {solved[a]}."
            )
        elif solved[t] == solved[a] and solved[t] == max(r["pairs"] for r in base):
            out.append(
                f"Answer: at these sizes New-LLM matches attention on both: {gaps[n_max]:+.3f} bits/byte at "
                f"{n_max} tokens and recall of all {solved[t]} pairs."
            )
    return " ".join(out)


def extra_sections(client, experiment: str, rows: list[dict]) -> str:
    """Sections for context sweeps, MQAR probes and WikiText runs, with the summary paragraph first."""
    context, mqar = collect_context(client, experiment), collect_mqar(client, experiment)
    parts = []
    text = summary(context, mqar)
    if text:
        parts.append(f"<h2>Summary</h2><p>{html.escape(text)}</p>")
    if context:
        parts.append(context_section(context))
    if mqar:
        parts.append(mqar_section(mqar))
    sources = {r["run_id"]: client.get_run(r["run_id"]).data.params.get("data.sources", "") for r in rows}
    wiki = [r for r in rows if "wikitext" in sources[r["run_id"]].lower()]
    if wiki:
        parts.append(seed_section(client, wiki))
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:  # MoVE: cosine by layer and module, bits per byte by swap (the latest summary run)
        from slmlab.stages.move import report_figures as move_figures

        parts.extend(f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(t)}'>"
                     f"<figcaption>{html.escape(t)}</figcaption></figure>"
                     for t, b64 in move_figures(client, exp.experiment_id))
    return "".join(parts)
