"""Build and run the Ray Train ``TorchTrainer`` for one pipeline stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from ray.data.dataset import MaterializedDataset
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from slmlab.config import PipelineConfig
from slmlab.runtime import verbose
from slmlab.train.loop import train_loop_per_worker
from slmlab.train.rendezvous import torch_config

if TYPE_CHECKING:
    from slmlab.lifecycle import RunSpec


def storage_path(cfg: PipelineConfig) -> str:
    return os.environ.get("SLMLAB_STORAGE") or str((Path(cfg.run_dir) / "ray").resolve())


MATERIALIZE_BELOW_BYTES = 256 * 2**20  # shards this small are read once into the object store


def _ingest(folder: Path, always_materialize: bool = False, seed: int = 0) -> ray.data.Dataset:
    """Shards as a Ray Dataset. Small ones (and validation, re-read at every evaluation) are read by
    the driver straight into the object store: training then needs no read tasks at all, which
    matters on small machines where a read task waiting for a whole CPU next to the train workers
    can starve (a streaming read's file listing always asks for 1 CPU). It is quick too: a
    ``read_parquet(...).materialize()`` of the same few MB spent ~5 s per dataset in Ray Data's
    executor (task start-up and its polling sleeps), twice per run. Large corpora stream.

    The blocks are put by the driver, so they live on its node (which holds the runs' bookkeeping
    too): blocks on a worker node would be lost with it, and re-reading them would wait for a CPU
    that the surviving runs' train workers hold (a multi-node deadlock seen in
    ``tests/test_multinode.py`` when the head node has no CPUs).

    A folder of partitions (``part-KKK/``, a ModularForge trunk or dense run reading all of them) is
    mixed row by row: read in path order, a run would see one partition after another (a 256-row
    shuffle buffer cannot fix that), and its model would drift to whichever partition came last."""
    size = sum(f.stat().st_size for f in Path(folder).rglob("*.parquet"))
    parts = _partition_files(Path(folder))
    if not (always_materialize or size <= MATERIALIZE_BELOW_BYTES):
        return ray.data.read_parquet(parts or str(folder), num_cpus=0.25)
    if parts:
        return _from_driver(parts, shuffle_seed=seed)
    return _from_driver([str(f) for f in sorted(Path(folder).rglob("*.parquet"))])


def _partition_files(folder: Path) -> list[str]:
    """The shard files of a folder of partitions, the partitions interleaved evenly (each file at its
    fractional position within its own partition, so a small partition is spread over the whole
    epoch rather than used up first); [] when ``folder`` holds no ``part-KKK/`` folders."""
    parts = sorted(p for p in folder.glob("part-*") if p.is_dir())
    keyed = []
    for k, part in enumerate(parts):
        files = sorted(part.glob("*.parquet"))
        keyed += [((i + 0.5) / len(files), k, str(f)) for i, f in enumerate(files)]
    return [f for *_, f in sorted(keyed)]


def _from_driver(files: list[str], shuffle_seed: int | None = None) -> ray.data.Dataset:
    """The rows of ``files``, in file order or (``shuffle_seed``) in one seeded random order, put
    into the object store from the driver: no read or shuffle task (see :func:`_ingest`)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not files:
        raise FileNotFoundError("no parquet shards to read (the data build wrote none)")
    tables = [pq.read_table(f) for f in files]
    if shuffle_seed is None:
        # one block per file, as read_parquet makes them: the loader's shuffle buffer fills block by
        # block, so the same blocks give the same batches (and the same loss curve) as before
        return ray.data.from_arrow(tables)
    table = pa.concat_tables(tables).combine_chunks()
    table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    rows_per_block = max(1, -(-table.num_rows // max(1, len(files) * 4)))  # a few blocks per file read
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks)


def ingest(spec: "RunSpec") -> dict[str, ray.data.Dataset]:
    """The datasets a run trains and validates on (see :func:`_ingest`)."""
    seed = spec.cfg.seed
    return {
        "train": _ingest(spec.train_dir, seed=seed),
        "val": _ingest(spec.shards.val_dir, always_materialize=True, seed=seed),
    }


def streams(datasets: dict[str, ray.data.Dataset]) -> bool:
    """Whether training will still need read tasks (a dataset too large to materialize)."""
    return any(not isinstance(ds, MaterializedDataset) for ds in datasets.values())


def build_trainer(spec: "RunSpec", *, tracking_uri: str, callbacks=None, datasets=None) -> TorchTrainer:
    """The Ray Train run of one :class:`slmlab.lifecycle.RunSpec` (its name must be set). ``datasets``
    already ingested by the caller (concurrent runs read their data in the driver) or read here."""
    cfg = spec.cfg
    tc = cfg.train
    datasets = datasets or ingest(spec)
    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # same blocks in the same order every epoch: resumes replay exactly
    # fault-injection knobs (tests of FailureConfig) travel to the workers; nothing else is forwarded
    injected = {k: v for k, v in os.environ.items() if k.startswith("SLMLAB_FAIL_")}
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    init = (
        {"path": str(Path(spec.init_from).resolve()), "allow_missing": list(spec.allow_missing)}
        if spec.init_from
        else None
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "pipeline": cfg.model_dump(mode="json"),
            "tokenizer_path": str(spec.shards.tokenizer_path.resolve()),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": spec.mlflow_run_id,
            "init_from": init,  # weights to start from (fine-tuning, a frozen trunk)
        },
        torch_config=torch_config(),  # the rendezvous store on 127.0.0.1 when the workers share a node
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        datasets=datasets,
        # one worker reads whole datasets: a split's coordinator actor costs ~2.5 s at its first epoch. Validation
        # is never split; each rank evaluates every world-th batch of it (see the loop's `evaluate`)
        dataset_config=DataConfig(
            datasets_to_split=["train"] if tc.num_workers > 1 else [], execution_options=options
        ),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=storage_path(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": injected} if injected else None,
            # Ray Train's own INFO lines (worker group started, each checkpoint and report) are for
            # debugging Ray Train: slmlab prints its own step and evaluation lines (--verbose: both)
            logging_config=ray.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
