"""Data-stage building blocks without Ray: parsing, packing, chat masks, mixture and partition plans,
the tokenizer's transformers round trip, config validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from slmlab.data import chat
from slmlab.data.config import DataConfig, PartitionConfig, SourceConfig
from slmlab.data.mixture import make_plan
from slmlab.data.packing import pack_examples, pack_text, truncate_example
from slmlab.data.sources import FATAL, Rows, parse_jsonl, parse_text
from slmlab.data.tokenizer import ASSISTANT, END_TURN, EOS, PAD, SPECIAL_TOKENS, USER, load_tokenizer, train_bpe

pytestmark = pytest.mark.timeout(300)


def docs_of(rows: Rows) -> list[tuple[str, str]]:
    c = rows.cols
    return [(d, t) for d, t, b in zip(c["doc_id"], c["text"], c["bad"]) if not b]


def bad_of(rows: Rows) -> list[tuple[str, str]]:
    c = rows.cols
    return [(w, b) for w, b in zip(c["where"], c["bad"]) if b]


# ---------------------------------------------------------------------------------------------
# plain text: what a document is


RAW = b"First para line 1\r\nline 2\n   \n\nSecond \xff para\nstill second\n\n\nThird\n"


@pytest.mark.parametrize(
    "sep, expected",
    [
        ("blank_line", [("f.txt:1", "First para line 1\nline 2"), ("f.txt:6", "still second"), ("f.txt:9", "Third")]),
        (
            "line",
            [
                ("f.txt:1", "First para line 1"),
                ("f.txt:2", "line 2"),
                ("f.txt:6", "still second"),
                ("f.txt:9", "Third"),
            ],
        ),
        ("file", [("f.txt:1", "First para line 1\nline 2\n   \n\nstill second\n\n\nThird\n")]),
    ],
)
def test_text_documents_by_separator(sep, expected):
    rows = Rows(0, SourceConfig(kind="text", path="x", doc_separator=sep), seed=1, val_fraction=0.1)
    parse_text("f.txt", RAW, rows)
    assert docs_of(rows) == expected
    # the non-UTF-8 line is a counted bad record with its file:line, and left out of its paragraph
    assert bad_of(rows) == [("f.txt:5", "not UTF-8 (byte 0xff at column 8)")]


def test_text_file_mode_is_verbatim():
    rows = Rows(0, SourceConfig(kind="text", path="x", doc_separator="file"), seed=1, val_fraction=0.1)
    parse_text("g.txt", "  héllo\r\n\nworld\n".encode(), rows)
    assert docs_of(rows) == [("g.txt:1", "  héllo\r\n\nworld\n")]


def test_jsonl_bad_records_are_counted_with_file_and_line():
    lines = [
        json.dumps({"text": "good one", "id": 7}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"text": 12}),
        json.dumps({"other": "x"}),
        json.dumps({"text": "   "}),
        "",  # blank lines are not records
        json.dumps({"text": "good two"}),
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xfe byte"}\n'
    rows = Rows(0, SourceConfig(kind="jsonl", path="x", id_field="id"), seed=1, val_fraction=0.1)
    parse_jsonl("d.jsonl", data, rows)
    assert docs_of(rows) == [("7", "good one"), ("d.jsonl:8", "good two")]
    bad = bad_of(rows)
    assert [w for w, _ in bad] == ["d.jsonl:2", "d.jsonl:3", "d.jsonl:4", "d.jsonl:5", "d.jsonl:6", "d.jsonl:9"]
    reasons = dict(bad)
    assert reasons["d.jsonl:9"].startswith("not UTF-8")
    assert reasons["d.jsonl:2"].startswith("invalid JSON")
    assert reasons["d.jsonl:3"] == "not a JSON object (list)"
    assert reasons["d.jsonl:4"] == "field 'text' is int, expected a string"
    assert reasons["d.jsonl:5"] == "missing field 'text'"
    assert reasons["d.jsonl:6"] == "empty text"


def test_jsonl_without_the_field_anywhere_is_fatal_naming_file_and_field():
    rows = Rows(0, SourceConfig(kind="jsonl", path="x", text_field="body"), seed=1, val_fraction=0.1)
    parse_jsonl("e.jsonl", b'{"text": "a"}\n{"text": "b"}\n', rows)
    fatal = [b for _, b in bad_of(rows) if b.startswith(FATAL)]
    assert len(fatal) == 1 and "e.jsonl" in fatal[0] and "'body'" in fatal[0] and "text" in fatal[0]


def test_split_and_keys_are_seeded_and_text_based():
    src = SourceConfig(kind="jsonl", path="x")
    a, b, c = (Rows(0, src, seed=s, val_fraction=0.3) for s in (1, 1, 2))
    for r in (a, b, c):
        for i in range(300):
            r.doc(f"id{i}", f"text {i}", 6)
    assert a.cols["split"] == b.cols["split"] and a.cols["key"] == b.cols["key"]
    assert a.cols["split"] != c.cols["split"]
    assert 0.2 < np.mean(a.cols["split"]) < 0.4
    d = Rows(1, src, seed=1, val_fraction=0.3)
    d.doc("other-id", "text 5", 6)
    assert d.cols["split"][0] == a.cols["split"][5]  # the same text lands on the same side, whatever its source


# ---------------------------------------------------------------------------------------------
# packing


def test_pack_text_conserves_every_token_and_targets_each_once():
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 500, size=int(n)).astype(np.int32) for n in rng.integers(1, 90, size=57)]
    seq_len, eos, pad = 16, 2, 0
    ids, mask = pack_text(np.concatenate(docs), [len(d) for d in docs], seq_len, eos, pad)
    assert ids.shape[1] == mask.shape[1] == seq_len + 1 and ids.dtype == np.int32 and mask.dtype == np.int8
    assert int(mask.sum()) == sum(len(d) + 1 for d in docs)
    assert (mask[:, 0] == 0).all()
    # the targets, read in order, are exactly the documents each followed by EOS
    expected = np.concatenate([np.append(d, eos) for d in docs])
    assert np.array_equal(ids[mask.astype(bool)], expected)
    # consecutive blocks overlap by one token (the context of the first target)
    assert np.array_equal(ids[1:, 0], ids[:-1, -1])
    assert ids[0, 0] == eos
    assert (ids[~mask.astype(bool)][1:] != pad).sum() <= len(ids)  # only position-0 tokens are unmasked non-pad


def test_pack_examples_never_split_an_example():
    rng = np.random.default_rng(1)
    seq_len = 20
    examples = []
    for n in rng.integers(2, seq_len + 1, size=40):
        e_ids = np.arange(100, 100 + n, dtype=np.int32)
        e_mask = np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.int8)
        examples.append((e_ids, e_mask))
    ids, mask = pack_examples(examples, seq_len, pad=0)
    assert int(mask.sum()) == sum(int(m.sum()) for _, m in examples)
    # every example appears contiguously inside one block, in order
    rebuilt = []
    for row in ids:
        run = []
        for t in row:
            if t == 0:
                break
            if t == 100 and run:
                rebuilt.append(run)
                run = []
            run.append(int(t))
        rebuilt.append(run)
    assert [len(r) for r in rebuilt] == [len(e) for e, _ in examples]


def test_truncate_example_counts_lost_targets():
    e_ids = np.arange(10, dtype=np.int32)
    e_mask = np.array([0, 0, 1, 1, 0, 1, 1, 1, 1, 1], dtype=np.int8)
    t_ids, t_mask, lost = truncate_example(e_ids, e_mask, 6)
    assert len(t_ids) == 6 and t_mask.sum() == 3 and lost == 4


# ---------------------------------------------------------------------------------------------
# chat records and the tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    texts = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "What is two plus two? It is four.",
        "Hello world, this is a test.",
    ] * 30
    path = train_bpe(texts, 400, 1, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return path


def test_chat_normalization_variants():
    src = SourceConfig(kind="jsonl", path="x", format="chat", system_field="sys")
    msgs, err = chat.normalize_chat(
        {
            "messages": [
                {"role": "system", "content": "be nice"},
                {"from": "human", "value": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        src,
    )
    assert err is None and msgs == [("system", "be nice"), ("user", "hi"), ("assistant", "hello")]
    msgs, err = chat.normalize_chat({"prompt": "2+2?", "response": "4", "sys": "math"}, src)
    assert msgs == [("system", "math"), ("user", "2+2?"), ("assistant", "4")]
    assert (
        chat.normalize_chat({"messages": [{"role": "user", "content": "hi"}]}, src)[1]
        == "no non-empty assistant message"
    )
    assert "role 'robot'" in chat.normalize_chat({"messages": [{"role": "robot", "content": "x"}]}, src)[1]
    assert (
        chat.normalize_chat({"prompt": "x", "response": None}, src)[1] == "field 'response' is null, expected a string"
    )
    assert chat.normalize_chat({"text": "x"}, src)[1].startswith("missing field 'messages'")


def test_chat_masks_cover_only_assistant_answers(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    conv = [
        ("system", "Be brief."),
        ("user", "What is two plus two?"),
        ("assistant", "It is four."),
        ("user", "And the fox?"),
        ("assistant", "The quick brown fox."),
    ]
    [(ids, mask)] = chat.encode_chats(tok, [conv])
    # identical to tokenizing the rendered template
    assert ids.tolist() == tok.encode(chat.render(conv), add_special_tokens=False).ids
    targets = tok.decode(ids[mask.astype(bool)].tolist(), skip_special_tokens=False)
    assert targets == f"It is four.{END_TURN}The quick brown fox.{END_TURN}"
    end = tok.token_to_id(END_TURN)
    assert int(((ids == end) & (mask == 1)).sum()) == 2 and int(((ids == end) & (mask == 0)).sum()) == 3


def test_tokenizer_loads_in_transformers_as_fast(tiny_tokenizer):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = load_tokenizer(tiny_tokenizer)
    text = "The lazy dog said: hello world! Ünïcödé ✓"
    expected = tok.encode(text, add_special_tokens=False).ids
    direct = PreTrainedTokenizerFast(tokenizer_file=str(tiny_tokenizer))
    auto = AutoTokenizer.from_pretrained(str(tiny_tokenizer.parent))
    for hf in (direct, auto):
        assert hf.is_fast
        assert hf(text, add_special_tokens=False)["input_ids"] == expected
        assert hf.decode(expected) == text
    assert auto.eos_token == EOS and auto.pad_token == PAD and auto.pad_token_id == tok.token_to_id(PAD)
    assert all(auto.convert_tokens_to_ids(t) == tok.token_to_id(t) for t in SPECIAL_TOKENS)
    conv = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."}]
    rendered = auto.apply_chat_template(conv, tokenize=False)
    assert rendered == chat.render([(m["role"], m["content"]) for m in conv])
    [(ids, _)] = chat.encode_chats(tok, [[(m["role"], m["content"]) for m in conv]])
    assert auto(rendered, add_special_tokens=False)["input_ids"] == ids.tolist()
    assert auto.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True).endswith(ASSISTANT)
    assert USER in rendered


# ---------------------------------------------------------------------------------------------
# mixture and partition plans


def synthetic_meta(n_per_source=(3000, 800, 200), seed=0):
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("source", "split", "key", "ntok", "u", "score", "topic")}
    for s, n in enumerate(n_per_source):
        cols["source"].append(np.full(n, s))
        cols["split"].append((rng.random(n) < 0.1).astype(np.int8))
        cols["key"].append(rng.random(n))
        cols["ntok"].append(rng.integers(5, 400, n))
        cols["u"].append(rng.random(n))
        cols["score"].append(rng.normal(size=n))
        cols["topic"].append(rng.integers(0, 3, n))
    return {k: np.concatenate(v) for k, v in cols.items()}


@pytest.mark.parametrize("strategy", ["subsample", "upsample"])
def test_mixture_meets_requested_token_shares(strategy):
    meta = synthetic_meta()
    labels = ["a", "b", "c"]
    weights = [0.2, 0.5, 0.3]
    plan, report = make_plan(meta, weights, strategy, labels)
    copies = plan.copies(meta["source"], meta["split"], meta["key"])
    for label, w in zip(labels, weights):
        assert report["requested"][label] == pytest.approx(w)
        assert report["achieved"]["train"][label] == pytest.approx(w, abs=0.01)
    train = meta["split"] == 0
    if strategy == "subsample":
        assert copies.max() == 1
        scarce = np.argmin([meta["ntok"][train & (meta["source"] == s)].sum() / w for s, w in enumerate(weights)])
        assert copies[train & (meta["source"] == scarce)].min() == 1  # the limiting source is used whole
    else:
        assert copies[train].min() >= 1 and copies.max() > 1
        assert copies[~train].max() == 1  # evaluation never repeats a document
    plan2, report2 = make_plan(meta, weights, strategy, labels)
    assert np.array_equal(plan2.copies(meta["source"], meta["split"], meta["key"]), copies) and report2 == report


def test_single_source_is_used_as_is():
    meta = synthetic_meta((500,))
    plan, report = make_plan(meta, [3.0], "subsample", ["only"])
    assert (plan.copies(meta["source"], meta["split"], meta["key"]) == 1).all()
    assert report["achieved"]["train"]["only"] == 1.0


@pytest.mark.parametrize("method", ["random", "topic", "curriculum"])
def test_partitions_are_deterministic_and_cover_everything(method):
    meta = synthetic_meta()
    cfg = PartitionConfig(method=method, num_partitions=3)
    plan, _ = make_plan(meta, [1, 1, 1], "subsample", ["a", "b", "c"], cfg)
    part = plan.partition(meta)
    assert set(np.unique(part)) == {0, 1, 2}
    plan2, _ = make_plan(meta, [1, 1, 1], "subsample", ["a", "b", "c"], cfg)
    assert np.array_equal(plan2.partition(meta), part)
    if method == "curriculum":
        copies = plan.copies(meta["source"], meta["split"], meta["key"])
        train = (meta["split"] == 0) & (copies > 0)
        tokens = [int((meta["ntok"] * copies)[train & (part == k)].sum()) for k in range(3)]
        assert max(tokens) - min(tokens) <= 2 * meta["ntok"].max()  # equal token runs, to within a document
        lengths = [meta["ntok"][train & (part == k)] for k in range(3)]
        assert lengths[0].max() <= lengths[1].min() and lengths[1].max() <= lengths[2].min()  # easiest first


@pytest.mark.parametrize("slack", [None, 0.1])
def test_topic_model_is_deterministic_and_recovers_topics(slack):
    from slmlab.data.topics import fit_topic_model

    rng = np.random.default_rng(3)
    vocab = {  # five-letter words: the three topics hold equal bytes, so balancing need not split one
        0: "ships ocean sails coast waves boats",
        1: "kings crown queen court realm lords",
        2: "class value tuple bytes float lists",
    }
    texts = [" ".join(rng.choice(vocab[i % 3].split(), size=12)) for i in range(120)]
    a = fit_topic_model(texts, 3, seed=5, balance_slack=slack).predict(texts)
    b = fit_topic_model(texts, 3, seed=5, balance_slack=slack).predict(texts)
    assert np.array_equal(a, b)
    truth = np.arange(120) % 3
    # clusters recover the three vocabularies (up to relabeling)
    assert all(len(set(a[truth == t])) == 1 for t in range(3)) and len(set(a)) == 3


def test_balanced_topics_cap_every_partition_and_unseen_text_goes_to_its_nearest_centroid():
    from slmlab.data.topics import fit_topic_model

    rng = np.random.default_rng(4)
    words = ["ships ocean sails coast waves boats", "kings crown queen court realm lords",
             "class value tuple bytes float lists"]
    topic = np.array([0] * 80 + [1] * 20 + [2] * 20)  # one topic holds two thirds of the bytes
    texts = [" ".join(rng.choice(words[t].split(), size=12)) for t in topic]
    plain = fit_topic_model(texts, 3, seed=5, balance_slack=None).predict(texts)
    share = lambda labels: np.array([sum(len(texts[i]) for i in np.flatnonzero(labels == k)) for k in range(3)])
    assert share(plain).max() > 0.6 * share(plain).sum()  # plain k-means keeps the big topic whole
    model = fit_topic_model(texts, 3, seed=5, balance_slack=0.1)
    balanced = model.predict(texts)
    assert share(balanced).max() <= 1.1 * share(balanced).sum() / 3
    # text it was not fitted on is labelled by its nearest centroid: a pure topic-1 text joins topic 1's
    home = np.bincount(balanced[topic == 1]).argmax()
    assert model.predict(["kings crown queen court realm lords kings queen"])[0] == home


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"kind": "text", "path": "x", "format": "chat"}, "format 'chat' only"),
        ({"kind": "jsonl", "path": "x", "doc_separator": "line"}, "doc_separator only"),
        ({"kind": "text"}, "needs 'path'"),
        ({"kind": "hf_disk", "path": "s3://bucket/ds"}, "cloud URI only"),
        ({"kind": "jsonl", "path": "s3://bucket/*.jsonl"}, "without wildcards"),
        ({"kind": "text", "path": "x", "weight": 0}, "greater than 0"),
    ],
)
def test_source_config_errors(raw, fragment):
    with pytest.raises(ValidationError) as err:
        SourceConfig(**raw)
    assert fragment in str(err.value)


def test_data_config_shape():
    cfg = DataConfig(
        sources=[{"kind": "text", "path": "a.txt", "weight": 2}, {"kind": "jsonl", "path": "b/", "format": "chat"}],
        mixture_strategy="upsample",
        partition={"method": "curriculum", "num_partitions": 4},
    )
    assert cfg.sources[0].separator == "blank_line" and cfg.partition.score == "length"
    with pytest.raises(ValidationError, match="score_field on every source"):
        DataConfig(
            sources=[{"kind": "text", "path": "a"}],
            partition={"method": "curriculum", "num_partitions": 2, "score": "field"},
        )
    with pytest.raises(ValidationError):
        DataConfig(partition={"method": "kmeans", "num_partitions": 2})
    with pytest.raises(ValidationError):
        DataConfig(partition={"method": "random", "num_partitions": 1})
    assert math.isclose(sum(s.weight for s in cfg.sources), 3.0)


def test_finalize_repeats_and_packs_every_copy(tmp_path):
    """Upsampled documents are repeated (each copy its own place in the order), partitions are kept
    apart, and PackAndWrite writes exactly the planned targets per (split, partition)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (tensor extension type)

    from slmlab.data.mixture import Plan
    from slmlab.data.packing import Finalize, PackAndWrite, _list_array

    rng = np.random.default_rng(2)
    n = 40
    docs = [rng.integers(10, 90, size=int(k)).astype(np.int32) for k in rng.integers(1, 30, size=n)]
    table = pa.table(
        {
            "source": pa.array(np.arange(n) % 2, pa.int32()),
            "split": pa.array((np.arange(n) % 5 == 0).astype(np.int8)),
            "fmt": pa.array(np.zeros(n, np.int8)),
            "ids": _list_array(docs, np.int32),
            "tmask": _list_array([np.zeros(0, np.int8)] * n, np.int8),
            "ntok": pa.array([len(d) + 1 for d in docs], pa.int64()),
            "key": pa.array(rng.random(n)),
            "u": pa.array(rng.random(n)),
            "score": pa.array(np.full(n, np.nan)),
            "topic": pa.array(np.full(n, -1, np.int32)),
        }
    )
    plan = Plan(
        2, whole=np.array([[1, 2], [1, 1]]), thr=np.array([[0.5, 0.0], [0.0, 0.0]]), method="random", num_partitions=2
    )
    cols = {c: table.column(c).to_numpy() for c in ("source", "split", "key", "u", "ntok", "score", "topic")}
    copies = plan.copies(cols["source"], cols["split"], cols["key"])
    out = Finalize(plan)(table)
    assert out.num_rows == copies.sum() and len(set(out.column("order").to_pylist())) == out.num_rows
    writer = PackAndWrite(str(tmp_path), 8, eos=2, pad=0, byte_lengths=np.ones(100, np.int64), partitioned=True)
    stats = writer(out)
    part = plan.partition(cols)
    for s, p, tokens, path in zip(stats["split"], stats["part"], stats["tokens"], stats["file"]):
        sel = (cols["split"] == s) & (part == p)
        assert tokens == int((cols["ntok"] * copies)[sel].sum())
        mask = np.concatenate([c.to_numpy() for c in pq.read_table(path).column("target_mask").chunks])
        assert int(mask.sum()) == tokens and f"part-{p:03d}" in path and ("/val/" in path) == bool(s)
    assert writer(out)["file"].tolist() == stats["file"].tolist()  # a retried batch overwrites, never duplicates


def test_longest_document_is_measured_in_chunks_without_reading_small_files(tmp_path, monkeypatch):
    from slmlab.data import sources

    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 10)
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"short\n" + b"x" * 25 + b"\nmid-length\n" + b"tail without newline")
    assert sources.longest_document_bytes(str(lines), whole_file=False, chunk=7) == 25  # spans 4 chunks
    assert sources.longest_document_bytes(str(lines), whole_file=True) == lines.stat().st_size
    small = tmp_path / "small.txt"
    small.write_bytes(b"0123456789")  # at the limit: not scanned, its size stands in
    assert sources.longest_document_bytes(str(small), whole_file=False) == 10
    src = sources.SourceConfig(kind="text", path=str(lines))
    with pytest.raises(ValueError, match=r"^data.sources\[3\] \(x\): .*lines.txt: expected each line under 0 MiB"):
        sources._check_document_sizes("data.sources[3] (x)", src, [str(lines)])
    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"a\n" * 20)  # 40 bytes in short lines: fine
    sources._check_document_sizes("data.sources[3] (x)", src, [str(ok)])
