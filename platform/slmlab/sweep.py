"""``slmlab sweep``: a Ray Tune experiment in which every trial is a full Ray Train run.

Ray's current Train–Tune integration (Train V2): each trial is a small function (0.01 CPU) that
builds and fits its own ``TorchTrainer`` with ``TuneReportCallback``, so Tune sees every
``ray.train.report`` and ASHA can stop a trial early on validation bits per byte. MLflow gets
one parent run per sweep and one child run per trial; the best finished trial is registered.

Search-space files (``search_spaces/*.yaml``)::

    metric: val/bpb
    mode: min
    num_samples: 4
    max_concurrent_trials: 1        # optional; each trial holds train.cpus_per_worker CPUs
    params:
      model.moe.num_experts: {choice: [2, 4]}
      model.moe.load_balance_weight: {loguniform: [0.001, 0.1]}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from slmlab.config import ConfigError, PipelineConfig, apply_overrides, validate_pipeline
from slmlab.schema import StrictConfig

DISTRIBUTIONS = {"choice", "grid", "uniform", "loguniform", "randint"}


class SearchSpace(StrictConfig):
    metric: str = "val/bpb"  # what ASHA compares trials on
    mode: str = Field("min", pattern="^(min|max)$")
    num_samples: int = Field(4, ge=1)  # samples drawn (times the grid size when a grid is used)
    max_concurrent_trials: int = Field(1, ge=1)  # on 2 cores one trial at a time keeps Ray Data fed
    grace_steps: int | None = Field(None, ge=1)  # ASHA's first rung (default: the pipeline's eval_every)
    reduction_factor: int = Field(2, ge=2)  # ASHA keeps 1/reduction_factor of the trials at each rung
    params: dict[str, dict[str, Any]]

    @field_validator("params")
    @classmethod
    def _known_distributions(cls, params: dict) -> dict:
        for path, spec in params.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{path}: expected one of {sorted(DISTRIBUTIONS)}, found {sorted(spec)}")
        return params

    def tune_space(self) -> dict:
        from ray import tune

        make = {
            "choice": lambda v: tune.choice(v),
            "grid": lambda v: tune.grid_search(v),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v),
        }
        return {path: make[kind](value) for path, spec in self.params.items() for kind, value in spec.items()}


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    try:
        return SearchSpace.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"{path}: <file>: expected a search-space YAML file, found no such file") from None
    except ValidationError as err:
        lines = [
            f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
        ]
        raise ConfigError("\n".join(lines)) from None


def run_trial(config: dict, base: dict, parent_run_id: str, sweep_name: str) -> None:
    """One Tune trial: validate the overridden pipeline, reuse its (pre-built) shards, and train it
    through the one run lifecycle with Tune seeing every report."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from slmlab.data.shards import build_shards
    from slmlab.lifecycle import RunSpec, train_run

    trial_id = tune.get_context().get_trial_id()
    cfg = validate_pipeline(apply_overrides(base, config), f"sweep {sweep_name} trial {trial_id}")
    shards = build_shards(cfg, progress=lambda m: None)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": shards.summary["vocab_size"]})})
    # a trial restarted by `--resume` (its driver died mid-run) continues its own MLflow run and
    # Ray Train checkpoints: one MLflow child per trial, never two
    earlier = _trial_runs(cfg, sweep_name, trial_id)
    spec = RunSpec(
        label=trial_id,
        cfg=cfg,
        shards=shards,
        run_name=f"{sweep_name}-{trial_id}",
        mlflow_run_id=earlier[0].info.run_id if earlier else None,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "slmlab.sweep": sweep_name,
            "slmlab.trial_id": trial_id,
            "slmlab.overrides": json.dumps(config, sort_keys=True, default=str),
        },
    )
    try:
        train_run(spec, progress=lambda m: None, callbacks=[TuneReportCallback()])
    except BaseException:
        # ASHA stops a trial by cancelling it; the lifecycle marked the run FAILED, which it was not
        from slmlab.tracking import client_for

        for r in _trial_runs(cfg, sweep_name, trial_id):
            client_for(cfg.run_dir).set_terminated(r.info.run_id, status="KILLED")
        raise


def _trial_runs(cfg: PipelineConfig, sweep_name: str, trial_id: str) -> list:
    from slmlab.tracking import client_for, ensure_experiment

    client = client_for(cfg.run_dir)
    experiment_id = ensure_experiment(client, cfg.experiment_name, cfg.run_dir)
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`slmlab.sweep` = '{sweep_name}' and tags.`slmlab.trial_id` = '{trial_id}'"
    )


DATA_FIELDS = ("data.", "tokenizer.", "seed")


def _prebuild_shards(base: dict, space: SearchSpace, progress) -> None:
    """Build every shard set the trials will need, here on the driver, before Tune starts.

    Inside a trial, Ray Data would be captured by the trial's placement group (0.01 CPU) and
    wait forever for CPUs; trials therefore only ever hit the cache. Data-affecting parameters
    must be discrete (choice or grid) for that reason."""
    import itertools

    from slmlab.data.shards import build_shards

    data_params = {p: spec for p, spec in space.params.items() if p.startswith(DATA_FIELDS)}
    for path, spec in data_params.items():
        kind, values = next(iter(spec.items()))
        if kind not in ("choice", "grid"):
            raise ConfigError(
                f"params.{path}: expected choice or grid for a data/tokenizer "
                f"field (its shards are built before the sweep), found {kind}"
            )
    combos = [
        dict(zip(data_params, values))
        for values in itertools.product(*(next(iter(s.values())) for s in data_params.values()))
    ]
    for combo in combos or [{}]:
        try:
            cfg = validate_pipeline(apply_overrides(base, combo), f"sweep data {combo}")
        except ConfigError:
            continue  # that trial will fail validation on its own, and be reported as errored
        build_shards(cfg, progress=progress)


def _sweep_state(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "state" / cfg.name / "sweeps.json"


def run_sweep(cfg: PipelineConfig, space: SearchSpace, resume: bool = False, progress=print) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from slmlab.runtime import ensure_ray
    from slmlab.tracking import client_for, ensure_experiment, flatten, register_model
    from slmlab.train.launch import storage_path

    ensure_ray()
    client = client_for(cfg.run_dir)
    experiment_id = ensure_experiment(client, cfg.experiment_name, cfg.run_dir)
    state_file = _sweep_state(cfg)
    if resume:
        if not state_file.exists():
            raise FileNotFoundError(f"--resume: expected an earlier sweep of {cfg.name!r} in {state_file}, found none")
        state = json.loads(state_file.read_text())
        progress(f"sweep: resuming {state['name']}")
    else:
        name = f"{cfg.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = client.create_run(
            experiment_id, run_name=name, tags={"slmlab.sweep": name, "slmlab.role": "sweep-parent"}
        )
        state = {"name": name, "parent_run_id": parent.info.run_id}
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state))
        client.log_dict(parent.info.run_id, space.model_dump(), "search_space.json")
        for k, v in flatten({"base": cfg.model_dump(mode="json")}).items():
            client.log_param(parent.info.run_id, k, str(v)[:6000])

    base = cfg.model_dump(mode="json")
    _prebuild_shards(base, space, progress)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, parent_run_id=state["parent_run_id"], sweep_name=state["name"]),
        {"cpu": 0.01},  # the trial function only waits on its Ray Train run; 0 CPUs is rejected
    )
    path = Path(storage_path(cfg)) / state["name"]
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        # max_t one past the last step: a trial reaching max_t is stopped by ASHA, which would cut
        # off the trial's own finishing work (weights to MLflow); only rungs below it stop trials
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=cfg.train.max_steps + 1,
            grace_period=space.grace_steps or cfg.train.eval_every,
            reduction_factor=space.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space.tune_space(),
            tune_config=tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                scheduler=scheduler,
                num_samples=space.num_samples,
                max_concurrent_trials=space.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=state["name"], storage_path=storage_path(cfg), verbose=1),
        )
    grid = tuner.fit()

    parent_id = state["parent_run_id"]
    children = [
        r
        for r in client.search_runs([experiment_id], filter_string=f"tags.`slmlab.sweep` = '{state['name']}'")
        if r.info.run_id != parent_id
    ]
    trials = []
    for r in grid:
        steps = r.metrics.get("step") if r.metrics else None
        trials.append(
            {
                "trial_id": r.metrics.get("trial_id") if r.metrics else None,
                "error": repr(r.error)[:300] if r.error else None,
                "last_step": steps,
                space.metric: (r.metrics or {}).get(space.metric),
                "config": r.config,
            }
        )
    for c in children:
        if c.info.status == "RUNNING":  # ASHA stops a trial by killing its actor: nothing in it could say so
            client.set_terminated(c.info.run_id, status="KILLED")
    finished = [c for c in children if c.info.status == "FINISHED" and space.metric in c.data.metrics]
    summary = {
        "sweep": state["name"],
        "trials": trials,
        "stopped_early": sum(1 for t in trials if not t["error"] and (t["last_step"] or 0) < cfg.train.max_steps),
        "errored": sum(1 for t in trials if t["error"]),
        "best": None,
    }
    if finished:
        best = (min if space.mode == "min" else max)(finished, key=lambda c: c.data.metrics[space.metric])
        version = register_model(
            client,
            cfg.registered_model_name,
            best.info.run_id,
            "model",
            description=f"best trial of sweep {state['name']}",
        )
        client.set_tag(parent_id, "slmlab.best_run_id", best.info.run_id)
        client.log_metric(parent_id, f"best/{space.metric}", best.data.metrics[space.metric])
        summary["best"] = {
            "run_id": best.info.run_id,
            space.metric: best.data.metrics[space.metric],
            "model_version": version,
            "overrides": json.loads(best.data.tags.get("slmlab.overrides", "{}")),
        }
        progress(
            f"sweep: best {space.metric}={best.data.metrics[space.metric]:.4f} "
            f"→ registered {cfg.registered_model_name} version {version}"
        )
    client.log_dict(parent_id, summary, "sweep_summary.json")
    client.set_terminated(parent_id, status="FINISHED" if finished else "FAILED")
    return summary
