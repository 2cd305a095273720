"""Process groups. megatron-core's ``parallel_state`` owns the TP/PP/DP groups (ARCHITECTURE.md §2).

The model's layers always take their tensor-parallel group from here, so a single-process run (a demo,
a unit test, a conversion tool) needs a world of one: :func:`ensure_initialized` creates it on demand with
an in-memory store (no ports, no network).
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state


def ensure_initialized(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Make sure torch.distributed and megatron-core's model-parallel groups exist.

    Multi-process launches initialise the default group themselves (deepspeed/torchrun); here we only
    fill in what is missing: a single-process gloo group, then ``initialize_model_parallel``.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
        )


def tensor_parallel_group() -> dist.ProcessGroup:
    ensure_initialized()
    return parallel_state.get_tensor_model_parallel_group()
