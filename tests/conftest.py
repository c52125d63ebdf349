"""Shared fixtures: a real local Ray on loopback, real corpora when present, isolated run dirs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind Ray to 127.0.0.1
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use their own sqlite store under tmp_path
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]
# ../shared/data; SLMLAB_SHARED_DATA=/nonexistent runs the suite as on a fresh clone without it
SHARED_DATA = Path(os.environ.get("SLMLAB_SHARED_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on loopback, started on first use and kept for later modules (a test that
    needs the machine to itself, like the `ray job submit` one, may shut it down)."""
    import ray

    from slmlab.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    return ray


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one intra-op thread, restoring the count afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA


def tiny_pipeline_dict(base: Path, **overrides) -> dict:
    """A pipeline small enough to run end to end in well under a minute of training.
    ``overrides`` use ``__`` for nesting: ``model__n_heads=5``."""
    raw = {
        "name": "tiny",
        "seed": 7,
        "run_dir": str(base / "runs"),
        "data": {"sources": [{"kind": "embedded", "max_documents": 120}], "seq_len": 32, "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 512},
        "model": {"family": "vectorslm", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "train": {"micro_batch_size": 4, "max_steps": 8, "warmup_steps": 1, "eval_every": 4, "eval_batches": 2,
                  "checkpoint_every": 4, "lr": 0.02, "torch_threads": 1, "cpus_per_worker": 0.5},
        "eval": {"prompts": ["The "], "max_new_tokens": 4},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


@pytest.fixture
def tiny_pipeline(tmp_path):
    return lambda **overrides: tiny_pipeline_dict(tmp_path, **overrides)


def pytest_collection_modifyitems(session, config, items):
    """Files with slow-tier tests first, each file's tests kept together and in order: with test files
    spread over xdist workers, the long files start at once and the quick ones fill in at the end."""
    first_index: dict[str, int] = {}
    has_slow: dict[str, bool] = {}
    for i, item in enumerate(items):
        path = str(item.path)
        first_index.setdefault(path, i)
        has_slow[path] = has_slow.get(path, False) or item.get_closest_marker("slow") is not None
    items.sort(key=lambda item: (not has_slow[str(item.path)], first_index[str(item.path)]))
