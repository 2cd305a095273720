"""Run a test function on N gloo ranks (torch.multiprocessing spawn, free port, OMP_NUM_THREADS=1)."""

from __future__ import annotations

import importlib
import os
import traceback

import torch.multiprocessing as mp

from megatron_genlip.training.ports import free_port  # outside the ephemeral range (no connection takes it)


def _worker(rank: int, world: int, port: int, module: str, fn: str, args: tuple, errors) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from megatron_genlip import platform

    torch.set_num_threads(1)
    platform.initialize()  # a worker's process start: the platform decision and the library patches
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        getattr(importlib.import_module(module), fn)(rank, world, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, module: str, fn: str, *args) -> None:
    """Call ``module.fn(rank, world, *args)`` on ``world`` processes; raise with the ranks' tracebacks."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world, free_port(), module, fn, args, errors), nprocs=world,
                           start_method="spawn")
    except Exception as e:  # noqa: BLE001
        details = []
        while not errors.empty():
            details.append(errors.get())
        raise AssertionError("\n".join(details) or str(e)) from None
