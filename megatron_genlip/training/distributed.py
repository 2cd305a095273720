"""Process start-up: environment, DeepSpeed's communication backend, megatron-core's groups.

The entry point works under the ``deepspeed`` launcher, ``torchrun``, ``srun`` (SLURM variables are mapped
to RANK/LOCAL_RANK/WORLD_SIZE when those are absent) and as a plain single process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_genlip.parallel import comm
from megatron_genlip.platform import Platform
from megatron_genlip.training.ports import free_port


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


def init_distributed(platform: Platform) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (megatron-core's groups come after layout checks). On CPU
    the platform decision has already kept DeepSpeed from JIT-building its shared-memory op (compat)."""
    import deepspeed

    fill_env()
    if platform.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    comm.init_host_groups()  # a gloo twin of the world for host-side values where the backend is NCCL
    return dist.get_rank(), dist.get_world_size()


def device(platform: Platform) -> torch.device:
    """This rank's device: the CUDA device ``init_distributed`` selected, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if platform.cuda else torch.device("cpu")
