"""Tokenize and pack documents on Ray Data into parquet shards, cached by a content key.

Layout of one cache entry (``<run_dir>/cache/data/<key>/``)::

    tokenizer.json, tokenizer_config.json   the trained byte-level BPE
    train/*.parquet, val/*.parquet          rows: input_ids int32[seq_len+1], target_mask int8[seq_len+1]
    summary.json                            documents, tokens, bytes, bytes/token, per-source shares
    _SUCCESS                                written last: an entry without it is never reused

Documents are split into train/validation by a hash of their text (so the same document always
lands on the same side), tokenized, terminated by EOS and packed back to back into blocks of
``seq_len + 1`` tokens. Only the last block of each Ray Data batch is padded; pad positions have
``target_mask = 0`` so they never count in the loss, in perplexity or in bits per byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from slmlab.config import PipelineConfig
from slmlab.data.sources import read_documents, source_fingerprint
from slmlab.data.tokenizer import EOS, PAD, load_tokenizer, token_byte_lengths, train_bpe

FORMAT_VERSION = 1  # bump when the shard layout or packing changes: old cache entries are ignored


@dataclass(frozen=True)
class Shards:
    root: Path
    key: str

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def val_dir(self) -> Path:
        return self.root / "val"

    @property
    def summary(self) -> dict:
        return json.loads((self.root / "summary.json").read_text())


def cache_key(cfg: PipelineConfig) -> str:
    payload = {
        "format": FORMAT_VERSION,
        "seed": cfg.seed,
        "data": cfg.data.model_dump(mode="json", exclude={"tokenize_concurrency", "shuffle_buffer"}),
        "tokenizer": cfg.tokenizer.model_dump(mode="json"),
        "sources": source_fingerprint(cfg.data),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _split_of(text: str, seed: int, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "little")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


class TokenizeAndPack:
    """Ray Data actor: one tokenizer per actor, loaded once."""

    def __init__(self, tokenizer_path: str, seq_len: int):
        self.tok = load_tokenizer(tokenizer_path)
        self.eos = self.tok.token_to_id(EOS)
        self.pad = self.tok.token_to_id(PAD)
        self.block = seq_len + 1

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        encodings = self.tok.encode_batch_fast(texts, add_special_tokens=False) if hasattr(self.tok, "encode_batch_fast") else self.tok.encode_batch(texts, add_special_tokens=False)
        pieces = []
        for enc in encodings:
            pieces.append(np.asarray(enc.ids, dtype=np.int32))
            pieces.append(np.asarray([self.eos], dtype=np.int32))
        ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        n_blocks = max(1, -(-len(ids) // self.block))
        flat = np.full(n_blocks * self.block, self.pad, dtype=np.int32)
        flat[: len(ids)] = ids
        mask = np.zeros(n_blocks * self.block, dtype=np.int8)
        mask[: len(ids)] = 1
        return {"input_ids": flat.reshape(n_blocks, self.block), "target_mask": mask.reshape(n_blocks, self.block)}


def _tokenizer_sample(docs: ray.data.Dataset, max_bytes: int):
    seen = 0
    for row in docs.iter_rows():
        text = str(row["text"])
        yield text
        seen += len(text.encode("utf-8"))
        if seen >= max_bytes:
            return


def _block_stats(byte_len: np.ndarray, eos: int):
    def stats(batch: dict) -> dict:
        ids, mask = batch["input_ids"], batch["target_mask"].astype(bool)
        return {
            "tokens": [int(mask.sum())],
            "bytes": [int(byte_len[ids][mask].sum())],
            "documents": [int(((ids == eos) & mask).sum())],
            "blocks": [len(ids)],
            "pad": [int((~mask).sum())],
        }

    return stats


def _summarize(folder: Path, tok_path: Path) -> dict:
    tok = load_tokenizer(tok_path)
    byte_len = np.asarray(token_byte_lengths(tok), dtype=np.int64)
    parts = ray.data.read_parquet(str(folder)).map_batches(_block_stats(byte_len, tok.token_to_id(EOS)), batch_format="numpy", batch_size=4096)
    totals = {"tokens": 0, "bytes": 0, "documents": 0, "blocks": 0, "pad": 0}
    for row in parts.iter_rows():
        for k in totals:
            totals[k] += int(row[k])
    totals["bytes_per_token"] = totals["bytes"] / max(1, totals["tokens"])
    return totals


def build_shards(cfg: PipelineConfig, progress=print) -> Shards:
    """Return the cached shards for ``cfg``, building them on Ray Data when missing."""
    cache_root = Path(cfg.run_dir) / "cache" / "data"
    key = cache_key(cfg)
    final = cache_root / key
    if (final / "_SUCCESS").exists():
        progress(f"data: reusing cached shards {final}")
        return Shards(final, key)

    tmp = cache_root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        docs = read_documents(cfg.data, Path(cfg.run_dir) / "cache")
        seed, val_fraction = cfg.seed, cfg.data.val_fraction

        def assign_split(batch: dict) -> dict:
            batch["split"] = np.asarray([_split_of(str(t), seed, val_fraction) for t in batch["text"]])
            return batch

        docs = docs.map_batches(assign_split, batch_format="numpy").materialize()
        n_docs = docs.count()
        if n_docs == 0:
            raise ValueError("data.sources: expected at least one document, found none")

        progress(f"data: training byte-level BPE (vocab {cfg.tokenizer.vocab_size}) on up to {cfg.tokenizer.sample_bytes:,} bytes")
        train_docs = docs.filter(lambda r: r["split"] == "train")
        tok_path = train_bpe(_tokenizer_sample(train_docs, cfg.tokenizer.sample_bytes), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, tmp / "tokenizer.json")

        for split in ("train", "val"):
            progress(f"data: tokenizing and packing the {split} split on Ray Data")
            part = docs.filter(lambda r, s=split: r["split"] == s)
            packed = part.map_batches(
                TokenizeAndPack,
                fn_constructor_args=(str(tok_path), cfg.data.seq_len),
                batch_size=cfg.data.tokenize_batch_size,
                batch_format="numpy",
                concurrency=cfg.data.tokenize_concurrency,
                num_cpus=0.5,  # whole-CPU actors starve the read tasks on small machines
            )
            packed.write_parquet(str(tmp / split))

        summary = {"documents_read": n_docs, "train": _summarize(tmp / "train", tok_path), "val": _summarize(tmp / "val", tok_path)}
        summary["sources"] = [s.model_dump(mode="json") for s in cfg.data.sources]
        summary["vocab_size"] = load_tokenizer(tok_path).get_vocab_size()
        summary["seq_len"] = cfg.data.seq_len
        if summary["val"]["blocks"] == 0 or summary["train"]["blocks"] == 0:
            raise ValueError(f"data: expected documents on both sides of the split, found train={summary['train']['blocks']} val={summary['val']['blocks']} blocks (raise data.val_fraction or add text)")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        (tmp / "_SUCCESS").write_text(key)
        if final.exists():  # a concurrent builder won the race; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"data: wrote {summary['train']['blocks']} train / {summary['val']['blocks']} val blocks to {final}")
    return Shards(final, key)
