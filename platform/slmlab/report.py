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
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]):
        m, tags = run.data.metrics, run.data.tags
        if "val/bpb" not in m or tags.get("slmlab.role") == "sweep-parent":
            continue
        tokens_per_step = {s: v for s, v in _series(client, run.info.run_id, "train/tokens")}
        bpb_curve = [(tokens_per_step.get(s, 0.0), v) for s, v in _series(client, run.info.run_id, "val/bpb")]
        rows.append({
            "run": run.info.run_name, "run_id": run.info.run_id,
            "label": tags.get("slmlab.variant") or tags.get("slmlab.family", "?"),
            "family": tags.get("slmlab.family", "?"), "stage": tags.get("slmlab.stage", ""),
            "params": m.get("model/parameters"), "tokens": m.get("train/tokens"),
            "bpb": m["val/bpb"], "ppl": m.get("val/ppl"),
            "train_tps": _median([v for _, v in _series(client, run.info.run_id, "train/tokens_per_s")]),
            "decode_tps": m.get("infer/decode_tokens_per_s"),
            "bpb_curve": bpb_curve, "state_mib": _series(client, run.info.run_id, "infer/state_mib"),
        })
    return rows


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
    ax.set(xscale="log", xlabel="parameters", ylabel="final validation bits per byte", title="Bits per byte vs parameters")
    figs.append(("Bits per byte vs parameters", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["state_mib"]:
            xs, ys = zip(*r["state_mib"])
            ax.plot(xs, ys, marker="o", label=r["label"])
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="generation state (MiB)", title="Inference memory vs sequence length")
    ax.legend(fontsize=7)
    figs.append(("Generation-state memory vs sequence length", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['label']}\n{r['run'][-4:]}" for r in rows]
    ax.bar([i - 0.2 for i in range(len(rows))], [r["train_tps"] or 0 for r in rows], width=0.4, label="training")
    ax.bar([i + 0.2 for i in range(len(rows))], [r["decode_tps"] or 0 for r in rows], width=0.4, label="decode (batch 1)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="tokens / s", title="Throughput")
    ax.legend(fontsize=7)
    figs.append(("Tokens per second", _png(fig)))

    head = "<tr><th>run</th><th>model</th><th>stage</th><th>parameters</th><th>training tokens</th><th>val bits/byte</th><th>val perplexity</th><th>train tokens/s</th><th>decode tokens/s</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(r['run'])}</td><td>{html.escape(r['label'])}</td><td>{html.escape(r['stage'])}</td><td>{_fmt(r['params'], ',.0f')}</td>"
        f"<td>{_fmt(r['tokens'], ',.0f')}</td><td>{r['bpb']:.4f}</td><td>{_fmt(r['ppl'], '.2f')}</td>"
        f"<td>{_fmt(r['train_tps'], ',.0f')}</td><td>{_fmt(r['decode_tps'], ',.0f')}</td></tr>" for r in rows)
    plots = "".join(f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(t)}'><figcaption>{html.escape(t)}</figcaption></figure>" for t, b64 in figs)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>slmlab report: {html.escape(experiment)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,td:nth-child(2),td:nth-child(3){{text-align:left}}figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>Experiment <code>{html.escape(experiment)}</code></h1>
<p>{len(rows)} finished runs. Bits per byte are measured on held-out text and are comparable across tokenizers;
perplexity is per token at each run's vocabulary.</p>
<table>{head}{body}</table>{plots}</body></html>"""


def write_report(experiment: str, out: Path, run_dir: str | Path = "runs") -> Path:
    client = client_for(run_dir)
    rows = collect(client, experiment)
    if not rows:
        raise ValueError(f"experiment {experiment!r}: expected finished runs with val/bpb, found none")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(render(experiment, rows), encoding="utf-8")
    os.replace(tmp, out)
    return out
