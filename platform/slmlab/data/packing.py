"""Tokenize documents and pack them into fixed blocks of ``seq_len + 1`` tokens.

Text documents are packed back to back into one stream per batch, each document followed by EOS
and the stream opened by one EOS (context only)::

    EOS d1 d1 d1 EOS d2 d2 EOS d3 ...

Block j holds stream[j*seq_len : j*seq_len + seq_len + 1]: consecutive blocks share one token, so
every stream token after the first is a prediction target in exactly one block (``target_mask``
is 1 there, 0 at position 0 and on padding). Hence no token is lost or duplicated: the targets of
a split are exactly Σ(len(encode(doc)) + 1) over its documents. Only the last block of a batch is
padded (PAD, mask 0).

Which documents share a stream is decided on the driver, not by Ray's batching: each (split,
partition) is ordered by the documents' seeded keys and cut into packing groups of
``pack_batch_size`` documents (:func:`pack_cuts`); each group is packed whole, sorted by key. So the
same config and seed give the same blocks, byte for byte, however Ray schedules the work.

Chat examples (see :mod:`slmlab.data.chat`) are never split: an example starts a new block or
joins a block holding only whole examples (greedy, in order). One longer than ``seq_len + 1`` tokens
is cut to its first ``seq_len + 1`` tokens; the cut is counted (``examples_truncated``,
``targets_truncated``) and an example left without any target is dropped and counted.
"""

from __future__ import annotations

import hashlib
import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slmlab.data import chat
from slmlab.data.sources import FMT_CHAT
from slmlab.data.tokenizer import encode_text, load_tokenizer


def pack_text(
    values: np.ndarray, lengths: np.ndarray, seq_len: int, eos: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated doc ids (``values``, per-doc ``lengths``) → (input_ids, target_mask), both [B, seq_len+1]."""
    block = seq_len + 1
    if len(lengths) == 0:
        return np.zeros((0, block), np.int32), np.zeros((0, block), np.int8)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = 1 + int(lengths.sum()) + len(lengths)
    stream = np.empty(total, dtype=np.int32)
    eos_pos = np.cumsum(lengths + 1)  # the EOS after each doc (position 0 is the opening EOS)
    is_doc = np.ones(total, dtype=bool)
    is_doc[0] = False
    is_doc[eos_pos] = False
    stream[~is_doc] = eos
    stream[is_doc] = values
    n_blocks = -(-(total - 1) // seq_len)
    idx = np.arange(n_blocks, dtype=np.int64)[:, None] * seq_len + np.arange(block, dtype=np.int64)[None, :]
    valid = idx < total
    ids = np.where(valid, stream[np.minimum(idx, total - 1)], pad).astype(np.int32)
    mask = valid.astype(np.int8)
    mask[:, 0] = 0
    return ids, mask


def pack_examples(
    examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """Whole examples (each at most seq_len+1 tokens, first token not a target) → blocks, greedy."""
    block = seq_len + 1
    starts, row, fill = [], 0, 0
    for ids, _ in examples:
        n = len(ids)
        assert n <= block, "examples are truncated before packing"
        if fill + n > block:
            row, fill = row + 1, 0
        starts.append((row, fill))
        fill += n
    n_rows = row + 1 if examples else 0
    out_ids = np.full((n_rows, block), pad, dtype=np.int32)
    out_mask = np.zeros((n_rows, block), dtype=np.int8)
    for (r, f), (ids, mask) in zip(starts, examples):
        out_ids[r, f : f + len(ids)] = ids
        out_mask[r, f : f + len(ids)] = mask
    out_mask[:, 0] = 0
    return out_ids, out_mask


def truncate_example(ids: np.ndarray, mask: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut an example to ``limit`` tokens; returns the targets lost."""
    if len(ids) <= limit:
        return ids, mask, 0
    return ids[:limit], mask[:limit], int(mask[limit:].sum())


def _list_array(arrays: list[np.ndarray], dtype) -> pa.Array:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class TokenizeDocs:
    """Ray Data actor: one tokenizer (and topic model) per actor, loaded once.

    In: DOC_SCHEMA rows (usable documents). Out: the same minus ``text``, plus ``ids`` (list<int32>),
    ``tmask`` (list<int8>, chat only: text documents are all targets), ``ntok`` (prediction targets
    the document contributes: len(ids) + 1 EOS for text, the masked tokens for chat, after
    truncation), ``truncated`` (0/1), ``lost`` (targets cut off) and ``topic`` (-1 unless topic
    partitioning)."""

    def __init__(self, tokenizer_path: str, seq_len: int, topic_model=None):
        self.tok = load_tokenizer(tokenizer_path)
        self.limit = seq_len + 1
        self.topic_model = topic_model

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        fmt = batch.column("fmt").to_numpy()
        n = len(texts)
        ids: list[np.ndarray] = [None] * n  # type: ignore[list-item]
        masks: list[np.ndarray] = [np.zeros(0, np.int8)] * n
        ntok = np.zeros(n, np.int64)
        truncated = np.zeros(n, np.int8)
        lost = np.zeros(n, np.int64)
        plain = [i for i in range(n) if fmt[i] != FMT_CHAT]
        chats_at = [i for i in range(n) if fmt[i] == FMT_CHAT]
        ids_array = None
        if plain:
            id_lists = encode_text(self.tok, [texts[i] for i in plain])
            lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
            ntok[plain] = lengths + 1
            if not chats_at:  # all text (the common case): one flat array, no per-document arrays
                offsets = np.zeros(n + 1, dtype=np.int32)
                np.cumsum(lengths, out=offsets[1:])
                values = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(offsets[-1]))
                ids_array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            else:
                for i, lst in zip(plain, id_lists):
                    ids[i] = np.asarray(lst, dtype=np.int32)
        topic_texts = texts
        if chats_at:
            chats = [chat.loads(texts[i]) for i in chats_at]
            for i, (e_ids, e_mask) in zip(chats_at, chat.encode_chats(self.tok, chats)):
                truncated[i] = len(e_ids) > self.limit
                e_ids, e_mask, lost[i] = truncate_example(e_ids, e_mask, self.limit)
                ids[i], masks[i] = e_ids, e_mask
                ntok[i] = int(e_mask.sum())
            if self.topic_model is not None:
                topic_texts = list(texts)
                for i, messages in zip(chats_at, chats):
                    topic_texts[i] = "\n".join(c for _, c in messages)
        topic = self.topic_model.predict(topic_texts) if self.topic_model is not None else np.full(n, -1, np.int32)
        out = batch.drop_columns(["text", "bad", "where"])
        for name, arr in (
            ("ids", ids_array if ids_array is not None else _list_array(ids, np.int32)),
            ("tmask", _list_array(masks, np.int8)),
            ("ntok", pa.array(ntok)),
            ("truncated", pa.array(truncated)),
            ("lost", pa.array(lost)),
            ("topic", pa.array(np.asarray(topic, dtype=np.int32))),
        ):
            out = out.append_column(name, arr)
        return out


def copy_orders(key: np.ndarray, copies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(document index, order key) of every copy. Each copy of a document gets its own place in
    the order: a golden-ratio step keeps the copies apart."""
    copies = np.asarray(copies, dtype=np.int64)
    keep = np.repeat(np.arange(len(copies)), copies)
    copy_no = np.arange(len(keep)) - np.repeat(np.cumsum(copies) - copies, copies)
    return keep, np.mod(np.asarray(key, dtype=np.float64)[keep] + copy_no * 0.6180339887498949, 1.0)


def pack_cuts(split: np.ndarray, part: np.ndarray, key: np.ndarray, copies: np.ndarray, size: int) -> dict:
    """(split, partition) -> the order keys that start its 2nd, 3rd, ... packing group of ``size`` copies."""
    keep, order = copy_orders(key, copies)
    s, p = np.asarray(split)[keep], np.asarray(part)[keep]
    cuts = {}
    for si, pi in sorted(set(zip(s.tolist(), p.tolist()))):
        cuts[(si, pi)] = np.sort(order[(s == si) & (p == pi)])[size::size]
    return cuts


def group_ids(split: np.ndarray, part: np.ndarray, order: np.ndarray, cuts: dict | None) -> np.ndarray:
    """One int64 per copy naming its packing group: split, partition and run number."""
    split, part = np.asarray(split, dtype=np.int64), np.asarray(part, dtype=np.int64)
    run = np.zeros(len(order), np.int64)
    for (si, pi), c in (cuts or {}).items():
        sel = (split == si) & (part == pi)
        run[sel] = np.searchsorted(c, order[sel], side="right")
    return ((split * 256 + part) << 32) + run


class Finalize:
    """Apply the plan: copies (mixture) and partition per document; explode copies; order key and
    packing group (``cuts`` from :func:`pack_cuts`; None: one group per split and partition)."""

    def __init__(self, plan, cuts: dict | None = None):
        self.plan, self.cuts = plan, cuts

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = ("source", "split", "key", "u", "ntok", "score", "topic")
        cols = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in names}
        copies = self.plan.copies(cols["source"], cols["split"], cols["key"])
        part = self.plan.partition(cols)
        keep, order = copy_orders(cols["key"], copies)
        out = batch.take(pa.array(keep, type=pa.int64())).select(
            ["source", "split", "fmt", "ids", "tmask", "ntok", "u"]
        )
        group = group_ids(cols["split"][keep], part[keep], order, self.cuts)
        for name, arr in (("part", part[keep].astype(np.int32)), ("order", order), ("group", group)):
            out = out.append_column(name, pa.array(arr))
        return out


def pack_group(batch: pa.Table, writer: "PackAndWrite") -> dict:
    """map_groups fn (a plain function: Ray names the stage after it)."""
    return writer(batch)


class PackAndWrite:
    """Pack one batch per (split, partition) group and write it as a parquet file
    ``<root>/<split>/[part-KKK/]<first order key>.parquet``; returns one stats row per group."""

    def __init__(self, root: str, seq_len: int, eos: int, pad: int, byte_lengths: np.ndarray, partitioned: bool):
        self.root, self.seq_len, self.eos, self.pad = root, seq_len, eos, pad
        self.byte_lengths = byte_lengths
        self.partitioned = partitioned

    def __call__(self, batch: pa.Table) -> dict:
        from ray.data.extensions import ArrowTensorArray

        order = batch.column("order").to_numpy()
        sort = np.lexsort((batch.column("u").to_numpy(), order))  # rows arrive in any order; equal keys: by text hash
        batch, order = batch.take(pa.array(sort)), order[sort]
        split = batch.column("split").to_numpy()
        part = batch.column("part").to_numpy()
        fmt = batch.column("fmt").to_numpy()
        ids_col, mask_col = batch.column("ids").combine_chunks(), batch.column("tmask").combine_chunks()
        stats = {k: [] for k in ("split", "part", "tokens", "bytes", "blocks", "pad", "documents", "file")}
        for s, p in sorted(set(zip(split.tolist(), part.tolist()))):
            rows = np.flatnonzero((split == s) & (part == p))
            blocks_ids, blocks_mask = [], []
            text_rows = rows[fmt[rows] != FMT_CHAT]
            if len(text_rows):
                sub = ids_col.take(pa.array(text_rows))
                values = sub.flatten().to_numpy()
                lengths = np.diff(sub.offsets.to_numpy()) if len(sub) else np.zeros(0, np.int64)
                b_ids, b_mask = pack_text(values, lengths, self.seq_len, self.eos, self.pad)
                blocks_ids.append(b_ids)
                blocks_mask.append(b_mask)
            chat_rows = rows[fmt[rows] == FMT_CHAT]
            if len(chat_rows):
                examples = [(ids_col[int(i)].values.to_numpy(), mask_col[int(i)].values.to_numpy()) for i in chat_rows]
                examples = [(e_ids, e_mask) for e_ids, e_mask in examples if e_mask.any()]
                b_ids, b_mask = pack_examples(examples, self.seq_len, self.pad)
                blocks_ids.append(b_ids)
                blocks_mask.append(b_mask)
            b_ids = np.concatenate(blocks_ids)
            b_mask = np.concatenate(blocks_mask)
            folder = os.path.join(self.root, "val" if s else "train", f"part-{p:03d}" if self.partitioned else "")
            os.makedirs(folder, exist_ok=True)
            # named by the batch's first order key: readers meet the batches in a seeded random order
            # (deterministic: a retried task overwrites its file instead of duplicating it)
            digest = hashlib.blake2b(order[rows].tobytes(), digest_size=6).hexdigest()
            path = os.path.join(folder, f"{int(order[rows[0]] * 2**53):014x}-{digest}.parquet")
            table = pa.table(
                {"input_ids": ArrowTensorArray.from_numpy(b_ids), "target_mask": ArrowTensorArray.from_numpy(b_mask)}
            )
            tmp = f"{path}.{os.getpid()}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, path)
            target = b_mask.astype(bool)
            stats["split"].append(s)
            stats["part"].append(p)
            stats["tokens"].append(int(target.sum()))
            stats["bytes"].append(int(self.byte_lengths[b_ids[target]].sum()))
            stats["blocks"].append(len(b_ids))
            stats["pad"].append(int(((b_ids == self.pad) & ~target).sum()))
            stats["documents"].append(len(rows))
            stats["file"].append(path)
        return {k: np.asarray(v) for k, v in stats.items()}
