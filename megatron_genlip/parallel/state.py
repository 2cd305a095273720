"""Process groups. megatron-core's ``parallel_state`` owns the TP/PP/DP groups (ARCHITECTURE.md §2).

Model constructors take their tensor-parallel group as an argument and create nothing; the builders
(``model.genlip.build_model``, ``model.stages.build_pipeline``) take it from here. A single-process run (a
demo, a unit test, a conversion tool) needs a world of one: :func:`ensure_initialized` creates it on demand with
an in-memory store (no ports, no network). The meta-device model of ``--dry-run`` needs no group at all.

Rank order: megatron-core's default order puts TP innermost, then DP, then PP outermost, exactly like
DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model). :func:`check_rank_order` asserts it,
because DeepSpeed's ZeRO/pipeline groups and megatron-core's TP groups must name the same ranks.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_genlip.parallel import comm


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
    got = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size())
    if got != (tensor_parallel, pipeline_parallel):
        raise RuntimeError(f"model parallelism already initialised as TP={got[0]} PP={got[1]}, "
                           f"not TP={tensor_parallel} PP={pipeline_parallel}")


def reinitialize(tensor_parallel: int, pipeline_parallel: int = 1) -> None:
    """Tear down megatron-core's groups and build them for another layout (tests compare layouts)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    ensure_initialized(tensor_parallel, pipeline_parallel)


def group_size(group) -> int:
    """Ranks in ``group``; None (no tensor parallelism, e.g. a meta-device model) counts as one."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This rank's index in ``group``; None counts as a group of one."""
    return 0 if group is None else dist.get_rank(group)


def tensor_parallel_group() -> dist.ProcessGroup:
    if not parallel_state.model_parallel_is_initialized():
        ensure_initialized()
    return parallel_state.get_tensor_model_parallel_group()


def gather_last_dim(x):
    """All-gather a tensor-parallel shard along its last dimension (e.g. vocab-parallel logits) over the TP
    group. megatron-core's own gather allocates on ``torch.cuda.current_device()``, which fails on CPU."""
    import torch

    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return x
    return torch.cat(comm.all_gather(x, group=group), dim=-1)


def deepspeed_topology(tensor_parallel: int, pipeline_parallel: int):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    dp = dist.get_world_size() // (tensor_parallel * pipeline_parallel)
    return PipeModelDataParallelTopology(num_pp=pipeline_parallel, num_mp=tensor_parallel, num_dp=dp)


def check_rank_order(tensor_parallel: int, pipeline_parallel: int) -> None:
    """Every rank's (pipe, data, model) coordinate in DeepSpeed's topology equals megatron-core's
    (PP rank, DP rank, TP rank); all ranks compare all ranks."""
    topo = deepspeed_topology(tensor_parallel, pipeline_parallel)
    mine = [parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank()]
    everyone = comm.all_gather_object(mine)
    for rank, coords in enumerate(everyone):
        c = topo.get_coord(rank)
        if [c.pipe, c.data, c.model] != coords:
            raise RuntimeError(f"rank {rank}: DeepSpeed topology (pipe, data, model) = {(c.pipe, c.data, c.model)} but "
                               f"megatron-core (pp, dp, tp) = {tuple(coords)}; the two rank orders must agree")


class MegatronMPU:
    """The ``mpu`` DeepSpeed expects (ENGINES_ON_CPU.md §9): megatron-core's parallel_state plus the two
    methods DeepSpeed calls that it lacks. ZeRO then partitions over the data-parallel group only and the
    initial weight broadcast stays inside it (tensor-parallel shards are not overwritten)."""

    def __getattr__(self, name):
        return getattr(parallel_state, name)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(parallel_state.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(parallel_state.get_model_parallel_group())
