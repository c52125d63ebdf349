"""Build tokenized, packed parquet shards on Ray Data, cached by a content key.

Layout of one cache entry (``<run_dir>/cache/data/<key>/``)::

    tokenizer.json, tokenizer_config.json   the trained byte-level BPE (loads in transformers as a fast tokenizer)
    train/*.parquet, val/*.parquet          rows: input_ids int32[seq_len+1], target_mask int8[seq_len+1]
    train/part-KKK/, val/part-KKK/          instead, when data.partition is set: one folder per partition
    documents.parquet                       one row per usable document: doc_id, source, split, partition,
                                            tokens, copies
    summary.json                            documents, tokens, bytes, bytes/token, mixture requested vs achieved,
                                            partition sizes, bad records (counts + first file:line examples)
    _SUCCESS                                written last: an entry without it is never reused

Stages (each on Ray Data; see :mod:`~slmlab.data.sources`, :mod:`~slmlab.data.mixture`,
:mod:`~slmlab.data.packing` for the rules):

1. read every source into normalized documents, counting bad records; split train/val by a hash of
   the text (the same text always lands on the same side), the embedded corpora by held-out group;
2. train the tokenizer on a bounded sample (``tokenizer.sample_bytes``) drawn from every source in
   proportion to its weight, in a seeded order;
3. tokenize every document in tokenizer actors (and label its topic when partitioning by topic);
4. plan the mixture and partitions on the driver from per-document token counts;
5. apply the plan (repeat / drop documents, assign partitions), group each split and partition into
   runs of ``pack_batch_size`` documents in seeded key order (sources interleaved), pack and write one
   file per run; the packed target tokens are checked against the plan, token for token. The runs are
   decided on the driver and sorted inside, so one cache key always means the same bytes.

The key hashes the data/tokenizer config, the seed and the *content* of local files (blake2b in 1 MiB
chunks), so an edited corpus rebuilds and an unchanged one is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from slmlab.config import PipelineConfig
from slmlab.data import chat
from slmlab.data.mixture import make_plan
from slmlab.data.packing import Finalize, PackAndWrite, TokenizeDocs, pack_cuts, pack_group
from slmlab.data.sources import FATAL, FMT_CHAT, TRAIN, VAL, _usable, file_digest, read_documents, resolve_source
from slmlab.data.tokenizer import EOS, PAD, load_tokenizer, token_byte_lengths, train_bpe, write_transformers_config

FORMAT_VERSION = 3  # bump when the shard layout or packing changes: old cache entries are ignored
MAX_EXAMPLES = 10  # bad-record examples kept per source: the first of each kind of problem
SPLITS = ((TRAIN, "train"), (VAL, "val"))


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
    def documents_path(self) -> Path:
        return self.root / "documents.parquet"

    @property
    def summary(self) -> dict:
        return json.loads((self.root / "summary.json").read_text())

    @property
    def num_partitions(self) -> int:
        """0 when the data is not partitioned."""
        parts = self.summary.get("partitions")
        return parts["num_partitions"] if parts else 0

    def partition_dir(self, k: int, split: str = "train") -> Path:
        """The shards of partition ``k`` (e.g. ``ray.data.read_parquet(shards.partition_dir(2))``)."""
        n = self.num_partitions
        if not n:
            raise ValueError("these shards are not partitioned (set data.partition)")
        if not 0 <= k < n:
            raise IndexError(f"partition {k}: expected 0 <= k < {n}")
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', found {split!r}")
        return self.root / split / f"part-{k:03d}"


def cache_key(cfg: PipelineConfig, fingerprints: list | None = None, tokenizer_path: str | Path | None = None) -> str:
    if fingerprints is None:
        fingerprints = [r.fingerprint for r in resolve_sources(cfg)]
    image_data = _image_data_configs(cfg) if not tokenizer_path else []
    payload = {
        "format": FORMAT_VERSION,
        "seed": cfg.seed,
        "data": cfg.data.model_dump(mode="json", exclude={"tokenize_concurrency", "shuffle_buffer"}),
        # a reused tokenizer is identified by its content; a trained one by its settings (+ the data)
        "tokenizer": {"reused": file_digest(str(tokenizer_path))}
        if tokenizer_path
        else cfg.tokenizer.model_dump(mode="json", exclude={"image_text"}),  # its effect: "image_text" below
        "sources": fingerprints,
    }
    if image_data:  # the image-text lines the tokenizer also trains on
        from slmlab.data.images import source_fingerprint

        payload["image_text"] = [[source_fingerprint(s) for s in d.sources] + [d.val_fraction] for d in image_data]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# helpers


def _image_data_configs(cfg: PipelineConfig) -> list:
    """The image-text data of the pipeline's vlm_train stages, when the tokenizer trains on it too."""
    if not cfg.tokenizer.image_text:
        return []
    from slmlab.data.images import ImageDataConfig

    return [st.data for st in cfg.stage_list() if isinstance(getattr(st, "data", None), ImageDataConfig)]


@contextlib.contextmanager
def _ordered():
    """Deterministic row order for the whole build (limits, samples, file order), and the plain
    task-based sort shuffle for the packing groupby: on 2 CPUs the default hash shuffle took ~10x
    longer to start than the whole packing stage."""
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order, ctx.shuffle_strategy
    ctx.execution_options.preserve_order = True
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy = before


class _SampleFilter:
    def __init__(self, p_max: np.ndarray):
        self.p_max = p_max

    def __call__(self, batch: pa.Table) -> pa.Table:
        src = batch.column("source").to_numpy()
        keep = (batch.column("split").to_numpy() == TRAIN) & (batch.column("key").to_numpy() < self.p_max[src])
        return batch.filter(pa.array(keep)).select(["source", "key", "u", "fmt", "text", "nbytes"])


class _DocStats:
    """Per-batch partial statistics of the read stage (merged on the driver)."""

    def __init__(self, n_sources: int):
        self.n = n_sources

    def __call__(self, batch: pa.Table) -> dict:
        src = batch.column("source").to_numpy().astype(np.int64)
        split = batch.column("split").to_numpy().astype(np.int64)
        nbytes = batch.column("nbytes").to_numpy()
        bad = batch.column("bad").to_pylist()
        good = np.array([b == "" for b in bad], dtype=bool)
        docs = np.zeros((2, self.n), np.int64)
        byts = np.zeros((2, self.n), np.int64)
        np.add.at(docs, (split[good], src[good]), 1)
        np.add.at(byts, (split[good], src[good]), nbytes[good])
        bad_by: dict = {}
        examples: dict = {}
        fatal: list = []
        where = batch.column("where").to_pylist()
        for i in np.flatnonzero(~good):
            reason, s = bad[i], int(src[i])
            if reason.startswith(FATAL):
                fatal.append(reason[len(FATAL) :])
                continue
            cat = reason.split(" (")[0]
            bad_by.setdefault(s, {}).setdefault(cat, 0)
            bad_by[s][cat] += 1
            ex = examples.setdefault(s, {})
            if cat not in ex and len(ex) < MAX_EXAMPLES:
                ex[cat] = f"{where[i]}: {reason}"  # the first example of each kind of problem
        return {
            "stats": [
                json.dumps(
                    {"docs": docs.tolist(), "bytes": byts.tolist(), "bad": bad_by, "examples": examples, "fatal": fatal}
                )
            ]
        }


def _merge_doc_stats(rows: list[dict], n: int) -> dict:
    out = {
        "docs": np.zeros((2, n), np.int64),
        "bytes": np.zeros((2, n), np.int64),
        "bad": [dict() for _ in range(n)],
        "examples": [dict() for _ in range(n)],
        "fatal": [],
    }
    for row in rows:
        st = json.loads(row["stats"])
        out["docs"] += np.asarray(st["docs"], dtype=np.int64)
        out["bytes"] += np.asarray(st["bytes"], dtype=np.int64)
        for s, by in st["bad"].items():
            for cat, c in by.items():
                out["bad"][int(s)][cat] = out["bad"][int(s)].get(cat, 0) + c
        for s, ex in st["examples"].items():
            mine = out["examples"][int(s)]
            for cat, e in ex.items():
                if cat not in mine and len(mine) < MAX_EXAMPLES:
                    mine[cat] = e
        out["fatal"] += [f for f in st["fatal"] if f not in out["fatal"]]
    return out


def _check_sources(stats: dict, resolved) -> None:
    if stats["fatal"]:
        raise ValueError("data.sources: " + "; ".join(stats["fatal"][:5]))
    for r in resolved:
        i = r.index
        if stats["docs"][:, i].sum() == 0:
            bad = stats["bad"][i]
            field = (
                r.src.text_field
                if r.src.format == "text"
                else f"{r.src.messages_field} or {r.src.prompt_field}/{r.src.response_field}"
            )
            detail = ", ".join(f"{c} ×{n}" for c, n in sorted(bad.items(), key=lambda kv: -kv[1])) or "no records"
            examples = "; ".join(list(stats["examples"][i].values())[:3])
            raise ValueError(
                f"data.sources[{i}] ({r.src.kind} {r.src.path or 'stdlib-docs'}, field {field!r}): "
                f"expected usable documents, "
                f"found none — {detail}" + (f" — e.g. {examples}" if examples else "")
            )


def _tokenizer_texts(rows: pa.Table, budget: np.ndarray, by_source: np.ndarray) -> list[str]:
    """Training texts: per source, documents in key order until its byte budget is met (to within
    one document), then all in key order (chat: the message contents)."""
    src = rows.column("source").to_numpy()
    key = rows.column("key").to_numpy()
    u = rows.column("u").to_numpy()
    nbytes = rows.column("nbytes").to_numpy()
    keep = np.zeros(len(src), dtype=bool)
    for i in range(len(budget)):
        idx = np.flatnonzero(src == i)
        idx = idx[np.lexsort((u[idx], key[idx]))]
        cum = np.cumsum(nbytes[idx])
        m = int(np.searchsorted(cum, budget[i], side="left"))
        if m < len(idx):
            below = cum[m - 1] if m > 0 else 0
            m = m + 1 if cum[m] - budget[i] <= budget[i] - below else m
        keep[idx[:m]] = True
        by_source[i] = int(nbytes[idx[:m]].sum())
    texts, fmts = rows.column("text").to_pylist(), rows.column("fmt").to_pylist()
    return [
        "\n".join(c for _, c in chat.loads(texts[j])) if fmts[j] == FMT_CHAT else texts[j] for j in np.flatnonzero(keep)
    ]


def _gather(ds, columns: list[str]) -> pa.Table:
    tables = [b for b in ds.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None)]
    return pa.concat_tables(tables) if tables else None


def _write_empty(folder: Path, seq_len: int) -> None:
    from ray.data.extensions import ArrowTensorArray

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "input_ids": ArrowTensorArray.from_numpy(np.zeros((0, seq_len + 1), np.int32)),
            "target_mask": ArrowTensorArray.from_numpy(np.zeros((0, seq_len + 1), np.int8)),
        }
    )
    pq.write_table(table, folder / "empty.parquet")


# ---------------------------------------------------------------------------------------------


def resolve_sources(cfg: PipelineConfig) -> list:
    """Each of ``cfg.data.sources`` found, listed and fingerprinted (no Ray needed): a missing path or
    an oversized document fails here, before anything starts."""
    cache_dir = Path(cfg.run_dir) / "cache"
    return [resolve_source(i, s, cache_dir) for i, s in enumerate(cfg.data.sources)]


def build_shards(
    cfg: PipelineConfig, progress=print, tokenizer_path: str | Path | None = None, resolved: list | None = None
) -> Shards:
    """Return the cached shards for ``cfg``, building them on Ray Data when missing.

    ``tokenizer_path``: reuse this tokenizer.json (e.g. the pretraining one, for instruction
    fine-tuning) instead of training one on the data; ``cfg.tokenizer`` is then ignored.
    ``resolved``: ``resolve_sources(cfg)`` when the caller already ran it."""
    cache_dir = Path(cfg.run_dir) / "cache"
    resolved = resolved if resolved is not None else resolve_sources(cfg)
    key = cache_key(cfg, [r.fingerprint for r in resolved], tokenizer_path)
    cache_root = cache_dir / "data"
    final = cache_root / key
    if (final / "_SUCCESS").exists():
        progress(f"data: reusing cached shards {final}")
        return Shards(final, key)

    tmp = cache_root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        with _ordered():
            summary = _build(cfg, resolved, tmp, progress, Path(tokenizer_path) if tokenizer_path else None)
        summary["key"] = key
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


def _build(cfg: PipelineConfig, resolved, out: Path, progress, reuse_tokenizer: Path | None) -> dict:
    dc, S = cfg.data, len(resolved)
    labels = [r.label for r in resolved]
    weights = np.asarray([s.weight for s in dc.sources], dtype=np.float64)
    shares = weights / weights.sum()

    # 1. read --------------------------------------------------------------------------------
    progress(f"data: reading {S} source(s): {', '.join(labels)}")
    # blocks of a few tokenizer batches, so every tokenizer actor gets work even from one big file
    docs_all = (
        read_documents(resolved, cfg.seed, dc.val_fraction)
        .repartition(target_num_rows_per_block=4 * dc.tokenize_batch_size)
        .materialize()
    )
    stats = _merge_doc_stats(docs_all.map_batches(_DocStats(S), batch_format="pyarrow", batch_size=None).take_all(), S)
    _check_sources(stats, resolved)
    n_bad = sum(sum(b.values()) for b in stats["bad"])
    n_docs = int(stats["docs"].sum())
    progress(f"data: {n_docs:,} documents, {int(stats['bytes'].sum()):,} bytes")
    if n_bad:
        first = [e for ex in stats["examples"] for e in ex.values()][:3]
        progress(
            f"data: {n_bad:,} bad records skipped (counts and examples in summary.json 'bad_records'), e.g. "
            + "; ".join(first)
        )
    # half a CPU, like the tokenizer actors it feeds: a whole-CPU task next to them never fits on
    # nodes of 1 CPU (one actor each leaves 0.5 free; seen as a hang on a 2 x 1-CPU cluster)
    docs = docs_all.map_batches(_usable, batch_format="pyarrow", batch_size=None, num_cpus=0.5)

    # 2. tokenizer sample, from every source by weight ------------------------------------------
    train_bytes = stats["bytes"][TRAIN].astype(np.float64)
    budget = shares * cfg.tokenizer.sample_bytes
    # candidates: with slack (2x the budget, at least 64 documents) so heavy-tailed sizes still fill it
    p_tok = np.minimum(
        1.0, np.maximum(2.0 * budget / np.maximum(train_bytes, 1.0), 64.0 / np.maximum(stats["docs"][TRAIN], 1))
    )
    p_max = p_tok.copy() if reuse_tokenizer is None else np.zeros(S)
    part = dc.partition
    if part and part.method == "topic":
        p_topic = min(1.0, part.topic_sample_documents / max(1, int(stats["docs"][TRAIN].sum())))
        p_max = np.maximum(p_max, p_topic)
    sample = None
    if p_max.max() > 0:
        sample = _gather(
            docs.map_batches(_SampleFilter(p_max), batch_format="pyarrow", batch_size=None),
            ["source", "key", "u", "fmt", "text", "nbytes"],
        )
    if sample is None:
        sample = pa.table(
            {
                "source": pa.array([], pa.int32()),
                "key": pa.array([], pa.float64()),
                "u": pa.array([], pa.float64()),
                "fmt": pa.array([], pa.int8()),
                "text": pa.array([], pa.string()),
                "nbytes": pa.array([], pa.int64()),
            }
        )
    # a fixed order whatever order Ray returned rows in (equal keys: by text hash)
    sample = sample.take(pc.sort_indices(sample, [("key", "ascending"), ("source", "ascending"), ("u", "ascending")]))
    sample_by_source = np.zeros(S, np.int64)
    lines: list[str] = []  # image-text lines the tokenizer also trained on
    if reuse_tokenizer is not None:
        progress(f"data: reusing the tokenizer {reuse_tokenizer}")
        tok_path = out / "tokenizer.json"
        shutil.copyfile(reuse_tokenizer, tok_path)
        if (reuse_tokenizer.parent / "tokenizer_config.json").exists():
            shutil.copyfile(reuse_tokenizer.parent / "tokenizer_config.json", out / "tokenizer_config.json")
        else:
            write_transformers_config(out)
    else:
        tok_texts = _tokenizer_texts(sample, budget, sample_by_source)
        image_data = _image_data_configs(cfg)
        if image_data:
            from slmlab.data.images import tokenizer_texts

            lines = tokenizer_texts(image_data, cfg.seed)
            progress(f"data: the tokenizer also trains on {len(lines):,} distinct caption/question/answer lines "
                     f"of the image-text stages' training images (tokenizer.image_text)")
            tok_texts += lines
        progress(
            f"data: training byte-level BPE (vocab {cfg.tokenizer.vocab_size}) on "
            f"{int(sample_by_source.sum()):,} bytes drawn from {int((sample_by_source > 0).sum())} source(s) "
            f"by weight (tokenizer.sample_bytes {cfg.tokenizer.sample_bytes:,})"
        )
        tok_path = train_bpe(tok_texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, out / "tokenizer.json")
        del tok_texts
    topic_model = None
    if part and part.method == "topic":
        from slmlab.data.topics import fit_topic_model

        keep = pc.less(sample.column("key"), p_topic)
        texts = [
            ("\n".join(c for _, c in chat.loads(t)) if f == FMT_CHAT else t)
            for t, f in zip(
                sample.column("text").filter(keep).to_pylist(), sample.column("fmt").filter(keep).to_pylist()
            )
        ]
        kind = "k-means" if part.topic_balance_slack is None else "balanced k-means"
        progress(f"data: fitting TF-IDF + SVD + {kind} ({part.num_partitions} topics) on {len(texts):,} documents")
        topic_model = fit_topic_model(texts, part.num_partitions, cfg.seed, part.topic_max_features,
                                      part.topic_balance_slack)
    del sample

    # 3. tokenize ----------------------------------------------------------------------------
    progress(f"data: tokenizing on Ray Data (up to {dc.tokenize_concurrency} tokenizer actor(s))")
    tokenized = docs.map_batches(
        TokenizeDocs,
        fn_constructor_args=(str(tok_path), dc.seq_len, topic_model),
        batch_size=dc.tokenize_batch_size,
        batch_format="pyarrow",
        # up to tokenize_concurrency actors, fewer when there are fewer input blocks (a small corpus)
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=dc.tokenize_concurrency),
        num_cpus=0.5,  # whole-CPU actors starve the read tasks on small machines
    ).materialize()
    del docs_all, docs

    # 4. plan ----------------------------------------------------------------------------------
    meta_cols = [
        "doc_id",
        "source",
        "split",
        "fmt",
        "key",
        "u",
        "score",
        "ntok",
        "nbytes",
        "topic",
        "truncated",
        "lost",
    ]
    meta_t = _gather(tokenized, meta_cols)
    # rows come back in whatever order Ray finished them: sort, so documents.parquet, the plan and
    # every tie below depend on the data alone
    meta_t = meta_t.take(
        pc.sort_indices(meta_t, [("source", "ascending"), ("doc_id", "ascending"), ("u", "ascending")])
    )
    meta = {c: meta_t.column(c).to_numpy(zero_copy_only=False) for c in meta_cols if c != "doc_id"}
    plan, mixture = make_plan(meta, list(weights), dc.mixture_strategy, labels, part)
    copies = plan.copies(meta["source"], meta["split"], meta["key"])
    partition = plan.partition(meta)
    pq.write_table(
        pa.table(
            {
                "doc_id": meta_t.column("doc_id"),
                "source": meta_t.column("source"),
                "split": pa.array(np.where(meta["split"] == VAL, "val", "train")),
                "partition": pa.array(partition),
                "tokens": meta_t.column("ntok"),
                "bytes": meta_t.column("nbytes"),
                "copies": pa.array(copies),
            }
        ),
        out / "documents.parquet",
    )

    # 5. apply, group, pack, write --------------------------------------------------------------
    # packing groups (runs of pack_batch_size copies in seeded key order, sources interleaved) are
    # decided here, so the blocks do not depend on how Ray batches or orders rows
    cuts = pack_cuts(meta["split"], partition, meta["key"], copies, dc.pack_batch_size)
    final = tokenized.map_batches(Finalize(plan, cuts), batch_format="pyarrow", batch_size=None)
    tok = load_tokenizer(tok_path)
    byte_lengths = np.asarray(token_byte_lengths(tok), dtype=np.int64)
    progress(
        f"data: packing into blocks of {dc.seq_len + 1} tokens"
        + (f" in {plan.num_partitions} {plan.method} partitions" if part else "")
    )
    writer = PackAndWrite(
        str(out), dc.seq_len, tok.token_to_id(EOS), tok.token_to_id(PAD), byte_lengths, part is not None
    )
    n_groups = sum(len(c) + 1 for c in cuts.values())  # one shuffle partition per group: no idle reduce tasks
    packed = (
        final.groupby("group", num_partitions=max(1, min(n_groups, 200)))
        .map_groups(pack_group, fn_kwargs={"writer": writer}, batch_format="pyarrow")
        .take_all()
    )

    files = {r["file"] for r in packed}
    for split_dir in (out / "train", out / "val"):
        for f in split_dir.rglob("*") if split_dir.exists() else []:
            if f.is_file() and str(f) not in files:
                f.unlink()  # a retried task's leftover
    groups = [(s, k) for s, _ in SPLITS for k in range(plan.num_partitions if part else 1)]
    for s, k in groups:
        folder = out / ("val" if s else "train") / (f"part-{k:03d}" if part else "")
        if not any(folder.glob("*.parquet")):
            _write_empty(folder, dc.seq_len)

    # summary, with the conservation check ------------------------------------------------------
    ntok, fmt = meta["ntok"], meta["fmt"]
    used = copies * (ntok > 0)
    want = {}
    for s, k in groups:
        sel = (meta["split"] == s) & (partition == k)
        want[(s, k)] = int((ntok * copies)[sel].sum())
    got = {g: {"tokens": 0, "bytes": 0, "blocks": 0, "pad": 0} for g in groups}
    for r in packed:
        g = got[(int(r["split"]), int(r["part"]))]
        for f in g:
            g[f] += int(r[f])
    for g in groups:
        if got[g]["tokens"] != want[g]:
            raise RuntimeError(
                f"data: packing lost or duplicated tokens in split {SPLITS[g[0]][1]} partition {g[1]}: "
                f"planned {want[g]}, packed {got[g]['tokens']}"
            )

    summary: dict = {
        "format_version": FORMAT_VERSION,
        "seq_len": dc.seq_len,
        "seed": cfg.seed,
        "vocab_size": tok.get_vocab_size(),
        "documents_read": n_docs,
    }
    for s, name in SPLITS:
        tot = {f: sum(got[g][f] for g in groups if g[0] == s) for f in ("tokens", "bytes", "blocks", "pad")}
        tot["documents"] = int(used[meta["split"] == s].sum())
        tot["bytes_per_token"] = tot["bytes"] / max(1, tot["tokens"])
        tot["utilization"] = tot["tokens"] / max(1, tot["blocks"] * dc.seq_len)
        summary[name] = tot
    if summary["val"]["blocks"] == 0 or summary["train"]["blocks"] == 0:
        raise ValueError(
            f"data: expected documents on both sides of the split, found train={summary['train']['blocks']} "
            f"val={summary['val']['blocks']} blocks (raise data.val_fraction or add text)"
        )

    summary["sources"] = []
    for r in resolved:
        i = r.index
        summary["sources"].append(
            {
                "label": r.label,
                "kind": r.src.kind,
                "path": r.src.path,
                "format": r.src.format,
                "weight": r.src.weight,
                "files": len(r.files) if not r.uri else None,
                # what was read: blake2b over the files' contents (local), else the name/URI (+ revision)
                "content_digest": hashlib.blake2b(
                    json.dumps(r.fingerprint, sort_keys=True, default=str).encode(), digest_size=12
                ).hexdigest(),
                "documents": int(stats["docs"][:, i].sum()),
                "bytes": int(stats["bytes"][:, i].sum()),
                "requested_share": float(shares[i]),
                "achieved_share": {name: mixture["achieved"][name][r.label] for _, name in SPLITS},
                "sampling_rate": mixture["rates"][r.label],
                "tokenizer_sample_bytes": int(sample_by_source[i]),
                "bad_records": int(sum(stats["bad"][i].values())),
                "documents_capped": r.capped,  # usable documents left out by max_documents
            }
        )
    summary["mixture"] = mixture
    by_reason: dict = {}
    for b in stats["bad"]:
        for cat, c in b.items():
            by_reason[cat] = by_reason.get(cat, 0) + c
    summary["bad_records"] = {
        "total": n_bad,
        "by_reason": by_reason,
        "by_source": {labels[i]: stats["bad"][i] for i in range(S) if stats["bad"][i]},
        "examples": [e for ex in stats["examples"] for e in ex.values()],
    }
    summary["tokenizer"] = {
        "vocab_size": tok.get_vocab_size(),
        "reused_from": str(reuse_tokenizer) if reuse_tokenizer else None,
        "sample_bytes": int(sample_by_source.sum()),
        "sample_bytes_by_source": {labels[i]: int(sample_by_source[i]) for i in range(S)},
        # distinct caption/question/answer lines of the image-text stages' training images (tokenizer.image_text)
        "image_text_lines": len(lines),
    }
    if part:
        summary["partitions"] = {
            "method": part.method,
            "num_partitions": part.num_partitions,
            **({"score": part.score} if part.method == "curriculum" else {}),
        }
        for s, name in SPLITS:
            summary["partitions"][name] = [
                {
                    "partition": k,
                    "documents": int(used[(meta["split"] == s) & (partition == k)].sum()),
                    "tokens": got[(s, k)]["tokens"],
                    "blocks": got[(s, k)]["blocks"],
                }
                for k in range(part.num_partitions)
            ]
    else:
        summary["partitions"] = None
    is_chat = fmt == FMT_CHAT
    if is_chat.any():
        summary["instruct"] = {
            "examples": int(is_chat.sum()),
            "examples_truncated": int(meta["truncated"][is_chat].sum()),
            "targets_truncated": int(meta["lost"][is_chat].sum()),
            "examples_without_targets": int((is_chat & (ntok == 0)).sum()),
        }
    return summary


def summary_for_mlflow(shards: Shards | dict) -> dict[str, float]:
    """Flat MLflow metrics of a build: sizes per split, mixture shares requested vs achieved per
    source (by index), partition sizes, bad-record counts, instruction truncation."""
    s = shards if isinstance(shards, dict) else shards.summary
    out: dict[str, float] = {}
    for split in ("train", "val"):
        for k in ("documents", "tokens", "bytes", "bytes_per_token", "blocks", "pad", "utilization"):
            out[f"data/{split}_{k}"] = float(s[split][k])
    for i, src in enumerate(s["sources"]):
        out[f"data/source_{i}/share_requested"] = float(src["requested_share"])
        for split in ("train", "val"):
            out[f"data/source_{i}/share_achieved_{split}"] = float(src["achieved_share"][split])
        out[f"data/source_{i}/documents"] = float(src["documents"])
        out[f"data/source_{i}/bad_records"] = float(src["bad_records"])
    out["data/bad_records"] = float(s["bad_records"]["total"])
    if s.get("partitions"):
        for split in ("train", "val"):
            for p in s["partitions"][split]:
                out[f"data/partition_{p['partition']}/{split}_tokens"] = float(p["tokens"])
                out[f"data/partition_{p['partition']}/{split}_documents"] = float(p["documents"])
    for k, v in (s.get("instruct") or {}).items():
        out[f"data/instruct_{k}"] = float(v)
    return out
