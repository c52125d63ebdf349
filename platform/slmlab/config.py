"""Typed pipeline configuration, validated once at load time.

A pipeline YAML is parsed into :class:`PipelineConfig`. Everything downstream (Ray Data, Ray
Train, evaluation, MLflow) receives these typed objects, never raw dicts, so a typo or an
impossible combination fails here — before Ray starts — with one line per problem naming the
file, the field path, what was expected and what was found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator

from slmlab.data.config import DataConfig, SourceConfig, Strict, TokenizerConfig  # noqa: F401
from slmlab.errors import SlmlabError
from slmlab.models import FAMILIES
from slmlab.stages import STAGES, StageConfig


class ConfigError(SlmlabError, ValueError):
    """A pipeline file that cannot run; ``str(err)`` is one line per problem."""


class TrainConfig(Strict):
    num_workers: int = Field(1, ge=1)  # Ray Train workers (data parallel)
    use_gpu: bool = False  # one GPU per worker when true
    cpus_per_worker: float = Field(1.0, gt=0)  # leave CPU for Ray Data's readers on small machines
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads per worker (None = cpus_per_worker rounded up)
    micro_batch_size: int = Field(16, ge=1)  # sequences per worker per forward pass
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    max_steps: int = Field(300, ge=1)  # optimizer steps; sets the cosine schedule's length
    stop_at_step: int | None = Field(None, ge=1)  # end this invocation early (time-sliced jobs); `--resume` continues
    lr: float = Field(3e-3, gt=0)  # peak learning rate after warmup
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine floor as a fraction of lr
    warmup_steps: int = Field(30, ge=0)  # linear warmup avoids early Adam blow-ups
    weight_decay: float = Field(0.1, ge=0)  # applied to matrices only, not norms/biases
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas; 0.95 is the LLM-standard second moment
    grad_clip: float = Field(1.0, ge=0)  # global-norm clipping (0 disables)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16 on modern CPUs/GPUs; fp32 is the exact reference
    zero_stage: Literal[0, 1, 2, 3] = 0  # DeepSpeed ZeRO stage; all run on CPU with gloo
    offload_optimizer: bool = False  # ZeRO-Offload optimizer states to CPU (needs zero_stage >= 1)
    optimizer: Literal["adamw", "cpu_adam"] = (
        "adamw"  # cpu_adam: DeepSpeed's vectorised CPU Adam (JIT-built once, ~70 s), the usual partner of offload
    )
    eval_every: int = Field(50, ge=1)  # steps between validation passes
    eval_batches: int | None = Field(None, ge=1)  # cap on validation micro-batches per pass (None = whole split)
    checkpoint_every: int = Field(100, ge=1)  # steps between resumable checkpoints
    keep_checkpoints: int = Field(2, ge=1)  # older ones are deleted by Ray
    log_every: int = Field(1, ge=1)  # steps between training-metric logs
    # torch.compile the model (inductor; CPU needs a C++ compiler): fuses norms, rotary and activations into
    # fewer kernels; the first steps pay the compile (benchmarks/bench_vectorslm_vs_hf.py: ratio, compile time)
    compile: bool = False
    max_failures: int = Field(0, ge=-1)  # Ray restarts from the last checkpoint this many times (-1 = forever)
    # name prefixes of the parameters that learn (None = all): a frozen trunk, router-only calibration
    trainable: list[str] | None = None
    # learning-rate multipliers by parameter-name prefix (the longest matching prefix wins; the rest get 1):
    # a from-scratch ViT that Adam moves at the decoder's full lr scrambles its patch tokens before the
    # decoder has learnt to look them up (README: where binding fails, {vit.blocks: 0.1})
    lr_scale: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    # tokens per optimizer step held fixed across runs that vary data.seq_len (context sweeps): the
    # micro-batch is derived as tokens_per_step / (seq_len * grad_accum_steps * num_workers)
    tokens_per_step: int | None = Field(None, ge=1)


class EvalConfig(Strict):
    prompts: list[str] = Field(default_factory=lambda: ["The ", "A module that", "Return the"])  # samples logged
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.8, ge=0)  # 0 = greedy
    top_k: int | None = Field(50, ge=1)
    quantize_int8: bool = False  # also measure the post-training INT8 model: size and val bits per byte before/after


class TrackingConfig(Strict):
    experiment: str | None = None  # MLflow experiment (default: pipeline name)
    register_as: str | None = None  # registered model name (default: pipeline name)
    label: str | None = None  # the main model's label in comparisons (default: its family)


def _model_union():
    classes = tuple(f.config_cls for f in FAMILIES.values())
    return Annotated[Union[classes], Field(discriminator="family")]  # type: ignore[valid-type]


class FinetuneConfig(Strict):
    """Instruction fine-tuning after pretraining: starts from the main model's registered weights,
    reuses its tokenizer, and computes the loss on assistant answers only."""

    data: DataConfig  # instruction sources (format: chat); the pretrained tokenizer is reused, never retrained
    train: dict[str, Any] = Field(
        default_factory=dict
    )  # overrides of the pretraining `train` section (lr, max_steps, ...)
    register_as: str | None = None  # registered model name (default: <pipeline>-sft)


class VariantConfig(Strict):
    """Another model trained on the same shards, tokenizer and token budget as the main one."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # label in MLflow; registered as <pipeline>-<name>
    model: _model_union()  # type: ignore[valid-type]

    @field_validator("model", mode="before")
    @classmethod
    def _known_family(cls, v: Any) -> Any:
        return _check_family(v)


def _stage_union():
    classes = tuple(k.config_cls for k in STAGES.values())
    return Annotated[Union[classes], Field(discriminator="kind")]  # type: ignore[valid-type]


def _check_family(v: Any) -> Any:
    if isinstance(v, dict) and v.get("family") not in FAMILIES:
        raise ValueError(f"expected family one of {sorted(FAMILIES)}, found {v.get('family')!r}")
    return v


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # experiment and registered-model name
    seed: int = 1234  # data split, shuffling, init and sampling all derive from it
    run_dir: str = (
        "runs"  # MLflow store, data cache and Ray storage (relative to the working directory; SLMLAB_RUN_DIR overrides)
    )
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: _model_union()  # type: ignore[valid-type]
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    compare: list[VariantConfig] = Field(default_factory=list)  # more models on the same data and budget
    finetune: FinetuneConfig | None = None  # instruction fine-tuning of the main model after pretraining
    # the ordered stages; empty = pretrain, then compare (with `compare:`), then finetune (with `finetune:`)
    stages: list[_stage_union()] = Field(default_factory=list)  # type: ignore[valid-type]

    @field_validator("run_dir")
    @classmethod
    def _absolute_run_dir(cls, v: str) -> str:
        # resolved once, where the user ran the command: Tune trials and Ray workers run elsewhere
        return str(Path(v).expanduser().resolve())

    @field_validator("model", mode="before")
    @classmethod
    def _known_family(cls, v: Any) -> Any:
        return _check_family(v)

    @field_validator("stages", mode="before")
    @classmethod
    def _known_stage(cls, v: Any) -> Any:
        for item in v if isinstance(v, list) else []:
            if isinstance(item, dict) and item.get("kind") not in STAGES:
                raise ValueError(f"expected stage kinds from {sorted(STAGES)}, found {item.get('kind')!r}")
        return v

    def stage_list(self) -> list[StageConfig]:
        """The stages this pipeline runs, in order (the default list when none are given)."""
        if self.stages:
            return list(self.stages)
        kinds = ["pretrain"] + (["compare"] if self.compare else []) + (["finetune"] if self.finetune else [])
        return [STAGES[k].config_cls() for k in kinds]

    def finetune_train(self) -> TrainConfig:
        assert self.finetune is not None
        return TrainConfig.model_validate({**self.train.model_dump(), **self.finetune.train})

    @property
    def label(self) -> str:
        return self.tracking.label or self.model.family

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model_name(self) -> str:
        return self.tracking.register_as or self.name


# ---------------------------------------------------------------------------------------------
# Loading


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"{source}: {dotted}: expected a mapping at {k!r}, found {type(node[k]).__name__}")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected dotted.key=value, found no '='")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _describe(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # a discriminated union adds the family tag to the path; the user never wrote it
        if len(loc) >= 2 and loc[0] == "model" and loc[1] in FAMILIES:
            del loc[1]
        path = ".".join(loc) or "<root>"
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {path}: expected no such field (unknown key), found {_describe(e['input'])}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {path}: expected a value (required field), found nothing")
        elif "expected" in msg:
            lines.append(f"{source}: {path}: {msg}")
        else:
            lines.append(f"{source}: {path}: expected {msg[0].lower() + msg[1:]}, found {_describe(e.get('input'))}")
    return "\n".join(lines)


def _cross_checks(cfg: PipelineConfig, source: str) -> None:
    """Constraints that span sections (pydantic locates these at the root otherwise)."""
    problems = []
    if cfg.data.seq_len > cfg.model.max_seq_len:
        problems.append(
            f"{source}: data.seq_len: expected at most "
            f"model.max_seq_len={cfg.model.max_seq_len}, found {cfg.data.seq_len}"
        )
    if cfg.train.stop_at_step is not None and cfg.train.stop_at_step > cfg.train.max_steps:
        problems.append(
            f"{source}: train.stop_at_step: expected at most "
            f"train.max_steps={cfg.train.max_steps}, found {cfg.train.stop_at_step}"
        )
    for i, variant in enumerate(cfg.compare):
        if cfg.data.seq_len > variant.model.max_seq_len:
            problems.append(
                f"{source}: compare.{i}.model.max_seq_len: expected at least "
                f"data.seq_len={cfg.data.seq_len}, found {variant.model.max_seq_len}"
            )
    if len({v.name for v in cfg.compare} | {cfg.label}) != len(cfg.compare) + 1:
        problems.append(
            f"{source}: compare: expected distinct names (and none equal to the "
            f"main label {cfg.label!r}), found {[v.name for v in cfg.compare]}"
        )
    if cfg.finetune is not None:
        try:
            cfg.finetune_train()
        except ValidationError as err:
            problems += [
                line.replace(f"{source}: ", f"{source}: finetune.train.", 1)
                for line in _format_errors(source, err).splitlines()
            ]
        if cfg.finetune.data.seq_len > cfg.model.max_seq_len:
            problems.append(
                f"{source}: finetune.data.seq_len: expected at most "
                f"model.max_seq_len={cfg.model.max_seq_len}, found {cfg.finetune.data.seq_len}"
            )
    names = [st.stage_name for st in cfg.stage_list()]
    if len(set(names)) != len(names):
        problems.append(f"{source}: stages: expected distinct stage names, found {names}")
    for i, st in enumerate(cfg.stages):
        for j, run in enumerate(getattr(st, "runs", None) or []):
            if getattr(run, "partition", None) is not None and cfg.data.partition is None:
                problems.append(
                    f"{source}: stages.{i}.runs.{j}.partition: expected data.partition to be set, found none"
                )
            if getattr(run, "set", None):
                try:
                    validate_pipeline(
                        apply_overrides({**cfg.model_dump(mode="json"), "stages": []}, run.set),
                        f"{source} (stages.{i}.runs.{j}.set)",
                    )
                except ConfigError as err:
                    problems.append(str(err))
    tps = cfg.train.tokens_per_step
    if tps is not None:
        per_micro = cfg.data.seq_len * cfg.train.grad_accum_steps * cfg.train.num_workers
        if tps % per_micro:
            problems.append(
                f"{source}: train.tokens_per_step: expected a multiple of data.seq_len x grad_accum_steps x "
                f"num_workers = {per_micro}, found {tps}"
            )
    if cfg.train.offload_optimizer and cfg.train.zero_stage == 0:
        problems.append(
            f"{source}: train.offload_optimizer: expected zero_stage "
            ">= 1 to offload optimizer states, found zero_stage=0"
        )
    if problems:
        raise ConfigError("\n".join(problems))


def validate_pipeline(raw: dict, source: str = "<config>") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of sections, found {type(raw).__name__}")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
    _cross_checks(cfg, source)
    tps = cfg.train.tokens_per_step
    if tps is not None:  # equal tokens per step whatever the context length: the batch follows seq_len
        per_micro = cfg.data.seq_len * cfg.train.grad_accum_steps * cfg.train.num_workers
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": tps // per_micro})})
    return cfg


def apply_overrides(base: dict, overrides: dict[str, Any], source: str = "overrides") -> dict:
    """A copy of a raw pipeline tree with dotted-path overrides applied ({"train.lr": 0.01})."""
    import copy

    tree = copy.deepcopy(base)
    for dotted, value in overrides.items():
        _set_dotted(tree, dotted, value, source)
    return tree


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    path = Path(path)
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: <file>: expected a pipeline YAML file, found no such file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise ConfigError(f"{source}: {where}: expected valid YAML, found {getattr(err, 'problem', err)}") from None
    raw = raw if raw is not None else {}
    if os.environ.get("SLMLAB_RUN_DIR") and isinstance(raw, dict):
        raw["run_dir"] = os.environ["SLMLAB_RUN_DIR"]  # e.g. shared storage for every job of a cluster
    for item in overrides:
        key, value = parse_override(item)
        if isinstance(raw, dict):
            _set_dotted(raw, key, value, f"{source} (--set {item})")
    return validate_pipeline(raw, source)
