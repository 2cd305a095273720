"""Rendezvous ports (training/ports.py): drawn below the kernel's ephemeral range, so a port found free is not
handed to another process's outgoing connection before the rendezvous binds it. Two failures this guards: the
EADDRINUSE of two multi-process tests side by side when ports came from bind(port 0), and the SLURM job 17399 whose
sbatch port 20000 + 17399 % 20000 = 37399 lay inside the ephemeral range and was taken."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_genlip.training import ports

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_range():
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    return tuple(map(int, path.read_text().split())) if path.exists() else (32768, 60999)


def test_the_range_lies_below_the_ephemeral_range():
    low, high = ports.PORT_RANGE
    first, last = _ephemeral_range()
    assert high <= first or low > last, (ports.PORT_RANGE, first, last)


def test_ports_are_free_and_in_range():
    low, high = ports.PORT_RANGE
    for _ in range(20):
        port = ports.free_port()
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

        monkeypatch.setattr(ports.random, "SystemRandom", Draws)
        assert ports.free_port(exclude={25001}) == 25002


@pytest.mark.parametrize("job_id", [1, 17399, 11999, 12000, 4_000_000_123])
def test_a_job_port_is_its_id_modulo_the_span_and_in_range(job_id):
    low, high = ports.PORT_RANGE
    first, last = _ephemeral_range()
    port = ports.job_port(job_id, "127.0.0.1")
    assert low <= port < high and not first <= port <= last
    expected = low + job_id % (high - low)
    if ports.is_free(expected, "127.0.0.1"):
        assert port == expected  # the same job (a requeue) gets the same port while it is free


def test_a_job_port_walks_past_a_taken_port_and_wraps(monkeypatch):
    low, high = ports.PORT_RANGE
    taken = {low + 17399 % (high - low), low + 17399 % (high - low) + 1}
    monkeypatch.setattr(ports, "is_free", lambda port, host="": port not in taken)
    assert ports.job_port(17399) == max(taken) + 1
    taken = {high - 1}
    assert ports.job_port(high - 1 - low) == low  # wraps inside the range, never into the ephemeral one


def test_the_command_line_prints_a_port_without_importing_torch():
    code = ("import runpy, sys; sys.argv = ['ports', '--job-id', '17399']; "
            "runpy.run_module('megatron_genlip.training.ports', run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'the launch scripts call this before any rank: keep it light'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    low, high = ports.PORT_RANGE
    assert low <= int(out.stdout) < high


def test_the_launch_scripts_take_their_ports_from_this_module():
    sbatch = (ROOT / "examples/slurm/pretrain_genlip.sbatch").read_text()
    assert "-m megatron_genlip.training.ports --job-id" in sbatch
    assert "% 20000" not in sbatch  # 20000 + id % 20000 reaches 39999, inside the ephemeral range
    assert "-m megatron_genlip.training.ports)" in (ROOT / "examples/pretrain_genlip.sh").read_text()
