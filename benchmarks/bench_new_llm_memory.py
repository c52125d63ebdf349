"""Peak inference memory of New-LLM vs a Llama-style transformer at 1k / 4k / 16k tokens, and decode speed.

    python benchmarks/bench_new_llm_memory.py            # 1k, 4k, 16k tokens
    python benchmarks/bench_new_llm_memory.py --quick    # 256, 1k tokens (smoke test, seconds)
    python benchmarks/bench_new_llm_memory.py --stream   # feed every token one at a time (no chunked prefill)

Each (model, length) runs in a fresh subprocess. The measured workload is: allocate the inference
state (New-LLM: its context vectors; transformer: its static KV cache sized for the run), push the N
tokens through it (chunked prefill of --chunk tokens, or token by token with --stream), then decode
--decode tokens one at a time. Reported:

  peak MiB      peak bytes of torch tensors allocated inside that workload and alive at the same
                time: the state/cache plus every activation; weights (allocated before) excluded.
                CPU: running sum of the allocation/free events of torch's CPU allocator recorded by
                torch.profiler(profile_memory=True) (tracemalloc cannot see them; RSS is page- and
                allocator-granular and includes the profiler's own buffers; scratch memory internal to
                oneDNN/MKL is not counted). CUDA: torch.cuda.max_memory_allocated() - allocated before.
                With --stream on CPU, profiling 16k single-token forwards is too slow, so peak MiB is
                instead the growth of the process's peak RSS (ru_maxrss) during the workload beyond
                the warm-up's: coarse (pages, allocator reuse) but it would show any per-token growth.
  state MiB     bytes of the state/cache object alone (analytic: numel * element size).
  run s         wall time of the (profiled, on CPU) workload.
  decode tok/s  1 / median time of one decode step (one token, one forward, unprofiled) over
                --decode further steps, with N + --decode tokens of context already in the state/cache.

The two models are sized to roughly equal parameter counts (printed). The transformer is
slmlab.models.vectorslm.VectorSLM with its static KV cache; if it cannot be imported the baseline
is skipped with a note.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import slmlab  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "platform"))

import torch  # noqa: E402

VOCAB, DIM, LAYERS = 4096, 256, 4
MODELS = ("new_llm", "transformer")


def build(kind: str, max_len: int):
    from slmlab.models.base import count_parameters

    if kind == "new_llm":
        from slmlab.models.new_llm import NewLLM, NewLLMConfig

        cfg = NewLLMConfig(
            vocab_size=VOCAB,
            dim=DIM,
            context_dim=256,
            n_layers=LAYERS,
            ffn_hidden=512,
            gate="vector",
            max_seq_len=max_len,
        )
        model = NewLLM(cfg)
    else:
        from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig

        cfg = VectorSLMConfig(
            vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=4, n_kv_heads=4, ffn_hidden=688, max_seq_len=max_len
        )
        model = VectorSLM(cfg)
    return model, count_parameters(model)


def prefill(model, ids: torch.Tensor, chunk: int, room: int):
    """A fresh state holding ids (chunked prefill, chunk=1 streams token by token); returns (state, logits)."""
    p = next(model.parameters())
    n = ids.size(1)
    cache = model.new_cache(ids.size(0), n + room, device=p.device, dtype=p.dtype)
    for s in range(0, n, chunk):
        logits = model({"input_ids": ids[:, s : s + chunk]}, cache=cache, start_pos=s, logits_to_keep=1).logits
    return cache, logits


def decode(model, cache, logits: torch.Tensor, pos: int, n: int) -> torch.Tensor:
    """Greedy-decode n tokens one forward each, continuing at position pos; returns the last logits."""
    for i in range(n):
        logits = model(
            {"input_ids": logits[:, -1].argmax(-1, keepdim=True)}, cache=cache, start_pos=pos + i, logits_to_keep=1
        ).logits
    return logits


def state_bytes(cache) -> int:
    tensors = [cache.context] if hasattr(cache, "context") else [cache.k, cache.v]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_tensor_bytes_cpu(fn):
    """(peak bytes of torch CPU tensors allocated inside fn and alive together, fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # frees of tensors allocated before profiling are not reported: this is growth
        peak = max(peak, live)
    return peak, result


def worker(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n, d, chunk = args.length, args.decode, 1 if args.stream else args.chunk
    model, n_params = build(args.model, max_len=n + 2 * d + 1)
    model = model.to(device, dtype).eval()
    ids = torch.randint(0, VOCAB, (1, n), device=device)

    def workload():
        cache, logits = prefill(model, ids, chunk, room=2 * d)
        return cache, decode(model, cache, logits, n, d)

    with torch.inference_mode():
        cache, logits = prefill(model, ids[:, :64], min(chunk, 64), room=2 * d)  # warm-up
        decode(model, cache, logits, 64, 4)
        del cache, logits
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            cache, logits = workload()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        elif args.stream:  # the profiler's per-op bookkeeping is too slow for 16k single-token forwards
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            cache, logits = workload()
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # KiB on Linux
        else:
            t0 = time.perf_counter()
            peak, (cache, logits) = peak_tensor_bytes_cpu(workload)
        workload_s = time.perf_counter() - t0
        steps = []  # unprofiled, context of n + d tokens; median step time resists other jobs' bursts
        for i in range(d):
            _sync(device)
            t0 = time.perf_counter()
            logits = decode(model, cache, logits, n + d + i, 1)
            _sync(device)
            steps.append(time.perf_counter() - t0)
        decode_s = d * statistics.median(steps)
    method = "cuda" if device.type == "cuda" else "rss" if args.stream else "profiler"
    print(
        json.dumps(
            {
                "model": args.model,
                "tokens": n,
                "params": n_params,
                "peak_bytes": peak,
                "method": method,
                "state_bytes": state_bytes(cache),
                "workload_s": workload_s,
                "decode_tok_s": d / decode_s,
            }
        )
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 and 1024 tokens only, 8 decode steps")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens per forward)")
    ap.add_argument("--stream", action="store_true", help="feed the context token by token (slow for the transformer)")
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded one at a time after the context")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each worker")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.worker:
        return worker(args)
    if args.quick:
        args.lengths, args.decode = [256, 1024], 8

    models = list(args.models)
    if "transformer" in models:
        try:
            from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "no baseline yet"
            print(f"note: transformer baseline skipped, slmlab.models.vectorslm not importable ({e!r})")
            models.remove("transformer")

    mode = "token by token" if args.stream else f"chunked prefill of {args.chunk}"
    print(
        f"device={args.device} dtype={args.dtype} threads={args.threads} "
        f"context: {mode}, then {args.decode} decode steps"
    )
    header = (
        f"{'model':<12}{'params':>10}{'tokens':>8}{'state MiB':>11}{'peak MiB':>10}{'run s':>8}{'decode tok/s':>14}"
    )
    print(header)
    rows: dict[str, list[dict]] = {m: [] for m in models}
    for m in models:
        for n in args.lengths:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--model",
                m,
                "--length",
                str(n),
                "--chunk",
                str(args.chunk),
                "--decode",
                str(args.decode),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--threads",
                str(args.threads),
            ]
            cmd += ["--stream"] if args.stream else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{m} at {n} tokens failed:\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows[m].append(r)
            print(
                f"{m:<12}{r['params']:>10,}{n:>8}{r['state_bytes'] / 2**20:>11.3f}{r['peak_bytes'] / 2**20:>10.2f}"
                f"{r['workload_s']:>8.1f}{r['decode_tok_s']:>14,.0f}",
                flush=True,
            )

    if args.stream and not args.device.startswith("cuda"):
        print(
            "peak MiB = growth of the process's peak RSS (ru_maxrss) during the workload, beyond the warm-up's;"
            " page-granular, 0 means no new memory was needed"
        )
        for m, rs in rows.items():
            if len(rs) >= 2:
                print(
                    f"{m}: peak RSS growth {rs[-1]['peak_bytes'] / 2**20:.2f} MiB at {rs[-1]['tokens']} tokens, "
                    f"{rs[0]['peak_bytes'] / 2**20:.2f} MiB at {rs[0]['tokens']}"
                )
        return
    for m, rs in rows.items():
        if len(rs) >= 2:
            ratio = rs[-1]["peak_bytes"] / max(rs[0]["peak_bytes"], 1)
            target = "  (target <= 1.05: " + ("met)" if ratio <= 1.05 else "MISSED)") if m == "new_llm" else ""
            print(f"{m}: peak tensor memory {rs[-1]['tokens']}/{rs[0]['tokens']} tokens = {ratio:.3f}{target}")


if __name__ == "__main__":
    main()
