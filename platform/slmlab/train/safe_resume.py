"""Resume DeepSpeed checkpoints without unpickling arbitrary objects.

A resume checkpoint is read back from ``SLMLAB_STORAGE``, shared storage on a cluster: whoever can
write there could plant a pickle that runs code in every training worker that resumes from it.
DeepSpeed 0.19.8's ``TorchCheckpointEngine.load`` calls ``torch.load(..., weights_only=False)``
explicitly (runtime/checkpoint_engine/torch_checkpoint_engine.py), and ``engine.load_checkpoint``
reads every model/optimizer/ZeRO file through it. :func:`load_checkpoint` runs that same call with
``weights_only=True``: tensors, containers and primitives load as before; of DeepSpeed's own objects
only the plain-data classes a checkpoint holds are allowed (found by saving ZeRO 0-3 in fp32 and bf16
and loading them back: the loss scaler, the ZeRO stage enum, a fragment address). Anything else — a
crafted ``__reduce__`` included — is refused before any of it runs.

DeepSpeed's universal checkpoints (config ``load_universal_checkpoint``) and the ``deepspeed.checkpoint``
tools still call ``torch.load(weights_only=False)`` themselves; slmlab uses neither, and
:func:`load_checkpoint` refuses an engine configured for them.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from slmlab.errors import SlmlabError


class UnsafeCheckpointError(SlmlabError):
    """A checkpoint file that holds something other than tensors and plain data."""


def deepspeed_data_classes() -> list:
    """DeepSpeed's plain-data classes found in its checkpoints (restored by attribute update only:
    none defines __setstate__ or __reduce__)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location=None):
    """``torch.load`` restricted to tensors, plain containers and :func:`deepspeed_data_classes`."""
    try:
        with torch.serialization.safe_globals(deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = str(err).split("Unsupported global: ", 1)[-1].split(" was not", 1)[0].splitlines()[0][:120]
        raise UnsafeCheckpointError(f"{path}: expected tensors and plain data, found {found} "
                                    "(refused: unpickling it could run code)") from None


@contextmanager
def weights_only_checkpoints() -> Iterator[None]:
    """Within the block, every DeepSpeed TorchCheckpointEngine loads with :func:`load_weights_only`
    (the engine's own and the ones DeepSpeed creates for MoE expert files)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location=map_location)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


def load_checkpoint(engine, load_dir: str | Path, tag: str | None = None, **kwargs):
    """``engine.load_checkpoint(load_dir, tag, **kwargs)``, refusing anything but tensors and plain data."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
        raise TypeError(f"weights-only resume covers DeepSpeed's TorchCheckpointEngine, found "
                        f"{type(engine.checkpoint_engine).__name__}")
    if engine.load_universal_checkpoint():
        raise TypeError("universal checkpoints are read with weights_only=False inside DeepSpeed: not supported")
    with weights_only_checkpoints():
        return engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
