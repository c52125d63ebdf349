"""The embedded default corpus: Python's own standard-library documentation.

Built offline from the interpreter that runs slmlab — no download: the pydoc topic pages
(``pydoc_data.topics``, the language reference's prose) plus the docstrings of every standard
library module, class and function, read with ``ast`` so nothing is imported or executed.
On CPython 3.11.7 this is 585 documents and 2,185,546 bytes of text (79 topic pages and 506
modules' docstrings; ~610k tokens with the default 4k BPE). Sizes differ slightly between
Python versions, which is why the corpus is keyed by the interpreter version in the data cache.

The instruction set (:mod:`slmlab.data.instructions`) answers questions with the first paragraph of
these same docstrings. So that fine-tuning is never validated on pretraining text, both corpora are
built in one walk and every record carries a ``group``: the documents linked by a shared answer
(an answer's own module, and every document whose text contains that answer) form one group, and
the train/validation split is decided per group, identically for both corpora. Groups lie on a
circle in a fixed hashed order, each taking an arc as long as its share of the corpus (half bytes,
half Q/A records); a record's ``split_at`` is its group's place there. The seed turns the circle and
the first ``val_fraction`` of it is held out (:class:`slmlab.data.sources.Rows`): so about that
fraction of both corpora, whole groups only, and the held-out set grows monotonically with
``val_fraction``. With the same seed, every fine-tuning validation answer is in pretraining
validation documents only when the fine-tuning ``val_fraction`` is at most the pretraining one.
"""

from __future__ import annotations

import ast
import bisect
import functools
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

CORPUS_FORMAT = 2  # bump when the records change: corpus files of another format are not reused

# test suites and GUI/IDE internals are code, not documentation
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def stdlib_modules():
    """Yield (dotted module name, file name, parsed AST) for every standard-library source file,
    in a fixed order, without importing anything."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(root, name)
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            yield str(path.relative_to(stdlib).with_suffix("")).replace(os.sep, "."), name, tree


def _module_doc(tree: ast.Module) -> str:
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                title = "" if isinstance(node, ast.Module) else f"{node.name}\n"
                parts.append(title + doc)
    return "\n\n".join(parts)


def _groups(docs: list[dict], links: list[tuple[str, str]]) -> dict[str, str]:
    """Document id -> group: connected components of documents linked by an answer (its own
    document, and every document whose whitespace-normalized text contains it), named by their
    smallest id."""
    parent = {d["id"]: d["id"] for d in docs}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    texts = [" ".join(d["text"].split()) for d in docs]
    starts = [0]
    for t in texts[:-1]:
        starts.append(starts[-1] + len(t) + 1)
    haystack = "\x00".join(texts)  # one string: one fast search per answer instead of one per document
    for own, answer in links:
        needle = " ".join(answer.split())
        i = haystack.find(needle)
        while i >= 0:
            a, b = find(own), find(docs[bisect.bisect_right(starts, i) - 1]["id"])
            if a != b:
                parent[max(a, b)] = min(a, b)
            i = haystack.find(needle, i + 1)
    return {d: find(d) for d in parent}


@functools.lru_cache(maxsize=1)
def embedded_corpora() -> tuple[list[dict], list[dict]]:
    """Both embedded corpora from one walk of the standard library, in a fixed order: documents
    ``{id, text, group, split_at}`` and instruction records ``{id, prompt, response, group, split_at}``."""
    import pydoc_data.topics as topics

    from slmlab.data.instructions import records_of

    docs = [{"id": f"topic:{key}", "text": topics.topics[key]} for key in sorted(topics.topics)]
    records, links = [], []
    for module, fname, tree in stdlib_modules():
        text = _module_doc(tree)
        if text:
            docs.append({"id": f"module:{module}", "text": text})
        for rec in records_of(module, fname, tree):
            records.append(rec)
            links.append((f"module:{module}", rec["response"]))
    group = _groups(docs, links)
    weight: dict[str, float] = {}
    total_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    for d in docs:
        weight[group[d["id"]]] = weight.get(group[d["id"]], 0.0) + 0.5 * len(d["text"].encode("utf-8")) / total_bytes
    for own, _ in links:
        weight[group[own]] += 0.5 / max(1, len(links))
    split_at, at = {}, 0.0
    for g in sorted(weight, key=lambda g: hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest()):
        split_at[g], at = at, at + weight[g]
    for d in docs:
        d["group"] = group[d["id"]]
        d["split_at"] = split_at[d["group"]]
    for rec, (own, _) in zip(records, links):
        rec["group"] = group[own]
        rec["split_at"] = split_at[rec["group"]]
    return docs, records


def iter_documents():
    """Yield (doc_id, text) in a fixed order."""
    for d in embedded_corpora()[0]:
        yield d["id"], d["text"]


def corpus_version() -> str:
    v = sys.version_info
    return f"python-{v.major}.{v.minor}.{v.micro}-c{CORPUS_FORMAT}"


def write_jsonl_once(out: Path, records) -> Path:
    """Write ``records`` (dicts) as JSON lines atomically; an existing file is reused as is."""
    out = Path(out)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, out)
    return out


def write_embedded_corpus(out: Path) -> Path:
    """The corpus as JSON lines (``{"id", "text", "group", "split_at"}``)."""
    return write_jsonl_once(out, embedded_corpora()[0])
