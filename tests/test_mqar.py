"""MQAR probe: deterministic by seed, well-formed, solvable (a lookup oracle scores 100%), chance
for an untrained model, learnable by a tiny transformer; the stage's config and cells."""
from __future__ import annotations

import pytest
import torch

from slmlab.models.base import IGNORE_INDEX, Capabilities, LanguageModel, ModelOutput
from slmlab.models.vectorslm import VectorSLMConfig
from slmlab.probes.mqar import (
    EVAL_STREAM,
    N_RESERVED,
    TRAIN_STREAM,
    MQARTask,
    ProbeTrain,
    accuracy,
    generate,
    train_cell,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Tiny models gain nothing from intra-op threads and only contend with other jobs."""


class LookupOracle(LanguageModel):
    """Copies the answer: at every position, the token that followed the latest earlier occurrence
    of the current token (an induction head written by hand). Scores 100% iff the probe is solvable
    from the sequence alone."""

    capabilities = Capabilities()

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, batch, *, cache=None, start_pos=0, logits_to_keep=0) -> ModelOutput:
        ids = batch["input_ids"]
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            after: dict[int, int] = {}
            for t in range(T):
                tok = int(ids[b, t])
                if tok in after:
                    logits[b, t, after[tok]] = 1.0
                if t + 1 < T:
                    after[tok] = int(ids[b, t + 1])
        return ModelOutput(logits=logits)


def test_generator_is_deterministic_by_seed_and_stream():
    task = MQARTask(16)
    a, b = generate(task, 8, seed=3), generate(task, 8, seed=3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], generate(task, 8, seed=4)["input_ids"])
    assert not torch.equal(a["input_ids"], generate(task, 8, seed=3, stream=EVAL_STREAM)["input_ids"])
    assert not torch.equal(a["input_ids"], generate(task, 8, seed=3, stream=TRAIN_STREAM, index=1)["input_ids"])


def test_sequences_are_well_formed():
    task = MQARTask(8, num_queries=5, key_vocab=20, value_vocab=30)
    batch = generate(task, 64, seed=0)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (64, task.seq_len) == (64, 1 + 16 + 5)
    keys, values = ids[:, 1:17:2], ids[:, 2:17:2]
    # disjoint id ranges, none of them a special token
    assert keys.min() >= N_RESERVED and keys.max() < task.first_value
    assert values.min() >= task.first_value and values.max() < task.vocab_size
    for row_k, row_v in zip(keys, values):
        assert len(set(row_k.tolist())) == 8 and len(set(row_v.tolist())) == 8  # distinct within a sequence
    # targets only at the queries, each the value that followed that key earlier
    answer = labels != IGNORE_INDEX
    assert answer[:, :17].sum() == 0 and answer[:, 17:].all()
    for b in range(64):
        table = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert [table[k] for k in ids[b, 17:].tolist()] == labels[b, 17:].tolist()
        assert len(set(ids[b, 17:].tolist())) == 5  # each key asked at most once
    # the answers are never in the input after the pairs (no elimination shortcut)
    assert not torch.isin(ids[:, 17:], values).any()


def test_bad_task_is_one_clear_line():
    with pytest.raises(ValueError, match=r"num_pairs: expected 1\.\.16 .*found 20"):
        MQARTask(20, key_vocab=16, value_vocab=64)
    with pytest.raises(ValueError, match="num_queries: expected 1..num_pairs=4, found 5"):
        MQARTask(4, num_queries=5)


@pytest.mark.parametrize("pairs", [4, 64])
def test_copy_oracle_solves_the_probe(pairs):
    task = MQARTask(pairs)
    assert accuracy(LookupOracle(task.vocab_size), generate(task, 16, seed=1)) == 1.0


def test_untrained_model_is_near_chance():
    task = MQARTask(4, key_vocab=64, value_vocab=64)
    torch.manual_seed(0)
    from slmlab.models.base import build_model

    model = build_model(VectorSLMConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=2,
                                        vocab_size=task.vocab_size, max_seq_len=task.seq_len))
    assert accuracy(model, generate(task, 256, seed=0, stream=EVAL_STREAM)) < 3 / task.value_vocab


def test_tiny_transformer_learns_above_chance():
    """300 steps take a 34k-parameter transformer well above chance (1/16). Full recall (past the
    1/4 of guessing among the values present) takes a few hundred steps more at twice the width;
    the stage's cells measure that."""
    task = MQARTask(4, key_vocab=16, value_vocab=16)
    model = VectorSLMConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=task.seq_len)
    figures = train_cell(model, [task], ProbeTrain(steps=300, batch_size=32, lr=3e-3, warmup=30, eval_sequences=256))
    assert figures["mqar/chance"] == 1 / 16
    assert figures["mqar/p4/accuracy"] > 3 * figures["mqar/chance"]
    assert figures["mqar/train_loss"] < 2.0  # from ~ln(vocab) = 5.0 at initialisation


def test_stage_cells_and_config_errors():
    from pydantic import ValidationError

    from slmlab.stages.mqar import MQARStage, cells

    transformer = {"family": "vectorslm", "dim": 32, "n_heads": 2, "n_kv_heads": 2}
    stage = MQARStage.model_validate({
        "kind": "mqar", "pairs": [4, 16], "context_dims": [16, 176],
        "models": [{"name": "new_llm", "model": {"family": "new_llm", "dim": 32, "context_dim": 176}},
                   {"name": "transformer", "model": transformer}]})
    # each model as configured, then the extra width (176 is already the base)
    assert [(c.label, c.base) for c in cells(stage)] == [
        ("new_llm", True), ("transformer", True), ("new_llm-c16", False)]
    assert [c.model.context_dim for c in cells(stage) if c.model.family == "new_llm"] == [176, 16]
    with pytest.raises(ValidationError, match="num_pairs: expected 1..128"):
        MQARStage.model_validate({"kind": "mqar", "pairs": [256], "models": stage.model_dump()["models"]})
