"""Stages: a pipeline is an ordered list of typed stages, each reading what earlier ones produced.

A stage kind is one file in this folder: a typed config (``StageConfig`` subclass with a
``kind`` literal) and a ``run(config, ctx) -> StageResult`` function, joined by one
``register_stage`` call. Stages never train by themselves: they describe runs (``RunSpec``) and
hand them to the context, which owns the run lifecycle (``slmlab.lifecycle``), concurrency
(``slmlab.parallel``) and the resume bookkeeping (:class:`PipelineState`).

Without a ``stages:`` list a pipeline runs ``pretrain``, then ``compare`` (when it has
``compare:`` variants), then ``finetune`` (when it has a ``finetune:`` section).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field

from slmlab.errors import SlmlabError
from slmlab.schema import StrictConfig

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from slmlab.config import PipelineConfig
    from slmlab.data.shards import Shards
    from slmlab.lifecycle import RunResult, RunSpec


class StageConfig(StrictConfig):
    kind: str  # a Literal in each subclass: picks the stage kind
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")  # unique in the pipeline (default: kind)

    @property
    def stage_name(self) -> str:
        return self.name or self.kind


class StageFailed(SlmlabError, RuntimeError):
    """A stage could not produce its result (e.g. one of its independent runs failed)."""


@dataclass(frozen=True)
class StageKind:
    kind: str
    config_cls: type[StageConfig]
    run: Callable[[Any, "StageContext"], "StageResult"]


STAGES: dict[str, StageKind] = {}


def register_stage(
    kind: str, config_cls: type[StageConfig], run: Callable[[Any, "StageContext"], "StageResult"]
) -> None:
    if kind in STAGES:
        raise ValueError(f"stage kind {kind!r} registered twice")
    STAGES[kind] = StageKind(kind, config_cls, run)


@dataclass
class StageResult:
    name: str
    runs: dict[str, "RunResult"] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # what later stages need: URIs, paths, figures
    stopped: bool = False  # a run stopped early on purpose (train.stop_at_step): later stages wait for --resume


# ---------------------------------------------------------------------------------------------
# Resume bookkeeping


class PipelineState:
    """What one invocation of a pipeline has done, run by run: ``<run_dir>/state/<pipeline>/<id>.json``.

    ``--resume`` reloads it: finished runs are not trained again, runs that stopped or were
    interrupted or failed continue under the same run name and MLflow run (Ray Train resumes from
    their last checkpoint, if any), unless their model config changed, which starts them afresh."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @staticmethod
    def folder(cfg: "PipelineConfig") -> Path:
        return Path(cfg.run_dir) / "state" / cfg.name

    @classmethod
    def new(cls, cfg: "PipelineConfig") -> "PipelineState":
        invocation = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        state = cls(cls.folder(cfg) / f"{invocation}.json", {"invocation": invocation, "stages": {}})
        state.save()
        return state

    @classmethod
    def load(cls, cfg: "PipelineConfig", which: str) -> "PipelineState":
        """``which``: 'latest', an invocation id, or the run name of any run in it."""
        folder = cls.folder(cfg)
        candidates = sorted((p for p in folder.glob("*.json") if p.is_file()), key=lambda p: p.stat().st_mtime)
        states = [cls(p, json.loads(p.read_text())) for p in candidates]
        states = [s for s in states if "stages" in s.data]
        if which == "latest" and states:
            return states[-1]
        for s in reversed(states):
            if s.data["invocation"] == which or any(
                r.get("run_name") == which for st in s.data["stages"].values() for r in st["runs"].values()
            ):
                return s
        raise SlmlabError(
            f"--resume {which}: expected an earlier run of pipeline {cfg.name!r} under {folder}, found none"
        )

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {"runs": {}})

    def run(self, stage: str, label: str) -> dict | None:
        return self.stage(stage)["runs"].get(label)

    def record(self, stage: str, key: str, /, **fields) -> None:
        entry = self.stage(stage)["runs"].setdefault(key, {})
        entry.update({k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()})
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def model_hash(spec: "RunSpec") -> str:
    """What a run's checkpoints depend on: its model's architecture (a changed lr still resumes)."""
    import hashlib

    return hashlib.sha256(spec.cfg.model.model_dump_json().encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# What a stage sees


@dataclass
class StageContext:
    cfg: "PipelineConfig"  # the pipeline, model vocabulary set; never mutated (copy with model_copy)
    shards: "Shards"  # the pipeline's data, built once (cached by content hash)
    client: "MlflowClient"
    state: PipelineState
    results: dict[str, StageResult] = field(default_factory=dict)  # earlier stages, by name
    progress: Callable[[str], None] = print

    def build_shards(self, cfg: "PipelineConfig", tokenizer_path: Path | None = None) -> "Shards":
        """Shards for another data config (cached), e.g. a fine-tuning set on the same tokenizer."""
        from slmlab.data.shards import build_shards

        return build_shards(cfg, progress=self.progress, tokenizer_path=tokenizer_path)

    def spec(self, label: str, cfg: "PipelineConfig | None" = None, **fields) -> "RunSpec":
        from slmlab.lifecycle import RunSpec

        return RunSpec(label=label, cfg=cfg or self.cfg, shards=fields.pop("shards", self.shards), **fields)

    def _prior(self, stage: str, spec: "RunSpec") -> tuple["RunResult | None", "RunSpec"]:
        """A finished result to reuse, or the spec continuing an interrupted attempt."""
        from slmlab.lifecycle import RunResult

        prior = self.state.run(stage, spec.label)
        if not prior:
            return None, spec
        if prior.get("status") == "FINISHED":
            fields = {
                k: prior.get(k)
                for k in ("label", "run_name", "mlflow_run_id", "status", "model_version", "model_uri", "metrics")
            }
            result = RunResult(
                **{**fields, "metrics": prior.get("metrics") or {}},
                model_dir=Path(prior["model_dir"]) if prior.get("model_dir") else None,
            )
            self.progress(f"resume: {stage}/{spec.label} finished earlier ({prior['run_name']}), not trained again")
            return result, spec
        if prior.get("model_hash") in (None, model_hash(spec)):
            # stopped, interrupted or failed with the same architecture: continue under the same run
            # name (Ray Train picks up its last checkpoint) and the same MLflow run
            return None, replace(spec, run_name=prior["run_name"], mlflow_run_id=prior["mlflow_run_id"])
        self.progress(f"resume: {stage}/{spec.label} has a new model config: trained afresh")
        return None, spec

    def _start(self, stage: str, spec: "RunSpec") -> "RunSpec":
        """The run's MLflow run (created or reopened), recorded as RUNNING before it trains."""
        from slmlab.lifecycle import start_run

        spec = start_run(spec)
        self.state.record(stage, spec.label, label=spec.label, run_name=spec.run_name,
                          mlflow_run_id=spec.mlflow_run_id, status="RUNNING", model_hash=model_hash(spec))
        return spec

    def _record(self, stage: str, result: "RunResult") -> None:
        self.state.record(stage, result.label, **asdict(result))

    def train(self, stage: str, spec: "RunSpec") -> "RunResult":
        """One run through the lifecycle, here in the driver; its failure fails the stage."""
        from slmlab.lifecycle import train_run

        done, spec = self._prior(stage, spec)
        if done:
            return done
        spec = self._start(stage, replace(spec, tags={"slmlab.stage": stage, **spec.tags}))
        try:
            result = train_run(spec, self.progress)
        except Exception as err:
            from slmlab.parallel import one_line

            self.state.record(stage, spec.label, status="FAILED", error=one_line(err))
            raise StageFailed(f"stage {stage}: run {spec.label} failed: {one_line(err)}") from err
        self._record(stage, result)
        return result

    def stage_run(self, stage: str) -> str:
        """The MLflow parent run of a stage's independent runs (created once, kept across resumes)."""
        from slmlab.tracking import ensure_experiment

        entry = self.state.stage(stage)
        if not entry.get("parent_run_id"):
            experiment_id = ensure_experiment(self.client, self.cfg.experiment_name, self.cfg.run_dir)
            run = self.client.create_run(
                experiment_id,
                run_name=f"{self.state.data['invocation']}-{stage}",
                tags={"slmlab.stage": stage, "slmlab.role": "stage-parent", "slmlab.pipeline": self.cfg.name},
            )
            entry["parent_run_id"] = run.info.run_id
            self.state.save()
        return entry["parent_run_id"]

    def train_many(
        self, stage: str, specs: list["RunSpec"], max_concurrent: int | None = None
    ) -> dict[str, "RunResult"]:
        """Independent runs at once, each an MLflow child run of the stage's parent run. A failing run
        is reported by label while the others finish; then the stage fails naming it."""
        from slmlab.parallel import train_concurrently

        parent = self.stage_run(stage)
        results, todo = {}, []
        for spec in specs:
            done, spec = self._prior(stage, spec)
            if done:
                results[spec.label] = done
            else:
                todo.append(replace(spec, tags={"slmlab.stage": stage, "mlflow.parentRunId": parent, **spec.tags}))
        self.client.update_run(parent, status="RUNNING")

        def prepare(spec: "RunSpec") -> "RunSpec":
            return self._start(stage, spec)

        results.update(
            train_concurrently(
                todo, max_concurrent, self.progress, prepare=prepare, on_done=lambda r: self._record(stage, r)
            )
        )
        failed = [r for r in results.values() if r.status == "FAILED"]
        self.client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
        if failed:
            raise StageFailed(
                f"stage {stage}: "
                + "; ".join(f"run {r.label} failed ({r.error})" for r in failed)
                + f"; {len(results) - len(failed)} other run(s) finished. Fix it and continue with --resume"
            )
        return results


# ---------------------------------------------------------------------------------------------
# Built-in stage kinds (one file each); families add theirs the same way.

from slmlab.stages import pretrain, compare, finetune, independent  # noqa: E402,F401,I001
from slmlab.stages import modularforge  # noqa: E402,F401  (registers partition, trunk, experts, assemble, evaluate)
from slmlab.stages import context_sweep, mqar  # noqa: E402,F401  (context lengths; associative-recall probe)
from slmlab.stages import vlm  # noqa: E402,F401  (registers vlm_train, vlm_eval)
from slmlab.stages import move  # noqa: E402,F401  (registers move_teacher, move_modules, move_assemble, move_distill)
