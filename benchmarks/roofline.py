"""This machine's own limits, measured in the run that reports against them.

Every benchmark prints a roofline first so that each figure it reports can be read as a fraction of
what the hardware can do, measured now (another machine, another load, another torch build move both
the figure and its limit):

  * dense matmul FLOP/s at 2048^3 (the attainable peak) and at the model's own shapes (small matmuls
    reach less of it: that is the ceiling a small model's training can hope for);
  * memory read bandwidth: the best of a few full reads (a sum) of a buffer 8x the last-level cache;
  * cache sizes, from sysfs.

Batch-1 decoding reads every weight and the KV history once per token, so its roofline is
bandwidth / (weight bytes + KV bytes per token). A model whose weights fit in the last-level cache is
not bound by DRAM bandwidth at all, and the benchmarks say so instead of quoting a meaningless fraction.

    python benchmarks/roofline.py        # prints this machine's limits alone
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cache_sizes() -> dict[str, int]:
    """{"L1d": bytes, "L2": bytes, "L3": bytes} of CPU 0, from sysfs (empty where it is not readable)."""
    sizes: dict[str, int] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
        sizes[f"L{level}{'d' if kind == 'Data' else ''}"] = int(text.rstrip("KMG")) * unit
    return sizes


def matmul_flops(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Best FLOP/s of (m,k) @ (k,n), repeated for about ``seconds``: best, since other processes only ever
    add time."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    c = torch.mm(a, b)
    best, spent = float("inf"), 0.0
    reps = 0
    while spent < seconds or reps < 3:
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync(device)
        dt = time.perf_counter() - t
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * m * k * n / best


def read_bandwidth(device: torch.device, nbytes: int, reps: int = 8) -> float:
    """Bytes/s of the best full read (a sum) of an fp32 buffer of ``nbytes``."""
    x = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


@dataclass
class Roofline:
    device: str
    dtype: str
    threads: int
    peak_flops: float  # 2048^3 matmul (8192^3 on GPU), FLOP/s
    bandwidth: float  # bytes/s, best full read of a buffer far larger than the last-level cache
    caches: dict[str, int]
    shape_flops: dict[tuple[int, int, int], float] = field(default_factory=dict)  # (m, k, n) -> FLOP/s

    @property
    def last_level_cache(self) -> int:
        return max(self.caches.values(), default=0)

    def shapes_flops(self, shapes: list[tuple[int, int, int]]) -> float:
        """FLOP/s of running the given matmuls one after another (time-weighted, not an average of rates):
        the best a model made of these matmuls could do."""
        work = sum(2 * m * k * n for m, k, n in shapes)
        return work / sum(2 * m * k * n / self.shape_flops[(m, k, n)] for m, k, n in shapes)

    def decode_tokens_per_s(self, weight_bytes: float, kv_bytes_per_token: float) -> float:
        """Batch-1 decode roofline: every weight and the KV history read once per token."""
        return self.bandwidth / (weight_bytes + kv_bytes_per_token)

    def fits_in_cache(self, nbytes: float) -> bool:
        return 0 < nbytes <= self.last_level_cache

    def lines(self) -> list[str]:
        caches = "  ".join(f"{k} {v / 1024**2:g} MiB" if v >= 1024**2 else f"{k} {v // 1024} KiB"
                           for k, v in self.caches.items())
        out = [
            f"roofline ({self.device}, {self.dtype}, {self.threads} threads, measured in this run):",
            f"  matmul peak {self.peak_flops / 1e9:8.1f} GFLOP/s (2048^3)   read bandwidth "
            f"{self.bandwidth / 1e9:6.1f} GB/s   caches: {caches or 'unknown'}",
        ]
        for (m, k, n), f in self.shape_flops.items():
            share = f / self.peak_flops * 100
            out.append(f"  matmul {m}x{k} @ {k}x{n}: {f / 1e9:8.1f} GFLOP/s ({share:4.0f}% of peak)")
        return out


def measure(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shapes: list[tuple[int, int, int]] = (),
) -> Roofline:
    device = torch.device(device)
    caches = cache_sizes() if device.type == "cpu" else {}
    peak_n = 2048 if device.type == "cpu" else 8192
    if device.type == "cpu":
        buffer = max(8 * max(caches.values(), default=32 * 1024**2), 256 * 1024**2)
    else:
        buffer = 2 * 1024**3
    roof = Roofline(
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
        # best of three half-second tries: a busy neighbour only ever lowers a try, and a low peak would
        # inflate every MFU printed against it (one 0.3 s try read 148 GFLOP/s where the same machine gave 188)
        peak_flops=max(matmul_flops(peak_n, peak_n, peak_n, device, dtype, seconds=0.5) for _ in range(3)),
        bandwidth=read_bandwidth(device, buffer),
        caches=caches,
    )
    for s in dict.fromkeys(shapes):
        roof.shape_flops[s] = max(matmul_flops(*s, device, dtype) for _ in range(2))
    return roof


def vectorslm_train_flops_per_token(cfg, seq_len: int) -> float:
    """6 x matmul parameters (the LM head included, the embedding lookup not) + 12 x layers x dim x seq_len for
    attention's score and value matmuls (PaLM's MFU estimate)."""
    d, L, hd = cfg.dim, cfg.n_layers, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    n_matmul = L * (attn + 3 * d * cfg.ffn_dim) + d * cfg.vocab_size
    return 6 * n_matmul + 12 * L * d * seq_len


def vectorslm_train_shapes(cfg, tokens: int) -> list[tuple[int, int, int]]:
    """The forward matmuls of one VectorSLM layer (times n_layers) and the LM head, as (m, k, n).
    The backward runs each twice more at transposed shapes of the same size."""
    d, hd = cfg.dim, cfg.head_dim
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    layer = [(tokens, d, qkv), (tokens, cfg.n_heads * hd, d), (tokens, d, 2 * cfg.ffn_dim), (tokens, cfg.ffn_dim, d)]
    return layer * cfg.n_layers + [(tokens, d, cfg.vocab_size)]


if __name__ == "__main__":
    print("\n".join(measure(shapes=[(2048, 192, 4096), (1, 512, 16384)]).lines()))
