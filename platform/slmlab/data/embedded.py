"""The embedded default corpus: Python's own standard-library documentation.

Built offline from the interpreter that runs slmlab — no download: the pydoc topic pages
(``pydoc_data.topics``, the language reference's prose) plus the docstrings of every standard
library module, class and function, read with ``ast`` so nothing is imported or executed.
On CPython 3.11.7 this is 585 documents and 2,185,546 bytes of text (79 topic pages and 506
modules' docstrings; ~610k tokens with the default 4k BPE). Sizes differ slightly between
Python versions, which is why the corpus is keyed by the interpreter version in the data cache.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

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


def _module_docs():
    for module, _, tree in stdlib_modules():
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    title = "" if isinstance(node, ast.Module) else f"{node.name}\n"
                    parts.append(title + doc)
        if parts:
            yield f"module:{module}", "\n\n".join(parts)


def iter_documents():
    """Yield (doc_id, text) in a fixed order."""
    import pydoc_data.topics as topics

    for key in sorted(topics.topics):
        yield f"topic:{key}", topics.topics[key]
    yield from _module_docs()


def corpus_version() -> str:
    return f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


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
    """The corpus as JSON lines (``{"id", "text"}``)."""
    return write_jsonl_once(out, ({"id": doc_id, "text": text} for doc_id, text in iter_documents()))
