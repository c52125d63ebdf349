"""Stages: independent runs in parallel under one MLflow parent, failures isolated, resume trains
only what did not finish; a text-only family added by one file and one registry line."""

from __future__ import annotations

import mlflow
import pytest
import torch
from pydantic import Field

from slmlab.config import ConfigError, validate_pipeline
from tests.conftest import tiny_pipeline_dict


def four_runs(tmp_path, broken: bool):
    runs = [{"name": f"r{i}", "set": {"train.lr": 0.01 + 0.005 * i}} for i in range(4)]
    if broken:  # statically valid, fails inside its run: no parameter has that name
        runs[2]["set"]["train.trainable"] = ["no_such_parameter."]
    return tiny_pipeline_dict(tmp_path, name="four", stages=[{"kind": "independent", "name": "many", "runs": runs}])


def test_stage_configs_are_typed_and_checked(tmp_path):
    raw = tiny_pipeline_dict(tmp_path, stages=[{"kind": "nope"}])
    with pytest.raises(ConfigError, match=r"stages: expected stage kinds from \[.*'independent'.*\], found 'nope'"):
        validate_pipeline(raw, "p.yaml")
    raw = four_runs(tmp_path, broken=False)
    raw["stages"][0]["runs"][1]["set"] = {"model.n_heads": 3}
    with pytest.raises(ConfigError, match=r"stages.0.runs.1.set.*model.n_heads: expected a divisor of dim=32"):
        validate_pipeline(raw, "p.yaml")
    raw = four_runs(tmp_path, broken=False)
    raw["stages"][0]["runs"][0]["partition"] = 1
    with pytest.raises(ConfigError, match=r"stages.0.runs.0.partition: expected data.partition to be set"):
        validate_pipeline(raw, "p.yaml")
    assert [s.stage_name for s in validate_pipeline(tiny_pipeline_dict(tmp_path)).stage_list()] == ["pretrain"]


def test_tokens_per_step_derives_the_batch_from_the_context(tmp_path):
    for seq_len, mb in ((16, 8), (32, 4), (64, 2)):
        cfg = validate_pipeline(tiny_pipeline_dict(tmp_path, data__seq_len=seq_len, train__tokens_per_step=128))
        assert cfg.train.micro_batch_size == mb
    with pytest.raises(ConfigError, match="train.tokens_per_step: expected a multiple of"):
        validate_pipeline(tiny_pipeline_dict(tmp_path, train__tokens_per_step=100))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~4 min alone on a quiet machine: 4 runs 2 at a time, then the resume
def test_independent_runs_overlap_fail_alone_and_resume(ray_local, tmp_path):
    from slmlab.pipeline import run_stages
    from slmlab.stages import StageFailed

    cfg = validate_pipeline(four_runs(tmp_path, broken=True))
    with pytest.raises(StageFailed, match=r"run r2 failed \(.*no_such_parameter.*\); 3 other run\(s\) finished"):
        run_stages(cfg, progress=lambda m: None)

    client = mlflow.tracking.MlflowClient(f"sqlite:///{cfg.run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("four").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("slmlab.role") == "stage-parent"]
    children = {
        r.data.tags["slmlab.variant"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert sorted(children) == ["r0", "r1", "r2", "r3"]
    assert {k: c.info.status for k, c in children.items()} == {
        "r0": "FINISHED",
        "r1": "FINISHED",
        "r2": "FAILED",
        "r3": "FINISHED",
    }
    assert parent.info.status == "FAILED"
    for name in ("r0", "r1", "r3"):
        assert [str(v.version) for v in client.search_model_versions(f"name='four-{name}'")] == ["1"]
    # at least two runs trained at the same time (2 CPUs, 0.5 CPU per run: the cluster holds 4)
    spans = sorted((c.info.start_time, c.info.end_time) for c in children.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans

    fixed = validate_pipeline(four_runs(tmp_path, broken=False))
    results = run_stages(fixed, resume="latest", progress=lambda m: None)
    after = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("four").experiment_id])}
    assert set(after) == {r.info.run_id for r in runs}  # the broken run continued its own MLflow run
    assert {k: r.status for k, r in results["many"].runs.items()} == dict.fromkeys(["r0", "r1", "r2", "r3"], "FINISHED")
    for name in ("r0", "r1", "r3"):  # finished runs were not trained again
        assert after[children[name].info.run_id].info.end_time == children[name].info.end_time
    assert after[children["r2"].info.run_id].info.status == "FINISHED"
    assert [str(v.version) for v in client.search_model_versions("name='four-r2'")] == ["1"]
    assert after[parent.info.run_id].info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# A new text-only family is one model class plus one registry line: nothing else changes.


def _register_bigram():
    from typing import Literal

    from slmlab.models import FAMILIES
    from slmlab.models.base import (
        Capabilities,
        FamilyConfig,
        LanguageModel,
        ModelOutput,
        lm_cross_entropy,
        register_family,
    )

    class BigramConfig(FamilyConfig):
        family: Literal["bigram_test"] = "bigram_test"
        scale: float = Field(1.0, gt=0)  # logit temperature, to show a typed field travels

    class Bigram(LanguageModel):
        capabilities = Capabilities(generation=False)

        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.table = torch.nn.Embedding(cfg.vocab_size, cfg.vocab_size)

        def forward(self, batch, *, cache=None, start_pos=0, logits_to_keep=0):
            logits = self.table(batch["input_ids"]) * self.cfg.scale
            out = ModelOutput(logits=logits)
            if batch.get("labels") is not None:
                out.loss = out.lm_loss = lm_cross_entropy(logits, batch["labels"])
                out.eval_sums = {"argmax_hits": (logits.argmax(-1) == batch["labels"]).sum()}
            return out

        def eval_metrics(self, sums):
            return {"argmax_hits": sums["argmax_hits"]}

    if "bigram_test" not in FAMILIES:
        register_family("bigram_test", BigramConfig, Bigram)
    return BigramConfig, Bigram


def test_a_test_only_family_trains_with_the_generic_loop_and_eval(tmp_path):
    """The family above goes through the same evaluation the loop uses, its own metric included."""
    from slmlab.evaluate import evaluate_batches

    config_cls, model_cls = _register_bigram()
    model = model_cls(config_cls(vocab_size=11))
    blocks = torch.randint(0, 11, (6, 9))
    raw = [
        {"input_ids": blocks[:3], "target_mask": torch.ones(3, 9, dtype=torch.int8)},
        {"input_ids": blocks[3:], "target_mask": torch.ones(3, 9, dtype=torch.int8)},
    ]
    metrics = evaluate_batches(model, raw, torch.ones(11, dtype=torch.long), "cpu")
    assert metrics["val/targets"] == 6 * 8 and metrics["val/bpb"] > 0
    assert metrics["val/argmax_hits"] == float(
        (model({"input_ids": blocks[:, :-1]}).logits.argmax(-1) == blocks[:, 1:]).sum()
    )
