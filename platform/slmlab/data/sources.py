"""Read the configured sources into one Ray Dataset of normalized documents, counting bad records.

Every source becomes rows of one schema (:data:`DOC_SCHEMA`): a usable document (``bad == ""``)
or a bad record (``bad`` = the reason, ``where`` = ``file:line`` for text/jsonl, ``file[row]`` for
parquet, ``dataset[row]`` for hf_disk, the dataset for streamed hf). Nothing is dropped without a
row saying why.

What a document is:
  * ``text`` files — ``doc_separator: blank_line`` (default): a paragraph, i.e. a maximal run of
    non-blank lines joined with "\\n" (a blank line is empty or whitespace only; "\\r" line ends are
    dropped); ``line``: every non-blank line; ``file``: the whole decoded file, verbatim. A line that
    is not UTF-8 is a bad record and is left out of its paragraph.
  * ``jsonl`` lines, ``parquet`` rows, ``hf``/``hf_disk`` rows — one record each; the text is
    ``text_field`` (format text) or the chat record (format chat, see :mod:`slmlab.data.chat`).
    Blank jsonl lines are not records.
  * ``embedded`` — the stdlib documentation corpus (:mod:`slmlab.data.embedded`), one doc per entry;
    with ``format: chat``, the stdlib question/answer set (:mod:`slmlab.data.instructions`). Both
    split by held-out group, not by text, so Q/A validation answers are never pretraining text.

Files are read with Ray Data's own reader ``read_binary_files`` (text, jsonl and parquet: one file per
task, so bad lines/rows are counted one by one with their position), which also takes cloud URIs
(s3://, gs://); a parquet file is decoded from memory with only the needed columns. Local paths may be
files, folders (recursive; hidden ``.``/``_`` names skipped) or globs, expanded here so the cache key
can hash their contents.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slmlab.data import chat
from slmlab.data.config import DataConfig, SourceConfig, is_remote
from slmlab.data.embedded import corpus_version, write_embedded_corpus

FATAL = "FATAL: "  # prefix of a bad-record reason that makes the whole build fail (missing field in a file)
TRAIN, VAL = 0, 1
FMT_TEXT, FMT_CHAT = 0, 1

DOC_SCHEMA = pa.schema(
    [
        ("source", pa.int32()),
        ("doc_id", pa.string()),
        ("fmt", pa.int8()),
        ("text", pa.string()),  # the document, or the chat record as JSON [[role, content], ...]
        ("nbytes", pa.int64()),  # UTF-8 bytes of the text (chat: of the message contents)
        ("score", pa.float64()),  # score_field value (NaN when unset)
        ("split", pa.int8()),  # TRAIN / VAL, by a hash of the text (equal texts, same side), or by split_at (embedded)
        ("key", pa.float64()),  # uniform [0, 1) per document, by seed: sampling, mixture, order
        ("u", pa.float64()),  # uniform [0, 1) per text, by seed: random partitions
        ("bad", pa.string()),  # "" for a usable document, else why the record was not used
        ("where", pa.string()),
    ]
)

_JSONL_EXT = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
_PARQUET_EXT = (".parquet",)


def embedded_corpus_path(cache_dir: Path) -> Path:
    return cache_dir / "corpus" / f"embedded-{corpus_version()}.jsonl"


def source_label(index: int, src: SourceConfig) -> str:
    return f"{index}:{src.kind}:{src.path or 'stdlib-docs'}"


# ---------------------------------------------------------------------------------------------
# Resolving paths and fingerprints (driver side)


@dataclass
class Resolved:
    index: int
    src: SourceConfig
    label: str
    files: list[str] = field(default_factory=list)  # local files to read (sorted)
    uri: str | None = None  # a cloud URI handed to Ray as is
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    fingerprint: dict = field(default_factory=dict)
    capped: int = 0  # usable documents beyond max_documents (set while reading)


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """blake2b of the file's bytes, read in 1 MiB chunks (hashlib releases the GIL: threads scale)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# One document (a line, a paragraph, a JSONL record, or a whole file with separator "file") is
# parsed in one piece by one Ray task, so its size bounds a task's memory. 64 MiB is ~16M tokens,
# far past any context we train on; larger input is almost surely a file without line breaks.
MAX_DOCUMENT_BYTES = 64 * 2**20


def longest_document_bytes(path: str, whole_file: bool, chunk: int = 1 << 20) -> int:
    """Bytes in the longest line of ``path`` (the file's size when ``whole_file``), read in chunks:
    a file of one 2 GiB line is judged without 2 GiB in memory. Files under the limit are not read."""
    size = os.path.getsize(path)
    if whole_file or size <= MAX_DOCUMENT_BYTES:
        return size
    longest = run = 0  # run: bytes since the last newline
    with open(path, "rb") as f:
        while block := f.read(chunk):
            start = 0
            while (i := block.find(b"\n", start)) != -1:
                longest, run, start = max(longest, run + i - start), 0, i + 1
            run += len(block) - start
    return max(longest, run)


def _check_document_sizes(where: str, src: SourceConfig, files: list[str]) -> None:
    if src.kind not in ("text", "jsonl"):
        return
    whole = src.kind == "text" and src.separator == "file"
    for p in files:
        if p.endswith(".gz"):
            continue  # compressed: its lines are not visible in its bytes
        n = longest_document_bytes(p, whole)
        if n > MAX_DOCUMENT_BYTES:
            unit = "file" if whole else "line"
            raise ValueError(
                f"{where}: {p}: expected each {unit} under {MAX_DOCUMENT_BYTES >> 20} MiB (one document is parsed "
                f"whole), found a {unit} of {n / 2**20:,.0f} MiB; split it into lines or files"
            )


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _list_local(path: str, exts: tuple[str, ...] | None) -> list[str]:
    if glob.has_magic(path):
        found = sorted(glob.glob(path, recursive=True))
        return [p for p in found if not os.path.isdir(p)]
    if os.path.isdir(path):
        out = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            out += [
                os.path.join(root, f) for f in sorted(files) if not _hidden(f) and (exts is None or f.endswith(exts))
            ]
        return out
    if os.path.lexists(path):
        return [path]
    raise FileNotFoundError(path)


def _exts(src: SourceConfig) -> tuple[str, ...] | None:
    return {"jsonl": _JSONL_EXT, "parquet": _PARQUET_EXT}.get(src.kind)


def resolve_source(index: int, src: SourceConfig, cache_dir: Path) -> Resolved:
    res = Resolved(index, src, source_label(index, src))
    entry = src.model_dump(mode="json")
    where = f"data.sources[{index}] ({src.kind} {src.path})"
    if src.kind == "embedded" and src.format == "chat":
        from slmlab.data.instructions import embedded_instructions_path, write_embedded_instructions

        res.files = [str(write_embedded_instructions(embedded_instructions_path(cache_dir)))]
        entry["version"] = corpus_version()
    elif src.kind == "embedded":
        res.files = [str(write_embedded_corpus(embedded_corpus_path(cache_dir)))]
        entry["version"] = corpus_version()
    elif src.kind in ("text", "jsonl", "parquet") and is_remote(src.path):
        res.uri = src.path  # remote content is not hashed: use versioned URIs for reproducible caches
    elif src.kind in ("text", "jsonl", "parquet"):
        try:
            listed = _list_local(src.path, _exts(src))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: expected a file, folder or glob, found no such path") from None
        if not listed:
            raise FileNotFoundError(f"{where}: expected {'/'.join(_exts(src) or ('any',))} files, found none")
        for p in listed:
            try:
                with open(p, "rb"):
                    pass
                res.files.append(p)
            except OSError as err:
                res.unreadable.append((p, f"unreadable file ({type(err).__name__}: {err.strerror or err})"))
        _check_document_sizes(where, src, res.files)
        with ThreadPoolExecutor(4) as pool:
            digests = list(pool.map(file_digest, res.files))
        entry["files"] = [[os.path.abspath(p), d] for p, d in zip(res.files, digests)]
        entry["unreadable"] = [p for p, _ in res.unreadable]
    elif src.kind == "hf_disk" or (src.kind == "hf" and os.path.isdir(src.path)):
        if not os.path.isdir(src.path):
            raise FileNotFoundError(
                f"{where}: expected a folder written by datasets' save_to_disk, found no such folder"
            )
        files = _list_local(src.path, None)
        with ThreadPoolExecutor(4) as pool:
            entry["files"] = [[os.path.relpath(p, src.path), d] for p, d in zip(files, pool.map(file_digest, files))]
    # hf by name: identified by name, subset, split and revision (already in `entry`)
    res.fingerprint = entry
    return res


def source_fingerprint(cfg: DataConfig, cache_dir: Path) -> list:
    """What identifies the sources' content: the bytes of local files (hashed), the interpreter
    version for the embedded corpus, names (+ revision) for remote datasets, URIs for cloud paths."""
    return [resolve_source(i, s, cache_dir).fingerprint for i, s in enumerate(cfg.sources)]


# ---------------------------------------------------------------------------------------------
# Normalization (runs in Ray tasks)


def _unit(digest: bytes) -> float:
    return (int.from_bytes(digest[:8], "little") >> 11) / float(1 << 53)


def _type(v) -> str:
    return "null" if v is None else type(v).__name__


class Rows:
    """Builds a DOC_SCHEMA table; computes split/key/u by seed."""

    def __init__(self, index: int, src: SourceConfig, seed: int, val_fraction: float):
        self.index, self.src, self.seed, self.val_fraction = index, src, seed, val_fraction
        self.cols = {name: [] for name in DOC_SCHEMA.names}

    def doc(
        self,
        doc_id: str,
        text: str,
        nbytes: int,
        score: float = math.nan,
        fmt: int = FMT_TEXT,
        split_at: float | None = None,
    ) -> None:
        """``split_at``: the document's place on the embedded corpora's held-out circle (shared by the
        pretraining text and the Q/A answers drawn from it); otherwise the split follows the text."""
        h = hashlib.blake2b(f"{self.seed}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if split_at is None:
            held_out = _unit(h) < self.val_fraction
        else:
            turn = _unit(hashlib.blake2b(f"{self.seed}\x00held-out".encode(), digest_size=8).digest())
            held_out = (split_at + turn) % 1.0 < self.val_fraction
        k = hashlib.blake2b(
            f"{self.seed}\x00{self.index}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8
        ).digest()
        c = self.cols
        c["source"].append(self.index)
        c["doc_id"].append(doc_id)
        c["fmt"].append(fmt)
        c["text"].append(text)
        c["nbytes"].append(nbytes)
        c["score"].append(score)
        c["split"].append(VAL if held_out else TRAIN)
        c["key"].append(_unit(k))
        c["u"].append(_unit(h[8:]))
        c["bad"].append("")
        c["where"].append("")

    def bad(self, where: str, reason: str) -> None:
        c = self.cols
        for name, v in (
            ("source", self.index),
            ("doc_id", ""),
            ("fmt", FMT_TEXT),
            ("text", ""),
            ("nbytes", 0),
            ("score", math.nan),
            ("split", TRAIN),
            ("key", 0.0),
            ("u", 0.0),
            ("bad", reason),
            ("where", where),
        ):
            c[name].append(v)

    def record(self, rec: dict, where: str, default_id: str) -> None:
        """One jsonl/parquet/hf record → a document or a bad row."""
        src = self.src
        score = math.nan
        if src.score_field:
            v = rec.get(src.score_field)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float, np.integer, np.floating))
                or not math.isfinite(float(v))
            ):
                return self.bad(
                    where,
                    f"field {src.score_field!r} is {_type(v) if v is not None else 'missing'}, "
                    "expected a finite number",
                )
            score = float(v)
        doc_id = str(rec[src.id_field]) if src.id_field and rec.get(src.id_field) is not None else default_id
        split_at = None
        if src.kind == "embedded":  # our own records: a stable id (not the cache path) and a held-out place
            doc_id, split_at = rec["id"], rec["split_at"]
        if src.format == "chat":
            messages, reason = chat.normalize_chat(rec, src)
            if reason:
                return self.bad(where, reason)
            return self.doc(doc_id, chat.dumps(messages), chat.content_bytes(messages), score, FMT_CHAT, split_at)
        if src.text_field not in rec:
            return self.bad(where, f"missing field {src.text_field!r}")
        text = rec[src.text_field]
        if not isinstance(text, str):
            return self.bad(where, f"field {src.text_field!r} is {_type(text)}, expected a string")
        if not text.strip():
            return self.bad(where, "empty text")
        self.doc(doc_id, text, len(text.encode("utf-8", "surrogatepass")), score, split_at=split_at)

    def table(self) -> pa.Table:
        return pa.table(
            {n: pa.array(self.cols[n], type=DOC_SCHEMA.field(n).type) for n in DOC_SCHEMA.names}, schema=DOC_SCHEMA
        )


def _lines(path: str, data: bytes, rows: Rows):
    """Yield (line_no, str) of the decodable lines; bad (non-UTF-8) lines become bad rows."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not text
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        for n, raw in enumerate(data.split(b"\n"), 1):
            try:
                yield n, raw.decode("utf-8").removesuffix("\r")
            except UnicodeDecodeError as err:
                rows.bad(f"{path}:{n}", f"not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})")
        return
    for n, line in enumerate(text.split("\n"), 1):
        yield n, line.removesuffix("\r")


def parse_text(path: str, data: bytes, rows: Rows) -> None:
    sep = rows.src.separator
    if sep == "file":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = "\n".join(line for _, line in _lines(path, data, rows))
        if text.strip():
            rows.doc(f"{path}:1", text, len(text.encode("utf-8")))
        return
    para: list[str] = []
    start = 0
    for n, line in _lines(path, data, rows):
        if not line.strip():
            if para:
                text = "\n".join(para)
                rows.doc(f"{path}:{start}", text, len(text.encode("utf-8")))
                para = []
            continue
        if sep == "line":
            rows.doc(f"{path}:{n}", line, len(line.encode("utf-8")))
            continue
        if not para:
            start = n
        para.append(line)
    if para:
        text = "\n".join(para)
        rows.doc(f"{path}:{start}", text, len(text.encode("utf-8")))


def _fields_of(src: SourceConfig) -> str:
    if src.format == "chat":
        return f"{src.messages_field!r} (or {src.prompt_field!r}/{src.response_field!r})"
    return repr(src.text_field)


def parse_jsonl(path: str, data: bytes, rows: Rows) -> None:
    src = rows.src
    records = missing = 0
    seen_keys: set[str] = set()
    for n, line in _lines(path, data, rows):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except ValueError as err:
            rows.bad(where, f"invalid JSON ({err.msg})")
            continue
        if not isinstance(rec, dict):
            rows.bad(where, f"not a JSON object ({_type(rec)})")
            continue
        records += 1
        if len(seen_keys) < 50:
            seen_keys.update(list(rec)[:50])
        if not _has_field(rec, src):
            missing += 1
        rows.record(rec, where, where)
    if records and missing == records:
        rows.bad(
            path,
            f"{FATAL}{path}: no record has field {_fields_of(src)} (fields found: {', '.join(sorted(seen_keys)[:20])})",
        )


def _has_field(rec: dict, src: SourceConfig) -> bool:
    if src.format == "chat":
        return src.messages_field in rec or src.prompt_field in rec or src.response_field in rec
    return src.text_field in rec


def _wanted(src: SourceConfig) -> list[str]:
    return [src.messages_field, src.prompt_field, src.response_field] if src.format == "chat" else [src.text_field]


def parse_parquet(path: str, data: bytes, rows: Rows) -> None:
    """Rows of one parquet file (only the needed columns are decoded); ``where`` = file[row]."""
    import io

    import pyarrow.parquet as pq

    src = rows.src
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        rows.bad(path, f"unreadable file (parquet: {err})")
        return
    names = pf.schema_arrow.names
    if not set(names).intersection(_wanted(src)):
        rows.bad(path, f"{FATAL}{path}: expected column {_fields_of(src)}, found columns {names}")
        return
    cols = [c for c in _wanted(src) + [src.id_field, src.score_field, src.system_field] if c and c in names]
    n = 0
    for batch in pf.iter_batches(columns=cols, batch_size=8192):
        for rec in batch.to_pylist():
            where = f"{path}[{n}]"
            rows.record(rec, where, where)
            n += 1


class ParseFiles:
    """map_batches fn over read_binary_files rows (``bytes``, ``path``): text, jsonl or parquet files → docs."""

    def __init__(self, index: int, src: SourceConfig, seed: int, val_fraction: float):
        self.args = (index, src, seed, val_fraction)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = Rows(*self.args)
        src = rows.src
        for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
            if path.endswith(".gz"):
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as err:
                    rows.bad(path, f"unreadable file (gzip: {err})")
                    continue
            if not data.strip():
                rows.bad(path, "empty file")
                continue
            if src.kind == "text":
                parse_text(path, data, rows)
            elif src.kind == "parquet":
                parse_parquet(path, data, rows)
            else:
                parse_jsonl(path, data, rows)
        return rows.table()


class NormalizeRecords:
    """map_batches fn over Hugging Face dataset rows → docs."""

    def __init__(self, index: int, src: SourceConfig, seed: int, val_fraction: float, where: str):
        self.args = (index, src, seed, val_fraction)
        self.where = where

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = Rows(*self.args)
        src = rows.src
        names = set(batch.column_names)
        if batch.num_rows and not names.intersection(_wanted(src)):
            rows.bad(
                self.where,
                f"{FATAL}{self.where}: expected column {_fields_of(src)}, found columns {sorted(names - {'__row__'})}",
            )
            return rows.table()
        for rec in batch.to_pylist():
            row = rec.pop("__row__", None)  # the row number (datasets held locally)
            if row is not None:
                where = doc_id = f"{self.where}[{row}]"
            else:  # streamed datasets: no row number; the record's content names it
                where = self.where
                doc_id = f"{where}#{hashlib.blake2b(repr(sorted(rec.items())).encode(), digest_size=8).hexdigest()}"
            rows.record(rec, where, doc_id)
        return rows.table()


# ---------------------------------------------------------------------------------------------
# Ray Data readers


def _hf_dataset(res: Resolved):
    import datasets

    src = res.src
    where = f"data.sources[{res.index}] ({src.kind} {src.path})"
    if src.kind == "hf_disk":
        ds = datasets.load_from_disk(src.path)
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise ValueError(f"{where}: expected split {src.split!r}, found splits {sorted(ds)}")
            ds = ds[src.split]
    else:
        ds = datasets.load_dataset(
            src.path, src.subset, split=src.split, streaming=src.streaming, revision=src.revision
        )
    cols = getattr(ds, "column_names", None)
    if cols and not set(cols).intersection(_wanted(src)):
        raise ValueError(f"{where}: expected field {_fields_of(src)}, found columns {sorted(cols)}")
    if isinstance(ds, datasets.Dataset):
        ds = ds.flatten_indices() if ds._indices is not None else ds
    elif src.max_documents:
        ds = ds.take(src.max_documents)  # streamed: bound what is downloaded
    return ds


def _hf_to_ray(res: Resolved, ds):
    """A Hugging Face dataset → Ray. Hub datasets by name go through ``ray.data.from_huggingface``
    (which reads the Hub's parquet files in parallel when online); local ones (hf_disk, a local
    folder) are handed over directly, since that function asks the Hub about every dataset."""
    import datasets
    import ray

    if res.src.kind == "hf" and not os.path.isdir(res.src.path):
        return ray.data.from_huggingface(ds)
    if isinstance(ds, datasets.Dataset):
        table = ds.data.table
        table = table.append_column("__row__", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        step = 50_000
        return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(1, table.num_rows), step)])
    # a local folder streamed by datasets: read here in chunks (no `datasets` import in every worker)
    tables, step = [], 20_000
    for batch in ds.iter(batch_size=step):
        n = len(next(iter(batch.values()))) if batch else 0
        batch["__row__"] = list(range(len(tables) * step, len(tables) * step + n))
        tables.append(pa.Table.from_pydict(batch))
    return ray.data.from_arrow(tables or [pa.table({"__row__": pa.array([], pa.int64())})])


def read_source(res: Resolved, seed: int, val_fraction: float):
    """One source → a Ray Dataset of DOC_SCHEMA rows (usable docs capped at max_documents)."""
    import ray

    src = res.src
    args = (res.index, src, seed, val_fraction)
    if src.kind in ("text", "jsonl", "parquet", "embedded") and not (res.uri or res.files):
        ds = ray.data.from_arrow(Rows(*args).table())  # every file unreadable: only bad rows below
    elif src.kind in ("text", "jsonl", "embedded"):
        paths = res.uri or res.files
        exts = [e.lstrip(".") for e in _JSONL_EXT] if src.kind == "jsonl" and res.uri else None
        ds = ray.data.read_binary_files(paths, include_paths=True, file_extensions=exts)
        ds = ds.map_batches(ParseFiles(*args), batch_size=1, batch_format="pyarrow")
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        for f in res.files:  # local files: fail before Ray on a missing column
            try:
                names = pq.read_schema(f).names
            except (pa.ArrowException, OSError):
                continue  # not parquet: counted as an unreadable file when parsed
            if not set(names).intersection(_wanted(src)):
                raise ValueError(
                    f"data.sources[{res.index}] ({res.label}): {f}: expected column {_fields_of(src)}, "
                    f"found columns {names}"
                )
        ds = ray.data.read_binary_files(
            res.uri or res.files, include_paths=True, file_extensions=["parquet"] if res.uri else None
        )
        ds = ds.map_batches(ParseFiles(*args), batch_size=1, batch_format="pyarrow")
    else:
        ds = _hf_to_ray(res, _hf_dataset(res))
        ds = ds.map_batches(NormalizeRecords(*args, f"{src.kind}:{src.path}"), batch_format="pyarrow")
    if res.unreadable:
        rows = Rows(*args)
        for p, reason in res.unreadable:
            rows.bad(p, reason)
        ds = ds.union(ray.data.from_arrow(rows.table()))
    if src.max_documents:
        ds = ds.materialize()
        good = ds.map_batches(_usable, batch_format="pyarrow", batch_size=None)
        res.capped = max(0, good.count() - src.max_documents)  # usable documents left out by the cap
        ds = good.limit(src.max_documents).union(ds.map_batches(_unusable, batch_format="pyarrow", batch_size=None))
    return ds


def _usable(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("bad"), ""))


def _unusable(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.not_equal(batch.column("bad"), ""))


def read_documents(resolved: list[Resolved], seed: int, val_fraction: float):
    parts = [read_source(r, seed, val_fraction) for r in resolved]
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
