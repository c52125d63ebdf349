"""The build plan: how many copies of each document (mixture) and which partition it goes to.

Computed once on the driver from per-document metadata (source, split, key, target tokens, score),
then applied in Ray tasks by the same vectorized functions, so the summary and
``documents.parquet`` describe exactly what was packed.

Mixture. Weights are shares of *target tokens* in the training split. With natural training tokens
T_i and normalized weights w_i, ``subsample`` takes total = min_i T_i / w_i (the scarcest source is
used once, the others sampled down), ``upsample`` takes total = max_i T_i / w_i (nothing is left
out; small sources repeat). Source i then needs r_i = w_i * total / T_i times its tokens: every
document gets floor(r_i) copies, plus one more for the documents first in a seeded random order
(their ``key``) until the fractional remainder of tokens is met (to within one document). The
validation split gets the same rates capped at 1 (no repeated documents in evaluation), so with
``subsample`` it follows the requested mixture too. A single source is used as is.

Partitions. ``random``: a seeded hash of the text; ``topic``: TF-IDF + k-means cluster
(:mod:`slmlab.data.topics`); ``curriculum``: documents ordered by score (target tokens, or the
source's ``score_field``), ties broken by key, cut into ``num_partitions`` runs of equal training
tokens; partition 0 is the easiest. Validation documents use the same thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from slmlab.data.sources import TRAIN, VAL


@dataclass
class Plan:
    num_sources: int
    whole: np.ndarray  # [2, S] int: copies every document of (split, source) gets
    thr: np.ndarray  # [2, S] float: one more copy where key < thr
    method: str | None = None
    num_partitions: int = 1
    score: str = "length"
    cut_score: np.ndarray = field(default_factory=lambda: np.zeros(0))  # curriculum thresholds (score, key)
    cut_key: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def copies(self, source: np.ndarray, split: np.ndarray, key: np.ndarray) -> np.ndarray:
        source = np.asarray(source, dtype=np.int64)
        split = np.asarray(split, dtype=np.int64)
        return (self.whole[split, source] + (np.asarray(key) < self.thr[split, source])).astype(np.int64)

    def partition(self, cols: dict) -> np.ndarray:
        n = len(cols["key"])
        if self.method is None:
            return np.zeros(n, np.int32)
        if self.method == "random":
            return np.minimum(
                (np.asarray(cols["u"]) * self.num_partitions).astype(np.int64), self.num_partitions - 1
            ).astype(np.int32)
        if self.method == "topic":
            return np.asarray(cols["topic"], dtype=np.int32)
        score = _score(cols, self.score)
        key = np.asarray(cols["key"])
        # partition = number of thresholds at or below (score, key), compared lexicographically
        above = (score[:, None] > self.cut_score[None, :]) | (
            (score[:, None] == self.cut_score[None, :]) & (key[:, None] >= self.cut_key[None, :])
        )
        return above.sum(axis=1).astype(np.int32)


def _score(cols: dict, score: str) -> np.ndarray:
    return np.asarray(cols["ntok"] if score == "length" else cols["score"], dtype=np.float64)


def _fraction_threshold(keys: np.ndarray, ntok: np.ndarray, want: float) -> float:
    """Key threshold so that docs with key < thr carry as close to ``want`` tokens as possible."""
    if want <= 0 or len(keys) == 0:
        return 0.0
    order = np.argsort(keys, kind="stable")
    cum = np.cumsum(ntok[order])
    m = int(np.searchsorted(cum, want, side="left"))  # cum[m] >= want
    if m >= len(cum):
        return 2.0
    below = cum[m - 1] if m > 0 else 0
    count = m + 1 if (cum[m] - want) <= (want - below) else m
    return float(keys[order][count]) if count < len(keys) else 2.0


def make_plan(meta: dict, weights: list[float], strategy: str, labels: list[str], partition=None) -> tuple[Plan, dict]:
    """``meta``: numpy columns source, split, key, ntok (+ u, topic, score). Returns the plan and the
    mixture report (requested vs achieved target-token shares per split)."""
    S = len(weights)
    source, split, key, ntok = (np.asarray(meta[c]) for c in ("source", "split", "key", "ntok"))
    T = np.zeros((2, S))
    np.add.at(T, (split.astype(np.int64), source.astype(np.int64)), ntok)
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    whole = np.ones((2, S), np.int64)
    thr = np.zeros((2, S))
    rates = np.ones(S)
    if S > 1:
        empty = [labels[i] for i in range(S) if T[TRAIN, i] == 0]
        if empty:
            raise ValueError(f"data.sources: expected training tokens from every source, found none from {empty}")
        per = T[TRAIN] / w
        total = per.min() if strategy == "subsample" else per.max()
        rates = w * total / T[TRAIN]
        for sp in (TRAIN, VAL):
            r = rates if sp == TRAIN else np.minimum(rates, 1.0)
            for i in range(S):
                sel = (split == sp) & (source == i)
                whole[sp, i] = int(np.floor(r[i] + 1e-9))
                frac = max(0.0, r[i] - whole[sp, i])
                thr[sp, i] = _fraction_threshold(key[sel], ntok[sel], frac * T[sp, i])
    plan = Plan(S, whole, thr)
    copies = plan.copies(source, split, key)
    achieved = np.zeros((2, S))
    np.add.at(achieved, (split.astype(np.int64), source.astype(np.int64)), ntok * copies)
    report = {
        "strategy": strategy,
        "requested": {labels[i]: float(w[i]) for i in range(S)},
        "achieved": {
            name: {labels[i]: float(achieved[sp, i] / max(1.0, achieved[sp].sum())) for i in range(S)}
            for sp, name in ((TRAIN, "train"), (VAL, "val"))
        },
        "rates": {labels[i]: float(rates[i]) for i in range(S)},
        "natural_tokens": {
            name: {labels[i]: int(T[sp, i]) for i in range(S)} for sp, name in ((TRAIN, "train"), (VAL, "val"))
        },
        "selected_tokens": {
            name: {labels[i]: int(achieved[sp, i]) for i in range(S)} for sp, name in ((TRAIN, "train"), (VAL, "val"))
        },
    }
    if partition is not None:
        plan.method, plan.num_partitions, plan.score = partition.method, partition.num_partitions, partition.score
        if partition.method == "curriculum":
            train = (split == TRAIN) & (copies > 0)
            score = _score(meta, partition.score)[train]
            k = key[train]
            order = np.lexsort((k, score))
            weight = (ntok * copies)[train][order].astype(np.float64)
            cum_before = np.cumsum(weight) - weight
            total = weight.sum()
            bucket = np.minimum(
                (partition.num_partitions * (cum_before + weight / 2) / max(total, 1.0)).astype(np.int64),
                partition.num_partitions - 1,
            )
            firsts = np.searchsorted(bucket, np.arange(1, partition.num_partitions), side="left")
            s_sorted, k_sorted = score[order], k[order]
            cut_s = np.array([s_sorted[f] if f < len(order) else np.inf for f in firsts])
            cut_k = np.array([k_sorted[f] if f < len(order) else np.inf for f in firsts])
            plan.cut_score, plan.cut_key = cut_s, cut_k
    return plan, report
