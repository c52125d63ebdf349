"""ModularForge assembly: a trunk and N independently trained experts → one MoE checkpoint, streamed.

    check      every input's header (names, shapes, N, top_k) before a byte is written
    pass A     per expert, one at a time: the trunk with that expert's FFN loaded into the skeleton's FFN
               slots, run on its partition's calibration sample → the REPAIR targets (per-channel mean
               square of every norm's output) and, with ``gate_source: expert``, the gate means; with
               ``gate_source: trunk`` the trunk itself (its own FFN) gives the gate means (mergekit's
               "hidden" mode, with the trunk as the base model)
    gates      row e at layer i = normalise(mean router input of partition e − mean over partitions);
               a warning when a layer's rows are nearly degenerate (condition number)
    pass B     the assembled MoE run layer by layer on the pooled calibration sample, loading one
               expert's tensors of one layer at a time; before each norm is used, its gain is scaled
               per channel so the mean square of its output matches the targets (REPAIR for RMSNorm:
               the merged model's statistics pulled back to those its parts were trained under)
    write      a safetensors file whose header is computed up front from the shapes; trunk tensors
               from memory, each expert's tensors copied in slices straight from its file into row
               block e of the stacked tensors. Temp file + rename: nothing half-written.

Peak memory is the skeleton (trunk without FFN) plus one expert: the trunk's FFN slots hold one
expert at a time in pass A and are freed before pass B. :func:`assemble_in_memory` is the plain
reference (every expert loaded, the real MoE model run whole) the streaming path is tested against.
No gradient step anywhere.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slmlab.errors import SlmlabError
from slmlab.models.layers import RotaryEmbedding
from slmlab.models.modularforge import assembled_config, expert_shapes, is_expert_tensor, trunk_config
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig
from slmlab.train.checkpoint import CONFIG_FILE, MODEL_FILE

log = logging.getLogger("slmlab.assemble")

GateSource = Literal["trunk", "expert"]
GateMode = Literal["hidden", "uniform"]
FACTOR_CLAMP = (0.25, 4.0)  # REPAIR gain factors beyond this mean the statistics are not comparable


class AssemblyError(SlmlabError, ValueError):
    """Inputs that cannot be assembled; the message names the file and what was expected."""


# ----------------------------------------------------------------------------------------------
# safetensors, streamed (the format: u64 header length, JSON header, one contiguous data buffer)

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"}
_TORCH = {v: k for k, v in _DTYPES.items()}


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class TensorFile:
    """Read one tensor of a safetensors file at a time with plain reads (no mmap: mapped pages would
    count in the process's memory for as long as the file stays open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                size = self.path.stat().st_size
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} in a file of {size} bytes")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise AssemblyError(f"{self.path}: expected a safetensors file, found no such file") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise AssemblyError(f"{self.path}: expected a safetensors file, found {err}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = {name: (e["dtype"], tuple(e["shape"]), 8 + n + e["data_offsets"][0])
                        for name, e in header.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        dtype, shape, offset = self.entries[name]
        if tuple(out.shape) != shape or _DTYPES.get(out.dtype) != dtype or not out.is_contiguous():
            raise AssemblyError(f"{self.path}: {name}: expected {dtype} {shape}, "
                                f"asked for {out.dtype} {tuple(out.shape)}")
        with open(self.path, "rb") as f:
            f.seek(offset)
            f.readinto(_bytes_view(out))
        return out

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, _ = self.entries[name]
        return self.read_into(name, torch.empty(shape, dtype=_TORCH[dtype]))

    def copy_to(self, name: str, writer: "StreamingWriter", dest: str, index: int, chunk: int = 1 << 20) -> None:
        """Copy the tensor's bytes into row block ``index`` of ``dest`` in ``chunk``-byte pieces."""
        dtype, shape, offset = self.entries[name]
        nbytes = writer.slice_bytes(dest, shape, dtype)
        buf = bytearray(min(chunk, nbytes))
        with open(self.path, "rb") as f:
            f.seek(offset)
            done = 0
            while done < nbytes:
                n = f.readinto(memoryview(buf)[: min(len(buf), nbytes - done)])
                if not n:
                    raise AssemblyError(f"{self.path}: {name}: file ends {nbytes - done} bytes early")
                writer.write_bytes(dest, index, done, memoryview(buf)[:n])
                done += n


class StreamingWriter:
    """A safetensors file written tensor by tensor (or row block by row block) into a preallocated
    temp file. Every shape is known up front, so the header and every offset are too. ``commit``
    checks every byte was written, then renames; leaving the ``with`` block on an error removes the
    temp file."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)}
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, (dtype, shape) in specs.items():
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + size]}
            self.offsets[name] = (start, size)
            start += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned (the format allows space padding)
        self.data_start, self.total = 8 + len(raw), 8 + len(raw) + start
        self.specs, self.written = specs, {name: 0 for name in specs}
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.f = open(self.tmp, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.f.truncate(self.total)

    def slice_bytes(self, name: str, shape: tuple[int, ...], dtype: str) -> int:
        want_dtype, want = self.specs[name]
        if dtype != want_dtype or tuple(shape) != tuple(want[1:]):
            raise AssemblyError(f"{self.path.name}: {name}: a row block must be {want_dtype} {tuple(want[1:])}, "
                                f"found {dtype} {tuple(shape)}")
        return _nbytes(dtype, shape)

    def write_bytes(self, name: str, index: int | None, at: int, data: memoryview) -> None:
        start, size = self.offsets[name]
        block = size if index is None else size // self.specs[name][1][0]
        base = start + (0 if index is None else index * block)
        if at + len(data) > block:
            raise AssemblyError(f"{self.path.name}: {name}: write past the end of its block")
        self.f.seek(self.data_start + base + at)
        self.f.write(data)
        self.written[name] += len(data)

    def write(self, name: str, tensor: torch.Tensor, index: int | None = None) -> None:
        t = tensor.detach().cpu().contiguous()
        dtype, shape = self.specs[name]
        want = shape if index is None else shape[1:]
        if _DTYPES.get(t.dtype) != dtype or tuple(t.shape) != tuple(want):
            raise AssemblyError(f"{self.path.name}: {name}: expected {dtype} {tuple(want)}, "
                                f"found {t.dtype} {tuple(t.shape)}")
        self.write_bytes(name, index, 0, _bytes_view(t))

    def commit(self) -> Path:
        short = [n for n, (_, size) in self.offsets.items() if self.written[n] != size]
        if short:
            raise AssemblyError(f"{self.path.name}: expected every tensor written once, found incomplete {short[:5]}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None or not self.f.closed:
            self.f.close()
            self.tmp.unlink(missing_ok=True)


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    n = _TORCH[dtype].itemsize
    for s in shape:
        n *= s
    return n


def extract_expert(model_dir: str | Path, out_file: str | Path) -> Path:
    """The expert's own artefact: only its ``layers.{i}.ffn.*`` tensors, copied one at a time out of
    the full model an expert run wrote."""
    src = TensorFile(Path(model_dir) / MODEL_FILE)
    names = [n for n in src.entries if is_expert_tensor(n)]
    if not names:
        raise AssemblyError(f"{src.path}: expected layers.{{i}}.ffn.* tensors, found none")
    specs = {n: (src.entries[n][0], src.shape(n)) for n in names}
    with StreamingWriter(out_file, specs, {"format": "pt", "slmlab.kind": "modularforge-expert"}) as w:
        for n in names:
            w.write(n, src.read(n))
        return w.commit()


def load_expert_model(trunk_dir: str | Path, expert_file: str | Path) -> VectorSLM:
    """Expert e as it was trained and evaluated alone: the trunk with the expert's FFN at every layer."""
    from slmlab.train.checkpoint import load_model_dir

    _, model = load_model_dir(trunk_dir)
    r = TensorFile(expert_file)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            r.read_into(f"layers.{i}.ffn.w_gate_up.weight", layer.ffn.w_gate_up.weight.data)
            r.read_into(f"layers.{i}.ffn.w_down.weight", layer.ffn.w_down.weight.data)
    return model.eval()


def write_trunk_view(trunk_dir: str | Path, out_dir: str | Path) -> Path:
    """The trunk without its FFNs (model.safetensors + model_config.json): what an expert run warm-starts
    from when its FFNs start fresh (the missing ``layers.{i}.ffn.`` tensors keep their initialisation)."""
    trunk_dir, out_dir = Path(trunk_dir), Path(out_dir)
    src = TensorFile(trunk_dir / MODEL_FILE)
    names = [n for n in src.entries if not is_expert_tensor(n)]
    tmp = _temp_dir(out_dir)
    try:
        specs = {n: (src.entries[n][0], src.shape(n)) for n in names}
        with StreamingWriter(tmp / MODEL_FILE, specs, {"format": "pt", "slmlab.kind": "modularforge-trunk-view"}) as w:
            for n in names:
                w.write(n, src.read(n))
            w.commit()
        shutil.copy2(trunk_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------
# Inputs and their checks


@dataclass
class Calibration:
    """A partition's calibration sample: token ids (n, T) and which positions count (n, T)."""

    ids: torch.Tensor
    mask: torch.Tensor


def calibration_sample(folder: str | Path, sequences: int) -> Calibration:
    """The first ``sequences`` packed blocks of a shard folder (a partition's training split)."""
    from slmlab.evaluate import read_blocks

    batch = next(read_blocks(folder, sequences), None)
    if batch is None or len(batch["input_ids"]) == 0:
        raise AssemblyError(f"{folder}: expected packed blocks for the calibration sample, found none")
    block = torch.as_tensor(batch["input_ids"]).long()
    mask = torch.as_tensor(batch["target_mask"])[:, 1:].bool()  # input t counts when its target t+1 is real
    return Calibration(block[:, :-1].contiguous(), mask.contiguous())


def _read_trunk(trunk_dir: Path) -> VectorSLMConfig:
    cfg_file = trunk_dir / CONFIG_FILE
    if not cfg_file.exists() or not (trunk_dir / MODEL_FILE).exists():
        raise AssemblyError(f"{trunk_dir}: expected a trunk model folder ({MODEL_FILE} + {CONFIG_FILE}), found none")
    raw = json.loads(cfg_file.read_text())
    if raw.get("family") != "vectorslm" or raw.get("moe"):
        raise AssemblyError(f"{cfg_file}: expected a dense vectorslm trunk, found family={raw.get('family')!r} "
                            f"moe={raw.get('moe')!r}")
    return trunk_config(VectorSLMConfig.model_validate(raw))


def check_inputs(trunk_dir: str | Path, expert_files: Sequence[str | Path], calib: Sequence[Calibration],
                 top_k: int) -> tuple[VectorSLMConfig, list[TensorFile]]:
    """Every reason an assembly cannot work, found from headers alone, before anything is written."""
    trunk_dir = Path(trunk_dir)
    tcfg = _read_trunk(trunk_dir)
    N = len(expert_files)
    if N < 1:
        raise AssemblyError("experts: expected at least one expert file, found none")
    if len(calib) != N:
        raise AssemblyError(f"experts: expected one expert per data partition ({len(calib)} partitions), "
                            f"found N={N} experts")
    if not 1 <= top_k <= N:
        raise AssemblyError(f"top_k: expected 1 <= top_k <= the number of experts N={N}, found {top_k}")
    want = expert_shapes(tcfg)
    readers = []
    for e, path in enumerate(expert_files):
        if not Path(path).exists():
            raise AssemblyError(f"{path}: expected the file of expert {e} (partition {e}), found no such file")
        r = TensorFile(path)
        missing = sorted(set(want) - set(r.entries))
        unexpected = sorted(set(r.entries) - set(want))
        wrong = [f"{n} {r.shape(n)} (trunk needs {want[n]})" for n in sorted(set(want) & set(r.entries))
                 if r.shape(n) != want[n]]
        bad_dtype = [n for n in r.entries if r.entries[n][0] != "F32"]
        problems = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                    f"wrong shape {wrong[:4]}" if wrong else "", f"not F32 {bad_dtype[:4]}" if bad_dtype else ""]
        if any(problems):
            raise AssemblyError(f"{path}: expected the FFN tensors of expert {e} for the trunk {trunk_dir} "
                                f"(dim={tcfg.dim}, ffn_dim={tcfg.ffn_dim}, n_layers={tcfg.n_layers}), found "
                                + "; ".join(p for p in problems if p))
        readers.append(r)
    return tcfg, readers


# ----------------------------------------------------------------------------------------------
# Statistics (shared by both paths: hooks on a real VectorSLM)


def norm_names(n_layers: int) -> list[str]:
    """The RMSNorms in the order a forward pass uses them: REPAIR calibrates them in this order."""
    return [f"layers.{i}.{n}" for i in range(n_layers) for n in ("attn_norm", "ffn_norm")] + ["norm"]


@dataclass
class Stats:
    sq: dict[str, torch.Tensor]  # norm name -> per-channel sum of output², over counted tokens (float64)
    router: list[torch.Tensor]  # per layer, sum of the router's input (the ffn_norm output), float64
    n: float = 0.0  # counted tokens


def _new_stats(cfg: VectorSLMConfig) -> Stats:
    z = lambda: torch.zeros(cfg.dim, dtype=torch.float64)
    return Stats({name: z() for name in norm_names(cfg.n_layers)}, [z() for _ in range(cfg.n_layers)])


def run_to_norm(model: VectorSLM, ids: torch.Tensor) -> torch.Tensor:
    """VectorSLM's forward up to the final norm (no LM head: logits are not needed and are large)."""
    x = model.tok_emb(ids)
    cos, sin = model.rope(0, ids.size(1), x.dtype)
    for layer in model.layers:
        x, _ = layer(x, cos, sin)
    return model.norm(x)


@torch.no_grad()
def collect_stats(model: VectorSLM, sample: Calibration, stats: Stats, batch: int = 2,
                  only: str | None = None) -> Stats:
    """Add ``sample``'s norm statistics through ``model`` into ``stats`` (``only``: one norm's)."""
    current: dict[str, torch.Tensor] = {}
    hooks = []
    for name in ([only] if only else stats.sq):
        def hook(_m, _i, out, name=name):
            m = current["mask"]
            o = out.double()[m]
            stats.sq[name] += o.square().sum(0)
            if name.endswith("ffn_norm") and not only:
                stats.router[int(name.split(".")[1])] += o.sum(0)
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        for s in range(0, len(sample.ids), batch):
            current["mask"] = sample.mask[s:s + batch]
            run_to_norm(model, sample.ids[s:s + batch])
            stats.n += float(current["mask"].sum())
    finally:
        for h in hooks:
            h.remove()
    return stats


def gate_rows(means: torch.Tensor, center: bool = True) -> torch.Tensor:
    """(N, L, dim) mean router inputs → (L, N, dim) gate rows: each row the normalised mean, after
    removing the mean over partitions (``center``). The shared component carries no routing
    information and, once rows are normalised, turns small differences in their lengths into a
    bias toward one expert (mergekit counters the same effect with negative prompts)."""
    m = means.double()
    if center and m.size(0) > 1:
        m = m - m.mean(0, keepdim=True)
    rows = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return rows.transpose(0, 1).float().contiguous()


def gate_conditions(rows: torch.Tensor, center: bool = True) -> list[float]:
    """Per layer, the condition number of the gate rows (largest / smallest singular value, the
    smallest in the (N-1)-dimensional span when centred). 1 = orthogonal, large = nearly degenerate."""
    out = []
    for layer in rows.double():
        s = torch.linalg.svdvals(layer)
        k = len(s) - 1 if center and len(s) > 1 else len(s)
        small, large = float(s[k - 1]), float(s[0])
        out.append(large / small if small > 1e-9 * large else math.inf)  # all-zero rows: infinitely degenerate
    return out


def repair_factor(target: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Per-channel gain factor that makes the output's mean square match the target's."""
    f = (target / current.clamp(min=1e-30)).sqrt()
    f = torch.where(current > 0, f, torch.ones_like(f))
    return f.clamp(*FACTOR_CLAMP)


# ----------------------------------------------------------------------------------------------
# Assembly


@dataclass
class AssemblyReport:
    path: Path  # the model folder written
    config: VectorSLMConfig
    gate_conditions: list[float]  # per layer
    gate_max_cosine: list[float]  # per layer, largest cosine between two partitions' raw mean router inputs
    factors: dict[str, tuple[float, float]] = field(default_factory=dict)  # norm -> (min, max) REPAIR factor
    warnings: list[str] = field(default_factory=list)


def _pass_a(skel: VectorSLM, readers: list[TensorFile], calib: Sequence[Calibration], gate_source: GateSource,
            need_targets: bool) -> tuple[torch.Tensor, Stats]:
    """Gate means (N, L, dim) and REPAIR targets, one expert in the skeleton's FFN slots at a time."""
    cfg = skel.cfg
    N, L = len(readers), cfg.n_layers
    means = torch.zeros(N, L, cfg.dim, dtype=torch.float64)
    targets = _new_stats(cfg)
    if gate_source == "trunk":  # the trunk's own FFN is in the slots
        for e in range(N):
            s = collect_stats(skel, calib[e], _new_stats(cfg), batch=1)
            means[e] = torch.stack(s.router) / max(s.n, 1.0)
    if gate_source == "expert" or need_targets:
        for e, r in enumerate(readers):
            for i, layer in enumerate(skel.layers):
                r.read_into(f"layers.{i}.ffn.w_gate_up.weight", layer.ffn.w_gate_up.weight.data)
                r.read_into(f"layers.{i}.ffn.w_down.weight", layer.ffn.w_down.weight.data)
            s = collect_stats(skel, calib[e], _new_stats(cfg), batch=1)
            if gate_source == "expert":
                means[e] = torch.stack(s.router) / max(s.n, 1.0)
            for k in targets.sq:
                targets.sq[k] += s.sq[k]
            targets.n += s.n
    return means, targets


def _finish_gates(means: torch.Tensor, gate_mode: GateMode, center: bool, cond_limit: float,
                  report: AssemblyReport) -> torch.Tensor:
    N, L, D = means.shape
    if gate_mode == "uniform":
        return torch.zeros(L, N, D)  # equal logits: every expert weighted 1/k among its top-k (k = N for uniform)
    rows = gate_rows(means, center)
    report.gate_conditions = gate_conditions(rows, center)
    raw = F.normalize(means.double(), dim=-1)
    cos = torch.einsum("eld,fld->lef", raw, raw) - 2 * torch.eye(N, dtype=torch.float64)
    report.gate_max_cosine = [float(c.max()) if N > 1 else 0.0 for c in cos]
    for i, c in enumerate(report.gate_conditions):
        if c > cond_limit:
            msg = (f"layer {i}: gate rows are nearly degenerate (condition number {c:.1f} > {cond_limit}; largest "
                   f"cosine between partition means {report.gate_max_cosine[i]:.4f}): its router barely tells "
                   f"the partitions apart")
            log.warning(msg)
            report.warnings.append(msg)
    return rows


def _moe_delta(h: torch.Tensor, gates: torch.Tensor, top_k: int, layer: int, readers: list[TensorFile],
               chunk: int) -> torch.Tensor:
    """The MoE layer's output for rows ``h`` (tokens, dim), one expert's weights loaded at a time;
    Mixtral's routing exactly (fp32 softmax, top-k, renormalised)."""
    probs = F.linear(h.float(), gates.float()).softmax(-1)
    top_w, top_e = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(h)
    for e, r in enumerate(readers):
        tok, slot = (top_e == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        w_gu, w_d = r.read(f"layers.{layer}.ffn.w_gate_up.weight"), r.read(f"layers.{layer}.ffn.w_down.weight")
        for s in range(0, tok.numel(), chunk):
            t, k = tok[s:s + chunk], slot[s:s + chunk]
            gate, up = F.linear(h[t], w_gu).chunk(2, dim=-1)
            out.index_add_(0, t, F.linear(F.silu(gate) * up, w_d) * top_w[t, k, None].to(h.dtype))
        del w_gu, w_d
    return out


def _calibrated(norm: nn.Module, x: torch.Tensor, mask: torch.Tensor, name: str, targets: Stats | None,
                report: AssemblyReport) -> None:
    """REPAIR for one RMSNorm, in place: scale its gain so that the per-channel mean square of its
    output over the counted tokens equals the target's."""
    if targets is None:
        return
    current = torch.zeros(x.size(-1), dtype=torch.float64)
    for s in range(0, x.size(0), 2):  # two sequences at a time: statistics, not activations, are kept
        current += norm(x[s:s + 2])[mask[s:s + 2]].double().square().sum(0)
    f = repair_factor(targets.sq[name], current)
    norm.weight.data.mul_(f.to(norm.weight.dtype))
    report.factors[name] = (float(f.min()), float(f.max()))


def _skeleton(cfg: VectorSLMConfig, trunk: TensorFile) -> VectorSLM:
    """The trunk model with every tensor allocated exactly once and read straight from the file: built
    on the meta device (an ordinary build would initialise every weight and hold a second, untied
    LM head of vocab x dim until it is tied), then given storage."""
    with torch.device("meta"):
        skel = VectorSLM(cfg)
    if cfg.tie_embeddings:
        skel.lm_head._parameters["weight"] = None  # tied: gets its storage through tok_emb only
    skel.to_empty(device="cpu")
    if cfg.tie_embeddings:
        skel.lm_head.weight = skel.tok_emb.weight
    skel.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # tables computed, not stored
    sd = skel.state_dict()
    names = {n: ns for ns in _tied_names(skel) for n in ns}
    loaded = set()
    for name in trunk.entries:
        if name not in sd:
            raise AssemblyError(f"{trunk.path}: {name}: expected only tensors of {type(skel).__name__}, found this one")
        trunk.read_into(name, sd[name])
        loaded.update(names[name])
    missing = sorted(set(sd) - loaded)
    if missing:
        raise AssemblyError(f"{trunk.path}: expected every tensor of the trunk, found no {missing[:4]}")
    return skel.eval()


def _tied_names(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


@torch.no_grad()
def assemble_streaming(trunk_dir: str | Path, expert_files: Sequence[str | Path], calib: Sequence[Calibration],
                       out_dir: str | Path, *, top_k: int, gate_mode: GateMode = "hidden",
                       gate_source: GateSource = "trunk", center: bool = True, calibrate: bool = True,
                       cond_limit: float = 5.0, chunk_tokens: int = 256, progress=print) -> AssemblyReport:
    """Assemble ``out_dir`` (model.safetensors, model_config.json, the trunk's tokenizer files) with
    at most the skeleton plus one expert in memory. See the module docstring for the passes."""
    trunk_dir, out_dir = Path(trunk_dir), Path(out_dir)
    tcfg, readers = check_inputs(trunk_dir, expert_files, calib, top_k)
    N = len(readers)
    cfg = assembled_config(tcfg, N, N if gate_mode == "uniform" else top_k)
    report = AssemblyReport(out_dir, cfg, [], [])

    trunk = TensorFile(trunk_dir / MODEL_FILE)
    skel = _skeleton(tcfg, trunk)  # trunk tensors, FFN slots holding one FFN at a time

    means, targets = _pass_a(skel, readers, calib, gate_source, calibrate)
    gates = _finish_gates(means, gate_mode, center, cond_limit, report)
    for layer in skel.layers:
        layer.ffn = None  # pass A is over: free the FFN slots before the MoE pass
    progress(f"assemble: gates from {gate_source} hidden states ({gate_mode}); calibrating norms: {calibrate}")

    # pass B: the assembled MoE, layer by layer on the pooled calibration sample
    ids = torch.cat([c.ids for c in calib])
    mask = torch.cat([c.mask for c in calib])
    x = skel.tok_emb(ids)
    cos, sin = skel.rope(0, ids.size(1), x.dtype)
    tg = targets if calibrate else None
    for i, layer in enumerate(skel.layers):
        _calibrated(layer.attn_norm, x, mask, f"layers.{i}.attn_norm", tg, report)
        for s in range(0, x.size(0), 2):
            x[s:s + 2] += layer.attn(layer.attn_norm(x[s:s + 2]), cos, sin)
        _calibrated(layer.ffn_norm, x, mask, f"layers.{i}.ffn_norm", tg, report)
        flat = x.view(-1, tcfg.dim)
        delta = torch.zeros_like(flat)
        for s in range(0, flat.size(0), 4 * chunk_tokens):
            delta[s:s + 4 * chunk_tokens] = _moe_delta(layer.ffn_norm(flat[s:s + 4 * chunk_tokens]), gates[i],
                                                       cfg.moe.top_k, i, readers, chunk_tokens)
        flat += delta
        del delta
    _calibrated(skel.norm, x, mask, "norm", tg, report)
    del x

    _write(skel, trunk, readers, gates, cfg, out_dir, trunk_dir)
    return report


def _write(skel: VectorSLM, trunk: TensorFile, readers: list[TensorFile], gates: torch.Tensor,
           cfg: VectorSLMConfig, out_dir: Path, trunk_dir: Path) -> None:
    N, H, D = cfg.moe.num_experts, cfg.ffn_dim, cfg.dim
    trunk_names = [n for n in trunk.entries if not is_expert_tensor(n)]
    specs = {n: ("F32", trunk.shape(n)) for n in trunk_names}
    for i in range(cfg.n_layers):
        specs[f"layers.{i}.ffn.router.weight"] = ("F32", (N, D))
        specs[f"layers.{i}.ffn.w_gate_up"] = ("F32", (N, 2 * H, D))
        specs[f"layers.{i}.ffn.w_down"] = ("F32", (N, D, H))
    tmp = _temp_dir(out_dir)
    try:
        sd = skel.state_dict()
        with StreamingWriter(tmp / MODEL_FILE, specs, {"format": "pt", "family": "vectorslm"}) as w:
            for n in trunk_names:
                w.write(n, sd[n])
            for i in range(cfg.n_layers):
                w.write(f"layers.{i}.ffn.router.weight", gates[i])
            for e, r in enumerate(readers):  # one expert file at a time, a slice at a time
                for i in range(cfg.n_layers):
                    r.copy_to(f"layers.{i}.ffn.w_gate_up.weight", w, f"layers.{i}.ffn.w_gate_up", e)
                    r.copy_to(f"layers.{i}.ffn.w_down.weight", w, f"layers.{i}.ffn.w_down", e)
            w.commit()
        _finish_dir(tmp, out_dir, cfg, trunk_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    return tmp


def _finish_dir(tmp: Path, out_dir: Path, cfg: VectorSLMConfig, trunk_dir: Path) -> None:
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (trunk_dir / name).exists():
            shutil.copy2(trunk_dir / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an earlier assembly into the same folder
    os.replace(tmp, out_dir)


# ----------------------------------------------------------------------------------------------
# The reference: everything in memory, the real MoE model run whole


def _dense_model(tcfg: VectorSLMConfig, trunk_sd: dict, expert_sd: dict | None) -> VectorSLM:
    model = VectorSLM(tcfg).eval()
    model.load_state_dict({**trunk_sd, **(expert_sd or {})})
    return model


@torch.no_grad()
def assemble_in_memory(trunk_dir: str | Path, expert_files: Sequence[str | Path], calib: Sequence[Calibration],
                       out_dir: str | Path, *, top_k: int, gate_mode: GateMode = "hidden",
                       gate_source: GateSource = "trunk", center: bool = True, calibrate: bool = True,
                       cond_limit: float = 5.0) -> AssemblyReport:
    """The naive assembly: load every expert, stack them, build the MoE VectorSLM, calibrate it by
    running the whole model once per norm, save it in one call. The reference for the streaming path
    (tests) and the baseline of the memory benchmark."""
    from safetensors.torch import load_file, save_model

    trunk_dir, out_dir = Path(trunk_dir), Path(out_dir)
    tcfg, _ = check_inputs(trunk_dir, expert_files, calib, top_k)
    N = len(expert_files)
    cfg = assembled_config(tcfg, N, N if gate_mode == "uniform" else top_k)
    report = AssemblyReport(out_dir, cfg, [], [])
    trunk_sd = load_file(str(trunk_dir / MODEL_FILE))
    if tcfg.tie_embeddings:  # tied: the file holds one of the two names
        tied = trunk_sd.get("tok_emb.weight", trunk_sd.get("lm_head.weight"))
        trunk_sd.update({"tok_emb.weight": tied, "lm_head.weight": tied})
    experts = [load_file(str(p)) for p in expert_files]

    trunk = _dense_model(tcfg, trunk_sd, None)
    means = torch.zeros(N, tcfg.n_layers, tcfg.dim, dtype=torch.float64)
    targets = _new_stats(tcfg)
    for e in range(N):
        s = collect_stats(_dense_model(tcfg, trunk_sd, experts[e]), calib[e], _new_stats(tcfg))
        for k in targets.sq:
            targets.sq[k] += s.sq[k]
        targets.n += s.n
        src = s if gate_source == "expert" else collect_stats(trunk, calib[e], _new_stats(tcfg))
        means[e] = torch.stack(src.router) / max(src.n, 1.0)
    gates = _finish_gates(means, gate_mode, center, cond_limit, report)

    moe = VectorSLM(cfg).eval()
    state = {k: v for k, v in trunk_sd.items() if not is_expert_tensor(k)}
    for i in range(tcfg.n_layers):
        state[f"layers.{i}.ffn.router.weight"] = gates[i]
        state[f"layers.{i}.ffn.w_gate_up"] = torch.stack([sd[f"layers.{i}.ffn.w_gate_up.weight"] for sd in experts])
        state[f"layers.{i}.ffn.w_down"] = torch.stack([sd[f"layers.{i}.ffn.w_down.weight"] for sd in experts])
    moe.load_state_dict(state)
    if calibrate:
        pooled = Calibration(torch.cat([c.ids for c in calib]), torch.cat([c.mask for c in calib]))
        for name in norm_names(tcfg.n_layers):
            current = collect_stats(moe, pooled, _new_stats(tcfg), batch=len(pooled.ids), only=name)
            f = repair_factor(targets.sq[name], current.sq[name])
            moe.get_submodule(name).weight.mul_(f.float())
            report.factors[name] = (float(f.min()), float(f.max()))
    tmp = _temp_dir(out_dir)
    try:
        save_model(moe, str(tmp / MODEL_FILE), metadata={"format": "pt", "family": "vectorslm"})
        _finish_dir(tmp, out_dir, cfg, trunk_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
