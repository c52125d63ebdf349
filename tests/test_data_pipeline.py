"""The Ray Data corpus pipeline end to end, on real text: every offline source kind in one weighted
mixture, exact token conservation, cache reuse and content hashing, topic partitions (twice, for
determinism), instruction data masks, and the bad-input report.

Real text = ../shared/data (tinyshakespeare, wikitext-2) when present; else two kinds of text this
project's own environment ships: stdlib documentation (the embedded corpus) and the license texts
plus scikit-learn dataset descriptions installed with its dependencies.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network: hf sources here are local folders
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from slmlab.config import validate_pipeline  # noqa: E402
from slmlab.data.shards import Shards, build_shards, cache_key, summary_for_mlflow  # noqa: E402
from slmlab.data.tokenizer import ASSISTANT, END_TURN, EOS, PAD, SYSTEM, USER, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(600)

from tests.conftest import SHARED_DATA as SHARED  # noqa: E402


def paragraphs(text: str) -> list[str]:
    """Independent of the library: maximal runs of non-blank lines, joined with newlines."""
    lines = [ln.removesuffix("\r") for ln in text.split("\n")]
    return ["\n".join(g) for blank, g in itertools.groupby(lines, key=lambda ln: not ln.strip()) if not blank]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Two real texts: a long play-like text file and a list of encyclopedic paragraphs."""
    root = tmp_path_factory.mktemp("corpus")
    if (SHARED / "tinyshakespeare" / "input.txt").exists() and (SHARED / "wikitext-2" / "valid.txt").exists():
        play = SHARED / "tinyshakespeare" / "input.txt"
        wiki = [p.strip() for p in paragraphs((SHARED / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"))]
    else:  # stdlib docs (not those the embedded source reads first) vs legal and dataset prose
        from slmlab.data.embedded import iter_documents

        docs = [t for _, t in itertools.islice(iter_documents(), 400)]
        play = root / "play.txt"
        play.write_text("\n\n".join(docs[200:]), encoding="utf-8")
        wiki = list(dict.fromkeys(p.strip() for p in shipped_prose() if len(p.strip()) > 20))  # unique, in order
        assert len(wiki) > 1500, "expected the installed dependencies' license texts"
    return {"root": root, "play": play, "wiki": [w for w in wiki if len(w) > 20]}


def shipped_prose() -> list[str]:
    """Paragraphs of the license files in the venv's *.dist-info folders and of scikit-learn's dataset
    descriptions: real English, of a kind unlike Python documentation, present wherever slmlab installs."""
    import sysconfig

    import sklearn

    site = Path(sysconfig.get_paths()["purelib"])
    files = sorted(
        p for p in site.glob("*.dist-info/**/*") if p.is_file() and p.name.upper().startswith(("LICEN", "COPY"))
    )
    files += sorted((Path(sklearn.__file__).parent / "datasets" / "descr").glob("*.rst"))
    return [p for f in files for p in paragraphs(f.read_text(encoding="utf-8", errors="replace"))]


def pipeline(run_dir: Path, data: dict, **tokenizer) -> object:
    return validate_pipeline(
        {
            "name": "datatest",
            "seed": 11,
            "run_dir": str(run_dir),
            "data": data,
            "tokenizer": {"vocab_size": 600, **tokenizer},
            "model": {
                "family": "vectorslm",
                "dim": 32,
                "n_layers": 1,
                "n_heads": 4,
                "n_kv_heads": 2,
                "max_seq_len": 256,
            },
        }
    )


def read_blocks(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """All blocks under a folder (recursively), read with pyarrow (the trainer's Ray read is tested once)."""
    import ray.data  # noqa: F401  registers the tensor extension type

    out = {"input_ids": [], "target_mask": []}
    for f in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(f)
        for c in out:
            out[c] += [chunk.to_numpy() for chunk in table.column(c).chunks]
    return np.concatenate(out["input_ids"]), np.concatenate(out["target_mask"])


def ray_read_blocks(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import ray

    batches = list(ray.data.read_parquet(str(folder)).iter_batches(batch_format="numpy", batch_size=None))
    return np.concatenate([b["input_ids"] for b in batches]), np.concatenate([b["target_mask"] for b in batches])


# ---------------------------------------------------------------------------------------------
# every offline source kind, mixed by weight


@pytest.fixture(scope="module")
def mixture(ray_local, corpus, tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("mix") / "data"
    root.mkdir()
    wiki = corpus["wiki"]
    third = len(wiki) // 3
    (root / "wiki.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in wiki[:third]), encoding="utf-8")
    pq.write_table(
        pa.table({"body": wiki[third : 2 * third], "n": list(range(2 * third - third))}), root / "wiki.parquet"
    )
    datasets.Dataset.from_dict({"content": wiki[2 * third :]}).save_to_disk(str(root / "wiki_hf"))
    (root / "hf_local").mkdir()
    half = corpus["play"].read_text(encoding="utf-8")[:300_000]
    (root / "hf_local" / "play.jsonl").write_text(
        "".join(json.dumps({"line": p}) + "\n" for p in paragraphs(half)), encoding="utf-8"
    )
    data = {
        "sources": [
            {"kind": "text", "path": str(corpus["play"]), "weight": 3},
            {"kind": "jsonl", "path": str(root / "*.jsonl"), "weight": 1},
            {"kind": "parquet", "path": str(root), "text_field": "body", "weight": 1},
            {"kind": "hf_disk", "path": str(root / "wiki_hf"), "text_field": "content", "weight": 1},
            {"kind": "hf", "path": str(root / "hf_local"), "text_field": "line", "weight": 1},
            {"kind": "embedded", "max_documents": 150, "weight": 1},
        ],
        "seq_len": 64,
        "val_fraction": 0.1,
    }
    cfg = pipeline(root.parent / "runs", data, sample_bytes=240_000)
    messages = []
    shards = build_shards(cfg, progress=messages.append)
    return cfg, shards, messages


def test_mixture_of_every_offline_source_kind(mixture):
    cfg, shards, _ = mixture
    s = shards.summary
    weights = np.array([src.weight for src in cfg.data.sources])
    requested = weights / weights.sum()
    assert [src["kind"] for src in s["sources"]] == ["text", "jsonl", "parquet", "hf_disk", "hf", "embedded"]
    for i, src in enumerate(s["sources"]):
        assert src["documents"] > 0 and src["bad_records"] == 0
        assert src["requested_share"] == pytest.approx(requested[i])
        assert src["achieved_share"]["train"] == pytest.approx(requested[i], abs=0.01), src["label"]
        assert src["sampling_rate"] <= 1.0 + 1e-9  # subsample: nothing repeated
    # validation follows the same rates; with a few dozen held-out documents per source it is only roughly there
    assert sum(src["achieved_share"]["val"] for src in s["sources"]) == pytest.approx(1.0)
    assert s["sources"][0]["achieved_share"]["val"] == pytest.approx(requested[0], abs=0.15)
    assert s["sources"][5]["documents"] == 150 and s["sources"][5]["documents_capped"] > 0  # max_documents, counted
    # the achieved mixture is what was packed: per-source selected tokens add up to the shard targets
    for split in ("train", "val"):
        assert sum(s["mixture"]["selected_tokens"][split].values()) == s[split]["tokens"]
    docs = pq.read_table(shards.documents_path).to_pandas()
    assert docs["copies"].max() == 1 and len(docs) == s["documents_read"]
    assert (docs.groupby("source")["split"].nunique() == 2).all()


def test_tokenizer_sample_is_drawn_from_every_source_by_weight(mixture):
    cfg, shards, _ = mixture
    s = shards.summary
    by_source = np.array(list(s["tokenizer"]["sample_bytes_by_source"].values()), dtype=float)
    assert (by_source > 0).all()
    assert by_source.sum() <= 1.05 * cfg.tokenizer.sample_bytes
    weights = np.array([src.weight for src in cfg.data.sources])
    share = by_source / by_source.sum()
    big_enough = np.array(
        [src["bytes"] > 1.2 * w / weights.sum() * cfg.tokenizer.sample_bytes for src, w in zip(s["sources"], weights)]
    )
    assert big_enough.sum() >= 3
    ratio = share[big_enough] / (weights[big_enough] / weights.sum())
    # proportional to the weights (to within whole documents), not first-source-first
    assert ((0.6 < ratio) & (ratio < 1.4)).all(), ratio


def test_shards_have_the_contract_layout(mixture):
    cfg, shards, _ = mixture
    ids, mask = ray_read_blocks(shards.train_dir)  # as the trainer reads them
    assert ids.dtype == np.int32 and mask.dtype == np.int8 and ids.shape[1] == cfg.data.seq_len + 1
    assert int(mask.sum()) == shards.summary["train"]["tokens"] and len(ids) == shards.summary["train"]["blocks"]
    assert (mask[:, 0] == 0).all()
    s = shards.summary
    assert s["vocab_size"] == load_tokenizer(shards.tokenizer_path).get_vocab_size()
    assert 1.0 < s["train"]["bytes_per_token"] < 6.0 and s["train"]["utilization"] > 0.95
    metrics = summary_for_mlflow(shards)
    assert metrics["data/train_tokens"] == s["train"]["tokens"] and metrics[
        "data/source_0/share_requested"
    ] == pytest.approx(0.375)
    assert all(isinstance(v, float) for v in metrics.values())
    with pytest.raises(ValueError, match="not partitioned"):
        shards.partition_dir(0)


# ---------------------------------------------------------------------------------------------
# conservation, cache reuse, content hashing


@pytest.fixture(scope="module")
def plain(ray_local, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    cfg = pipeline(
        root / "runs", {"sources": [{"kind": "text", "path": str(corpus["play"])}], "seq_len": 48, "val_fraction": 0.05}
    )
    messages = []
    return cfg, build_shards(cfg, progress=messages.append), messages


def test_every_token_is_packed_exactly_once(plain, corpus):
    _, shards, _ = plain
    tok = load_tokenizer(shards.tokenizer_path)
    docs = paragraphs(corpus["play"].read_text(encoding="utf-8"))
    expected = sum(len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False))  # + one EOS each
    got = 0
    for folder in (shards.train_dir, shards.val_dir):
        _, mask = read_blocks(folder)
        got += int(mask.sum())
    assert got == expected
    s = shards.summary
    assert s["train"]["tokens"] + s["val"]["tokens"] == expected
    assert s["train"]["documents"] + s["val"]["documents"] == len(docs) == s["documents_read"]
    assert s["train"]["bytes"] + s["val"]["bytes"] == sum(len(d.encode()) for d in docs)


def packed_documents(folder: Path, tok) -> list[str]:
    """The text documents in a shards folder, decoded: every stream token after the first is a target
    in exactly one block and each document is followed by EOS, so the targets split at EOS are the
    documents."""
    eos = tok.token_to_id(EOS)
    ids, mask = read_blocks(folder)
    targets = ids[mask.astype(bool)]
    pieces = np.split(targets, np.flatnonzero(targets == eos) + 1)[:-1]  # each ends with its EOS
    return [tok.decode(piece[:-1].tolist()) for piece in pieces]


@pytest.mark.parametrize("build", ["plain", "mixture"])
def test_no_validation_document_is_in_the_training_shards(build, request):
    shards = request.getfixturevalue(build)[1]
    tok = load_tokenizer(shards.tokenizer_path)
    val, train = packed_documents(shards.val_dir, tok), packed_documents(shards.train_dir, tok)
    s = shards.summary
    assert len(val) == s["val"]["documents"] > 10 and len(train) == s["train"]["documents"]
    shared = set(val) & set(train)
    assert not shared, f"{len(shared)} validation documents are also training documents, e.g. {sorted(shared)[:2]}"
    docs = pq.read_table(shards.documents_path).to_pandas()
    assert docs.groupby(["source", "doc_id"])["split"].nunique().max() == 1  # one side per document in the table too


def test_second_build_reuses_the_cache(plain):
    cfg, shards, _ = plain
    marker = shards.root / "_SUCCESS"
    before = (marker.stat().st_ino, marker.stat().st_mtime_ns, shards.root.stat().st_ino)
    messages = []
    again = build_shards(cfg, progress=messages.append)
    assert again.key == shards.key and again.root == shards.root
    assert messages == [f"data: reusing cached shards {shards.root}"]
    assert (marker.stat().st_ino, marker.stat().st_mtime_ns, shards.root.stat().st_ino) == before


def test_cache_key_hashes_file_contents_not_mtimes(tmp_path, corpus):
    path = tmp_path / "copy.txt"
    shutil.copy(corpus["play"], path)
    cfg = pipeline(tmp_path / "runs", {"sources": [{"kind": "text", "path": str(path)}]})
    key = cache_key(cfg)
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] = ord("x") if data[len(data) // 2] != ord("x") else ord("y")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert cache_key(cfg) != key
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache_key(cfg) == cache_key(cfg)  # touching alone changes nothing
    touched = cache_key(cfg)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache_key(cfg) == touched


# ---------------------------------------------------------------------------------------------
# partitions for independent experts


@pytest.fixture(scope="module")
def topic_data(ray_local, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("topic")
    wiki = root / "wiki.jsonl"
    wiki.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus["wiki"][:1500]), encoding="utf-8")
    data = {
        "sources": [
            {"kind": "text", "path": str(corpus["play"]), "weight": 1},
            {"kind": "jsonl", "path": str(wiki), "weight": 1},
        ],
        "seq_len": 64,
        "val_fraction": 0.1,
        "partition": {"method": "topic", "num_partitions": 3},
    }
    builds = [build_shards(pipeline(root / f"runs{i}", data), progress=lambda m: None) for i in range(2)]
    return data, builds


def test_topic_partitions_are_written_recorded_and_deterministic(topic_data):
    _, (shards, twin) = topic_data
    s = shards.summary
    assert s["partitions"]["method"] == "topic" and shards.num_partitions == 3
    docs = pq.read_table(shards.documents_path).to_pandas()
    assert set(docs["partition"]) == {0, 1, 2}
    for split in ("train", "val"):
        sizes = s["partitions"][split]
        assert sum(p["tokens"] for p in sizes) == s[split]["tokens"]
        for p in sizes:
            ids, mask = read_blocks(shards.partition_dir(p["partition"], split))
            assert int(mask.sum()) == p["tokens"] and len(ids) == p["blocks"]
            rows = docs[(docs["split"] == split) & (docs["partition"] == p["partition"])]
            assert int(rows["copies"].sum()) == p["documents"]
            assert int((rows["tokens"] * rows["copies"]).sum()) == p["tokens"]
    # the whole train folder still reads as one dataset (all partitions)
    _, mask = read_blocks(shards.train_dir)
    assert int(mask.sum()) == s["train"]["tokens"]
    # both sources' documents are spread by topic: the play and the encyclopedia mostly part ways
    purity = (
        docs[docs["copies"] > 0].groupby("partition")["source"].agg(lambda x: x.value_counts(normalize=True).iloc[0])
    )
    assert purity.mean() > 0.8
    # same corpus, same seed, another run dir → the same partition for every document
    other = pq.read_table(twin.documents_path).to_pandas()
    assert twin.key == shards.key
    merged = docs.merge(other, on=["source", "doc_id"], suffixes=("", "_twin"))
    assert len(merged) == len(docs) and (merged["partition"] == merged["partition_twin"]).all()
    assert (merged["copies"] == merged["copies_twin"]).all()
    assert twin.summary["partitions"] == s["partitions"]
    with pytest.raises(IndexError):
        shards.partition_dir(3)


# ---------------------------------------------------------------------------------------------
# instruction data


def reference_example(tok, messages: list[tuple[str, str]], limit: int) -> tuple[list[int], list[int]]:
    """Independent reference: tokenize the rendered template and mark assistant spans by walking it."""
    rendered = "".join(f"<|{r}|>{c}<|end|>" for r, c in messages)
    ids = tok.encode(rendered, add_special_tokens=False).ids
    roles = {tok.token_to_id(t): t for t in (SYSTEM, USER, ASSISTANT)}
    end = tok.token_to_id(END_TURN)
    mask, inside = [], False
    for t in ids:
        if t in roles:
            inside = roles[t] == ASSISTANT
            mask.append(0)
        else:
            mask.append(1 if inside else 0)
            if t == end:
                inside = False
    return ids[:limit], mask[:limit]


@pytest.fixture(scope="module")
def instruct(ray_local, corpus, plain, tmp_path_factory):
    """Chat data on the tokenizer of the `plain` build, as instruction fine-tuning after pretraining does."""
    root = tmp_path_factory.mktemp("chat")
    paras = paragraphs(corpus["play"].read_text(encoding="utf-8"))[:1200]
    records = []
    for i in range(0, len(paras) - 1, 2):
        q, a = paras[i][:120], paras[i + 1][:120]
        if i % 4 == 0:
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": "You answer in verse."},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                        {"role": "user", "content": "More?"},
                        {"role": "assistant", "content": "No more."},
                    ]
                }
            )
        else:
            records.append({"prompt": q, "response": a})
    records.append({"prompt": "Tell me everything. " * 5, "response": " ".join(paras[:40])})  # truncated, keeps targets
    records.append(
        {"prompt": " ".join(paras[40:80]), "response": "Too late."}
    )  # truncated before the answer: no targets
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = pipeline(
        root / "runs",
        {"sources": [{"kind": "jsonl", "path": str(path), "format": "chat"}], "seq_len": 192, "val_fraction": 0.1},
    )
    return records, build_shards(cfg, progress=lambda m: None, tokenizer_path=plain[1].tokenizer_path)


def test_instruction_data_reuses_the_pretraining_tokenizer(instruct, plain):
    _, shards = instruct
    pretrain = plain[1]
    assert shards.tokenizer_path.read_bytes() == pretrain.tokenizer_path.read_bytes()
    assert shards.summary["tokenizer"]["reused_from"] == str(pretrain.tokenizer_path)
    assert shards.summary["vocab_size"] == pretrain.summary["vocab_size"]
    assert (shards.root / "tokenizer_config.json").read_text() == (pretrain.root / "tokenizer_config.json").read_text()


def as_messages(rec: dict) -> list[tuple[str, str]]:
    if "messages" in rec:
        return [(m["role"], m["content"]) for m in rec["messages"]]
    return [("user", rec["prompt"]), ("assistant", rec["response"])]


def test_instruction_masks_and_packing(instruct):
    records, shards = instruct
    tok = load_tokenizer(shards.tokenizer_path)
    limit = 193
    expected_targets, truncated, lost, empty = 0, 0, 0, 0
    for rec in records:
        full_ids, full_mask = reference_example(tok, as_messages(rec), 10**9)
        ids, mask = full_ids[:limit], full_mask[:limit]
        expected_targets += sum(mask)
        truncated += len(full_ids) > limit
        lost += sum(full_mask) - sum(mask)
        empty += sum(mask) == 0
    s = shards.summary
    assert s["instruct"] == {
        "examples": len(records),
        "examples_truncated": truncated,
        "targets_truncated": lost,
        "examples_without_targets": empty,
    }
    assert 2 <= truncated < len(records) // 10 and empty == 1
    end, pad = tok.token_to_id(END_TURN), tok.token_to_id(PAD)
    starts = {tok.token_to_id(SYSTEM), tok.token_to_id(USER)}
    roles = starts | {tok.token_to_id(ASSISTANT)}
    total = 0
    for folder in (shards.train_dir, shards.val_dir):
        ids, mask = read_blocks(folder)
        total += int(mask.sum())
        for row, m in zip(ids, mask):
            # a block starts with a whole example and never ends inside one (except a block-long truncated example)
            assert row[0] in starts
            content = row[row != pad] if (row == pad).any() else row
            if (row == pad).any():
                assert content[-1] == end
            assert not any(t in roles for t in row[m.astype(bool)])  # role tokens are never targets
            assert tok.token_to_id(EOS) not in row
    assert total == expected_targets == s["train"]["tokens"] + s["val"]["tokens"]
    # the targets of a short example are exactly its answers, each closed by <|end|>
    ids, mask = read_blocks(shards.train_dir)
    answers = tok.decode(ids[0][mask[0].astype(bool)].tolist(), skip_special_tokens=False)
    assert answers.endswith(END_TURN) and SYSTEM not in answers and USER not in answers


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def messy(ray_local, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    folder = root / "jsonl"
    folder.mkdir()
    good = corpus["wiki"][:400]
    (folder / "a_good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good), encoding="utf-8")
    bad_lines = [
        json.dumps({"text": good[0]}),
        "{broken json",
        json.dumps({"text": 42}),
        json.dumps({"title": "no text"}),
        json.dumps({"text": ""}),
        json.dumps("just a string"),
    ]
    (folder / "b_bad.jsonl").write_bytes(("\n".join(bad_lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    (folder / "c_empty.jsonl").write_bytes(b"")
    os.symlink(root / "nowhere.jsonl", folder / "d_missing.jsonl")
    text = root / "play.txt"
    raw = corpus["play"].read_bytes()[:200_000]
    cut = raw.index(b"\n", 1000) + 1
    text.write_bytes(raw[:cut] + b"Bad \xff\xfe line\n" + raw[cut:])
    data = {
        "sources": [
            {"kind": "jsonl", "path": str(folder)},
            {"kind": "text", "path": str(text), "doc_separator": "line"},
        ],
        "seq_len": 32,
        "val_fraction": 0.1,
    }
    messages = []
    return root, folder, text, build_shards(pipeline(root / "runs", data), progress=messages.append), messages


def test_bad_records_are_counted_and_located(messy):
    root, folder, text, shards, messages = messy
    bad = shards.summary["bad_records"]
    assert bad["by_reason"] == {
        "invalid JSON": 1,
        "field 'text' is int, expected a string": 1,
        "missing field 'text'": 1,
        "empty text": 1,
        "not a JSON object": 1,
        "not UTF-8": 2,
        "empty file": 1,
        "unreadable file": 1,
    }
    assert bad["total"] == 9
    b = folder / "b_bad.jsonl"
    examples = "\n".join(bad["examples"])
    for loc in (
        f"{b}:2: invalid JSON",
        f"{b}:3: field 'text' is int",
        f"{b}:7: not UTF-8",
        f"{folder / 'c_empty.jsonl'}: empty file",
        f"{folder / 'd_missing.jsonl'}: unreadable file",
    ):
        assert loc in examples
    raw = text.read_bytes()
    line = raw[: raw.index(b"Bad \xff")].count(b"\n") + 1
    assert f"{text}:{line}: not UTF-8" in examples
    assert shards.summary["sources"][0]["bad_records"] == 8 and shards.summary["sources"][1]["bad_records"] == 1
    assert shards.summary["sources"][0]["documents"] == 401  # 400 good + the one good line of b_bad.jsonl
    assert any("9 bad records" in m for m in messages)


def test_entirely_bad_source_is_an_error_naming_it(ray_local, tmp_path, corpus):
    good = tmp_path / "good.txt"
    good.write_text("\n\n".join(corpus["wiki"][:50]), encoding="utf-8")
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"text": 1}\n{"text": null}\nnot json\n', encoding="utf-8")
    cfg = pipeline(
        tmp_path / "runs", {"sources": [{"kind": "text", "path": str(good)}, {"kind": "jsonl", "path": str(junk)}]}
    )
    with pytest.raises(ValueError) as err:
        build_shards(cfg, progress=lambda m: None)
    msg = str(err.value)
    assert "data.sources[1]" in msg and str(junk) in msg and "'text'" in msg and "expected usable documents" in msg
    assert f"{junk}:3: invalid JSON" in msg
    assert not list((tmp_path / "runs" / "cache" / "data").glob("*"))  # nothing half-built left behind


def test_missing_text_field_names_file_and_field(ray_local, tmp_path, corpus):
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in corpus["wiki"][:20]), encoding="utf-8")
    cfg = pipeline(tmp_path / "runs", {"sources": [{"kind": "jsonl", "path": str(path)}]})
    with pytest.raises(ValueError, match=r"recs\.jsonl: no record has field 'text' \(fields found: body\)"):
        build_shards(cfg, progress=lambda m: None)
    pq.write_table(pa.table({"body": corpus["wiki"][:20]}), tmp_path / "recs.parquet")
    cfg = pipeline(
        tmp_path / "runs",
        {"sources": [{"kind": "parquet", "path": str(tmp_path / "recs.parquet"), "text_field": "content"}]},
    )
    with pytest.raises(ValueError, match=r"recs\.parquet: expected column 'content', found columns \['body'\]"):
        build_shards(cfg, progress=lambda m: None)


def test_shards_is_a_plain_value(tmp_path):
    s = Shards(tmp_path, "k")
    assert s.train_dir == tmp_path / "train" and s.documents_path == tmp_path / "documents.parquet"
