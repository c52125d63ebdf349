"""MLflow: where runs, metrics, artefacts and registered models go.

Default store: ``<run_dir>/mlflow.db`` (SQLite, so the model registry works) with artefacts in
``<run_dir>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides both (e.g. a cluster's server).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

# The user's choice, read once: mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into the
# environment, so reading it later would make one pipeline's store leak into the next.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(run_dir: str | Path) -> str:
    if USER_TRACKING_URI:
        return USER_TRACKING_URI
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def artifact_root(run_dir: str | Path) -> str:
    return (Path(run_dir).resolve() / "mlartifacts").as_uri()


def client_for(run_dir: str | Path) -> MlflowClient:
    uri = tracking_uri(run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if not USER_TRACKING_URI:
        _new_store_from_template(Path(run_dir).resolve() / "mlflow.db")
    return MlflowClient(uri, registry_uri=uri)  # explicit store; mlflow's global state is never touched


_EMPTY_STORE: Path | None = None  # this process's empty SQLite store, migrated once


def _new_store_from_template(db: Path) -> None:
    """A new SQLite store starts as a copy of an empty one this process already migrated: MLflow's
    ~60 schema migrations take ~2 s per new store, paid by every run dir (each test's, each sweep's).
    The copy is linked into place, so a store that exists, or that another process creates at the
    same moment, is never overwritten."""
    global _EMPTY_STORE
    if db.exists():
        return
    if _EMPTY_STORE is None or not _EMPTY_STORE.exists():
        folder = tempfile.mkdtemp(prefix="slmlab-mlflow-empty-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        template = Path(folder) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates the schema
        _EMPTY_STORE = template
    staged = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    shutil.copyfile(_EMPTY_STORE, staged)
    try:
        os.link(staged, db)
    except FileExistsError:
        pass
    finally:
        staged.unlink(missing_ok=True)


def mark_killed(client: MlflowClient, pipeline: str, since_ms: int) -> list[str]:
    """Runs of ``pipeline`` started at or after ``since_ms`` and still RUNNING become KILLED: an
    interrupted invocation leaves no run that claims to be training. Returns their run ids."""
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    quoted = pipeline.replace("'", "\\'")
    runs = client.search_runs(ids, f"attributes.status = 'RUNNING' and tags.`slmlab.pipeline` = '{quoted}' "
                                   f"and attributes.start_time >= {int(since_ms)}", max_results=10_000)
    for r in runs:
        client.set_terminated(r.info.run_id, status="KILLED")
    return [r.info.run_id for r in runs]


def ensure_experiment(client: MlflowClient, name: str, run_dir: str | Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None if USER_TRACKING_URI else f"{artifact_root(run_dir)}/{name}"
    return client.create_experiment(name, artifact_location=location)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MetricsLogger:
    """Logs metrics to one MLflow run from wherever it runs (driver, Ray task or Ray Train worker);
    the one place metric batches are built."""

    def __init__(self, uri: str, run_id: str, client: MlflowClient | None = None):
        self.client = client or MlflowClient(uri)
        self.run_id = run_id

    @classmethod
    def for_client(cls, client: MlflowClient, run_id: str) -> "MetricsLogger":
        return cls(client.tracking_uri, run_id, client)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.log_points([(k, v, step) for k, v in metrics.items()])

    def log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        """{key: [(step, value), ...]}: e.g. a figure measured at several lengths."""
        self.log_points([(k, v, step) for k, points in series.items() for step, v in points])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_points(self, points: list[tuple[str, float, int]]) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v, step in points]
        for i in range(0, len(batch), 900):  # the REST API caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900], synchronous=True)


def register_model(client: MlflowClient, name: str, run_id: str, artifact_path: str, description: str = "") -> str:
    """Register ``<run artefacts>/<artifact_path>`` as a new version of ``name``; returns the version."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.get_registered_model(name)  # created by a concurrent run meanwhile
    run = client.get_run(run_id)
    mv = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id, description=description
    )
    return str(mv.version)


def resolve_model_dir(ref: str, run_dir: str | Path = "runs") -> Path:
    """A local folder holding model.safetensors + model_config.json + tokenizer.json, from either
    an MLflow model URI (``models:/name/version``, ``models:/name@alias``, ``runs:/id/model``) or a
    checkpoint directory (a run's model folder, or a Ray checkpoint of a finished run)."""
    if ref.startswith(("models:/", "runs:/")):
        client = client_for(run_dir)
        try:
            if ref.startswith("models:/"):
                name, _, which = ref[len("models:/") :].partition("@")
                if which:
                    mv = client.get_model_version_by_alias(name, which)
                else:
                    name, _, version = ref[len("models:/") :].partition("/")
                    mv = client.get_model_version(name, version)
                source = client.get_model_version_download_uri(mv.name, mv.version)
                return Path(
                    mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri(run_dir))
                )
            run_id, _, path = ref[len("runs:/") :].partition("/")
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=path, tracking_uri=tracking_uri(run_dir)
                )
            )
        except mlflow.exceptions.MlflowException as err:
            raise FileNotFoundError(
                f"{ref}: expected a registered model or run artefact in "
                f"{tracking_uri(run_dir)}, found none ({err.message.splitlines()[0]})"
            ) from None
    path = Path(ref)
    if (path / "model").is_dir() and not (path / "model_config.json").exists():
        path = path / "model"
    if not (path / "model_config.json").exists():
        raise FileNotFoundError(
            f"{ref}: expected an MLflow model URI or a folder with "
            "model_config.json and model.safetensors, found neither"
        )
    return path
