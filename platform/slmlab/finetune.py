"""Instruction fine-tuning stage: pretrained weights + chat data with the loss on answers only.

The stage is its own MLflow run (tag ``slmlab.stage=finetune``) linked to the pretraining run
(``slmlab.parent_run_id`` and ``mlflow.parentRunId``), trained from the pretraining run's
registered model version, and registered as its own model (``<pipeline>-sft`` by default).
"""
from __future__ import annotations

from slmlab.config import PipelineConfig


def finetune_config(cfg: PipelineConfig) -> PipelineConfig:
    """The pretraining pipeline with the fine-tuning data and train overrides swapped in."""
    assert cfg.finetune is not None
    return cfg.model_copy(update={"name": f"{cfg.name}-sft", "data": cfg.finetune.data, "train": cfg.finetune_train(),
                                  "compare": [], "finetune": None})


def run_finetune(cfg: PipelineConfig, pretrained, pretrain_shards, client, progress=print):
    from slmlab.data.shards import build_shards
    from slmlab.pipeline import train_stage
    from slmlab.tracking import resolve_model_dir

    ft = finetune_config(cfg)
    shards = build_shards(ft, progress=progress, tokenizer_path=pretrain_shards.tokenizer_path)
    if shards.summary["vocab_size"] != cfg.model.vocab_size:
        raise ValueError(f"finetune.data: expected the pretrained tokenizer's vocabulary ({cfg.model.vocab_size}), found {shards.summary['vocab_size']}")
    register_as = cfg.finetune.register_as or f"{cfg.registered_model_name}-sft"
    base_uri = f"models:/{cfg.registered_model_name}/{pretrained.model_version}"
    base_dir = resolve_model_dir(base_uri, cfg.run_dir)  # the registered version, not a local leftover
    progress(f"finetune: from {base_uri} on {shards.summary['train']['tokens']:,} answer-masked tokens")
    return train_stage(ft, shards, client, label=f"{cfg.label}-sft", register_as=register_as, init_from=base_dir,
                       tags={"slmlab.stage": "finetune", "slmlab.parent_run_id": pretrained.mlflow_run_id,
                             "mlflow.parentRunId": pretrained.mlflow_run_id,
                             "slmlab.base_model": base_uri},
                       progress=progress)
