"""Which sockets a test's own processes listen on: this process and its descendants (the local Ray it
started), sampled while something runs. Other programs on the machine are not ours to judge."""
from __future__ import annotations

import ipaddress
import os
import threading

import psutil


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
