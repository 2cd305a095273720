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
their ``ModelParallelConfig`` has ``sequence_parallel=True``; the two transitions at the ends are the one wrapper
:class:`SequenceParallel` (``scatter`` after the embeddings, ``gather`` before ln_post; the identity when
sequence parallelism is off). The model holds one and calls both ends around its blocks; the pipeline's first
stage calls ``scatter`` and its last stage ``gather`` (``model/stages.py``). The embeddings (vocab-parallel
all-reduce, image patches scattered into their slots) run on full-length tensors before ``scatter``.

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
same layers with sequence parallelism switched off (:meth:`SequenceParallel.region`); that is only allowed
without autograd, since the gradient hooks assume split activations.

Like every module of ``megatron_genlip.parallel``, this one imports nothing from ``megatron_genlip.model``: the
model builds on these primitives, never the other way round.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region

from megatron_genlip import platform
from megatron_genlip.parallel import comm, state


def check_supported(tensor_parallel: int, sequence_parallel: bool) -> None:
    """Refuse SP without TP. (On CPU its collectives need ``compat``'s ``cpu-current-device`` patch, applied at
    start-up by the platform decision, not here: constructors patch nothing.)"""
    if sequence_parallel and tensor_parallel < 2:
        raise ValueError(f"sequence parallelism splits the sequence over the tensor-parallel group: it needs "
                         f"parallel.tensor_parallel > 1 (got {tensor_parallel})")


class SequenceParallel:
    """The two ends of sequence parallelism over ``tp_group``, for the model and the pipeline stages alike; both
    are the identity when ``enabled`` is False, so no caller branches on it."""

    def __init__(self, tp_group, enabled: bool):
        check_supported(state.group_size(tp_group), enabled)
        self.group = tp_group
        self.enabled = enabled

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Full-length [L, B, d] -> this rank's slice [L/TP, B, d] (backward: all-gather)."""
        if not self.enabled:
            return x
        platform.current()  # a library user who never initialised: the decision (and CPU patches) now, not mid-step
        return scatter_to_sequence_parallel_region(x, group=self.group)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Slice [L/TP, B, d] -> full length [L, B, d]. What follows runs replicated on every TP rank, so the
        incoming gradient is already complete and identical: backward keeps this rank's slice (no reduce-scatter)."""
        if not self.enabled:
            return x
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.group)

    @contextlib.contextmanager
    def region(self, model: torch.nn.Module, length: int, cached: bool):
        """The wrapper for one forward of ``model``'s blocks: this one when the call can run split (no KV cache,
        ``length`` divisible by TP) or sequence parallelism is off; otherwise an inactive one, with the layers
        of ``model`` switched to unsplit for the ``with`` block (no-grad only)."""
        if not self.enabled or (not cached and length % state.group_size(self.group) == 0):
            yield self
        else:
            with _switched_off(model, length, cached, state.group_size(self.group)):
                yield OFF


OFF = SequenceParallel(None, False)


def _sum_over_tp(grad: torch.Tensor, group) -> torch.Tensor:
    total = grad.to(torch.float32, copy=True)  # fp32 reduction, as DeepSpeed's communication_data_type
    comm.all_reduce(total, group=group)
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
def _switched_off(model: torch.nn.Module, length: int, cached: bool, tensor_parallel: int):
    if torch.is_grad_enabled():
        raise ValueError(
            f"parallel.sequence_parallel=true: a forward with gradients needs a sequence length divisible by "
            f"parallel.tensor_parallel ({tensor_parallel}) and no KV cache (got length {length}"
            f"{', KV cache' if cached else ''}); run inference under torch.no_grad()")
    layers = [m for m in model.modules() if m is not model and getattr(m, "sequence_parallel", None) is True]
    for m in layers:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m in layers:
            m.sequence_parallel = True

