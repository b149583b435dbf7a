"""Free TCP ports on loopback for the servers tests and benchmarks start.

A port the kernel hands out for `bind(0)` comes from the ephemeral range, the
same range it takes the source port of every outgoing connection from: between
closing the probe socket and the server's own bind, a client connection
anywhere on the machine may take it ("Address already in use" in CI). Ports
below that range are never taken that way, so they are drawn from there, at
random (parallel test workers draw independently), and probed before use.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10000  # above the well-known and most registered service ports


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct ports on 127.0.0.1 that nothing listens on now, outside the ephemeral range."""
    if n <= 0:
        return []
    top = _ephemeral_start()
    if top - _LOWEST < 1000:  # an unusual range setting: fall back to the kernel's choice
        return _kernel_ports(n)
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(200 * n):
        port = rng.randrange(_LOWEST, top)
        if port not in ports and _bindable(port):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"no {n} free ports in {_LOWEST}-{top - 1} on 127.0.0.1")


def free_port() -> int:
    return free_ports(1)[0]


def _kernel_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports
