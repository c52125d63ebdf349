"""A local `slmlab run` listens on loopback only: Ray, its dashboard, Ray Data, and the Ray Train
workers' torch.distributed rendezvous (TCPStore) and gloo sockets, sampled while a tiny pipeline
trains. Only this test process and its descendants (the local Ray it started) are inspected: other
programs on the machine are not ours to judge."""
from __future__ import annotations

import ipaddress
import os
import threading

import psutil
import pytest

pytestmark = pytest.mark.slow


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 and ::1, also as an IPv4-mapped IPv6 address (gRPC's dual-stack sockets bound to
    127.0.0.1 show as ::ffff:127.0.0.1); "::" and "0.0.0.0" (every interface) are not."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


class ListenSampler(threading.Thread):
    """Every ``interval`` seconds, records (process name, address, port) of each LISTEN socket owned by
    this process or a descendant."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.seen, self.stop = interval, set(), threading.Event()

    def run(self) -> None:
        me = psutil.Process(os.getpid())
        while not self.stop.is_set():
            try:
                ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
                for c in psutil.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN and c.pid in ours:
                        try:
                            name = " ".join(psutil.Process(c.pid).cmdline())[:80]
                        except psutil.Error:
                            name = "?"
                        self.seen.add((name, c.laddr.ip, c.laddr.port))
            except psutil.Error:
                pass
            self.stop.wait(self.interval)


def test_local_run_listens_on_loopback_only(ray_local, tmp_path):
    from slmlab.config import validate_pipeline
    from slmlab.pipeline import run_pipeline
    from tests.conftest import tiny_pipeline_dict

    cfg = validate_pipeline(tiny_pipeline_dict(tmp_path, train__max_steps=4, train__eval_every=4,
                                               train__checkpoint_every=4))
    sampler = ListenSampler()
    sampler.start()
    try:
        result = run_pipeline(cfg)
    finally:
        sampler.stop.set()
        sampler.join()
    assert result is not None and result.model_version is not None
    # the premise: the sampler saw the training workers' own listeners (the rendezvous store at least)
    assert any("RayTrainWorker" in name for name, _, _ in sampler.seen), sorted(sampler.seen)
    assert not is_loopback("::") and not is_loopback("0.0.0.0") and is_loopback("::ffff:127.0.0.1")
    exposed = sorted(s for s in sampler.seen if not is_loopback(s[1]))
    assert exposed == [], exposed
