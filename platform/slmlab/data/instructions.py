"""The embedded instruction set: question/answer pairs built offline from the standard library.

Every documented public function and class of the standard library becomes one chat record:
the user asks what it does, the assistant answers with the first paragraph of its docstring.
Real English answers, no download, deterministic; on CPython 3.11.7 1,776 records (229 KB of text).
Used by ``pipelines/vectorslm.yaml``'s fine-tuning stage (``kind: embedded, format: chat``). Records
share their train/validation split with the pretraining documents that contain their answers
(see :mod:`slmlab.data.embedded`).
"""

from __future__ import annotations

import ast
from pathlib import Path

from slmlab.data.embedded import corpus_version, embedded_corpora, write_jsonl_once

QUESTIONS = (
    "What does {kind} `{name}` in the `{module}` module do?",
    "Explain `{module}.{name}`.",
    "Describe the {kind} `{name}` from `{module}`.",
)


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines()).strip()


def records_of(module: str, fname: str, tree: ast.Module):
    """The Q/A records of one module: its public top-level functions and classes with a docstring."""
    if fname.startswith("_"):
        return
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        answer = _first_paragraph(doc) if doc else ""
        if len(answer) < 20:
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        question = QUESTIONS[len(node.name) % len(QUESTIONS)].format(kind=kind, name=node.name, module=module)
        yield {"id": f"{module}.{node.name}", "prompt": question, "response": answer}


def iter_records():
    """The records ``{id, prompt, response, group, split_at}`` in a fixed order."""
    yield from embedded_corpora()[1]


def embedded_instructions_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / "corpus" / f"instructions-{corpus_version()}.jsonl"


def write_embedded_instructions(out: Path) -> Path:
    return write_jsonl_once(out, embedded_corpora()[1])
