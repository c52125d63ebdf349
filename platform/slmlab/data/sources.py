"""Read the configured sources into one Ray Dataset of documents: columns ``text`` and ``source``."""
from __future__ import annotations

from pathlib import Path

import ray

from slmlab.config import DataConfig, SourceConfig
from slmlab.data.embedded import corpus_version, write_embedded_corpus


def embedded_corpus_path(cache_dir: Path) -> Path:
    return cache_dir / "corpus" / f"embedded-{corpus_version()}.jsonl"


def source_label(index: int, src: SourceConfig) -> str:
    return f"{index}:{src.kind}:{src.path or 'stdlib-docs'}"


def read_source(index: int, src: SourceConfig, cache_dir: Path) -> ray.data.Dataset:
    label = source_label(index, src)
    if src.kind == "embedded":
        ds = ray.data.read_json(str(write_embedded_corpus(embedded_corpus_path(cache_dir))))
    elif src.kind == "jsonl":
        ds = ray.data.read_json(src.path)
    elif src.kind == "parquet":
        ds = ray.data.read_parquet(src.path, columns=[src.text_field])
    elif src.kind == "text":
        ds = ray.data.read_text(src.path)  # one document per line
    else:  # pragma: no cover - routed by config validation
        raise NotImplementedError(f"source kind {src.kind!r}")
    field = "text" if src.kind in ("embedded", "text") else src.text_field
    if src.max_documents:
        ds = ds.limit(src.max_documents)

    def select(batch):
        return {"text": batch[field], "source": [label] * len(batch[field])}

    return ds.map_batches(select, batch_format="numpy")


def read_documents(cfg: DataConfig, cache_dir: Path) -> ray.data.Dataset:
    parts = [read_source(i, s, cache_dir) for i, s in enumerate(cfg.sources)]
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def source_fingerprint(cfg: DataConfig) -> list:
    """What identifies the sources' content: file sizes and mtimes for local paths, the
    interpreter version for the embedded corpus, names for remote datasets."""
    out = []
    for s in cfg.sources:
        entry = s.model_dump(mode="json")
        if s.kind == "embedded":
            entry["version"] = corpus_version()
        elif s.path and Path(s.path).exists():
            p = Path(s.path)
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            entry["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        out.append(entry)
    return out
