"""Rendezvous ports, without torch (the launch scripts call this before any rank starts).

Ports are drawn below Linux's default ephemeral range (32768-60999). The kernel hands ports of that range to
every outgoing connection and to ``bind(port 0)``, so a port found free there can be taken by another process's
connection before the rendezvous binds it: the EADDRINUSE seen when tests ran side by side with ports from
``bind(0)``, and again in a SLURM job whose port was ``20000 + job id % 20000`` (job 17399 drew 37399).

    python -m megatron_genlip.training.ports                 # a random free port (examples/pretrain_genlip.sh)
    python -m megatron_genlip.training.ports --job-id 17399  # the job's port, walking on if it is taken (sbatch)
"""

from __future__ import annotations

import argparse
import random
import socket

PORT_RANGE = (20000, 32000)  # [low, high): below the ephemeral range


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` now ("" = every interface, as a rendezvous server listens)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", exclude=()) -> int:
    """A TCP port that is free now on ``host``, drawn at random from ``PORT_RANGE``."""
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(*PORT_RANGE)
        if port not in exclude and is_free(port, host):
            return port
    raise RuntimeError(f"no free TCP port in {PORT_RANGE[0]}-{PORT_RANGE[1]} after 200 tries; set MASTER_PORT")


def job_port(job_id: int, host: str = "") -> int:
    """The rendezvous port of a batch job: ``low + job id % span``, or the next free one after it (wrapping
    inside ``PORT_RANGE``). Run it on the rendezvous host (a SLURM batch script runs on the job's first node)."""
    low, high = PORT_RANGE
    span = high - low
    start = job_id % span
    for step in range(span):
        port = low + (start + step) % span
        if is_free(port, host):
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high}; set GENLIP_MASTER_PORT")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print a free rendezvous port below the ephemeral range "
                                                 f"({PORT_RANGE[0]}-{PORT_RANGE[1] - 1}).")
    parser.add_argument("--job-id", type=int, default=None,
                        help="derive the port from this batch job id (the same job gets the same port while "
                             "it is free); without it, a random free port")
    parser.add_argument("--host", default=None,
                        help="address to test the port on (default: every interface with --job-id, "
                             "127.0.0.1 otherwise)")
    args = parser.parse_args(argv)
    if args.job_id is None:
        print(free_port("127.0.0.1" if args.host is None else args.host))
    else:
        print(job_port(args.job_id, "" if args.host is None else args.host))


if __name__ == "__main__":
    main()
