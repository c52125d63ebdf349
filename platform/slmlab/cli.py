"""``slmlab``: a small, stable command line. Every other setting lives in the pipeline YAML."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from slmlab.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and compare small language-model architectures on Ray.")


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="pipeline YAML (see pipelines/)"),
    set_: List[str] = typer.Option([], "--set", help="override a field: dotted.key=value (repeatable)"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue a run: its name, or 'latest'"),
) -> None:
    """Run a pipeline: data → training → evaluation → MLflow registry."""
    from slmlab.config import load_pipeline

    try:
        cfg = load_pipeline(pipeline, set_)
    except ConfigError as err:
        _fail(str(err))
    from slmlab.pipeline import run_pipeline

    result = run_pipeline(cfg, resume=resume, progress=lambda m: typer.echo(f"[slmlab] {m}"))
    shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("val/")}
    typer.echo(f"[slmlab] done: run {result.run_name} (MLflow {result.mlflow_run_id}) {shown}")


@app.command()
def validate(pipeline: Path, set_: List[str] = typer.Option([], "--set")) -> None:
    """Check a pipeline YAML without running anything."""
    from slmlab.config import load_pipeline

    try:
        cfg = load_pipeline(pipeline, set_)
    except ConfigError as err:
        _fail(str(err))
    typer.echo(f"{pipeline}: ok ({cfg.model.family}, {cfg.train.max_steps} steps)")


@app.command()
def ui(
    run_dir: Path = typer.Option(Path("runs"), help="the pipelines' run_dir"),
    port: int = typer.Option(5000),
    host: str = typer.Option("127.0.0.1", help="bind address; loopback unless you mean to expose it"),
) -> None:
    """Open the MLflow UI on the local store (127.0.0.1 by default)."""
    from slmlab.tracking import artifact_root, tracking_uri

    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port),
           "--backend-store-uri", tracking_uri(run_dir), "--default-artifact-root", artifact_root(run_dir), "--workers", "1"]
    typer.echo(f"MLflow UI on http://{host}:{port}  (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(cmd))


if __name__ == "__main__":  # pragma: no cover
    app()
