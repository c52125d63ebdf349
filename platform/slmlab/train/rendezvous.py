"""torch.distributed rendezvous for the Ray Train workers: on loopback whenever they share a node.

Ray Train 2.60's TorchConfig knows two rendezvous, ``env://`` and ``tcp://`` (ray/train/torch/config.py),
and both end in ``TCPStore(MASTER_ADDR, MASTER_PORT, is_master=rank == 0)``, whose server listens on
every interface (``*:<port>``, torch 2.13, libuv or not) whatever host it is given. Gloo's pair sockets
bind the address the hostname resolves to. On one machine neither has any business off loopback.

:class:`LoopbackTorchConfig` keeps Ray's process-group setup but, when all workers are on one node,
rank 0 opens the store on a socket it bound to 127.0.0.1 itself (TCPStore's ``master_listen_fd``),
the others connect there, and gloo/NCCL are pinned to the loopback interface. Workers spread over
several nodes get Ray's own ``env://`` rendezvous unchanged (they must reach each other): see
cluster/README.md for that port's exposure.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

LOOPBACK = "127.0.0.1"
_STORE: tuple | None = None  # rank 0's (listening socket, TCPStore server): alive as long as the process group


def loopback_interface() -> str:
    """Name of the interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addrs):
            return name
    return "lo"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _serve_store(timeout_s: int) -> int:
    """Rank 0: a TCPStore server on a socket bound to loopback only; returns its port."""
    import torch.distributed as dist

    global _STORE
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    port = sock.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, is_master=True, master_listen_fd=sock.fileno(), wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    _STORE = (sock, store)
    return port


def _join(backend: str, rank: int, world_size: int, port: int, timeout_s: int) -> None:
    import torch.distributed as dist

    iface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)  # gloo's pair listeners
    os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)  # NCCL's bootstrap sockets (GPU nodes)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray's own setup does
    # read by DeepSpeed (its CPU shared-memory collective names its segment after them) and env:// users
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)
    timeout = timedelta(seconds=timeout_s)
    store = _STORE[1] if rank == 0 else dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _close_store() -> None:
    global _STORE
    if _STORE is not None:
        _STORE[0].close()
        _STORE = None


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        if len(set(worker_group.execute(_node_id))) > 1:
            return super().on_start(worker_group, backend_config)
        import ray
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars

        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        port = worker_group.execute_single(0, _serve_store, timeout_s=backend_config.timeout_s)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)  # RANK, LOCAL_RANK, WORLD_SIZE, ...
        n = len(worker_group)
        # positional: execute_single_async's own first parameter is called `rank`
        ray.get([worker_group.execute_single_async(i, _join, backend, i, n, port, backend_config.timeout_s)
                 for i in range(n)])

    def on_shutdown(self, worker_group, backend_config) -> None:
        super().on_shutdown(worker_group, backend_config)
        try:
            worker_group.execute_single(0, _close_store)
        except Exception:  # a dead worker took its store with it
            pass


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """Ray's TorchConfig, with the rendezvous on loopback when every worker is on one node."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config(backend: str | None = None) -> TorchConfig:
    """The TorchConfig every slmlab TorchTrainer gets (``TorchTrainer(..., torch_config=torch_config())``)."""
    return LoopbackTorchConfig(backend=backend)
