"""Tokenize + pack throughput of the Ray Data pipeline vs raw ``tokenizers`` encode_batch.

    python benchmarks/bench_data_pipeline.py [--mb 24] [--actors 1,2] [--vocab 8192]

Same text, same machine, one run:
  * baseline: ``Tokenizer.encode_batch`` on every document in this process — tokenization only — at
    the same number of threads as the pipeline it is compared with: 1 thread (TOKENIZERS_PARALLELISM
    off) against 1 tokenizer actor, the library's rayon pool at N threads against N actors;
  * pipeline: the documents in Ray's object store → ``TokenizeDocs`` actors (num_cpus=0.5 each, one
    tokenizer thread each) → ``Finalize`` → ``PackAndWrite`` (packing + parquet files), exactly the
    build_shards stages after reading, for 1 and 2 tokenizer actors.
Reported: bytes/s of document text for each, and pipeline / baseline. The pipeline figure is wall
clock from submit to the last file written, actor start-up included; the fixed cost of one
execution (the same pipeline on 64 documents: actor start-up, scheduling, one file) is measured
too, and the "steady" ratio leaves it out. Runs are interleaved and repeated, and the summary takes
the best run of each configuration, since other processes on a small shared machine slow runs down
(never speed them up). Both sides must count the same target
tokens (one EOS per document).

Text: ../shared/data (tinyshakespeare, wikitext-2) when present, else the embedded stdlib-docs
corpus, split into paragraphs and repeated until --mb megabytes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import roofline  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def paragraphs(text: str) -> list[str]:
    lines = text.split("\n")
    return ["\n".join(g) for blank, g in itertools.groupby(lines, key=lambda ln: not ln.strip()) if not blank]


def load_text(target_bytes: int) -> tuple[list[str], str]:
    files = sorted(SHARED.glob("*/*.txt")) if SHARED.is_dir() else []
    if files:
        docs = [p for f in files for p in paragraphs(f.read_text(encoding="utf-8"))]
        origin = ", ".join(str(f) for f in files)
    else:
        from slmlab.data.embedded import iter_documents

        docs = [p for _, t in iter_documents() for p in paragraphs(t)]
        origin = "embedded stdlib-docs corpus"
    size = sum(len(d.encode()) for d in docs)
    reps = max(1, -(-target_bytes // size))
    return docs * reps, f"{origin} (x{reps})"


def doc_table(docs: list[str], seed: int = 0):
    from slmlab.data.config import SourceConfig
    from slmlab.data.sources import Rows

    rows = Rows(0, SourceConfig(kind="text", path="bench"), seed=seed, val_fraction=0.0001)
    for i, d in enumerate(docs):
        rows.doc(f"bench:{i}", d, len(d.encode()))
    return rows.table()


def run_pipeline(table, tok_path: Path, actors: int, seq_len: int, batch: int, out: Path) -> tuple[float, int, float]:
    import ray

    from slmlab.data.mixture import Plan
    from slmlab.data.packing import Finalize, PackAndWrite, TokenizeDocs
    from slmlab.data.tokenizer import EOS, PAD, load_tokenizer, token_byte_lengths

    tok = load_tokenizer(tok_path)
    plan = Plan(1, np.ones((2, 1), np.int64), np.zeros((2, 1)))
    step = 4 * batch  # the block size build_shards gives the tokenizer stage
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)]).materialize()
    t0 = time.perf_counter()
    packed = (
        ds.map_batches(
            TokenizeDocs,
            fn_constructor_args=(str(tok_path), seq_len, None),
            batch_size=batch,
            batch_format="pyarrow",
            concurrency=actors,
            num_cpus=0.5,
        )
        .map_batches(Finalize(plan), batch_format="pyarrow", batch_size=None)
        .map_batches(
            PackAndWrite(
                str(out),
                seq_len,
                tok.token_to_id(EOS),
                tok.token_to_id(PAD),
                np.asarray(token_byte_lengths(tok), np.int64),
                False,
            ),
            batch_size=8192,
            batch_format="pyarrow",
        )
    )
    t_first = None
    tokens = 0
    for row in packed.iter_rows():
        if t_first is None:
            t_first = time.perf_counter()
        tokens += int(row["tokens"])
    total = time.perf_counter() - t0
    return total, tokens, (t_first - t0 if t_first else 0.0)


def baseline(tok, docs: list[str], threads: int, times: list[float]) -> int:
    """encode_batch on one thread (the library's parallelism off) or on its rayon pool, sized to the largest
    actor count at start-up (RAYON_NUM_THREADS) so it matches that pipeline's thread count; returns target tokens."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"  # read by tokenizers at each call
    t0 = time.perf_counter()
    encs = tok.encode_batch(docs, add_special_tokens=False)
    times.append(time.perf_counter() - t0)
    return sum(len(e.ids) for e in encs) + len(docs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=64.0, help="megabytes of text")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2048, help="documents per tokenizer call (data.tokenize_batch_size)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    actors = [int(a) for a in args.actors.split(",")]
    if any(1 < k != max(actors) for k in actors):
        raise SystemExit("--actors: the baseline's thread pool has one size per process: use 1 and one other count")
    os.environ["RAYON_NUM_THREADS"] = str(max(actors))  # before tokenizers builds its pool

    docs, origin = load_text(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"text: {len(docs):,} documents, {n_bytes / 1e6:.1f} MB from {origin}")

    from slmlab.data.tokenizer import load_tokenizer, train_bpe

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    tok_path = train_bpe(docs[: max(1, len(docs) // int(max(1, args.mb // 4)))], args.vocab, 2, work / "tokenizer.json")
    tok = load_tokenizer(tok_path)

    import ray

    from slmlab.runtime import ensure_ray

    ensure_ray(num_cpus=args.cpus)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as build_shards runs it
    table = doc_table(docs)
    ray.data.range(8).map_batches(lambda b: b).materialize()  # warm Ray's worker pool (not the actors)
    tok.encode_batch(docs[:2000], add_special_tokens=False)
    print("\n".join(roofline.measure().lines()[:2]))
    print(
        f"pipeline: Ray Data on {args.cpus} CPUs, TokenizeDocs actors at num_cpus=0.5 (1 tokenizer thread each), "
        f"tokenize batch {args.batch}, seq_len {args.seq_len}; load average before: {os.getloadavg()[0]:.1f}"
    )
    base_times = {k: [] for k in actors}
    pipe_times, fixed_times = {k: [] for k in actors}, {k: [] for k in actors}
    tiny = table.slice(0, 64)  # the fixed cost of one execution: actor start-up, scheduling, a file write
    for rep in range(args.repeat):  # interleaved, so neighbours' load hits every configuration alike
        for k in actors:
            base_tokens = baseline(tok, docs, k, base_times[k])
            print(f"  [{rep}] baseline encode_batch, {k} thread(s): {base_times[k][-1]:6.2f} s  "
                  f"{n_bytes / base_times[k][-1] / 1e6:6.2f} MB/s")
            fixed, _, _ = run_pipeline(tiny, tok_path, k, args.seq_len, args.batch, work / f"tiny{rep}-{k}")
            total, tokens, t_first = run_pipeline(table, tok_path, k, args.seq_len, args.batch, work / f"out{rep}-{k}")
            assert tokens == base_tokens, f"pipeline packed {tokens} target tokens, baseline counted {base_tokens}"
            pipe_times[k].append(total)
            fixed_times[k].append(fixed)
            print(
                f"  [{rep}] {k} actor(s): {total:6.2f} s  {n_bytes / total / 1e6:6.2f} "
                f"MB/s  ratio {base_times[k][-1] / total:.2f}"
                f"  (fixed start-up {fixed:.1f} s; steady ratio {base_times[k][-1] / max(total - fixed, 1e-9):.2f};"
                f" {tokens:,} target tokens = baseline's)"
            )
    print(
        f"\nsummary (best of {args.repeat} per configuration; "
        f"{n_bytes / 1e6:.1f} MB; load average after: {os.getloadavg()[0]:.1f})"
    )
    print(
        "  configuration                 seconds   MB/s   ratio to encode_batch   fixed start-up   "
        "steady ratio (minus start-up)"
    )
    for k in actors:
        base = float(np.min(base_times[k]))
        t, f = float(np.min(pipe_times[k])), float(np.min(fixed_times[k]))
        print(f"  encode_batch, {k} thread(s)    {base:7.2f}  {n_bytes / base / 1e6:5.2f}   1.00")
        print(
            f"  Ray Data, {k} actor(s)         {t:7.2f}  {n_bytes / t / 1e6:5.2f}   {base / t:.2f} at equal threads"
            f"       {f:5.1f} s          {base / max(t - f, 1e-9):.2f}"
        )
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
