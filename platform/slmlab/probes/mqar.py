"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023): can a model look a key up?

One sequence, ids in a vocabulary of its own (the probe trains its models from scratch)::

    BOS  k1 v1  k2 v2 ... kN vN   q1 q2 ... qQ

Keys and values are drawn without replacement from disjoint id ranges, fresh for every sequence,
so nothing can be memorised in the weights: the answer to a query q_i (one of the N keys, each
queried at most once, in random order) is the value that followed q_i earlier in *this* sequence.
The loss and the accuracy fall on the query positions only (the label at q_i is its value).
Answers are never fed back as inputs (as in Zoology, whose query region holds keys and zeros):
with every key queried once, earlier answers would let a model score by elimination (the last
query's value is the one not yet given) without recalling anything.

Zoology's finding: attention solves this at small widths (an induction head: match the key, copy
what followed it), while a fixed-size recurrent state needs room proportional to N. New-LLM's
whole memory is ``n_layers * context_dim`` numbers, so this probe asks where that runs out.

Ids 0..N_RESERVED-1 stay unused, mirroring the tokenizer's special tokens (PAD = 0, BOS = 1, ...)
so a task id never means "padding" or "end of document" to code that treats those specially.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from slmlab.data.tokenizer import SPECIAL_TOKENS
from slmlab.models.base import IGNORE_INDEX, FamilyConfig, build_model, count_parameters

N_RESERVED = len(SPECIAL_TOKENS)  # ids below this are the tokenizer's specials: never a key or value
BOS_ID = SPECIAL_TOKENS.index("<|bos|>")
TRAIN_STREAM, EVAL_STREAM = 0, 1  # independent seed streams: evaluation sequences are never trained on


@dataclass(frozen=True)
class MQARTask:
    num_pairs: int  # N key-value pairs per sequence: the amount the model must hold at once
    num_queries: int | None = None  # keys asked back (None = all N): answer positions per sequence
    key_vocab: int = 128  # distinct key ids; > N so which keys appear varies between sequences
    value_vocab: int = 128  # distinct value ids; chance accuracy is 1 / value_vocab

    def __post_init__(self) -> None:
        if not 1 <= self.num_pairs <= min(self.key_vocab, self.value_vocab):
            raise ValueError(f"num_pairs: expected 1..{min(self.key_vocab, self.value_vocab)} (distinct keys and "
                             f"values per sequence), found {self.num_pairs}")
        if self.num_queries is not None and not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(f"num_queries: expected 1..num_pairs={self.num_pairs}, found {self.num_queries}")

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def seq_len(self) -> int:
        return 1 + 2 * self.num_pairs + self.queries

    @property
    def vocab_size(self) -> int:
        return N_RESERVED + self.key_vocab + self.value_vocab

    @property
    def first_value(self) -> int:
        return N_RESERVED + self.key_vocab


def generate(task: MQARTask, n: int, seed: int, stream: int = TRAIN_STREAM, index: int = 0) -> dict[str, torch.Tensor]:
    """``n`` sequences as a model batch: ``input_ids`` and aligned ``labels`` (IGNORE_INDEX except at
    the queries), both (n, task.seq_len) int64. The same (task, n, seed, stream, index) always gives
    the same batch; ``index`` numbers the training batches of one stream."""
    rng = np.random.default_rng([seed, stream, index])
    N, Q = task.num_pairs, task.queries
    # distinct ids per row: the first N of a random permutation of each range
    keys = N_RESERVED + np.argsort(rng.random((n, task.key_vocab)), axis=1)[:, :N]
    values = task.first_value + np.argsort(rng.random((n, task.value_vocab)), axis=1)[:, :N]
    asked = np.argsort(rng.random((n, N)), axis=1)[:, :Q]  # which pairs are queried, in query order
    q_keys, answers = np.take_along_axis(keys, asked, 1), np.take_along_axis(values, asked, 1)

    ids = np.empty((n, task.seq_len), dtype=np.int64)
    ids[:, 0] = BOS_ID
    ids[:, 1:1 + 2 * N:2], ids[:, 2:2 + 2 * N:2] = keys, values
    start = 1 + 2 * N
    ids[:, start:] = q_keys
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[:, start:] = answers  # labels[t] is the target of position t: the query's value
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


@torch.no_grad()
def accuracy(model: torch.nn.Module, batch: dict[str, torch.Tensor], batch_size: int = 256) -> float:
    """Fraction of answer positions where the argmax over the whole vocabulary is the right value."""
    was_training = model.training
    model.eval()
    hits = total = 0
    try:
        for s in range(0, batch["input_ids"].size(0), batch_size):
            ids, labels = batch["input_ids"][s:s + batch_size], batch["labels"][s:s + batch_size]
            pred = model({"input_ids": ids}).logits.argmax(-1)
            mask = labels != IGNORE_INDEX
            hits += int((pred[mask] == labels[mask]).sum())
            total += int(mask.sum())
    finally:
        model.train(was_training)
    return hits / max(1, total)


@dataclass(frozen=True)
class ProbeTrain:
    """How one probe model trains: plain AdamW on fresh sequences every step (an unbounded supply)."""

    steps: int = 2000  # optimizer steps, cycling through the pair counts
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # peak learning rate (linear warmup, cosine to 10%)
    warmup: int = 100  # warmup steps
    weight_decay: float = 0.1  # matrices only
    eval_sequences: int = 1000  # held-out sequences (EVAL_STREAM) per pair count
    eval_every: int = 0  # also measure accuracy every this many steps (0 = at the end only)
    seed: int = 1234  # data and initialisation


def _lr_at(step: int, cfg: ProbeTrain) -> float:
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _accuracies(model, tasks, cfg: ProbeTrain) -> dict[str, float]:
    return {f"mqar/p{t.num_pairs}/accuracy": accuracy(model, generate(t, cfg.eval_sequences, cfg.seed, EVAL_STREAM))
            for t in tasks}


def train_cell(model_cfg: FamilyConfig, tasks: Sequence[MQARTask], cfg: ProbeTrain, log=None) -> dict[str, float]:
    """Train ``model_cfg`` from scratch on every task in turn (step i draws from tasks[i % len]; as
    Zoology, one model learns a mixture of pair counts, and the short sequences teach the lookup
    fastest) in this process; its vocab_size and max_seq_len are set from the tasks. Returns the
    accuracy on held-out sequences per pair count (``mqar/p<N>/accuracy``), the final training
    loss, parameters, wall seconds and training tokens/s. ``log(step, metrics)`` sees progress."""
    from slmlab.train.optim import param_groups

    if len({(t.key_vocab, t.value_vocab) for t in tasks}) != 1:
        raise ValueError("tasks: expected one key/value vocabulary for all pair counts, found several")
    update = {"vocab_size": tasks[0].vocab_size, "max_seq_len": max(t.seq_len for t in tasks)}
    model_cfg = model_cfg.model_copy(update=update)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, cfg))
    model.train()
    t0, loss_ema, tokens, eval_s = time.perf_counter(), None, 0, 0.0
    for step in range(cfg.steps):
        task = tasks[step % len(tasks)]
        out = model(generate(task, cfg.batch_size, cfg.seed, TRAIN_STREAM, step))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += cfg.batch_size * task.seq_len
        loss = float(out.loss.detach())
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        if log is not None and (step + 1) % 50 == 0:
            log(step + 1, {"mqar/train_loss": loss_ema})
        if log is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            e0 = time.perf_counter()
            log(step + 1, _accuracies(model, tasks, cfg))
            model.train()
            eval_s += time.perf_counter() - e0
    seconds = time.perf_counter() - t0 - eval_s
    return {**_accuracies(model, tasks, cfg), "mqar/train_loss": float(loss_ema),
            "mqar/chance": 1.0 / tasks[0].value_vocab, "model/parameters": float(count_parameters(model)),
            "mqar/seconds": seconds, "mqar/tokens_per_s": tokens / seconds}
