"""Process start-up: environment, DeepSpeed's communication backend, megatron-core's groups.

The entry point works under the ``deepspeed`` launcher, ``torchrun``, ``srun`` (SLURM variables are mapped
to RANK/LOCAL_RANK/WORLD_SIZE when those are absent) and as a plain single process.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_env() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for every launcher (and none)."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with deepspeed, torchrun "
                               "or set MASTER_ADDR/MASTER_PORT")
        env["MASTER_PORT"] = str(free_port())


def disable_shm_comm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~60 s, needs g++) at init;
    it only serves inference all-reduce, so training marks it incompatible (ENGINES_ON_CPU.md §1.2)."""
    import deepspeed.ops as ds_ops

    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (megatron-core's groups come after layout checks)."""
    import deepspeed

    fill_env()
    if not torch.cuda.is_available():
        disable_shm_comm_op()
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
