"""Cost model of one training step on one GPU, counted from the model's own code (issue #23).

Nothing here is typed in from a formula except the credited (MFU) FLOPs, which are ``model/accounting.py``'s: the
executed work is what the real :class:`~megatron_genlip.model.genlip.GenLIPModel` launches when it runs one
forward and backward at the recipe's full size, recorded op by op.

Counting
--------
* **Trace.** The model is built on the meta device (no memory, no arithmetic) with 2 transformer blocks (the blocks
  are identical: the per-block figures come from block 1, an interior block, multiplied by ``num_layers``; block 0
  is checked to count the same), set to training mode, activation checkpointing and ``model.loss_impl`` as the
  design asks, and run forward and backward on a real packed micro-batch (``rows`` x ``seq_length`` tokens, e.g.
  16 x 16384) under :class:`OpRecorder`, a ``TorchDispatchMode`` that records every aten op with the shapes,
  strides, dtypes and storages of what it reads and writes. The token ids, labels, sample ids and token kinds stay
  real CPU tensors (the model's data-dependent steps need their values: the labelled positions, the image-slot
  count), the activations, parameters and gradients live on meta; an op that mixes the two is re-run with its CPU
  tensors moved to meta. Tensor subclasses (torchao's ``Float8TrainingTensor``) are unwrapped: the recorder defers
  to the subclass and records the plain ops it runs (casts, amax, ``_scaled_mm``).
* **Attribution.** Forward ops belong to the region (block i, the embedding, the head) whose forward runs;
  backward ops to the region whose forward created the autograd node that runs them (autograd sequence numbers,
  ``torch._C._current_autograd_node``); forward code that runs while backward runs is recomputation (phase
  ``rec``: checkpointing).
* **Classes.** GEMM: ``mm``/``addmm``/``bmm``/``baddbmm``/``_scaled_mm`` (FLOPs from torch's own
  ``torch.utils.flop_counter`` formulas). Attention: the layers' kernel is swapped for a stand-in that calls the
  aten op ``_scaled_dot_product_efficient_attention`` (shapes, autograd and the selective-checkpointing policy's
  treatment of attention outputs are those of a real kernel; its dense FLOPs are NOT used): attention work is
  counted from the packed rows' real block structure instead (:func:`tile_counts`). View: an op whose outputs share
  the storage of an input (view, permute, detach, a no-op ``contiguous``). Allocation: ``empty*`` (free). Host
  synchronisation: ``_local_scalar_dense``. Everything else is element-wise/reduction/copy work.
* **Executed vs credited FLOPs.** Executed = every GEMM the trace ran (recomputation included; FP8 GEMMs apart);
  credited = ``accounting.batch_flops`` of the same batch, split into its block / attention / head / embedding
  terms (the split is checked to add up to ``batch_flops``).

Memory traffic of the element-wise work
---------------------------------------
* **Eager**: every element-wise op is its own kernel; it reads each distinct tensor view it takes (a broadcast
  operand once: stride-0 dimensions do not count) and writes its outputs. Gathers and scatters (``index``,
  ``embedding``, ``index_put_``...) move only the indexed rows; ``copy_``/``fill_``/RNG fills do not read their
  destination.
* **Compiled** (``torch.compile`` of each transformer block, the checkpoint inside the compiled unit as
  ``model/recompute.py`` does it; the embedding and the head stay eager): the forward graph and the backward graph
  (recomputation included) are each cut into islands of element-wise ops, GEMM and attention ops being boundaries.
  First, identical ops on identical inputs in one graph are merged (AOTAutograd's common-subexpression
  elimination). Then islands grow greedily along producer -> consumer edges in program order (:func:`fuse`), as
  inductor's scheduler fuses, unless a rule forbids it. An island is one kernel; its traffic is the bytes crossing
  its boundary: the distinct values it reads that it did not produce (GEMM outputs, the block input, parameters,
  tensors the forward graph saved), and the values it produces that are read by a GEMM, the attention kernel,
  another island or the other graph (what is saved for backward is written by the forward graph) or that leave
  the step (parameter gradients); dead values are not written. The rules, i.e. the assumptions:
  (1) no island may depend on itself through an op outside it (checked on ancestor/descendant bitsets: a GEMM
  between two element-wise ops keeps them apart); (2) a global reduction (<= 64 output elements, e.g. FP8's amax)
  ends a kernel: what uses its result starts another island, which reads again what it needs from before;
  (3) a reduction over the token dimension (bias, LayerScale and layer-norm weight gradients) is its own kernel and
  reads its inputs from memory (inductor's split reductions; the layer-norm backward's weight part adds a read of
  its gradient and input); (4) no horizontal fusion of independent kernels that share an input (the rope of q and
  of k each read cos/sin); (5) a cheap single-input pointwise op (a cast, a bias add, a scale) whose result another
  island needs is recomputed by that island from its input when that moves no more bytes (inductor inlines
  pointwise producers into their consumers); (6) what autograd saves in eager is what the compiled forward saves
  (the min-cut partitioner may save less). The result is a model of inductor, stated as such, not its output;
  ``benchmarks/gpu_run.py`` measures the real thing.
* **Ideal-fusion floor** (``Design.fusion="floor"``): every rule dropped, each graph's element-wise work priced as
  one island. It is a lower bound, not a prediction: whatever kernels run the same ops (inductor, hand-written
  Triton, Transformer Engine's fused norms), each value crossing a GEMM or attention boundary, saved for backward,
  or leaving the step moves at least once. Only a different op graph goes below it (GEMM epilogue fusion, another
  checkpointing policy).

FlexAttention
-------------
The rows are stage-1 samples (196 image + 6 prompt + N(68, 20) caption tokens clipped to [8, 130], ~270 tokens:
PERFORMANCE.md §1.4 and §2.7) packed by the project's own ``data.packing.fill_row`` (:func:`stage1_batch`). Per
row, :func:`tile_counts` counts the entries the mask rule (``masks.may_attend`` with the padding diagonal, the flex
``mask_mod``) allows in every (query tile, key tile): empty tiles are skipped, partial ones run ``mask_mod`` per
entry, full ones do not; it is checked against a brute-force count of ``masks.sdpa_mask`` in the tests. Executed =
computed tiles x 2 x Bq x Bk x D_rounded x dots x heads x layers, with D_rounded = the next power of two of the head
dim (72, 96 -> 128: torch/_inductor/kernel/flex/common.py) and dots = 2 per forward (recomputed forwards counted from
the trace) + 7 per backward (the Triton templates); credited = 12 L h T^2 per sample. BlockMask sizes 256/128/64;
"tuned" takes the fastest; :data:`FLEX_BLOCKS` notes which ones torch's H100 defaults accept.

Time model
----------
t = GEMM FLOPs / (peak x eta_gemm) [FP8 GEMMs at the FP8 peak and eta_gemm_fp8] + attention executed FLOPs /
(peak x eta_flex) x (1 + partial-tile overhead x share of partial tiles) + element-wise bytes / (HBM x eta_hbm) +
kernels x per-kernel gap + the optimizer step's bytes / (HBM x eta_hbm). Every constant is a field of
:class:`Assumptions` with its source; MFU = credited FLOPs / (t x 989e12) (PERFORMANCE.md §5, also for FP8).
:func:`predict` gives the components of a config's step for ``benchmarks/gpu_run.py`` to put beside its
measurement; ``benchmarks/cost_model.py`` prints the tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from megatron_genlip.model.attention import fa2_head_dim

# ------------------------------------------------------------------------------------------------------------------
# assumptions (each overridable: benchmarks/cost_model.py --help)


@dataclass(frozen=True)
class Assumptions:
    """The hardware numbers and efficiencies the time model rests on (H100 SXM5 unless overridden)."""

    # PERFORMANCE.md §1.1: H100 SXM5 dense BF16 tensor peak (also VeOmni's 989e12); the MFU denominator (§5)
    peak_bf16: float = 989e12
    # PERFORMANCE.md §1.1: FP8 dense tensor peak (1,979 TFLOP/s without sparsity)
    peak_fp8: float = 1979e12
    # PERFORMANCE.md §1.1: HBM3 3.35 TB/s (H200: 4.8 TB/s, --hbm-tbps 4.8)
    hbm_bytes_per_s: float = 3.35e12
    # [judgement] cuBLAS BF16 on large-M GEMMs (M = 262,144 tokens, K/N 1152-4096) on H100 SXM reaches ~650-750
    # TFLOP/s; Megatron-Bridge's 744 model-TFLOP/s/GPU on Llama3 8B (§2.1) is 75% of the BF16 peak end to end
    eta_gemm: float = 0.70
    # [judgement] FP8 GEMMs of these shapes: ~1,100 TFLOP/s (56% of the FP8 peak); torchao's microbenchmark gives
    # 1.39x over BF16 at (4096, 8192, 16384) casts included, 0.80x at (1024, 2048, 1024) (§2.2, §2.5)
    eta_gemm_fp8: float = 0.55
    # PERFORMANCE.md §2.6: FA2 reaches 35% of the H100 peak (FA3 paper), FlexAttention 85-90% of FA2 -> ~0.30 of
    # the BF16 peak, applied to the executed (tile, padded head-dim) FLOPs
    eta_flex: float = 0.30
    # PERFORMANCE.md §2.6: masking every element costs ~15-20% (FlexAttention blog): extra time of a partial tile
    flex_partial_overhead: float = 0.15
    # [judgement] FlashAttention-2 variable-length (model.attention=varlen) on its executed tile FLOPs: FA2 reaches
    # 35% of the H100 peak on long sequences (FA3 paper, §2.6); segments of ~200-330 tokens give each query tile
    # 2-6 key tiles, the same short loops as the flex kernel on these rows -> the same 0.30
    eta_varlen: float = 0.30
    # [judgement] large element-wise kernels reach 80-90% of HBM bandwidth, strided permutes and row reductions
    # over d = 1152 less: 0.75 on average
    eta_hbm: float = 0.75
    # [judgement] GPU-side gap between dependent kernels when the host runs ahead (launch latency, tail effects)
    kernel_gap_s: float = 3e-6
    # DeepSpeed ZeRO-1 bf16 step at DP = 1 (training/memory.py's table; DeepSpeed 0.19.8), bytes moved per
    # parameter: bucket copy of the bf16 gradient (2+2), fp32 gradient partition (2+4), gradient norm (4),
    # clip/unscale in place (4+4), fused Adam (read p, g, m, v 16 + write p, m, v 12), fp32 -> bf16 parameter copy
    # (4+2), zeroing the bf16 gradients (2)
    optimizer_bytes_per_param: float = 58.0

    def describe(self) -> dict:
        return dataclasses.asdict(self)


ASSUMPTION_SOURCES = {
    "peak_bf16": "PERFORMANCE.md §1.1 (H100 SXM5 dense BF16)",
    "peak_fp8": "PERFORMANCE.md §1.1 (H100 SXM5 dense FP8)",
    "hbm_bytes_per_s": "PERFORMANCE.md §1.1 (H100 HBM3)",
    "eta_gemm": "judgement: cuBLAS large-M BF16 GEMMs ~650-750 TFLOP/s; Megatron-Bridge 744 model-TFLOP/s (§2.1)",
    "eta_gemm_fp8": "judgement: ~1.1 PFLOP/s FP8 GEMMs; torchao 1.39x at (4096,8192,16384) (§2.2, §2.5)",
    "eta_flex": "FA2 35% of H100 peak (FA3 paper) x Flex 85-90% of FA2 (PyTorch blog), §2.6",
    "flex_partial_overhead": "FlexAttention blog: masking every element costs 15-20% (§2.6)",
    "eta_varlen": "judgement: FA2 35% of peak on long sequences (§2.6), short segments -> as eta_flex",
    "eta_hbm": "judgement: element-wise kernels at 75% of HBM bandwidth on average",
    "kernel_gap_s": "judgement: GPU-side gap per dependent kernel",
    "optimizer_bytes_per_param": "DeepSpeed ZeRO-1 bf16 step at DP=1, bytes per parameter (training/memory.py table)",
}

# ------------------------------------------------------------------------------------------------------------------
# the design of a step


@dataclass(frozen=True)
class Design:
    """What a step runs. ``checkpointing``: train.activation_checkpointing; ``compiled``: each transformer block under
    torch.compile (element-wise traffic by the island model) or eager; ``loss_impl``: model.loss_impl;
    ``flex_block``: the BlockMask tile (an int, or "tuned": the feasible size with the least predicted attention
    time); ``attention``: model.attention, "flex" (FlexAttention, ``flex_block``) or "varlen" (two FlashAttention-2
    variable-length calls, counted by :func:`varlen_tile_counts`); ``fp8``: model.fp8 (none | torchao-tensorwise | torchao-rowwise); ``fp8_shared_cast``: the model's one cast
    of an input shared by several projections (model/fp8.py ``shared_tensorwise_cast``, from 2e249a6) or, False, a
    cast per projection as at b2d56cb (the layers' ``input_cast`` removed); ``fusion``: how the compiled blocks'
    element-wise work is priced, "islands" (the island model) or "floor" (the ideal-fusion lower bound of
    :func:`element_traffic`: what no kernel fusion of the same ops can beat)."""

    name: str
    checkpointing: str = "full"
    compiled: bool = False
    loss_impl: str = "reference"
    flex_block: int | str = 128
    fp8: str = "none"
    fp8_shared_cast: bool = True
    attention: str = "flex"
    fusion: str = "islands"


# main @ b2d56cb (the desk estimate): full recompute, eager blocks, the chunked checkpointed fp32 loss,
# 128 x 128 FlexAttention tiles
BEFORE = Design("before", checkpointing="full", compiled=False, loss_impl="reference", flex_block=128,
                fp8_shared_cast=False)
# this issue, as the recipes run it: compiled blocks, selective checkpointing, the fused loss (its chunk functions
# compiled), the exact-mask attention of two FlashAttention-2 variable-length calls (model.attention=varlen)
AFTER = Design("after", checkpointing="selective", compiled=True, loss_impl="fused", flex_block=128,
               attention="varlen")


def ladder() -> list[Design]:
    """BEFORE, then each option of the issue alone on top of it, then AFTER (what each option buys)."""
    return [BEFORE,
            replace(BEFORE, name="+compile", compiled=True),
            replace(BEFORE, name="+selective", checkpointing="selective"),
            replace(BEFORE, name="+fused loss", loss_impl="fused"),
            replace(BEFORE, name="+flex tuned", flex_block="tuned"),
            replace(BEFORE, name="+varlen", attention="varlen"),
            AFTER,
            replace(AFTER, name="after, FlexAttention 128", attention="flex"),
            replace(AFTER, name="after, flex tuned tile (max-autotune)", attention="flex", flex_block="tuned"),
            replace(AFTER, name="after, no ckpt", checkpointing="none")]


class OptionUnavailable(RuntimeError):
    """A design option that the model code in this tree does not offer (yet)."""


# ------------------------------------------------------------------------------------------------------------------
# the packed micro-batch

PROMPT_TOKENS = 6  # "Describe the image in detail." (unlabelled; GENLIP_SPEC.md §2.4)
CAPTION_MEAN, CAPTION_STD, CAPTION_MIN, CAPTION_MAX = 68, 20, 8, 130
IMAGE_GRID = (14, 14)  # 224 px / 16


def stage1_lengths(n: int, seed: int) -> list[int]:
    """Labelled caption lengths (caption + <|im_end|> + newline) of ``n`` stage-1 samples: N(68, 20) clipped to
    [8, 130]. With 196 image and 6 prompt tokens a sample is ~270 tokens: PERFORMANCE.md §1.4 (270e9 tokens for 1B
    samples in the official configs; 196 image + ~74 text, GENLIP_SPEC.md §4.1); the spread is §2.7's simulation."""
    rng = random.Random(seed)
    return [int(min(CAPTION_MAX, max(CAPTION_MIN, round(rng.gauss(CAPTION_MEAN, CAPTION_STD))))) for _ in range(n)]


def stage1_batch(rows: int, seq_length: int, vocab_size: int, buffer_size: int = 4096, seed: int = 0,
                 patches_device: str = "meta") -> dict[str, torch.Tensor]:
    """A packed stage-1 micro-batch as the data path builds it: samples of 196 image + 6 prompt + caption tokens
    (:func:`stage1_lengths`), packed by the project's packer (``data.packing.fill_row`` over a buffer of
    ``buffer_size`` samples, the recipe's ``data.pack_buffer_size``), laid out by ``data.sample.assemble_sample`` and
    ``data.packing.collate_batch``. Patches are meta tensors unless ``patches_device`` says otherwise."""
    from megatron_genlip.data.packing import collate_batch, fill_row
    from megatron_genlip.data.sample import assemble_sample

    n_img = IMAGE_GRID[0] * IMAGE_GRID[1]
    captions = stage1_lengths(buffer_size + rows * (seq_length // 200 + 8), seed)
    stream = iter(captions)
    buffer = [next(stream) for _ in range(buffer_size)]
    g = torch.Generator().manual_seed(seed)
    packed = []
    for _ in range(rows):
        lengths = np.array([n_img + PROMPT_TOKENS + c for c in buffer])
        taken = fill_row(lengths, seq_length)
        row = []
        for j in taken:
            cap = buffer[j]
            ids = torch.randint(1, vocab_size, (PROMPT_TOKENS + cap,), generator=g).tolist()
            patches = torch.empty(n_img, 3, 16, 16, dtype=torch.uint8, device=patches_device)
            row.append(assemble_sample(patches, IMAGE_GRID, ids, [False] * PROMPT_TOKENS + [True] * cap))
        for j in sorted(taken, reverse=True):
            buffer.pop(j)
        buffer.extend(next(stream) for _ in range(len(taken)))
        packed.append(row)
    return collate_batch(packed, seq_length)


# ------------------------------------------------------------------------------------------------------------------
# FlexAttention tiles of packed prefix-LM rows


def next_power_of_two(n: int) -> int:
    """The head dim FlexAttention's Triton kernels compute with: torch/_inductor/kernel/flex/common.py
    ``set_head_dim_values`` sets QK_HEAD_DIM_ROUNDED = V_HEAD_DIM_ROUNDED = next_power_of_two(head_dim) (72, 96 ->
    128); the loads are masked, the tensor-core dots run at the rounded size."""
    return 1 if n <= 0 else 2 ** math.ceil(math.log2(n))


def _row_tiles(sids: np.ndarray, kinds: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """Allowed (query, key) entries per (query tile, key tile) of one row: int64 [ceil(L/bq), ceil(L/bk)].

    The rule is ``masks.may_attend`` with the padding diagonal (the flex ``mask_mod``): q sees k iff same sample and
    k <= q, or both are image tokens of the same sample; a padding query sees itself. Counted per query from its
    sample's extent: every sample must be [image tokens][text tokens] (checked)."""
    L = sids.shape[0]
    idx = np.arange(L)
    real = sids >= 0
    img = (kinds == 1) & real
    # start of each token's sample and end of its image run
    start = np.zeros(L, dtype=np.int64)
    img_end = np.zeros(L, dtype=np.int64)
    change = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
    bounds = np.r_[change, L]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if sids[a] < 0:
            continue
        n_img = int(img[a:b].sum())
        if n_img and not img[a:a + n_img].all():
            raise ValueError("tile counting needs every sample laid out as [image tokens][text tokens]")
        start[a:b] = a
        img_end[a:b] = a + n_img
    nq, nk = -(-L // bq), -(-L // bk)
    counts = np.zeros((nq, nk), dtype=np.int64)
    max_len = int(np.max(np.diff(bounds))) if len(bounds) > 1 else 1
    reach = -(-max_len // bk) + 1
    qtile = idx // bq
    base = idx // bk
    for d in range(-reach, reach + 1):
        j = base + d
        ok = (j >= 0) & (j < nk)
        k0, k1 = j * bk, np.minimum(j * bk + bk, L)
        causal = np.clip(np.minimum(idx, k1 - 1) - np.maximum(start, k0) + 1, 0, None) * real
        bidir = np.clip(np.minimum(img_end - 1, k1 - 1) - np.maximum(idx + 1, k0) + 1, 0, None) * img
        pad = (~real) & (idx >= k0) & (idx < k1)
        total = (causal + bidir + pad) * ok
        np.add.at(counts, (qtile[ok], j[ok]), total[ok])
    return counts


def tile_counts(sample_ids: torch.Tensor, token_kinds: torch.Tensor, block: int | tuple[int, int]) -> dict:
    """BlockMask tiles of a packed micro-batch for one block size (int, or (Q, KV)): empty (skipped), partial
    (``mask_mod`` applied per entry), full; the allowed entries (the exact mask's work) and the computed entries."""
    bq, bk = (block, block) if isinstance(block, int) else block
    sids, kinds = sample_ids.cpu().numpy(), token_kinds.cpu().numpy()
    out = {"block": (bq, bk), "empty": 0, "partial": 0, "full": 0, "allowed_entries": 0, "computed_entries": 0,
           "rows": sids.shape[0]}
    L = sids.shape[1]
    for s, k in zip(sids, kinds):
        c = _row_tiles(s, k, bq, bk)
        qsize = np.minimum(np.arange(c.shape[0]) * bq + bq, L) - np.arange(c.shape[0]) * bq
        ksize = np.minimum(np.arange(c.shape[1]) * bk + bk, L) - np.arange(c.shape[1]) * bk
        area = qsize[:, None] * ksize[None, :]
        full = c == area
        partial = (c > 0) & ~full
        out["full"] += int(full.sum())
        out["partial"] += int(partial.sum())
        out["empty"] += int((c == 0).sum())
        out["allowed_entries"] += int(c.sum())
        out["computed_entries"] += int(bq * bk * (full | partial).sum())  # a tile runs whole, edge or not
    return out


# FlexAttention kernel dots per computed tile (torch/_inductor/kernel/flex/templates): forward 2 (q k^T, p v:
# common.py.jinja forward_block_mn), backward 7 (dq pass: q k^T, dO v^T, dS k; dk/dv pass: k q^T, p^T dO, v dO^T,
# dS^T q: flex_backwards.py.jinja), each 2 x Bq x Bk x D_rounded FLOPs
FLEX_FWD_DOTS, FLEX_BWD_DOTS = 2, 7

# Which BlockMask sizes the Triton kernels accept on H100 (sm90) in torch's default heuristics (no max-autotune),
# read from torch/_inductor/template_heuristics/triton.py (CUDAConfigHeuristic): forward tile 64 x 64 for head dims
# 72 and 96 (not in h100_default_flex_config -> FlexConfig(64, 64, 3, 4)); backward "sm90" FlexBwDConfig(64, 128,
# 128, 64) for 64 <= head dim <= 128: BLOCK_N1 = BLOCK_M2 = 128 must divide the BlockMask's KV and Q sizes
# (kernel/flex/flex_attention.py skips other configs), so a 64-token BlockMask needs max-autotune's configs.
FLEX_BLOCKS = (256, 128, 64)


def flex_block_note(block: int) -> str:
    if block % 128 == 0:
        return "default heuristics"
    return "needs inductor max-autotune (sm90 default backward tiles are 128)"


# ------------------------------------------------------------------------------------------------------------------
# the op recorder

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "matmul", "linear", "addmv", "mv", "convolution",
            "convolution_backward"}
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "promote_types",
             "_local_scalar_dense", "set_", "resize_", "record_stream", "is_same_size", "lift_fresh"}
NO_READ_SELF = {"copy_", "fill_", "zero_", "bernoulli_", "normal_", "uniform_", "random_", "exponential_",
                "index_put_", "_index_put_impl_", "scatter_", "scatter_add_", "masked_fill_", "index_fill_"}
GATHERS = {"index", "embedding", "index_select", "gather", "take"}
RNG_OPS = {"bernoulli", "bernoulli_", "rand", "randn", "rand_like", "randn_like", "normal_", "uniform_", "randint",
           "native_dropout", "random_", "exponential_"}
MULTI_KERNEL = {"native_layer_norm_backward": 2, "embedding_dense_backward": 3}  # CUDA kernels per op (eager)
# compiled: the weight/bias gradients of a layer norm's backward are a reduction over tokens -> its own kernel, which
# reads the incoming gradient and the input again (assumption (2) of the module docstring)
COLUMN_PART = {"native_layer_norm_backward": (0, 1)}
GLOBAL_REDUCTION_MAX = 64  # outputs of at most this many elements from a large input: a global reduction


def _unique_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _storage_id(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - a tensor without storage (should not happen here)
        return id(t)


@dataclass
class Ref:
    """One tensor an op reads or writes: its value (storage, version), the view and its bytes."""

    key: tuple
    view: tuple
    nbytes: int
    numel: int
    dtype: str
    device: str


@dataclass
class Op:
    index: int
    name: str  # "mm", "add", ... (overload packet name without the namespace)
    full_name: str
    kind: str  # gemm | attention | view | alloc | sync | elementwise
    phase: str  # fwd | bwd | rec
    region: str  # embed | block.<i> | head | other
    reads: list[Ref]
    writes: list[Ref]
    flops: float = 0.0
    fp8: bool = False
    mutates: bool = False
    const: str = ""  # the non-tensor arguments (CSE signature)
    attention: dict | None = None
    extra_kernels: int = 0

    @property
    def graph(self) -> str:
        return "fwd" if self.phase == "fwd" else "bwd"


class OpRecorder(TorchDispatchMode):
    """Records every aten op (see the module docstring); ``region``/``phase`` say where the model is."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.phase = "fwd"
        self.stack: list[str] = []
        self.ranges: list[tuple[int, int, str]] = []  # autograd sequence-number ranges of forward regions
        self._versions: dict[int, int] = {}
        self._keep: list = []  # keeps every recorded tensor alive: storage ids are never reused

    # -- regions -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def region(self, name: str):
        start = torch._C._autograd._get_sequence_nr()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            if self.phase == "fwd":
                self.ranges.append((start, torch._C._autograd._get_sequence_nr(), name))

    def _where(self) -> tuple[str, str]:
        if self.stack:
            return self.stack[-1], ("fwd" if self.phase == "fwd" else "rec")
        if self.phase == "fwd":
            return "other", "fwd"
        node = torch._C._current_autograd_node()
        if node is not None:
            seq = node._sequence_nr()
            best = None
            for a, b, name in self.ranges:
                if a <= seq < b and (best is None or b - a < best[1] - best[0]):
                    best = (a, b, name)
            if best is not None:
                return best[2], "bwd"
        return "other", "bwd"

    # -- values --------------------------------------------------------------------------------------------------
    def _ref(self, t: torch.Tensor, nbytes: int | None = None) -> Ref:
        sid = _storage_id(t)
        self._keep.append(t)
        key = (sid, self._versions.get(sid, 0))
        view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
        return Ref(key, view, _unique_bytes(t) if nbytes is None else nbytes, t.numel(), str(t.dtype).replace(
            "torch.", ""), t.device.type)

    def _bump(self, t: torch.Tensor) -> None:
        sid = _storage_id(t)
        self._versions[sid] = self._versions.get(sid, 0) + 1

    # -- dispatch ------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t not in (torch.Tensor, torch.nn.Parameter) for t in types):
            return NotImplemented  # a tensor subclass: let it run, record the plain ops it runs
        try:
            out = func(*args, **kwargs)
            run_args, run_kwargs = args, kwargs
        except (RuntimeError, NotImplementedError):
            flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if not ({"meta", "cpu"} <= {t.device.type for t in flat}):
                raise

            def to_meta(t):
                return t.to("meta") if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t

            run_args, run_kwargs = tree_map(to_meta, (args, kwargs))
            out = func(*run_args, **run_kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
        packet = getattr(func, "_overloadpacket", None)
        name = packet.__name__ if packet is not None else name
        schema = getattr(func, "_schema", None)
        in_tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out_tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        written_args = []
        if schema is not None:
            for i, a in enumerate(schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    v = args[i] if i < len(args) else kwargs.get(a.name)
                    written_args += [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
        mutates = bool(written_args)
        in_storages = {_storage_id(t) for t in in_tensors}
        region, phase = self._where()
        if name in ALLOC_OPS or (not in_tensors and not out_tensors):
            kind = "sync" if name == "_local_scalar_dense" else "alloc"
        elif name in GEMM_OPS:
            kind = "gemm"
        elif ("scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name
              or "varlen_attn" in name):
            kind = "attention"
        elif not mutates and out_tensors and all(_storage_id(t) in in_storages for t in out_tensors):
            kind = "view"
        else:
            kind = "elementwise"
        reads: list[Ref] = []
        skip_self = name in NO_READ_SELF and mutates
        seen = set()
        for i, t in enumerate(in_tensors):
            if skip_self and i == 0:
                continue
            nbytes = None
            if name in GATHERS and i == 0 and out_tensors:  # a gather reads the rows it picks
                nbytes = _unique_bytes(out_tensors[0])
            if name in ("index_put_", "index_put", "_index_put_impl_") and i == 0:
                continue
            r = self._ref(t, nbytes)
            if (r.key, r.view) in seen:
                continue
            seen.add((r.key, r.view))
            reads.append(r)
        for t in written_args:
            self._bump(t)
        writes: list[Ref] = []
        if kind not in ("view", "alloc", "sync"):
            targets = written_args if mutates else out_tensors
            for t in targets:
                nbytes = None
                if name in ("index_put_", "index_put", "_index_put_impl_") and len(args) > 2:
                    nbytes = _unique_bytes(args[2]) if isinstance(args[2], torch.Tensor) else None
                writes.append(self._ref(t, nbytes))
            if mutates:  # outputs that are not the mutated arguments (rare)
                ws = {_storage_id(t) for t in written_args}
                writes += [self._ref(t) for t in out_tensors if _storage_id(t) not in ws]
        elif kind == "alloc":
            for t in out_tensors:
                self._ref(t)
        op = Op(len(self.ops), name, str(func), kind, phase, region, reads, writes, mutates=mutates,
                extra_kernels=MULTI_KERNEL.get(name, 1) - 1)
        if kind == "gemm":
            op.flops = _gemm_flops(func, args, kwargs, out)
            op.fp8 = name == "_scaled_mm"
        if kind == "attention":
            backward = "backward" in name
            q = args[1] if backward else args[0]  # backward: grad_out, q, k, v, out, lse
            if q.dim() == 3:  # varlen: [tokens, heads, head_dim]
                op.attention = {"batch": 1, "heads": q.shape[1], "length": q.shape[0], "head_dim": q.shape[2]}
            else:  # [B, heads, L, head_dim]
                op.attention = {"batch": q.shape[0], "heads": q.shape[1], "length": q.shape[2], "head_dim": q.shape[3]}
            op.attention["pass"] = "bwd" if backward else "fwd"
        if kind in ("elementwise", "gemm") and name not in RNG_OPS and not mutates:
            op.const = repr([a for a in tree_flatten((args, kwargs))[0] if not isinstance(a, torch.Tensor)])
        else:
            op.const = f"#{op.index}"  # never merged
        self.ops.append(op)


def _gemm_flops(func, args, kwargs, out) -> float:
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    if packet in flop_registry:
        return float(flop_registry[packet](*args, **kwargs, out_val=out))  # shapes only: works on meta
    a, b = args[0], args[1]  # matmul / linear seen above autograd (inside a subclass): 2 x M x N x K
    k = a.shape[-1]
    n = b.shape[0] if packet.__name__ == "linear" else b.shape[-1]
    return 2.0 * (a.numel() // k) * n * k


# ------------------------------------------------------------------------------------------------------------------
# running the model under the recorder


class _AttentionStandIn(torch.autograd.Function):
    """q, k, v [B, h, L, hd] -> out: the aten efficient-attention ops (forward and backward), their outputs viewed
    in the layouts FlexAttention gives (out like q, dq/dk/dv like q/k/v: torch/_higher_order_ops/flex_attention.py
    ``_permute_strides``), so what the layer does around the kernel (permutes, copies) is what it does with flex."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset)
        return out.as_strided(q.shape, q.stride())

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, seed, offset = ctx.saved_tensors
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False])
        return dq.as_strided(q.shape, q.stride()), dk.as_strided(k.shape, k.stride()), \
            dv.as_strided(v.shape, v.stride())


class AttentionStandIn:
    """The layers' attention kernel for counting: the aten efficient-attention op (shapes, autograd and the
    selective policy's saving like a real kernel; on meta it computes nothing). ``build_mask`` returns None: the
    mask's work is counted by :func:`tile_counts` from the batch's sample ids and token kinds."""

    name = "flex"

    def build_mask(self, sample_ids, token_kinds):
        return None

    def __call__(self, q, k, v, mask):
        return _AttentionStandIn.apply(q, k, v)


def _checkpointing_value(model, mode: str):
    """The model's ``activation_checkpointing`` for ``mode``: strings where the model takes them (model/recompute.py),
    the older bool otherwise (selective then does not exist)."""
    from megatron_genlip.model import genlip

    if hasattr(genlip, "recompute"):
        return mode
    if mode == "selective":
        raise OptionUnavailable("train.activation_checkpointing=selective does not exist in this tree "
                                "(GenLIPModel.activation_checkpointing is a bool)")
    return mode == "full"


def has_option(option: str) -> bool:
    """Whether this tree offers a design option: "selective" checkpointing, the "fused" loss."""
    from megatron_genlip.config import ModelConfig
    from megatron_genlip.model import genlip

    if option == "selective":
        return hasattr(genlip, "recompute")
    if option == "fused":
        return "loss_impl" in {f.name for f in dataclasses.fields(ModelConfig)}
    raise ValueError(option)


@contextlib.contextmanager
def _fp8_without_hardware():
    """Build torchao Float8Linear layers on a machine without FP8 hardware (they only run on meta here)."""
    from megatron_genlip.model import fp8

    saved = fp8.require_fp8_hardware
    fp8.require_fp8_hardware = lambda cfg: None
    try:
        yield
    finally:
        fp8.require_fp8_hardware = saved


def build_trace_model(model_cfg, num_layers: int = 2, loss_impl: str = "reference", fp8: str = "none",
                      fp8_shared_cast: bool = True, attention: str = "flex"):
    """The real GenLIPModel on meta, bf16, ``num_layers`` blocks, the given loss and FP8 recipe; ``attention``
    "varlen" keeps the model's own varlen kernel (its CUDA branch: torch's varlen custom op, fake on meta), "flex"
    swaps in :class:`AttentionStandIn`."""
    from megatron_genlip import platform
    from megatron_genlip.model.genlip import GenLIPModel
    from megatron_genlip.parallel import state

    platform.current()
    state.ensure_initialized(1)
    changes = dict(num_layers=num_layers, params_dtype="bfloat16", backend="local", fp8=fp8,
                   attention="varlen" if attention == "varlen" else "sdpa")
    if has_option("fused"):
        changes["loss_impl"] = loss_impl
    elif loss_impl != "reference":
        raise OptionUnavailable("model.loss_impl=fused does not exist in this tree")
    cfg = replace(model_cfg, **changes)
    ctx = _fp8_without_hardware() if fp8 != "none" else contextlib.nullcontext()
    with ctx, torch.device("meta"):
        model = GenLIPModel(cfg, state.tensor_parallel_group())
    model.train()
    for layer in model.layers:
        if attention != "varlen":
            layer.self_attn.kernel = AttentionStandIn()
        if not fp8_shared_cast:  # each Float8Linear casts its own input (the design before 2e249a6)
            for m in (layer.self_attn, layer.mlp):
                if getattr(m, "input_cast", None) is not None:
                    m.input_cast = None
    return model


@dataclass
class Trace:
    ops: list[Op]
    num_layers: int  # layers traced
    outputs: set  # value keys that leave the step (parameter gradients)
    host_syncs: int


def trace_step(model_cfg, batch: dict[str, torch.Tensor], checkpointing: str = "full", loss_impl: str = "reference",
               fp8: str = "none", num_layers: int = 2, fp8_shared_cast: bool = True, attention: str = "flex") -> Trace:
    """One forward + backward of the real model under :class:`OpRecorder` (module docstring)."""
    model = build_trace_model(model_cfg, num_layers, loss_impl, fp8, fp8_shared_cast, attention)
    model.activation_checkpointing = _checkpointing_value(model, checkpointing)
    rec = OpRecorder()
    handles = []
    for i, layer in enumerate(model.layers):
        handles += _hook_region(rec, layer, f"block.{i}")
    handles += _hook_region(rec, model.ln_post, "head")
    handles += _hook_region(rec, model.lm_head, "head")
    handles += _hook_region(rec, model.rotary, "embed")
    for attr, name in (("embed", "embed"), ("loss_from_hidden", "head"), ("_token_losses", "head")):
        if hasattr(model, attr):
            setattr(model, attr, _wrap_region(rec, getattr(model, attr), name))
    # the fused loss's element-wise chunk functions (compiled on CUDA): their own region
    from megatron_genlip.model import fused_loss

    saved_kernels = fused_loss._kernels
    fused_loss._kernels = lambda device: tuple(_wrap_region(rec, fn, "head.loss") for fn in saved_kernels(device))
    batch = dict(batch)
    for key in ("input_ids", "positions", "patches"):  # no data-dependent use: meta
        if key in batch:
            batch[key] = batch[key].to("meta") if batch[key].device.type != "meta" else batch[key]
    try:
        with rec:
            out = model(batch)
            rec.phase = "bwd"
            out.loss.backward()
    finally:
        fused_loss._kernels = saved_kernels
        for h in handles:
            h.remove()
    outputs = set()
    for p in model.parameters():
        if p.grad is not None:
            sid = _storage_id(p.grad)
            outputs.add((sid, rec._versions.get(sid, 0)))
    syncs = sum(op.kind == "sync" for op in rec.ops)
    return Trace(rec.ops, num_layers, outputs, syncs)


def _hook_region(rec: OpRecorder, module: torch.nn.Module, name: str):
    if module is None:
        return []
    entered = []

    def pre(_m, _a):
        cm = rec.region(name)
        cm.__enter__()
        entered.append(cm)

    def post(_m, _a, _o):
        entered.pop().__exit__(None, None, None)

    # always_call: a non-reentrant checkpoint's recomputation stops the forward early by raising
    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]


def _wrap_region(rec: OpRecorder, fn, name: str):
    @functools.wraps(fn)
    def wrapped(*a, **k):
        with rec.region(name):
            return fn(*a, **k)

    return wrapped


# ------------------------------------------------------------------------------------------------------------------
# element-wise traffic: eager and the compiled island model


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _is_global_reduction(op: Op) -> bool:
    if op.kind != "elementwise" or not op.reads or not op.writes:
        return False
    biggest = max(r.numel for r in op.reads)
    return biggest >= 1024 and all(w.numel <= GLOBAL_REDUCTION_MAX for w in op.writes)


def _is_column_reduction(op: Op) -> bool:
    """A reduction over the token dimension: output much smaller than the input, and the input's last (feature)
    dimension kept (a bias / LayerScale / norm-weight gradient), not a row reduction (layer norm's statistics)."""
    if op.kind != "elementwise" or not op.reads or not op.writes or _is_global_reduction(op):
        return False
    big = max(op.reads, key=lambda r: r.numel)
    out = max(op.writes, key=lambda r: r.numel)
    if out.numel * 64 > big.numel:
        return False
    return out.view[1][-1:] == big.view[1][-1:]


def cse(ops: list[Op], graph_of) -> list[Op]:
    """Common-subexpression elimination inside each compiled graph (``graph_of(op)`` -> a graph id or None for
    eager ops): an op identical to an earlier one in its graph (same function, same input values and views, same
    constants; never a mutation or an RNG draw) is dropped and its outputs read as the earlier op's."""
    alias: dict[tuple, tuple] = {}
    seen: dict[tuple, Op] = {}
    kept = []
    for op in ops:
        reads = [replace(r, key=alias.get(r.key, r.key)) for r in op.reads]
        op = replace(op, reads=reads)
        g = graph_of(op)
        if g is not None and op.kind in ("elementwise", "gemm") and not op.const.startswith("#"):
            sig = (g, op.full_name, op.const, tuple((r.key, r.view) for r in reads))
            first = seen.get(sig)
            if first is not None and len(first.writes) == len(op.writes):
                for w, w0 in zip(op.writes, first.writes):
                    alias[w.key] = w0.key
                continue
            seen[sig] = op
        kept.append(op)
    return kept


@dataclass
class Traffic:
    bytes: float = 0.0
    kernels: int = 0
    ops: int = 0  # element-wise ops (after CSE)
    islands: int = 0

    def add(self, other: "Traffic") -> None:
        self.bytes += other.bytes
        self.kernels += other.kernels
        self.ops += other.ops
        self.islands += other.islands


def fuse(live: list[Op], graph_of, producer: dict, floor: bool = False) -> _UnionFind:
    """Greedy fusion of element-wise ops into islands inside each compiled graph (inductor-like): along each
    producer -> consumer edge, in program order, the two islands merge when (a) both are element-wise in the same
    graph (broadcasts, ``cat`` and row reductions fuse into pointwise kernels as inductor does), (b) the producer is not a global reduction (what uses its result starts a new kernel)
    and neither is a reduction over tokens (its own kernel), (c) no op outside them lies on a path from one to the
    other (a GEMM between them would make the fused kernel depend on itself). Paths are checked with ancestor and
    descendant bitsets over the graph's ops (GEMMs and attention included).

    ``floor``: every element-wise op of a graph in one island, no rule applied (:func:`element_traffic`'s floor)."""
    uf = _UnionFind()
    by_graph: dict = {}
    for op in live:
        uf.find(op.index)
        g = graph_of(op)
        if g is not None:
            by_graph.setdefault(g, []).append(op)
    if floor:
        for gops in by_graph.values():
            ew = [op.index for op in gops if op.kind == "elementwise"]
            for i in ew[1:]:
                uf.union(ew[0], i)
        return uf
    for g, gops in by_graph.items():
        bit = {op.index: 1 << i for i, op in enumerate(gops)}
        parents = {op.index: [p for p in {producer[r.key].index: producer[r.key] for r in op.reads
                                          if r.key in producer}.values()
                              if p.index in bit and p.index < op.index] for op in gops}
        anc: dict[int, int] = {}
        for op in gops:
            a = 0
            for p in parents[op.index]:
                a |= anc[p.index] | bit[p.index]
            anc[op.index] = a
        children: dict[int, list[int]] = {}
        for op in gops:
            for p in parents[op.index]:
                children.setdefault(p.index, []).append(op.index)
        desc: dict[int, int] = {}
        for op in reversed(gops):
            d = 0
            for c in children.get(op.index, []):
                d |= desc[c] | bit[c]
            desc[op.index] = d
        island = {op.index: [bit[op.index], anc[op.index], desc[op.index]] for op in gops}  # members, anc, desc
        for op in gops:
            if op.kind != "elementwise" or _is_column_reduction(op):
                continue
            for p in parents[op.index]:
                if p.kind != "elementwise" or _is_global_reduction(p) or _is_column_reduction(p):
                    continue
                ra, rb = uf.find(p.index), uf.find(op.index)
                if ra == rb:
                    continue
                (ma, aa, da), (mb, ab, db) = island[ra], island[rb]
                if ((ab & da) | (aa & db)) & ~(ma | mb):
                    continue  # something outside both sits between them
                uf.union(ra, rb)
                island[uf.find(ra)] = [ma | mb, aa | ab, da | db]
    return uf


def element_traffic(ops: list[Op], compiled_regions, outputs: set = frozenset(),
                    floor: bool = False) -> dict[tuple[str, str], Traffic]:
    """Bytes read + written by the element-wise work, per (region, graph). ``compiled_regions(region)`` says whether
    a region runs compiled (islands) or eager (one kernel per op). See the module docstring for the model.

    ``floor``: the ideal-fusion floor of the compiled regions, a lower bound for any implementation that runs the
    same ops with the GEMMs and the attention kernel as library calls (no epilogue fusion): each graph's element-wise
    work is one island, so it reads each value produced outside it (a GEMM or attention output, the block input, a
    parameter, a tensor saved by the other graph) once, and writes each value that a GEMM, the attention kernel or
    the other graph reads, or that leaves the step, once; token-dimension reductions read nothing extra."""

    def graph_of(op: Op):
        return (op.region, op.graph) if compiled_regions(op.region) else None

    ops = cse(ops, graph_of)
    live = [op for op in ops if op.kind in ("elementwise", "gemm", "attention", "sync")]
    producer: dict[tuple, Op] = {}
    consumers: dict[tuple, list[Op]] = {}
    for op in live:
        for r in op.reads:
            consumers.setdefault(r.key, []).append(op)
        for w in op.writes:
            producer[w.key] = op
    uf = fuse(live, graph_of, producer, floor)
    ew = [op for op in live if op.kind == "elementwise"]
    groups: dict[int, list[Op]] = {}
    for op in ew:
        groups.setdefault(uf.find(op.index), []).append(op)
    island_of = {op.index: root for root, members in groups.items() for op in members}

    def inlinable(p: Op):
        """The one large input of a cheap pointwise op (a cast, a bias add, a scale), or None: a consumer in another
        island recomputes such an op from that input instead of reading its result (assumption (5))."""
        if p.kind != "elementwise" or not p.reads or len(p.writes) != 1 or _is_global_reduction(p) \
                or _is_column_reduction(p) or p.name in RNG_OPS or p.mutates:
            return None
        big = max(p.reads, key=lambda r: r.numel)
        if big.numel != p.writes[0].numel or any(r.numel * 64 > big.numel for r in p.reads if r is not big):
            return None
        return big

    def materialised(key, g) -> bool:  # written anyway: a GEMM, the attention kernel or the other graph reads it
        return key in outputs or any(c.kind != "elementwise" or graph_of(c) != g for c in consumers.get(key, []))

    def resolve(r: Ref, reader_island: int, g, depth: int = 0) -> list[Ref]:
        p = producer.get(r.key)
        if p is None or depth > 8 or graph_of(p) != g or island_of.get(p.index) == reader_island \
                or materialised(r.key, g):
            return [r]
        src = inlinable(p)
        if src is None or src.nbytes > r.nbytes:
            return [r]
        return resolve(src, reader_island, g, depth + 1)

    # what each island reads from memory, and which values some reader needs materialised
    island_reads: dict[int, dict] = {}
    demanded: set = set()
    for root, members in groups.items():
        first = members[0]
        g = graph_of(first)
        ids = {op.index for op in members}
        reads = {}
        for op in members:
            for r in op.reads:
                p = producer.get(r.key)
                if g is None:
                    reads[(r.key, r.view)] = r.nbytes
                elif p is None or p.index not in ids:
                    for x in resolve(r, root, g):
                        reads[(x.key, x.view)] = x.nbytes
                        demanded.add(x.key)
        island_reads[root] = reads
    result: dict[tuple[str, str], Traffic] = {}
    for root, members in groups.items():
        first = members[0]
        ids = {op.index for op in members}
        compiled = graph_of(first) is not None
        t = Traffic(ops=len(members), islands=1)
        writes = {}
        for op in members:
            for w in op.writes:
                if not compiled or w.key in demanded or materialised(w.key, graph_of(first)):
                    writes[(w.key, w.view)] = w.nbytes  # compiled: island-internal, inlined or dead -> not written
            if compiled and not floor and op.name in COLUMN_PART:
                for i in COLUMN_PART[op.name]:
                    if i < len(op.reads):
                        t.bytes += op.reads[i].nbytes
                t.kernels += 1
        t.bytes += sum(island_reads[root].values()) + sum(writes.values())
        t.kernels += 1 if compiled else sum(1 + op.extra_kernels for op in members)
        key = (first.region, first.graph)
        result.setdefault(key, Traffic()).add(t)
    return result


# ------------------------------------------------------------------------------------------------------------------
# putting it together


@dataclass
class Component:
    """One row of the table: executed and credited FLOPs, element-wise bytes and kernels, predicted seconds."""

    name: str
    executed_flops: float = 0.0
    executed_fp8_flops: float = 0.0
    credited_flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    seconds: float = 0.0
    rests_on: str = ""
    detail: dict = field(default_factory=dict)


def credited_parts(model_cfg, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """``accounting.batch_flops`` of the batch split into its terms (block GEMMs, attention, LM head + proj,
    embedding); checked to add up to ``batch_flops``."""
    from megatron_genlip.batch import KIND_IMAGE, KIND_TEXT, predicts_label
    from megatron_genlip.model.accounting import batch_flops

    c = model_cfg
    L, h, f, e, V = c.num_layers, c.hidden_size, c.ffn_hidden_size, c.text_embed_dim, c.vocab_size
    q_out = 2 * h if c.gated_attention else h
    block_matmul = L * (h * q_out + 3 * h * h + 3 * h * f)
    sids = batch["sample_ids"].cpu().numpy()
    kinds = batch["token_kinds"].cpu().numpy()
    lab = np.zeros_like(sids, dtype=bool)
    lab[:, :-1] = predicts_label(batch["labels"]).cpu().numpy()
    parts = {"blocks": 0.0, "attention": 0.0, "head": 0.0, "embed": 0.0}
    samples = 0
    for s, k, lb in zip(sids, kinds, lab):
        real = s >= 0
        n = int(s[real].max()) + 1 if real.any() else 0
        n_img = np.bincount(s[real], weights=(k == KIND_IMAGE)[real], minlength=n)
        n_txt = np.bincount(s[real], weights=(k == KIND_TEXT)[real], minlength=n)
        n_lab = np.bincount(s[real], weights=lb[real], minlength=n)
        T = n_img + n_txt
        parts["blocks"] += float(6 * block_matmul * T.sum())
        parts["attention"] += float(12 * L * h * (T * T).sum())
        parts["head"] += float(6 * e * V * n_lab.sum() + (6 * h * e * n_lab.sum() if e != h else 0))
        parts["embed"] += float((6 * h * e * n_txt.sum() if e != h else 0)
                                + 6 * c.num_channels * c.patch_size ** 2 * h * n_img.sum())
        samples += n
    total, count = batch_flops(c, batch)
    if abs(sum(parts.values()) - total) > 1e-9 * total or count != samples:
        raise AssertionError(f"credited parts {sum(parts.values())} != accounting.batch_flops {total}")
    parts["total"] = total
    parts["samples"] = samples
    return parts


def _attention_component(model_cfg, batch, trace: Trace, block, a: Assumptions, layers: int) -> Component:
    """Executed FlexAttention FLOPs of the step for BlockMask ``block`` (recomputed forwards included, as counted in
    the trace), head dim rounded as the kernels do."""
    tiles = tile_counts(batch["sample_ids"], batch["token_kinds"], block)
    per_block = [op for op in trace.ops if op.kind == "attention" and op.region == "block.1"]
    fwd = sum(op.attention["pass"] == "fwd" for op in per_block)
    bwd = sum(op.attention["pass"] == "bwd" for op in per_block)
    hd = model_cfg.head_dim
    hd_r = next_power_of_two(hd)
    heads = model_cfg.num_attention_heads
    computed = tiles["computed_entries"]
    dots = fwd * FLEX_FWD_DOTS + bwd * FLEX_BWD_DOTS
    executed = layers * heads * computed * 2 * hd_r * dots
    computed_tiles = tiles["partial"] + tiles["full"]
    partial_share = tiles["partial"] / max(computed_tiles, 1)
    seconds = executed / (a.peak_bf16 * a.eta_flex) * (1 + a.flex_partial_overhead * partial_share)
    exact = layers * heads * tiles["allowed_entries"] * 2 * hd * (FLEX_FWD_DOTS + FLEX_BWD_DOTS)
    return Component("attention (FlexAttention)", executed_flops=executed, seconds=seconds,
                     kernels=layers * (fwd + bwd),
                     rests_on=f"eta_flex={a.eta_flex}, partial-tile overhead {a.flex_partial_overhead}",
                     detail={"block": tiles["block"], "tiles_per_row": computed_tiles / tiles["rows"],
                             "partial_share": partial_share, "empty_tiles": tiles["empty"], "head_dim": hd,
                             "head_dim_rounded": hd_r, "forward_passes": fwd, "backward_passes": bwd,
                             "computed_over_allowed": computed / max(tiles["allowed_entries"], 1),
                             "exact_mask_flops": exact, "note": flex_block_note(tiles["block"][0])})


# FlashAttention-2's tiles on sm90 for head dims 65-96 (its sm80 kernels run on H100): forward 128 queries x 64 keys
# (flash_fwd_launch_template.h run_mha_fwd_hdim96, not sm8x), backward 64 x 128 (run_mha_bwd_hdim96); GEMMs per
# tile, each 2 x Bm x Bn x D FLOPs: forward 2 (q k^T, p v), backward 5 (q k^T again, dO v^T, p^T dO, dS k, dS^T q)
FA2_FWD_TILE, FA2_BWD_TILE = (128, 64), (64, 128)
FA2_FWD_DOTS, FA2_BWD_DOTS = 2, 5


def _segment_tiles(q_lengths: np.ndarray, k_lengths: np.ndarray, tile: tuple[int, int], causal: bool
                   ) -> tuple[int, int]:
    """(computed tiles, tiles that need masking) of FA2 over (query, key) segments with (Bm, Bn) tiles: a query
    tile runs every key tile holding a key one of its rows may see (causal aligned at the segments' ends, as FA2
    aligns it), masking the tiles that cross the key segment's end or the diagonal; empty segments run nothing."""
    bm, bn = tile
    computed = masked = 0
    for nq, nk in zip(np.asarray(q_lengths, dtype=np.int64), np.asarray(k_lengths, dtype=np.int64)):
        if nq <= 0 or nk <= 0:
            continue
        starts = np.arange(-(-nq // bm)) * bm
        ends = np.minimum(starts + bm, nq)  # one past the last row of each query tile
        if causal:  # row r sees keys <= r + nk - nq
            reach = np.clip(ends + nk - nq, 0, nk)  # one past the last key the tile's last row sees
            cols = -(-reach // bn)
            first = np.clip(starts + nk - nq + 1, 0, None) // bn  # the first key tile its first row does not see all of
            masked += int(np.sum(np.clip(cols - first, 0, None)))
        else:
            cols = np.full(len(starts), -(-nk // bn))
            masked += len(starts) if nk % bn else 0
        computed += int(cols.sum())
    return computed, masked


def varlen_tile_counts(sample_ids: torch.Tensor, token_kinds: torch.Tensor) -> dict:
    """FA2 tiles of a packed micro-batch under model.attention=varlen: the segments of both calls as the model
    builds them (``attention.varlen_mask``), forward and backward tiles, the entries they compute and the exact
    mask's allowed entries."""
    from megatron_genlip.model.attention import varlen_mask

    m = varlen_mask(sample_ids.cpu(), token_kinds.cpu())
    q, ka, kb = (np.diff(cu.numpy().astype(np.int64)) for cu in (m.cu_q, m.cu_ka, m.cu_kb))
    out = {"rows": sample_ids.shape[0], "segments": m.segments, "allowed_entries": 0}
    for call, k, causal in (("a", ka, False), ("b", kb, True)):
        for pas, tile in (("fwd", FA2_FWD_TILE), ("bwd", FA2_BWD_TILE)):
            computed, masked = _segment_tiles(q, k, tile, causal)
            out[f"{call}_{pas}_tiles"], out[f"{call}_{pas}_masked"] = computed, masked
            out[f"{call}_{pas}_entries"] = computed * tile[0] * tile[1]
    out["allowed_entries"] = int(tile_counts(sample_ids, token_kinds, 128)["allowed_entries"])
    return out


def _varlen_component(model_cfg, batch, trace: Trace, a: Assumptions, layers: int) -> Component:
    """Executed FA2 FLOPs of the step under model.attention=varlen (two calls per pass; recomputed forwards
    counted from the trace), at FA2's tiles and head dim."""
    tiles = varlen_tile_counts(batch["sample_ids"], batch["token_kinds"])
    per_block = [op for op in trace.ops if op.kind == "attention" and op.region == "block.1"]
    fwd = sum(op.attention["pass"] == "fwd" for op in per_block) // 2  # passes: each runs calls A and B
    bwd = sum(op.attention["pass"] == "bwd" for op in per_block) // 2
    hd, heads = model_cfg.head_dim, model_cfg.num_attention_heads
    hd_r = fa2_head_dim(hd)
    fwd_entries = tiles["a_fwd_entries"] + tiles["b_fwd_entries"]
    bwd_entries = tiles["a_bwd_entries"] + tiles["b_bwd_entries"]
    executed = layers * heads * 2 * hd_r * (fwd * FA2_FWD_DOTS * fwd_entries + bwd * FA2_BWD_DOTS * bwd_entries)
    n_tiles = fwd * (tiles["a_fwd_tiles"] + tiles["b_fwd_tiles"]) + bwd * (tiles["a_bwd_tiles"] + tiles["b_bwd_tiles"])
    n_masked = (fwd * (tiles["a_fwd_masked"] + tiles["b_fwd_masked"])
                + bwd * (tiles["a_bwd_masked"] + tiles["b_bwd_masked"]))
    masked_share = n_masked / max(n_tiles, 1)
    seconds = executed / (a.peak_bf16 * a.eta_varlen) * (1 + a.flex_partial_overhead * masked_share)
    exact = layers * heads * tiles["allowed_entries"] * 2 * hd * (FA2_FWD_DOTS + FA2_BWD_DOTS)
    return Component("attention (varlen FA2)", executed_flops=executed, seconds=seconds, kernels=layers * 2 * (fwd + bwd),
                     rests_on=f"eta_varlen={a.eta_varlen}, masked-tile overhead {a.flex_partial_overhead}",
                     detail={"block": ("varlen",), "tiles_per_row": (tiles["a_fwd_tiles"] + tiles["b_fwd_tiles"])
                             / tiles["rows"], "partial_share": masked_share, "segments": tiles["segments"],
                             "head_dim": hd, "head_dim_rounded": hd_r, "forward_passes": fwd,
                             "backward_passes": bwd, "computed_over_allowed": fwd_entries / max(
                                 tiles["allowed_entries"], 1), "exact_mask_flops": exact,
                             "note": f"FA2 tiles fwd {FA2_FWD_TILE}, bwd {FA2_BWD_TILE}"})


def _gemm_seconds(flops: float, fp8_flops: float, a: Assumptions) -> float:
    return flops / (a.peak_bf16 * a.eta_gemm) + fp8_flops / (a.peak_fp8 * a.eta_gemm_fp8)


def _gemms(ops: list[Op], region_pred) -> tuple[float, float, int]:
    bf, f8, n = 0.0, 0.0, 0
    for op in ops:
        if op.kind == "gemm" and region_pred(op.region):
            n += 1
            if op.fp8:
                f8 += op.flops
            else:
                bf += op.flops
    return bf, f8, n


def optimizer_component(model_cfg, a: Assumptions) -> Component:
    from megatron_genlip.model.accounting import build_meta_model, count_parameters

    params = count_parameters(build_meta_model(model_cfg)).total
    nbytes = params * a.optimizer_bytes_per_param
    return Component("optimizer step (ZeRO-1, DP=1)", bytes=nbytes, seconds=nbytes / (a.hbm_bytes_per_s * a.eta_hbm),
                     rests_on=f"optimizer_bytes_per_param={a.optimizer_bytes_per_param}, eta_hbm={a.eta_hbm}",
                     detail={"parameters": params})


def evaluate(model_cfg, batch, trace: Trace, design: Design, a: Assumptions, credited: dict,
             optimizer: Component | None = None) -> dict:
    """The per-component table of one design from its trace."""
    L = model_cfg.num_layers
    if design.fusion not in ("islands", "floor") or (design.fusion == "floor" and not design.compiled):
        raise ValueError(f"fusion={design.fusion!r}: 'islands', or 'floor' for compiled blocks")
    floor = design.fusion == "floor"
    compiled = (lambda region: region.startswith("block.")) if design.compiled else (lambda region: False)
    traffic = element_traffic(trace.ops, compiled, trace.outputs, floor=floor)

    def tr(pred, graph=None) -> Traffic:
        t = Traffic()
        for (region, g), v in traffic.items():
            if pred(region) and (graph is None or g == graph):
                t.add(v)
        return t

    comps = []
    # block GEMMs
    bf, f8, n = _gemms(trace.ops, lambda r: r == "block.1")
    bf0, f80, _ = _gemms(trace.ops, lambda r: r == "block.0")
    if abs((bf + f8) - (bf0 + f80)) > 1e-6 * max(bf + f8, 1):
        raise AssertionError(f"blocks 0 and 1 execute different GEMM FLOPs ({bf0 + f80} vs {bf + f8})")
    g = Component("block GEMMs", executed_flops=L * bf, executed_fp8_flops=L * f8,
                  credited_flops=credited["blocks"], kernels=L * n,
                  rests_on=f"eta_gemm={a.eta_gemm}" + (f", eta_gemm_fp8={a.eta_gemm_fp8}" if f8 else ""))
    g.seconds = _gemm_seconds(g.executed_flops, g.executed_fp8_flops, a) + g.kernels * a.kernel_gap_s
    comps.append(g)
    # block element-wise
    fwd, bwd = tr(lambda r: r == "block.1", "fwd"), tr(lambda r: r == "block.1", "bwd")
    tokens = batch["sample_ids"].numel()
    e = Component("block element-wise" + (" (ideal-fusion floor)" if floor else " (compiled)" if design.compiled
                                          else " (eager)"),
                  bytes=L * (fwd.bytes + bwd.bytes), kernels=L * (fwd.kernels + bwd.kernels),
                  rests_on=f"eta_hbm={a.eta_hbm}, kernel gap {a.kernel_gap_s * 1e6:.0f} us"
                  + (", lower bound" if floor else ", island model" if design.compiled else ""),
                  detail={"fwd_bytes_per_token": fwd.bytes / tokens, "bwd_bytes_per_token": bwd.bytes / tokens,
                          "fwd_kernels_per_block": fwd.kernels, "bwd_kernels_per_block": bwd.kernels,
                          "fwd_ops_per_block": fwd.ops, "bwd_ops_per_block": bwd.ops})
    e.seconds = e.bytes / (a.hbm_bytes_per_s * a.eta_hbm) + e.kernels * a.kernel_gap_s
    comps.append(e)
    # attention
    if design.attention == "varlen":
        att = _varlen_component(model_cfg, batch, trace, a, L)
    else:
        blocks = FLEX_BLOCKS if design.flex_block == "tuned" else (design.flex_block,)
        options = [_attention_component(model_cfg, batch, trace, b, a, L) for b in blocks]
        att = min(options, key=lambda c: c.seconds)
        if design.flex_block == "tuned":
            att.detail["candidates"] = {str(c.detail["block"][0]): round(c.seconds, 4) for c in options}
    att.credited_flops = credited["attention"]
    comps.append(att)
    # LM head + loss (ln_post, proj, head, cross-entropy)
    hb, hf, hn = _gemms(trace.ops, lambda r: r in ("head", "head.loss"))
    ht = tr(lambda r: r == "head")
    logits = sum(w.numel for op in trace.ops if op.kind == "gemm" and op.region == "head" and op.phase == "fwd"
                 for w in op.writes if w.view[1][-1:] == (model_cfg.vocab_size,))  # the logits GEMMs
    if design.compiled and design.loss_impl == "fused":
        # model/fused_loss.py compiles its three chunk functions on CUDA: one kernel each, each reading the chunk's
        # logits (activation dtype) once; the last writes the logits' gradient (activation dtype)
        calls = sum(1 for op in trace.ops if op.kind == "gemm" and op.region == "head" and op.phase == "fwd"
                    for w in op.writes if w.view[1][-1:] == (model_cfg.vocab_size,))
        ht.add(Traffic(bytes=4 * 2 * logits, kernels=3 * calls))
    else:
        ht.add(tr(lambda r: r == "head.loss"))
    head = Component(f"LM head + loss ({design.loss_impl})", executed_flops=hb, executed_fp8_flops=hf,
                     credited_flops=credited["head"], bytes=ht.bytes, kernels=hn + ht.kernels,
                     rests_on=f"eta_gemm={a.eta_gemm}, eta_hbm={a.eta_hbm}", detail={"logits_elements": logits})
    head.seconds = (_gemm_seconds(hb, hf, a) + ht.bytes / (a.hbm_bytes_per_s * a.eta_hbm)
                    + head.kernels * a.kernel_gap_s)
    comps.append(head)
    # embedding and the rest (rotary tables, gradient accumulation glue)
    eb, ef, en = _gemms(trace.ops, lambda r: r in ("embed", "other"))
    et = tr(lambda r: r in ("embed", "other"))
    emb = Component("embeddings + rest", executed_flops=eb, executed_fp8_flops=ef, credited_flops=credited["embed"],
                    bytes=et.bytes, kernels=en + et.kernels, rests_on=f"eta_hbm={a.eta_hbm}")
    emb.seconds = (_gemm_seconds(eb, ef, a) + et.bytes / (a.hbm_bytes_per_s * a.eta_hbm)
                   + emb.kernels * a.kernel_gap_s)
    comps.append(emb)
    if optimizer is not None:
        comps.append(optimizer)
    total = sum(c.seconds for c in comps)
    return {"design": dataclasses.asdict(design), "components": [dataclasses.asdict(c) for c in comps],
            "step_seconds": total, "credited_flops": credited["total"],
            "executed_flops": sum(c.executed_flops + c.executed_fp8_flops for c in comps),
            "mfu": credited["total"] / (total * a.peak_bf16), "tokens": tokens,
            "tokens_per_s": tokens / total, "samples": credited["samples"], "host_syncs": trace.host_syncs}


def rows_per_gpu_step(cfg) -> int:
    """Packed rows one GPU takes per optimizer step: global_batch_size / data-parallel size when the config names
    its GPUs (parallel.data_parallel: micro-batches x gradient accumulation), else train.micro_batch_size. The cost
    model prices them as one micro-batch; ``benchmarks/cost_model.py`` also prices the recipe's split."""
    p, t = cfg.parallel, cfg.train
    return t.global_batch_size // p.data_parallel if p.data_parallel else t.micro_batch_size


class CostModel:
    """Traces cached per (checkpointing, loss, FP8) for one config and batch; :meth:`predict` per design."""

    def __init__(self, cfg, rows: int | None = None, seq_length: int | None = None, seed: int = 0,
                 assumptions: Assumptions | None = None):
        self.cfg = cfg
        self.model_cfg = cfg.model
        self.rows = rows or rows_per_gpu_step(cfg)
        self.seq_length = seq_length or cfg.data.seq_length
        self.assumptions = assumptions or Assumptions()
        self.batch = stage1_batch(self.rows, self.seq_length, cfg.model.vocab_size,
                                  buffer_size=getattr(cfg.data, "pack_buffer_size", 4096), seed=seed)
        self.credited = credited_parts(cfg.model, self.batch)
        self._traces: dict = {}
        self._optimizer = None

    def trace(self, checkpointing: str, loss_impl: str, fp8: str, fp8_shared_cast: bool = True,
              attention: str = "flex") -> Trace:
        shared = fp8_shared_cast or fp8 == "none"
        key = (checkpointing, loss_impl, fp8, "shared cast" if shared else "cast per projection", attention)
        if key not in self._traces:
            self._traces[key] = trace_step(self.model_cfg, self.batch, checkpointing, loss_impl, fp8,
                                           fp8_shared_cast=shared, attention=attention)
        return self._traces[key]

    def predict(self, design: Design, assumptions: Assumptions | None = None) -> dict:
        a = assumptions or self.assumptions
        if self._optimizer is None:
            self._optimizer = optimizer_component(self.model_cfg, a)
        opt = self._optimizer
        if assumptions is not None:
            opt = optimizer_component(self.model_cfg, a)
        trace = self.trace(design.checkpointing, design.loss_impl, design.fp8, design.fp8_shared_cast,
                           design.attention)
        out = evaluate(self.model_cfg, self.batch, trace, design, a, self.credited, opt)
        out["rows"], out["seq_length"] = self.rows, self.seq_length
        out["assumptions"] = a.describe()
        return out


def design_from_config(cfg, cuda: bool = True) -> Design:
    """The design a config runs (train.activation_checkpointing, train.compile on CUDA, model.loss_impl,
    model.fp8 when torchao, FlexAttention at attention.BLOCK_SIZE)."""
    from megatron_genlip.model.attention import BLOCK_SIZE

    ckpt = cfg.train.activation_checkpointing
    ckpt = {True: "full", False: "none", None: "none"}.get(ckpt, ckpt)
    fp8 = cfg.model.fp8 if cfg.model.fp8.startswith("torchao") else "none"
    return Design("config", checkpointing=ckpt, compiled=bool(cfg.train.compile) and cuda,
                  loss_impl=getattr(cfg.model, "loss_impl", "reference"), flex_block=BLOCK_SIZE, fp8=fp8,
                  attention="varlen" if cfg.model.attention == "varlen" else "flex")


def predict(cfg_path: str, options: dict | None = None, overrides: list[str] | None = None) -> dict:
    """Predicted components of one training step, for ``benchmarks/gpu_run.py`` to put beside its measurement.

    ``cfg_path``: a config (e.g. examples/configs/stage1-So16.yaml); ``overrides``: dotted KEY=VALUE as the trainer
    takes them. ``options``: ``design`` ("config": what the config runs, the default; "before"; "after"; or a dict
    of :class:`Design` fields), ``rows`` / ``seq_length`` (the measured layout; default the config's), ``seed``,
    and any :class:`Assumptions` field (e.g. ``hbm_bytes_per_s`` = 4.8e12 on an H200). Returns the dict of
    :func:`evaluate`: ``components`` (name, executed/credited FLOPs, bytes, kernels, seconds, what it rests on),
    ``step_seconds``, ``mfu``, ``tokens_per_s``, ``design``, ``assumptions``."""
    from megatron_genlip.config import load_config

    options = dict(options or {})
    cfg = load_config(cfg_path, overrides)
    fields = {f.name for f in dataclasses.fields(Assumptions)}
    a = Assumptions(**{k: options.pop(k) for k in list(options) if k in fields})
    design = options.pop("design", "config")
    if design == "config":
        design = design_from_config(cfg)
    elif design == "before":
        design = BEFORE
    elif design == "after":
        design = AFTER
    elif isinstance(design, dict):
        design = Design(**{"name": "custom", **design})
    model = CostModel(cfg, options.pop("rows", None), options.pop("seq_length", None), options.pop("seed", 0), a)
    if options:
        raise ValueError(f"unknown options {sorted(options)}")
    return model.predict(design)
