"""The LM head and the token-mean cross-entropy in one pass over the labelled positions (``model.loss_impl=fused``).

The reference path (``model.loss_impl=reference``: ``HeadMixin._token_losses`` under per-chunk checkpointing)
materialises each chunk's fp32 logits twice, once in forward and again when backward recomputes the chunk, and
runs the head's GEMM four times (forward, recompute, two gradient GEMMs). The loss is the last op of the forward
and a scalar, so its gradient is known up to one factor when the forward runs: this function computes, chunk by
chunk, the logits once (``[C, V/TP]`` in the activation dtype, then freed; the softmax statistics and the logits'
gradient in fp32 inside three element-wise functions, compiled into one kernel each on CUDA), the per-token losses and the gradients of the loss mean
with respect to the hidden states and the head weight (3 GEMMs per chunk in all; Liger-Kernel's fused linear
cross-entropy does the same). Backward only scales those gradients by the incoming scalar gradient (the loss
scale, the gradient-accumulation factor). Cost: the weight's gradient [V/TP, e] (fp32 while accumulated over
chunks, then the weight's dtype) lives from the head's forward to its backward: ``training/memory.py`` counts it.

Arithmetic follows megatron-core's ``vocab_parallel_cross_entropy`` op for op (max over the vocabulary, all-reduced
over the tensor-parallel group; ``log(sum exp(z - max)) - (z_target - max)``; the softmax minus the one-hot of
the target as the logits' gradient), so the loss and gradients equal the reference path's within rounding
(``tests/test_fused_loss.py`` states the tolerances). Under tensor parallelism the weight is the rank's vocabulary
shard (megatron-core's ``VocabUtility`` ranges), the max, the sum of exponentials and the target logit are
all-reduced, and the hidden states' gradient (a partial sum over the vocabulary shards) is all-reduced once, in the
forward: column-parallel semantics, as ``ColumnParallelLinear``'s input gradient. All reductions go through
``parallel/comm.py`` on device tensors (no host synchronisation).
"""

from __future__ import annotations

import functools

import torch

from megatron_genlip import platform
from megatron_genlip.parallel import comm, state


def _vocab_range(weight: torch.Tensor, tp_group) -> tuple[int, int]:
    rows = weight.shape[0]
    start = state.group_rank(tp_group) * rows
    return start, start + rows


def chunk_max(logits: torch.Tensor) -> torch.Tensor:
    """Row maxima [C] (fp32) of a chunk's logits [C, V/TP] (the activation dtype: max is exact in any dtype)."""
    return logits.amax(dim=-1).float()


def chunk_sums(logits, top, local_t, outside):
    """sum(exp(z - max)) over the rows' vocabulary shard and the target's z - max (0 outside the shard), in fp32."""
    z = logits.float() - top[:, None]
    picked = torch.where(outside, torch.zeros_like(top), z.gather(1, local_t[:, None])[:, 0])
    return z.exp().sum(dim=-1), picked


def chunk_grad(logits, top, sum_exp, local_t, outside, scale: float, dtype):
    """d(mean loss)/d logits = (softmax - onehot(target)) x scale (scale = fp32(1/N), as the mean's backward), in
    fp32, returned in ``dtype`` (the head's GEMMs run in the activation dtype)."""
    p = (logits.float() - top[:, None]).exp() / sum_exp[:, None]
    vocab = torch.arange(p.shape[-1], device=p.device)
    target = (vocab[None, :] == local_t[:, None]) & ~outside[:, None]
    return ((p - target.to(p.dtype)) * scale).to(dtype)


def _kernels(device: torch.device):
    """The chunk functions, ``torch.compile``d on the accelerator when the platform compiles (each one fused
    kernel reading the activation-dtype logits once: ~10 bytes per logit in all instead of ~56 for the eager ops
    on fp32 copies; dynamic shapes: the last chunk's length varies), as they are elsewhere (CPU: the same math
    eagerly)."""
    if device.type == "cpu" or not platform.current().compile:
        return chunk_max, chunk_sums, chunk_grad
    return _compiled_kernels()


@functools.cache
def _compiled_kernels():
    return tuple(torch.compile(fn, dynamic=True) for fn in (chunk_max, chunk_sums, chunk_grad))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, e], weight [V/TP, e], targets [N]) -> (mean loss, per-token losses [N], not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, tp_group):
        n = hidden.shape[0]
        tp = state.group_size(tp_group)
        start, end = _vocab_range(weight, tp_group)
        find_max, find_sums, find_grad = _kernels(hidden.device)
        grad_hidden = torch.empty_like(hidden)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        step = chunk if chunk > 0 else max(n, 1)
        # several chunks: their weight gradients summed in fp32 (fp64 stays fp64); one chunk: its GEMM's own output
        acc = torch.promote_types(weight.dtype, torch.float32) if n > step else weight.dtype
        grad_weight = None
        for i in range(0, n, step):
            h, t = hidden[i:i + step], targets[i:i + step]
            logits = h @ weight.t()  # [C, V/TP] in the activation dtype: the reference head's output
            top = find_max(logits)
            if tp > 1:
                comm.all_reduce(top, op=comm.MAX, group=tp_group)
            outside = (t < start) | (t >= end)
            local_t = torch.where(outside, torch.zeros_like(t), t - start)
            sum_exp, picked = find_sums(logits, top, local_t, outside)
            if tp > 1:
                both = torch.stack((picked, sum_exp))
                comm.all_reduce(both, group=tp_group)
                picked, sum_exp = both[0], both[1]
            losses[i:i + step] = torch.log(sum_exp) - picked
            g = find_grad(logits, top, sum_exp, local_t, outside, 1.0 / n, hidden.dtype)
            del logits
            grad_hidden[i:i + step] = g @ weight
            part = g.t() @ h  # the GEMM in the activation dtype
            grad_weight = part.to(acc) if grad_weight is None else grad_weight.add_(part)  # summed in fp32
            del g
        if tp > 1 and n:
            comm.all_reduce(grad_hidden, group=tp_group)
        if grad_weight is None:  # no labelled position
            grad_weight = torch.zeros_like(weight)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(losses)
        loss = losses.mean() if n else hidden.sum() * 0.0
        return loss, losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), \
            None, None, None


def token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                 tp_group=None) -> torch.Tensor:
    """Per-token cross-entropy [N] (fp32) of ``hidden @ weight.T``, chunk by chunk, without any gradient work (the
    same statistics as :class:`_FusedLinearCrossEntropy`'s forward: evaluation, ``torch.no_grad``)."""
    n = hidden.shape[0]
    tp = state.group_size(tp_group)
    start, end = _vocab_range(weight, tp_group)
    find_max, find_sums, _ = _kernels(hidden.device)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    step = chunk if chunk > 0 else max(n, 1)
    for i in range(0, n, step):
        t = targets[i:i + step]
        logits = hidden[i:i + step] @ weight.t()
        top = find_max(logits)
        if tp > 1:
            comm.all_reduce(top, op=comm.MAX, group=tp_group)
        outside = (t < start) | (t >= end)
        sum_exp, picked = find_sums(logits, top, torch.where(outside, torch.zeros_like(t), t - start), outside)
        if tp > 1:
            both = torch.stack((picked, sum_exp))
            comm.all_reduce(both, group=tp_group)
            picked, sum_exp = both[0], both[1]
        losses[i:i + step] = torch.log(sum_exp) - picked
    return losses


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                               tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` and the per-token losses (no gradient),
    ``chunk`` positions at a time (0: all at once); ``weight`` is this rank's vocabulary shard under TP. Without
    autograd (evaluation) only the losses are computed: one GEMM per chunk, no gradient buffers."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        losses = token_losses(hidden, weight, targets, chunk, tp_group)
        return (losses.mean() if losses.numel() else hidden.sum() * 0.0), losses
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk, tp_group)


class FusedLossHead:
    """Mixin for an LM-head linear (bias-free, [V/TP, e] weight): ``head(x)`` gives logits as the linear does;
    ``head(x, targets=t, chunk=C)`` gives (mean loss, per-token losses) through :func:`fused_linear_cross_entropy`
    on the vocabulary shard of ``loss_tp_group`` (set by the model). The loss runs inside the module's own forward,
    so ZeRO-3 gathers the weight for it as for a plain call."""

    loss_tp_group = None

    def forward(self, x, targets=None, chunk: int = 0):  # noqa: D102
        if targets is None:
            return super().forward(x)
        if getattr(self, "bias", None) is not None:
            raise ValueError("the fused LM-head loss takes a head without bias (GENLIP_SPEC.md: lm_head has none)")
        return fused_linear_cross_entropy(x, self.weight, targets, chunk, self.loss_tp_group)
