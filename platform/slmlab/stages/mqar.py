"""``mqar``: the associative-recall probe (:mod:`slmlab.probes.mqar`) for each model, at each pair count.

Each cell trains one small model from scratch on MQAR sequences of every pair count in ``pairs``
(in turn, as Zoology trains on a mixture) and reports its accuracy on held-out sequences of each
count; New-LLM models are also run at every width in ``context_dims`` (their whole memory is
``n_layers * context_dim`` numbers).

Why from scratch rather than fine-tuning the pretrained models: the probe then measures what the
architecture can learn to do with its state, not how far one text-pretraining run happens to
transfer; its vocabulary and lengths are its own (no tokenizer coupling); and New-LLM can be
swept over ``context_dim`` without pretraining a model per width. Zoology trains from scratch too.

Why plain PyTorch in a Ray task per cell rather than a Ray Train run: a cell is a model of ~0.1-1M
parameters on generated data (no shards), and a Ray Train + DeepSpeed start costs ~20-35 s here
for nothing this needs (one process, no checkpoints: a cell is minutes and re-runs on --resume).
Cells are independent, so they run as 1-CPU Ray tasks, as many at once as the cluster holds.
Each cell is an MLflow child run of the stage's run, tagged ``slmlab.role=probe``, with its
accuracy per pair count as ``mqar/p<N>/accuracy``; ``slmlab report`` tabulates and plots them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple, Union

from pydantic import Field, model_validator

from slmlab.models import FAMILIES
from slmlab.schema import StrictConfig
from slmlab.stages import StageConfig, StageContext, StageFailed, StageResult, register_stage

_Model = Annotated[Union[tuple(f.config_cls for f in FAMILIES.values())], Field(discriminator="family")]  # type: ignore[misc]


class ProbeModel(StrictConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # label in MLflow and in the report
    model: _Model  # type: ignore[valid-type]  # vocab_size and max_seq_len are set from the tasks


class MQARStage(StageConfig):
    kind: Literal["mqar"] = "mqar"
    models: list[ProbeModel] = Field(min_length=1)  # the architectures compared, at one fixed size each
    pairs: list[int] = Field([4, 16, 64], min_length=1)  # key-value pairs per sequence: trained on all, scored on each
    context_dims: list[int] = Field(default_factory=list)  # extra New-LLM widths (memory sizes) per pair count
    key_vocab: int = Field(128, ge=1)  # distinct keys; must be >= the largest pair count
    value_vocab: int = Field(128, ge=2)  # distinct values; chance accuracy is 1 / value_vocab
    steps: int = Field(2000, ge=1)  # optimizer steps per cell, fresh sequences each step, cycling the pair counts
    batch_size: int = Field(64, ge=1)  # sequences per step
    lr: float = Field(3e-3, gt=0)  # peak AdamW learning rate (warmup, cosine to 10%)
    warmup: int = Field(100, ge=0)  # warmup steps
    eval_sequences: int = Field(1000, ge=1)  # held-out sequences per pair count the accuracy is measured on
    eval_every: int = Field(0, ge=0)  # also log accuracy every this many steps (0 = at the end only)
    threads: int = Field(1, ge=1)  # torch threads (= CPUs asked of Ray) per cell
    max_concurrent: int | None = Field(None, ge=1)  # cap on cells at once (None = as many as the CPUs hold)

    @model_validator(mode="after")
    def _tasks_exist(self) -> "MQARStage":
        from slmlab.probes.mqar import MQARTask

        for n in self.pairs:
            MQARTask(n, key_vocab=self.key_vocab, value_vocab=self.value_vocab)  # raises one line naming the field
        if any(c < 1 for c in self.context_dims):
            raise ValueError(f"context_dims: expected positive widths, found {self.context_dims}")
        return self


class Cell(NamedTuple):
    label: str  # unique in the stage: the model's name, or <name>-c<context_dim> for an extra width
    name: str  # the ProbeModel's name
    model: Any  # its family config (context_dim changed for extra widths)
    base: bool  # the model as configured (False: one of the extra context_dims)


def cells(stage: MQARStage) -> list[Cell]:
    """Every cell of the stage: each model as configured (the comparison, first), then the extra widths."""
    out = [Cell(pm.name, pm.name, pm.model, True) for pm in stage.models]
    for pm in stage.models:
        if pm.model.family == "new_llm":
            for c in stage.context_dims:
                if c != pm.model.context_dim:
                    out.append(Cell(f"{pm.name}-c{c}", pm.name, pm.model.model_copy(update={"context_dim": c}), False))
    return out


def _run_cell(model_cfg, tasks, train, uri: str, run_id: str, threads: int) -> dict[str, float]:
    """One cell, in a Ray task: train, log the loss curve and the figures to the cell's MLflow run."""
    import torch

    from slmlab.probes.mqar import train_cell
    from slmlab.tracking import MetricsLogger

    torch.set_num_threads(threads)
    logger = MetricsLogger(uri, run_id)
    figures = train_cell(model_cfg, tasks, train, log=lambda step, m: logger.log(m, step))
    logger.log(figures, step=train.steps)
    return figures


def run(stage: MQARStage, ctx: StageContext) -> StageResult:
    import ray
    from mlflow.entities import Param

    from slmlab.parallel import one_line
    from slmlab.probes.mqar import MQARTask, ProbeTrain
    from slmlab.tracking import ensure_experiment, flatten

    cfg, name = ctx.cfg, stage.stage_name
    tasks = [MQARTask(n, key_vocab=stage.key_vocab, value_vocab=stage.value_vocab) for n in stage.pairs]
    train = ProbeTrain(steps=stage.steps, batch_size=stage.batch_size, lr=stage.lr, warmup=stage.warmup,
                       eval_sequences=stage.eval_sequences, eval_every=stage.eval_every, seed=cfg.seed)
    parent = ctx.stage_run(name)
    experiment_id = ensure_experiment(ctx.client, cfg.experiment_name, cfg.run_dir)
    remote = ray.remote(_run_cell).options(num_cpus=stage.threads, max_retries=0, name="slmlab-mqar")
    limit = stage.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // stage.threads))
    results: dict[str, dict] = {}
    todo = []
    for cell in cells(stage):
        prior = ctx.state.run(name, cell.label)
        if prior and prior.get("status") == "FINISHED":
            results[cell.label] = prior["metrics"]
        else:
            todo.append(cell)
    ctx.client.update_run(parent, status="RUNNING")
    ctx.progress(f"{name}: {len(todo)} probe cell(s) to train ({len(results)} done earlier), {limit} at a time")
    running, failed = {}, []
    while todo or running:
        while todo and len(running) < limit:
            label, model_name, model, base = todo.pop(0)
            model = model.model_copy(update={"vocab_size": tasks[0].vocab_size,
                                             "max_seq_len": max(t.seq_len for t in tasks)})
            run = ctx.client.create_run(experiment_id, run_name=f"{ctx.state.data['invocation']}-{name}-{label}", tags={
                "mlflow.parentRunId": parent, "slmlab.stage": name, "slmlab.role": "probe", "slmlab.probe": "mqar",
                "slmlab.pipeline": cfg.name, "slmlab.family": model.family, "slmlab.variant": model_name,
                "slmlab.probe_cell": label, "slmlab.probe_base": str(base).lower()})
            run_id = run.info.run_id
            params = {"mqar.pairs": ",".join(map(str, stage.pairs)), "mqar.key_vocab": stage.key_vocab,
                      "mqar.value_vocab": stage.value_vocab, **{f"mqar.train.{k}": v for k, v in vars(train).items()},
                      **flatten(model.model_dump(mode="json"), "model.")}
            ctx.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            ctx.state.record(name, label, label=label, mlflow_run_id=run_id, status="RUNNING")
            ref = remote.remote(model, tasks, train, ctx.client.tracking_uri, run_id, stage.threads)
            running[ref] = (label, run_id)
        done, _ = ray.wait(list(running), num_returns=1)
        label, run_id = running.pop(done[0])
        try:
            figures = ray.get(done[0])
        except Exception as err:  # one cell's failure is reported by label; the others go on
            failed.append(f"{label} ({one_line(err)})")
            ctx.client.set_terminated(run_id, status="FAILED")
            ctx.state.record(name, label, status="FAILED", error=one_line(err))
            ctx.progress(f"{name}: {label} FAILED: {one_line(err)}")
            continue
        ctx.client.set_terminated(run_id, status="FINISHED")
        ctx.state.record(name, label, status="FINISHED", metrics=figures)
        results[label] = figures
        acc = ", ".join(f"{figures[f'mqar/p{n}/accuracy']:.3f} at {n}" for n in stage.pairs)
        ctx.progress(f"{name}: {label}: accuracy {acc} pairs (chance {figures['mqar/chance']:.3f}, "
                     f"{figures['mqar/seconds']:.0f} s)")
    ctx.client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
    if failed:
        raise StageFailed(f"stage {name}: cells failed: {'; '.join(failed)}; continue with --resume")
    accuracy = {(label, n): figures[f"mqar/p{n}/accuracy"] for label, figures in results.items() for n in stage.pairs}
    return StageResult(name, outputs={"accuracy": accuracy})


register_stage("mqar", MQARStage, run)
