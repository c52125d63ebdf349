"""``slmlab``: a small, stable command line. Every other setting lives in the pipeline YAML.

Errors the platform raises on purpose (config, data, registry, export: :mod:`slmlab.errors`) print
as one red line and exit 2; ``slmlab --verbose ...`` shows their traceback instead. Anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, NoReturn, Optional

import click
import typer
from typer.core import TyperGroup

from slmlab.errors import ExportError, RegistryError, user_error

VERBOSE_ENV = "SLMLAB_VERBOSE"  # "1": tracebacks here, Ray Data progress bars and INFO logs elsewhere


def _verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def _fail(message: str) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


class _Commands(TyperGroup):
    """Every command runs inside one handler: a deliberate error becomes its message and exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as err:
            problem = user_error(err)
            if problem is None or _verbose():
                raise
            _fail(str(problem))


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Train and compare small language-model architectures on Ray.")


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="full tracebacks, Ray Data progress and logs"),
) -> None:
    """Train and compare small language-model architectures on Ray."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by the pipeline (Ray Data progress, INFO logs) and by Ray workers


def _model_dir(ref: str, run_dir: Path) -> Path:
    """A model folder from a models:/, runs:/ reference or a path; never creates an MLflow store to
    look something up in (a missing store means the model cannot be there)."""
    from slmlab.tracking import USER_TRACKING_URI, resolve_model_dir

    if ref.startswith(("models:/", "runs:/")) and not USER_TRACKING_URI and not (run_dir / "mlflow.db").exists():
        raise RegistryError(f"{ref}: expected a registered model or run artefact in {run_dir.resolve() / 'mlflow.db'}, "
                            "found no MLflow store there (wrong --run-dir?)")
    try:
        return resolve_model_dir(ref, run_dir)
    except FileNotFoundError as err:
        raise RegistryError(str(err)) from None


def _load(ref: str, run_dir: Path):
    from slmlab.train.checkpoint import load_model_dir

    folder = _model_dir(ref, run_dir)
    try:
        cfg, net = load_model_dir(folder)
    except (FileNotFoundError, ValueError) as err:
        raise RegistryError(str(err)) from None
    return folder, cfg, net


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="pipeline YAML (see pipelines/)"),
    set_: List[str] = typer.Option([], "--set", help="override a field: dotted.key=value (repeatable)"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue a run: its name, or 'latest'"),
) -> None:
    """Run a pipeline: data → training → evaluation → MLflow registry."""
    from slmlab.config import load_pipeline

    cfg = load_pipeline(pipeline, set_)
    from slmlab.pipeline import run_stages

    started_ms = int(time.time() * 1000)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `ray job stop`: unwind as Ctrl-C does
    try:
        results = run_stages(cfg, resume=resume, progress=lambda m: typer.echo(f"[slmlab] {m}"))
    except KeyboardInterrupt:
        from slmlab.tracking import client_for, mark_killed

        killed = mark_killed(client_for(cfg.run_dir), cfg.name, started_ms)
        typer.secho(f"[slmlab] interrupted: {len(killed)} MLflow run(s) of this invocation marked KILLED; "
                    f"`slmlab run {pipeline} --resume latest` re-runs what did not finish",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None
    for stage in results.values():  # one line per run: where it is and what it scored
        for run in stage.runs.values():
            bpb = run.metrics.get("val/bpb")
            typer.echo(f"[slmlab] done: {stage.name}/{run.label} {run.status} {run.model_uri or run.run_name}"
                       + (f" val/bpb {bpb:.4f}" if bpb is not None else ""))


def _interrupt(signum, _frame) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


@app.command()
def validate(pipeline: Path, set_: List[str] = typer.Option([], "--set")) -> None:
    """Check a pipeline YAML without running anything."""
    from slmlab.config import load_pipeline

    cfg = load_pipeline(pipeline, set_)
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
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", tracking_uri(run_dir), "--default-artifact-root", artifact_root(run_dir)]
    typer.echo(f"MLflow UI on http://{host}:{port}  (Ctrl-C to stop)")
    server = subprocess.Popen(cmd)
    # a SIGTERM to us (a service manager, a test) must stop the server too, not orphan it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: server.send_signal(signum))
    raise typer.Exit(server.wait())


@app.command()
def sweep(
    pipeline: Path = typer.Argument(..., help="pipeline YAML: the base every trial starts from"),
    space: Optional[Path] = typer.Argument(None, help="search space YAML (search_spaces/); not needed with --resume"),
    set_: List[str] = typer.Option([], "--set", help="override a base field: dotted.key=value"),
    resume: bool = typer.Option(False, "--resume", help="finish this pipeline's interrupted sweep (Tuner.restore)"),
) -> None:
    """Ray Tune sweep: each trial a Ray Train run, ASHA on validation bits per byte, all in MLflow."""
    from slmlab.config import load_pipeline
    from slmlab.sweep import SearchSpace, load_space, run_sweep

    cfg = load_pipeline(pipeline, set_)
    if space is None and not resume:
        _fail("SPACE: expected a search-space YAML (or --resume), found nothing")
    spec = load_space(space) if space else SearchSpace(params={})
    summary = run_sweep(cfg, spec, resume=resume, progress=lambda m: typer.echo(f"[slmlab] {m}"))
    typer.echo(f"[slmlab] sweep {summary['sweep']}: {len(summary['trials'])} trials, "
               f"{summary['stopped_early']} stopped early by ASHA, "
               f"{summary['errored']} errored; best: {summary['best']}")


@app.command()
def generate(
    model: str = typer.Argument(..., help="models:/name/version, models:/name@alias, or a checkpoint folder"),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n",
                                                 help="default: 64, or as many as fit after the prompt"),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the chat template (instruction-tuned models)"),
    image: Optional[Path] = typer.Option(None, "--image", help="an image the prompt asks about (vision-language "
                                         "models; implies --chat)"),
    run_dir: Path = typer.Option(Path("runs"), "--run-dir", help="where the MLflow store lives"),
    int8: bool = typer.Option(False, "--int8", help="int8 weights and 7-bit activations (fbgemm, CPU): batch-1 "
                              "decoding ~2.1x the default fp32 path at 30.9M parameters for ~0.03% more bits per byte"),
) -> None:
    """Stream a continuation of PROMPT from a trained model (KV-cached)."""
    import torch

    from slmlab.data.tokenizer import ASSISTANT, END_TURN, EOS, USER, load_tokenizer
    from slmlab.generation import decode_layout
    from slmlab.generation import generate as generate_tokens

    folder, _, net = _load(model, run_dir)
    if int8:
        from slmlab.quantize import quantize_int8

        net = quantize_int8(net, dynamic_activations=True, exclude=("router",))  # routing decisions stay exact
    else:  # batch-1 decoding on CPU: big weights through oneDNN's packed kernel (~1.7x); the same tokens
        net = decode_layout(net)
    if not net.capabilities.generation:
        _fail(f"{model}: expected a model that can generate, found {type(net).__name__} (no generation capability)")
    tok = load_tokenizer(folder / "tokenizer.json")
    extra = None
    if image is not None:  # encoded once into the prefill; its tokens sit in the KV cache like a prompt
        if "pixel_values" not in net.capabilities.batch_fields:
            _fail(f"--image: expected a vision-language model, found {type(net).__name__} (it reads no images)")
        from slmlab.data.images import load_image

        try:
            pixels = load_image(str(image), net.cfg.image_size, net.cfg.channels)
        except Exception as err:  # noqa: BLE001 - whatever the decoder says, one line naming the file
            _fail(f"--image {image}: expected a readable image file, found {type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else 'no details'}")
        extra, chat = {"pixel_values": torch.from_numpy(pixels)[None]}, True
    text = f"{USER}{prompt}{END_TURN}{ASSISTANT}" if chat else prompt
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
    limit, length = net.capabilities.max_positions, ids.shape[1]
    if limit is not None and length >= limit:
        _fail(f"--prompt: expected fewer than max_seq_len={limit} tokens{' with the chat template' if chat else ''}, "
              f"found {length}")
    if max_new_tokens is None:  # the default never fails: a 64-position model still answers
        max_new_tokens = 64 if limit is None else min(64, limit - length)
    if limit is not None and length + max_new_tokens > limit:
        _fail(f"--max-new-tokens: expected at most {limit - length} (max_seq_len={limit} minus a "
              f"{length}-token prompt), found {max_new_tokens}")
    stops = [i for i in (tok.token_to_id(EOS), tok.token_to_id(END_TURN)) if i is not None]
    emitted: list[int] = []
    shown = ""
    typer.echo(prompt if not chat else "", nl=False)

    def stream(tokens: list[int]) -> None:
        nonlocal shown
        if tokens[0] in stops:
            return
        emitted.append(tokens[0])
        text_now = tok.decode(emitted)
        if not text_now.endswith("\ufffd"):  # hold back half of a multi-byte character
            typer.echo(text_now[len(shown):], nl=False)
            shown = text_now

    generate_tokens(net, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    stop_token_ids=stops, generator=torch.Generator().manual_seed(seed), on_token=stream, extra=extra)
    typer.echo(tok.decode(emitted)[len(shown):])


@app.command()
def report(
    experiment: str = typer.Argument(..., help="MLflow experiment (a pipeline's name)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (<run-dir>/reports/<experiment>.html)"),
    run_dir: Path = typer.Option(Path("runs"), "--run-dir"),
) -> None:
    """Write a self-contained HTML comparison of an experiment's runs (plots from MLflow data)."""
    from slmlab.report import write_report

    try:
        path = write_report(experiment, out or run_dir / "reports" / f"{experiment}.html", run_dir)
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"wrote {path}")


@app.command()
def export(
    model: str = typer.Argument(..., help="models:/name/version, models:/name@alias, or a checkpoint folder"),
    out: Path = typer.Argument(..., help="output folder (written atomically)"),
    format: str = typer.Option("hf", "--format", help="hf: transformers LlamaForCausalLM / MixtralForCausalLM"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty OUT, replacing only the export's files"),
    run_dir: Path = typer.Option(Path("runs"), "--run-dir"),
) -> None:
    """Export a model for other tools (Hugging Face transformers: no custom code needed)."""
    from slmlab.hf_interop import check_export_target, export_hf

    if format != "hf":
        _fail(f"--format: expected hf, found {format!r}")
    check_export_target(out, force)  # before loading anything: the cheapest mistake to report
    folder, cfg, net = _load(model, run_dir)
    arch = net.capabilities.hf_export
    if arch is None:
        raise ExportError(f"{model}: expected a model with a transformers equivalent (vectorslm), "
                          f"found family {cfg.family!r}")
    if hasattr(net, "text_decoder"):  # a vision-language model: its text decoder is the transformers model
        net, cfg = net.text_decoder()
    path = export_hf(net, cfg, out, tokenizer_file=folder / "tokenizer.json", force=force)
    typer.echo(f"wrote {path} ({arch})")


if __name__ == "__main__":  # pragma: no cover
    app()
