"""Megatron sequence parallelism (``parallel.sequence_parallel``) for the GenLIP blocks.

Between a row-parallel output and the next column-parallel input the activations [L, B, d] are split along
L over the tensor-parallel group, so layer norms, LayerScale, DropPath and the residual adds run on L/TP
positions per rank::

    embed (full length) -> scatter (this rank's L/TP slice)
    block:  LN1 -> q, k, v, gate   column-parallel: all-gather L, heads split
                -> attention on the full sequence (full-length rotary tables and prefix-LM mask)
                -> o               row-parallel: reduce-scatter L (instead of all-reduce), bias added on the slice
                -> LayerScale, DropPath, residual on the slice; the same for LN2 -> SwiGLU (fc1/gate_fc, fc2)
    gather (full length) -> ln_post -> proj -> LM head / loss (replicated, as without SP)

megatron-core's ColumnParallelLinear/RowParallelLinear do the all-gather / reduce-scatter themselves when
their ``ModelParallelConfig`` has ``sequence_parallel=True``; :func:`scatter` and :func:`gather` are the two
transitions at the ends. The embeddings (vocab-parallel all-reduce, image patches scattered into their slots)
run on full-length tensors before :func:`scatter`.

Gradients of replicated parameters. A parameter that is not split over TP but is applied to a sequence slice
(layer norms, LayerScale, the row-parallel biases, which megatron-core adds after the reduce-scatter) only
sees its rank's positions: its gradient is partial and must be summed over the TP group. Megatron does that
in ``finalize_model_grads`` for parameters tagged ``.sequence_parallel``; under DeepSpeed there is no such
hook, and after backward ZeRO-2/3 already hold reduced, partitioned gradients. So :func:`reduce_replicated_grads`
tags them the same way and registers a tensor hook on each that all-reduces its gradient over TP *inside
autograd*, before the gradient is accumulated into ``.grad``: DeepSpeed's own gradient hooks (post-accumulate
hooks in ZeRO-1/2/3) and the pipeline engine see the summed gradient, whatever the stage. A hook (rather than
an identity/all-reduce function at the point of use) is used because the norms come from the layer spec and the
row bias is added inside megatron-core, so their uses are not in our code; the hook keeps parameter names.

Calls that cannot be split (a KV cache, a length not divisible by TP: captioning, feature extraction) run the
same layers with sequence parallelism switched off (:func:`parallel_region`); that is only allowed without
autograd, since the gradient hooks assume split activations.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region

from megatron_genlip import platform
from megatron_genlip.parallel import state


def check_supported(tensor_parallel: int, sequence_parallel: bool) -> None:
    """Refuse SP without TP. (On CPU its collectives need ``compat``'s ``cpu-current-device`` patch, applied at
    start-up by the platform decision, not here: constructors patch nothing.)"""
    if sequence_parallel and tensor_parallel < 2:
        raise ValueError(f"sequence parallelism splits the sequence over the tensor-parallel group: it needs "
                         f"parallel.tensor_parallel > 1 (got {tensor_parallel})")


def scatter(x: torch.Tensor) -> torch.Tensor:
    """Full-length [L, B, d] -> this rank's slice [L/TP, B, d] (backward: all-gather)."""
    platform.current()  # a library user who never initialised: the decision (and CPU patches) now, not mid-step
    return scatter_to_sequence_parallel_region(x, group=state.tensor_parallel_group())


def gather(x: torch.Tensor) -> torch.Tensor:
    """Slice [L/TP, B, d] -> full length [L, B, d]. What follows runs replicated on every TP rank, so the
    incoming gradient is already complete and identical: backward keeps this rank's slice (no reduce-scatter)."""
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False,
                                                group=state.tensor_parallel_group())


def _sum_over_tp(grad: torch.Tensor, group) -> torch.Tensor:
    total = grad.to(torch.float32, copy=True)  # fp32 reduction, as DeepSpeed's communication_data_type
    dist.all_reduce(total, group=group)
    return total.to(grad.dtype)


def reduce_replicated_grads(module: torch.nn.Module, group) -> list[str]:
    """Tag every parameter of ``module`` that is not split over TP with ``.sequence_parallel = True`` and sum
    its gradient over ``group`` in backward (see the module docstring). Returns the names handled."""
    names = []
    for name, p in module.named_parameters():
        if getattr(p, "tensor_model_parallel", False) or hasattr(p, "_genlip_sp_grad_hook"):
            continue
        p.sequence_parallel = True
        p._genlip_sp_grad_hook = p.register_hook(functools.partial(_sum_over_tp, group=group))
        names.append(name)
    return names


@contextlib.contextmanager
def _switched_off(model: torch.nn.Module, length: int, cached: bool):
    if torch.is_grad_enabled():
        raise ValueError(
            f"parallel.sequence_parallel=true: a forward with gradients needs a sequence length divisible by "
            f"parallel.tensor_parallel ({state.tensor_parallel_world_size()}) and no KV cache (got length {length}"
            f"{', KV cache' if cached else ''}); run inference under torch.no_grad()")
    layers = [m for m in model.modules() if m is not model and getattr(m, "sequence_parallel", None) is True]
    for m in layers:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m in layers:
            m.sequence_parallel = True


@contextlib.contextmanager
def parallel_region(model: torch.nn.Module, length: int, cached: bool):
    """Yield True when this call runs split (``model.sequence_parallel``, no cache, length divisible by TP);
    for an SP model that cannot split this call, the layers run unsplit inside the block (no-grad only)."""
    if not getattr(model, "sequence_parallel", False):
        yield False
    elif not cached and length % state.tensor_parallel_world_size() == 0:
        yield True
    else:
        with _switched_off(model, length, cached):
            yield False
