"""Peak memory of ModularForge expert training and assembly, each in a fresh process.

    python benchmarks/bench_modularforge_memory.py           # the seed's default size (~54M parameters assembled)
    python benchmarks/bench_modularforge_memory.py --quick   # a small model (smoke test, seconds)

Size (the seed's default): d_model 512, 4 layers, 5 experts, top-2, vocabulary 16,384; the seed's
d_ff 2048 two-matrix FFN is a SwiGLU of width 1344 here (3 x 1344 ≈ 2 x 2048 weights per row, the
same parameter count). Trunk and expert weights are random: memory does not depend on their values.

Workloads, each in its own subprocess, measured the same way:

  expert training     the trunk frozen (every tensor but the FFNs), a fresh FFN at every layer, AdamW on
                      the FFNs only, --steps steps of (--batch x 128) tokens; plain torch, the model and
                      its optimizer alone (a Ray Train + DeepSpeed worker adds its own runtime on top)
  streaming assembly  slmlab.assemble.assemble_streaming: gates, REPAIR calibration, tensor-by-tensor write
  naive assembly      slmlab.assemble.assemble_in_memory: every expert loaded, stacked, whole MoE run and saved

Reported: baseline (RSS after imports and a warm-up: one layer of the same width run forward and
backward, then freed, so BLAS buffers sized by the width count as the process's), peak (the kernel's
VmHWM, reset to the baseline just before the workload through /proc/self/clear_refs), and
peak − baseline: the memory the workload itself added. Every workload runs with the same fixed glibc
malloc thresholds (TUNABLES below; --glibc-default to compare with glibc's adaptive ones).
The bar for streaming assembly: peak − baseline ≤ 1.10 × (skeleton + one expert), where skeleton =
the trunk's tensors without its FFNs and one expert = one expert file's tensors. The seed claims
~200 MB for expert training and ~80 MB for assembly.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import slmlab  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "platform"))

import torch  # noqa: E402

MiB = 2**20
SIZES = {  # (config fields, experts, top_k, calibration sequences per partition, seq_len)
    "default": (dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=8, ffn_hidden=1344, vocab_size=16384,
                     max_seq_len=256), 5, 2, 4, 128),
    "quick": (dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=336, vocab_size=2048,
                   max_seq_len=128), 3, 2, 2, 64),
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# Inputs (parent process)


def make_inputs(folder: Path, size: str) -> dict:
    from safetensors.torch import save_file

    from slmlab.assemble import TensorFile
    from slmlab.models.modularforge import expert_shapes, is_expert_tensor
    from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig
    from slmlab.train.checkpoint import write_model

    fields, n, top_k, seqs, T = SIZES[size]
    cfg = VectorSLMConfig(**fields)
    torch.manual_seed(0)
    write_model(VectorSLM(cfg), cfg, folder / "trunk")
    for e in range(n):  # one expert in memory at a time here too
        tensors = {k: torch.randn(s) * 0.02 for k, s in expert_shapes(cfg).items()}
        save_file(tensors, str(folder / f"expert-{e}.safetensors"))
    g = torch.Generator().manual_seed(1)
    calib = {}
    for e in range(n):
        calib[f"ids.{e}"] = torch.randint(0, cfg.vocab_size, (seqs, T), generator=g)
        calib[f"mask.{e}"] = torch.ones(seqs, T, dtype=torch.uint8)
    save_file(calib, str(folder / "calib.safetensors"))
    trunk = TensorFile(folder / "trunk" / "model.safetensors")
    nbytes = lambda f, keep: sum(4 * torch.Size(f.shape(k)).numel() for k in f.entries if keep(k))
    skeleton = nbytes(trunk, lambda k: not is_expert_tensor(k))
    expert = nbytes(TensorFile(folder / "expert-0.safetensors"), lambda k: True)
    params = skeleton // 4 + n * expert // 4 + n * cfg.dim * cfg.n_layers
    return {"skeleton": skeleton, "expert": expert, "params": params, "experts": n, "top_k": top_k}


# ----------------------------------------------------------------------------------------------
# Workloads (child processes)


def _warm_up(folder: Path) -> None:
    """Run the kernels the workloads will run, at their width, once: BLAS packing buffers and lazily
    initialised kernels (~14 MiB at the default width, measured) belong to the process, not to a
    workload. A one-layer model of the same width, forward + backward + an AdamW step, then freed."""
    from slmlab.assemble import _read_trunk
    from slmlab.models.vectorslm import VectorSLM

    cfg = _read_trunk(folder / "trunk")
    small = cfg.model_copy(update={"n_layers": 1, "vocab_size": 64})
    m = VectorSLM(small)
    ids = torch.randint(0, 64, (1, 129))
    m({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}).loss.backward()
    torch.optim.AdamW(m.parameters()).step()
    del m
    gc.collect()


def child(mode: str, folder: Path, batch: int, steps: int) -> dict:
    from safetensors.torch import load_file

    from slmlab import assemble
    from slmlab.models.modularforge import expert_prefixes, is_expert_tensor
    from slmlab.models.vectorslm import VectorSLM

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    _warm_up(folder)
    baseline = _status("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    if mode in ("streaming", "naive"):
        raw = load_file(str(folder / "calib.safetensors"))
        n = len([k for k in raw if k.startswith("ids.")])
        calib = [assemble.Calibration(raw[f"ids.{e}"], raw[f"mask.{e}"].bool()) for e in range(n)]
        del raw
        files = [folder / f"expert-{e}.safetensors" for e in range(n)]
        top_k = int(os.environ["BENCH_TOP_K"])
        if mode == "streaming":
            assemble.assemble_streaming(folder / "trunk", files, calib, folder / "out-streaming", top_k=top_k,
                                        progress=lambda _: None)
        else:
            assemble.assemble_in_memory(folder / "trunk", files, calib, folder / "out-naive", top_k=top_k)
    else:  # expert training: frozen trunk, fresh FFNs, AdamW on the FFNs
        from slmlab.assemble import _read_trunk

        cfg = _read_trunk(folder / "trunk")
        model = VectorSLM(cfg)
        trunk = assemble.TensorFile(folder / "trunk" / "model.safetensors")
        sd = model.state_dict()
        with torch.no_grad():
            for k in trunk.entries:
                if not is_expert_tensor(k):
                    trunk.read_into(k, sd[k])
        del sd
        trainable = [p for name, p in model.named_parameters() if name.startswith(expert_prefixes(cfg.n_layers))]
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(expert_prefixes(cfg.n_layers)))
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            ids = torch.randint(0, cfg.vocab_size, (batch, 129), generator=g)
            loss = model({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"mode": mode, "baseline": baseline, "peak": peak, "added": peak - baseline, "seconds": seconds,
            "exact_peak": exact}


# Fixed glibc thresholds in every workload's process: by default glibc raises its mmap threshold to the
# largest block freed so far (up to 32 MiB) and its trim threshold to twice that, after which freed
# activations stay in the heap and RSS measures the allocator's history rather than what is live.
TUNABLES = "glibc.malloc.mmap_threshold=262144:glibc.malloc.trim_threshold=262144"


def run_child(mode: str, folder: Path, batch: int, steps: int, top_k: int, glibc_default: bool) -> dict:
    env = {**os.environ, "BENCH_TOP_K": str(top_k)}
    if not glibc_default:
        env["GLIBC_TUNABLES"] = TUNABLES
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(folder), "--batch", str(batch),
                          "--steps", str(steps)], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=16, help="expert-training micro-batch (sequences of 128 tokens)")
    ap.add_argument("--steps", type=int, default=3, help="expert-training optimizer steps")
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic malloc thresholds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir), args.batch, args.steps)))
        return

    size = "quick" if args.quick else "default"
    with tempfile.TemporaryDirectory(prefix="bench-modularforge-") as tmp:
        folder = Path(tmp)
        info = make_inputs(folder, size)
        ref = info["skeleton"] + info["expert"]
        print(f"size {size}: {info['params'] / 1e6:.1f}M parameters assembled ({info['experts']} experts, "
              f"top-{info['top_k']}); skeleton {info['skeleton'] / MiB:.1f} MiB + one expert "
              f"{info['expert'] / MiB:.1f} MiB = {ref / MiB:.1f} MiB")
        go = lambda mode, batch=0, steps=0: run_child(mode, folder, batch, steps, info["top_k"], args.glibc_default)
        small = max(1, args.batch // 4)
        rows = [(f"expert training (batch {args.batch})", go("train", args.batch, args.steps), 200),
                (f"expert training (batch {small})", go("train", small, args.steps), 200),
                ("streaming assembly", go("streaming"), 80),
                ("naive assembly", go("naive"), None)]
        out_size = (folder / "out-streaming" / "model.safetensors").stat().st_size
    print(f"assembled checkpoint: {out_size / MiB:.1f} MiB; malloc: "
          f"{'glibc defaults' if args.glibc_default else TUNABLES}")
    print(f"{'workload':32} {'baseline MiB':>12} {'peak MiB':>9} {'added MiB':>10} {'seed MB':>8} {'s':>6}")
    for name, r, seed in rows:
        print(f"{name:32} {r['baseline'] / MiB:12.1f} {r['peak'] / MiB:9.1f} {r['added'] / MiB:10.1f} "
              f"{seed if seed else '-':>8} {r['seconds']:6.1f}")
    stream, naive = rows[2][1], rows[3][1]
    ratio = stream["added"] / ref
    print(f"streaming assembly: added / (skeleton + one expert) = {ratio:.3f} (bar 1.10: "
          f"{'met' if ratio <= 1.10 else 'MISSED'}); naive / streaming = {naive['added'] / stream['added']:.2f}x")
    if not all(r["exact_peak"] for _, r, _ in rows):
        print("note: /proc/self/clear_refs unavailable: peaks include the imports' transient peak")


if __name__ == "__main__":
    main()
