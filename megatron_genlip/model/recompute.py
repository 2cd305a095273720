"""Activation checkpointing of the transformer blocks: ``train.activation_checkpointing`` = none | selective | full.

* ``none``: autograd keeps everything each block's backward needs (fastest, the most memory:
  ``training/memory.py`` ``layer_activation_bytes``).
* ``full``: a block keeps only its input; backward runs the whole block forward again (every GEMM twice: the
  step executes 4/3 of the block FLOPs that MFU credits).
* ``selective``: a block keeps its input and the outputs of its matrix multiplications and of the attention
  kernel (:func:`saved_ops`: the expensive, FLOP-bound work); backward recomputes only the cheap, memory-bound
  element-wise ops between them (layer norms, RoPE, sigmoid gate, SiLU x up, LayerScale, DropPath, bias adds,
  residual adds). No GEMM runs twice, and the memory is the GEMM outputs instead of every element-wise
  intermediate (torchtitan's op-level SAC policy and Megatron's selective recompute follow the same idea;
  ``memory.selective_layer_bytes`` counts it).

Eagerly, both checkpointing modes go through ``parallel.rng.checkpoint``: non-reentrant ``torch.utils.checkpoint``,
which restores torch's default generators before recomputing (DropPath draws the same rows: its draw is
recomputed, not saved) and replays the tensor-parallel tracker's streams. Selective checkpointing is torch's
``create_selective_checkpoint_contexts`` with the policy below. Compiled (:func:`compile_block`, ``train.compile``
on CUDA), the checkpoint runs inside the compiled unit and the same policy becomes the partitioner's save/recompute
decision (torch tags the traced nodes with it); the partitioner never recomputes random ops, so DropPath's mask is
saved there instead.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch.utils.checkpoint import CheckpointPolicy

from megatron_genlip.config import CHECKPOINTING_MODES, checkpointing_mode
from megatron_genlip.parallel import rng

MODES = CHECKPOINTING_MODES

# aten ops whose outputs selective checkpointing keeps (those present in this torch build); the
# FlexAttention higher-order op is added by :func:`saved_ops`
_SAVED_ATEN = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_flash_attention_forward", "_efficient_attention_forward")


def normalize(value) -> str:
    """``activation_checkpointing`` as one of :data:`MODES` (true/false: full/none); raises on anything else."""
    mode = checkpointing_mode(value)
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {value!r}: expected one of {', '.join(MODES)} (or true/false)")
    return mode


@functools.cache
def saved_ops() -> frozenset:
    """The ops whose outputs selective checkpointing saves: GEMMs and attention kernels (also a compiled
    attention kernel called from an eager block)."""
    ops = {getattr(torch.ops.aten, name).default for name in _SAVED_ATEN if hasattr(torch.ops.aten, name)}
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    # a compiled region called from an eager block: the compiled FlexAttention (model/attention.py ``_compiled``
    # wraps it in this operator), the only compiled code a block runs when it is not compiled itself
    wrapped = getattr(torch.ops.higher_order, "inductor_compiled_code", None)
    if wrapped is not None:
        ops.add(wrapped)
    try:  # model.attention=varlen: torch's FlashAttention-2 variable-length custom op (torch >= 2.10)
        importlib.import_module("torch.nn.attention.varlen")  # registers torch.ops.torch_attn
        ops.add(torch.ops.torch_attn._varlen_attn.default)
    except (ImportError, AttributeError):
        pass
    return frozenset(ops)


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep GEMM and attention outputs; recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def run_block(block, mode: str, *args, region=None, call=None):
    """``block(*args)`` (or ``call(*args)``: a pipeline stage passes its transformer forward) under the
    checkpointing ``mode`` (callers pass ``none`` outside training); through the block's compiled runner when
    :func:`compile_block` gave it one, the block is training and no KV cache is passed (the last argument): a
    compiled runner keeps the training shapes, evaluation and decoding run eagerly. ``region``: the spec's
    ``fp8_region`` when the caller runs the blocks inside it; a checkpointed block enters it again in its own
    function, so its recomputation in backward (outside the caller's region) runs in it too."""
    compiled = getattr(block, "compiled_runs", None)
    if compiled is not None and block.training and args[-1] is None:
        return compiled[mode](*args[:-1])
    function = call if call is not None else block
    if mode == "none":
        return function(*args)
    return rng.checkpoint(_in_region(function, region), *args,
                          policy=selective_policy if mode == "selective" else None)


def _in_region(function, region):
    """``function`` inside the FP8 region (in its forward and in its recomputation alike)."""
    if region is None:
        return function

    def run(*args):
        with region():
            return function(*args)

    return run


def _sac_context():
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(selective_policy)


def _runner(block, mode: str):
    """What one compiled unit runs: the block's forward (not its ``__call__``: module hooks stay outside the
    graph), inside torch's checkpoint when recomputing. Under ``torch.compile`` the selective policy tags the traced
    ops and the partitioner saves exactly the GEMM and attention outputs; random ops (DropPath) are saved, not
    recomputed (the partitioner never recomputes them). No tracker replay inside the graph: no op of a block draws
    from a forked stream (DropPath draws from the replicated default generator)."""
    from megatron_genlip.model.layers import TransformerBlock

    forward = TransformerBlock.forward  # also for a pipeline stage (BlockStage), whose own forward takes a tuple

    def plain(x, cos, sin, mask):
        return forward(block, x, cos, sin, mask, None)

    # one function (code object) per mode: dynamo caches graphs per code object, and a shared one whose closure
    # differs by mode would count as a recompilation
    def selective(x, cos, sin, mask):
        return torch.utils.checkpoint.checkpoint(plain, x, cos, sin, mask, use_reentrant=False,
                                                 context_fn=_sac_context)

    def full(x, cos, sin, mask):
        return torch.utils.checkpoint.checkpoint(plain, x, cos, sin, mask, use_reentrant=False)

    return {"none": plain, "selective": selective, "full": full}[mode]


def compile_block(block, **options) -> None:
    """Give ``block`` one ``torch.compile``d runner per checkpointing mode (each compiled on its first call, with
    static shapes: every micro-batch has the same [L, B] rows, so one graph serves the whole run;
    ``tests/test_compile.py`` counts them). Parameters, their names and the state dict are the block's own: nothing
    is wrapped. ``options``: torch.compile's keyword arguments (tests pass ``backend``)."""
    options = {"dynamic": False, **options}
    runs = {mode: torch.compile(_runner(block, mode), **options) for mode in MODES}
    object.__setattr__(block, "compiled_runs", runs)  # a plain attribute: not a submodule, not in the state dict


def blocks_of(model) -> list:
    """The transformer blocks of a model or of this rank's pipeline stages."""
    from megatron_genlip.model.layers import TransformerBlock

    return [m for m in model.modules() if isinstance(m, TransformerBlock)]
