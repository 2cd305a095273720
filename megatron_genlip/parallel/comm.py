"""Every collective the project calls itself, on a backend that serves its tensors.

On a GPU cluster DeepSpeed initialises torch.distributed with ``nccl``, which serves ``cuda`` tensors only
(``Backend.backend_capability["nccl"] == ["cuda"]``; megatron-core's TP/PP/DP groups inherit it). A CPU tensor
all-reduced there fails with ``No backend type associated with device type cpu``, and every gloo test (gloo
serves both) hides it. So the rule here, the one place that calls torch.distributed collectives
(``tests/test_comm.py`` fails if another library module does):

* **device values** (losses, flags, sums computed by the model) stay on the device and are reduced on the group
  the caller names: on the GPU that is NCCL, with no copy to the host;
* **host values** (a Python flag, counts computed on the CPU, pickled objects) go over a *gloo twin* of that group,
  made for host-side values as megatron-core makes its ``*_gloo`` groups: the world's twin is created by
  :func:`init_host_groups` (every rank, right after the default group exists), the data-parallel twins are
  megatron-core's own. A CPU tensor on a group whose backend does not serve the CPU is routed to its twin; a group
  with no twin is a clear error, never a wrong backend.

Which device types a group's backend serves comes from ``torch.distributed.get_backend_config`` (e.g.
``"cuda:nccl"``, ``"cpu:gloo,cuda:gloo"``). The tests run these functions on a world registered as ``cuda:gloo``
on a CPU machine, which refuses CPU tensors exactly as NCCL does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SUM = dist.ReduceOp.SUM
MAX = dist.ReduceOp.MAX

_host_world: dist.ProcessGroup | None = None


def served_device_types(group=None) -> set[str]:
    """Device types (``"cpu"``, ``"cuda"``, ...) whose tensors ``group``'s backend can reduce."""
    config = dist.get_backend_config(group)
    types = set()
    for entry in config.split(","):
        device, sep, _backend = entry.partition(":")
        if not sep:  # a backend name without devices (a plugin): it serves whatever it is given
            return {"cpu", "cuda"}
        types.add(device.strip())
    return types


def serves(group, device_type: str) -> bool:
    return device_type in served_device_types(group)


def init_host_groups() -> None:
    """Create the gloo twin of the world for host-side values where the default backend does not serve the CPU
    (NCCL). Collective: every rank calls it once, right after the default group is initialised, before any
    other group is created (DeepSpeed's and megatron-core's groups then come in the same order on every rank)."""
    global _host_world
    if serves(None, "cpu"):
        _host_world = dist.group.WORLD
    elif _host_world is None:
        _host_world = dist.new_group(backend="gloo")


def reset() -> None:
    """Forget the host groups (after ``destroy_process_group``, e.g. between tests)."""
    global _host_world
    _host_world = None


def host_group(group=None):
    """The group to use for host (CPU) tensors and pickled objects in place of ``group`` (None: the world)."""
    if group is None or group is dist.group.WORLD:
        if serves(None, "cpu"):
            return None
        if _host_world is None:
            raise RuntimeError("the default process group does not serve CPU tensors (NCCL) and no gloo twin was "
                               "made: call megatron_genlip.parallel.comm.init_host_groups() on every rank right "
                               "after torch.distributed is initialised")
        return _host_world
    if serves(group, "cpu"):
        return group
    twin = _megatron_twins().get(id(group))
    if twin is None:
        raise RuntimeError(f"group {dist.get_backend_config(group)!r} of ranks {dist.get_process_group_ranks(group)} "
                           "does not serve CPU tensors and has no gloo twin: reduce a device tensor on it instead")
    return twin


def _megatron_twins() -> dict[int, dist.ProcessGroup]:
    """megatron-core's data-parallel groups and their gloo twins (created when it builds its groups with the
    default ``create_gloo_process_groups=True``)."""
    from megatron.core import parallel_state as ps

    twins = {}
    if not ps.model_parallel_is_initialized():
        return twins
    for with_cp in (False, True):
        try:
            twins[id(ps.get_data_parallel_group(with_context_parallel=with_cp))] = \
                ps.get_data_parallel_group_gloo(with_context_parallel=with_cp)
        except (AssertionError, RuntimeError):  # gloo groups not created
            pass
    return twins


def _group_for(tensor: torch.Tensor, group):
    if serves(group, tensor.device.type):
        return group
    if tensor.device.type == "cpu":
        return host_group(group)
    raise RuntimeError(f"a {tensor.device.type} tensor cannot be reduced on a {dist.get_backend_config(group)!r} "
                       "group")


# ------------------------------------------------------------------------------------------------------
# tensor collectives: on the caller's group when its backend serves the tensor's device, else the gloo twin


def all_reduce(tensor: torch.Tensor, op=SUM, group=None) -> torch.Tensor:
    """In place; returns ``tensor``. A device tensor costs no host synchronisation."""
    dist.all_reduce(tensor, op=op, group=_group_for(tensor, group))
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order of ``group``."""
    g = _group_for(tensor, group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(g))]
    dist.all_gather(parts, tensor.contiguous(), group=g)
    return parts


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if ``flag`` (a host value) is True on any rank of ``group``."""
    x = torch.tensor([1.0 if flag else 0.0])
    all_reduce(x, op=MAX, group=group)
    return bool(x.item() > 0)


# ------------------------------------------------------------------------------------------------------
# object collectives and barriers: always over the host group (pickles never travel through the GPU)


def all_gather_object(obj, group=None) -> list:
    g = host_group(group)
    out: list = [None] * dist.get_world_size(g)
    dist.all_gather_object(out, obj, group=g)
    return out


def broadcast_object(obj=None, src: int = 0):
    """Global rank ``src``'s ``obj`` on every rank of the world."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=host_group(None))
    return box[0]


def gather_object(obj, dst: int = 0) -> list | None:
    """Every rank's ``obj`` on global rank ``dst`` (None elsewhere)."""
    g = host_group(None)
    out = [None] * dist.get_world_size(g) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=g)
    return out


def barrier(group=None) -> None:
    """A barrier among our own host-side steps (over the gloo twin)."""
    dist.barrier(group=host_group(group))


def backend_barrier() -> None:
    """A barrier on the default group's own backend: stands in for a library's barrier (DeepSpeed's
    ``dist.barrier()`` on NCCL) that a rank skipped, so the two meet."""
    dist.barrier()
