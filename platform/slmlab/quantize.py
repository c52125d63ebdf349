"""Post-training INT8 quantisation for any model family, and how big a model is on disk.

``quantize_int8(model)`` returns a copy in which every ``nn.Linear`` (and, by default, every
``nn.Embedding``) holds its weight as int8 with one fp scale per output row (symmetric, per-channel:
scale = max|w_row| / 127, so the rounding error per weight is at most scale / 2 = max|w_row| / 254).
Activations stay in floating point and the weight is dequantised on the fly, so this is weight-only
INT8: it shrinks checkpoints and resident weights ~4x from fp32 (~2x from bf16) but does not speed
up the matmuls (aten's weight-only int8 GEMM, ``_weight_int8pack_mm``, measured 3-8x slower than fp32
at batch 1 on this project's CPU). ``dynamic_activations=True`` is the fast CPU decode path instead.

Why not ``torch.ao.quantization.quantize_dynamic``: it only runs on CPU (fbgemm/qnnpack kernels),
swaps in modules other code cannot read ``.weight`` from, and torch.ao.quantization is deprecated in
favour of torchao. The version here is ~80 lines, works on CPU and CUDA in any float dtype, and keeps
weight tying: a weight shared by an embedding and the output head is quantised once and both modules
keep sharing the int8 tensor (serialised once).
"""
from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: returns (int8 tensor like w, scale (rows, 1) in w's dtype)."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w32 / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so a tied int8 tensor stays one object through model.to(device):
    # Module._apply swaps parameter data in place but rebuilds buffers per module, which would untie them.
    return nn.Parameter(t, requires_grad=False)


class Int8Linear(nn.Module):
    """y = x @ (qweight * scale)^T + bias, dequantised in the input's dtype."""

    def __init__(self, qweight: nn.Parameter, scale: nn.Parameter, bias: nn.Parameter | None,
                 dynamic_activations: bool = False):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.qweight, self.scale, self.bias = qweight, scale, bias
        self.dynamic_activations = dynamic_activations

    @property
    def weight(self) -> torch.Tensor:
        """Dequantised weight, for code that reads ``.weight`` directly (e.g. an fp32 MoE router)."""
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_activations and x.device.type == "cpu" and x.dtype == torch.float32 and not (
            torch.is_grad_enabled() and x.requires_grad
        ):
            # reduce_range: 7-bit activations, as fbgemm requires (its u8 x s8 pair sums saturate int16 at 8 bits:
            # 10-20% output error measured without it, 1.5% with it)
            flat = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features), self._packed(), True)
            return flat.view(*x.shape[:-1], self.out_features)
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _packed(self):
        """fbgemm's packed int8 weight, built on first use and again if the weights change."""
        key = tuple((t.data_ptr(), t._version) for t in (self.qweight, self.scale, self.bias) if t is not None)
        if getattr(self, "_packed_key", None) != key:
            with warnings.catch_warnings():  # quantized tensors are deprecated; the fbgemm kernels are not yet replaced
                warnings.simplefilter("ignore")
                wq = torch._make_per_channel_quantized_tensor(
                    self.qweight.detach(), self.scale.detach().view(-1).double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0,
                )
                bias = None if self.bias is None else self.bias.detach().float()
                self._packed_weight = torch.ops.quantized.linear_prepack(wq, bias)
            self._packed_key = key
        return self._packed_weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "int8 per-channel")


class Int8Embedding(nn.Module):
    """Row lookup of an int8 table times its per-row scale; output in the scale's dtype (the original's)."""

    def __init__(self, qweight: nn.Parameter, scale: nn.Parameter, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.qweight, self.scale, self.padding_idx = qweight, scale, padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.scale.dtype) * F.embedding(ids, self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def quantize_int8(
    model: nn.Module, *, embeddings: bool = True, exclude: Iterable[str] = (), dynamic_activations: bool = False
) -> nn.Module:
    """A weight-only INT8 copy of ``model`` in eval mode; ``model`` itself is not modified.

    Quantises every module whose type is exactly ``nn.Linear`` (subclasses such as
    nn.MultiheadAttention's out_proj are left alone) and, when ``embeddings``, every ``nn.Embedding``
    without max_norm. Modules whose qualified name contains a string of ``exclude`` stay in full
    precision (e.g. ``exclude=("router",)`` to keep MoE routing decisions exact). A Linear tied to an
    embedding that is not quantised is skipped too, so tying never duplicates a weight.

    ``dynamic_activations``: on CPU, fp32 inference also rounds each Linear's input to 7 bits (one scale per
    call, fbgemm's reduced range) and runs fbgemm's int8 GEMM on the int8 weights as stored: the fast batch-1
    decoding path (W8A8-dynamic; int8 weights, a quarter of fp32's bytes, stay in cache where fp32's do not).
    It changes the numerics beyond weight rounding: measure the bits per byte it costs. Training, other
    devices and other dtypes take the weight-only path.
    """
    exclude = tuple(exclude)
    qmodel = copy.deepcopy(model)

    def wanted(name: str, m: nn.Module) -> bool:
        if any(s in name for s in exclude):
            return False
        if type(m) is nn.Linear:
            return True
        return embeddings and type(m) is nn.Embedding and m.max_norm is None

    named = dict(qmodel.named_modules())
    targets = {name for name, m in named.items() if name and wanted(name, m)}
    # a weight used by any module we keep in full precision must stay a float Parameter
    keep_float = {id(p) for name, m in named.items() if name not in targets for p in m.parameters(recurse=False)}

    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(float weight) -> (int8, scale), shared by ties
    for name in sorted(targets):
        m = named[name]
        if id(m.weight) in keep_float:
            continue
        if id(m.weight) not in done:
            q, scale = _quantize_rows(m.weight)
            done[id(m.weight)] = (_frozen(q), _frozen(scale))
        q, scale = done[id(m.weight)]
        if isinstance(m, nn.Linear):
            bias = None if m.bias is None else _frozen(m.bias.detach())
            new: nn.Module = Int8Linear(q, scale, bias, dynamic_activations)
        else:
            new = Int8Embedding(q, scale, m.padding_idx)
        parent_name, _, child = name.rpartition(".")
        setattr(named[parent_name] if parent_name else qmodel, child, new)
    return qmodel.eval()


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what a checkpoint of the weights costs on disk.
    Tensors sharing storage (tied weights) are written once."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes
