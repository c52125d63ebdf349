"""Bits per byte, loss and perplexity on hand-computed examples: the figures every comparison rests on."""
from __future__ import annotations

import math

import torch

from slmlab.evaluate import eval_metrics, evaluate_batches, split_block
from slmlab.models.base import IGNORE_INDEX, Capabilities, LanguageModel, ModelOutput


class FixedLogits(LanguageModel):
    """Predicts the same distribution at every position: p(token) = probs[token]."""

    capabilities = Capabilities(generation=False)

    def __init__(self, probs: list[float]):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probs).log())

    def forward(self, batch, *, cache=None, start_pos=0, logits_to_keep=0):
        ids = batch["input_ids"]
        return ModelOutput(logits=self.logits.expand(*ids.shape, -1).clone())


def test_bits_per_byte_by_hand():
    # vocabulary of 4: token 0 is special (0 bytes), tokens 1, 2, 3 are 1, 2 and 3 bytes long
    model = FixedLogits([0.1, 0.2, 0.3, 0.4])
    byte_lengths = torch.tensor([0, 1, 2, 3])
    block = torch.tensor([[3, 1, 2, 3, 0]])  # targets after the first token: 1, 2, 3, 0
    mask = torch.ones_like(block)
    m = evaluate_batches(model, [{"input_ids": block, "target_mask": mask}], byte_lengths, "cpu")
    nats = -(math.log(0.2) + math.log(0.3) + math.log(0.4) + math.log(0.1))
    assert m["val/targets"] == 4
    assert math.isclose(m["val/loss"], nats / 4, rel_tol=1e-6)
    assert math.isclose(m["val/ppl"], math.exp(nats / 4), rel_tol=1e-6)
    # the special token's loss counts, its bytes do not: 1 + 2 + 3 bytes
    assert math.isclose(m["val/bpb"], nats / math.log(2) / 6, rel_tol=1e-6)


def test_the_first_token_is_never_a_target_and_masked_tokens_do_not_count():
    block = torch.tensor([[5, 6, 7, 8]])
    inputs, labels = split_block(block, torch.tensor([[1, 1, 0, 1]]))
    assert inputs.tolist() == [[5, 6, 7]]
    assert labels.tolist() == [[6, IGNORE_INDEX, 8]]  # token 5 is never predicted; 7 is masked out
    model = FixedLogits([1 / 9] * 9)
    m = evaluate_batches(model, [{"input_ids": block, "target_mask": torch.tensor([[1, 1, 0, 1]])}],
                         torch.ones(9, dtype=torch.long), "cpu")
    assert m["val/targets"] == 2 and math.isclose(m["val/bpb"], math.log2(9), rel_tol=1e-6)  # uniform over 9


def test_batches_sum_before_dividing():
    """Two batches of different sizes: the figure is a ratio of sums, not a mean of ratios."""
    model = FixedLogits([0.5, 0.25, 0.25])
    byte_lengths = torch.tensor([1, 1, 4])
    a = {"input_ids": torch.tensor([[0, 0]]), "target_mask": torch.ones(1, 2)}  # 1 bit over 1 byte
    b = {"input_ids": torch.tensor([[0, 2, 2]]), "target_mask": torch.ones(1, 3)}  # 4 bits over 8 bytes
    m = evaluate_batches(model, [a, b], byte_lengths, "cpu")
    assert math.isclose(m["val/bpb"], (1 + 4) / (1 + 8), rel_tol=1e-6)


def test_family_sums_become_family_figures():
    class Counting(FixedLogits):
        def forward(self, batch, **kw):
            out = super().forward(batch, **kw)
            out.eval_sums = {"hits": torch.tensor(3.0), "count": torch.tensor(4.0)}
            return out

        def eval_metrics(self, sums):
            return {"hit_rate": sums["hits"] / sums["count"]}

    model = Counting([0.5, 0.5])
    batch = {"input_ids": torch.tensor([[0, 1]]), "target_mask": torch.ones(1, 2)}
    m = evaluate_batches(model, [batch, batch], torch.ones(2, dtype=torch.long), "cpu")
    assert m["val/hit_rate"] == 0.75
    assert eval_metrics({"nats": 0.0, "targets": 0.0, "bytes": 0.0})["val/bpb"] == 0.0


def test_shards_read_back_as_integer_arrays_in_a_process_without_ray(tmp_path):
    """Packed shards hold Ray's tensor extension type; a script that never imports ray (an offline
    re-assembly, a notebook) still gets (rows, seq) integer arrays, not object arrays of rows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    ids = np.arange(3 * 5, dtype=np.int32).reshape(3, 5)
    pq.write_table(pa.table({"input_ids": ArrowTensorArray.from_numpy(ids)}), tmp_path / "part.parquet")
    code = ("import sys; from slmlab.evaluate import read_blocks; b = next(read_blocks(sys.argv[1], 2)); "
            "assert 'ray' not in sys.modules; "
            "print(b['input_ids'].dtype, b['input_ids'].shape, b['input_ids'].tolist())")
    src = str(Path(__file__).resolve().parents[1] / "platform")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.stdout.split(" ", 2)[:2] == ["int32", "(2,"] and "[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]" in out.stdout
