"""Resume reads DeepSpeed checkpoints with weights_only=True: real checkpoints (ZeRO 0 and 2) load
exactly, a planted pickle is refused before it runs. Real DeepSpeed engines, outside Ray."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from slmlab.config import TrainConfig
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig
from slmlab.train.optim import build_optimizer, deepspeed_config
from slmlab.train.safe_resume import UnsafeCheckpointError, load_checkpoint

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")


@pytest.fixture(scope="module")
def single_process_group(one_thread):
    """deepspeed.initialize outside Ray wants the torch.distributed env of a one-process job (else MPI)."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_engine(stage: int, seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = VectorSLM(VectorSLMConfig(vocab_size=64, max_seq_len=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=2))
    tc = TrainConfig(micro_batch_size=2, zero_stage=stage, max_steps=10, warmup_steps=1, lr=0.01)
    opt, sched = build_optimizer(model, tc)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(tc, 1))
    return engine


def train_steps(engine, n: int) -> float:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        out = engine({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        engine.backward(out.loss)
        engine.step()
    return float(out.loss.detach())


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 2])  # ZeRO-2 stores the loss scaler, stage enum and fragment addresses
def test_resume_loads_a_real_deepspeed_checkpoint(single_process_group, tmp_path, stage):
    trained = make_engine(stage, seed=0)
    train_steps(trained, 3)
    trained.save_checkpoint(str(tmp_path), tag="ds")

    resumed = make_engine(stage, seed=1)  # different initial weights: the load must replace them
    assert any(not torch.equal(a, b) for a, b in zip(weights(resumed).values(), weights(trained).values()))
    path, _ = load_checkpoint(resumed, tmp_path, tag="ds")
    assert path is not None
    for (name, a), b in zip(weights(trained).items(), weights(resumed).values()):
        assert torch.equal(a, b), name
    assert resumed.global_steps == trained.global_steps == 3
    assert resumed.lr_scheduler.get_last_lr() == trained.lr_scheduler.get_last_lr()
    # optimizer moments restored too: the next step is the same step
    assert train_steps(resumed, 1) == pytest.approx(train_steps(trained, 1), abs=0, rel=0)
    for (name, a), b in zip(weights(trained).items(), weights(resumed).values()):
        assert torch.equal(a, b), name


class Planted:
    """What an attacker with write access to shared storage would leave: unpickling it calls a function."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_planted_pickle(single_process_group, tmp_path):
    engine = make_engine(0, seed=0)
    train_steps(engine, 1)
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="ds")
    states = tmp_path / "ckpt" / "ds" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code_ran"
    real = torch.load(states, weights_only=True)
    torch.save({**real, "client_extra": Planted(marker)}, states)

    before = weights(engine)
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt: expected tensors and plain data"):
        load_checkpoint(engine, tmp_path / "ckpt", tag="ds")
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before.values(), weights(engine).values()))

    # the premise: DeepSpeed's own load runs the planted call (this is what the safe load prevents)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    assert TorchCheckpointEngine.load.__module__.startswith("deepspeed")  # the patch was undone
    engine.load_checkpoint(str(tmp_path / "ckpt"), tag="ds")
    assert marker.exists()
