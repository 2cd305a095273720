"""Rendezvous ports (training/distributed.py free_port): drawn below the kernel's ephemeral range, so a port found
free is not handed to another process's outgoing connection before the rendezvous binds it (the EADDRINUSE a test
run saw when two multi-process tests ran side by side and ports came from bind(port 0))."""

from __future__ import annotations

import socket
from pathlib import Path

from megatron_genlip.training import distributed


def test_ports_are_free_and_outside_the_ephemeral_range():
    low, high = distributed.PORT_RANGE
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if ephemeral.exists():
        first, last = map(int, ephemeral.read_text().split())
        assert high <= first or low > last, (distributed.PORT_RANGE, first, last)
    for _ in range(20):
        port = distributed.free_port()
        assert low <= port < high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free right after it was chosen


def test_a_taken_port_or_an_excluded_one_is_skipped(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        draws = [taken, 25001, 25002]

        class Draws:
            def randrange(self, a, b):
                return draws.pop(0)

        monkeypatch.setattr(distributed.random, "SystemRandom", Draws)
        assert distributed.free_port(exclude={25001}) == 25002
