"""Attention kernels for packed prefix-LM rows, each with the builder of the mask argument it takes.

A kernel is called by the layer as ``kernel(q, k, v, mask)`` with q, k, v [B, heads, L, head_dim]. The model
builds ``mask`` ONCE per forward with ``kernel.build_mask(sample_ids, token_kinds)`` and hands it to every layer:

* ``sdpa``: ``F.scaled_dot_product_attention`` with the dense boolean mask of ``masks.sdpa_mask`` [B, 1, L, L]
  (the reference; O(L^2) memory, fine on CPU and for short rows).
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` whose ``mask_mod`` evaluates the same
  rule (``masks.may_attend`` with the padding diagonal, so padding rows give no NaN). Fully masked 128x128 tiles
  are skipped, which is what makes 16384-token rows of ~270-token samples cheap (GENLIP_SPEC.md §2.7, §11).
* ``varlen``: the exact mask, no tiles wasted on masked entries and no head-dim padding to a power of two
  (FlashAttention-2's variable-length kernel, ``torch.nn.attention.varlen.varlen_attn``), as two calls over the
  flattened rows (:class:`VarlenAttention`): the prefix-LM rule is, per packed sample laid out
  [image][text], "an image token sees its image (bidirectional), a text token sees the sample's earlier tokens
  (causal)", so call A runs bidirectional attention of each image (and padding) run over itself and call B causal
  attention of each text run over its sample so far; image and padding tokens take A's output, text tokens B's.
  Each call gives the other call's queries an empty key segment (FA2 writes 0 there and skips the tiles), so the
  executed work per sample is P^2 + P C + C^2/2 at FA2's tile size, the credited amount (P image, C text tokens):
  ~1.9x the exact-mask entries in FA2 tiles at the stage-1 lengths, versus ~2.2x (x 128/head_dim) for 128-token
  FlexAttention tiles (``benchmarks/cost_model.py`` counts both). The segment boundaries are built
  once per micro-batch on the device with ONE host read (counts and longest segment, bucketed so compiled
  blocks see few distinct shapes); a sample whose image does not open it is refused there with a clear error.
  On CPU the same two calls run as SDPA with the dense block-diagonal mask of the same ``cu_seqlens`` (tests).

On CUDA the kernel uses only torch's public API: ``create_block_mask`` and ``flex_attention``, both
``torch.compile``d when the platform decision says so (``train.compile``, on by default on CUDA: fused Triton
kernels, no L x L tensor; uncompiled they run unfused). On CPU nothing is compiled and torch's public
``flex_attention`` refuses inputs that require grad, so the kernel calls ``compat.flex_attention_cpu`` (the
higher-order op the public function dispatches to, whose eager implementation has forward and backward; it
materialises the scores: for tests and small runs). The flex kernel also accepts a dense boolean mask and then
runs SDPA: incremental decoding with a KV cache and image-only feature extraction build their own small dense
masks (``inference/generate.py``), so generation works unchanged with ``model.attention=flex``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_genlip import compat, platform
from megatron_genlip.batch import KIND_IMAGE, KIND_TEXT
from megatron_genlip.model.masks import may_attend, sdpa_mask

BLOCK_SIZE = 128  # FlexAttention tile (query and key); rows need not be multiples of it


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torch SDPA with a dense boolean mask (True = attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)


class SdpaAttention:
    """The dense reference kernel."""

    name = "sdpa"

    def build_mask(self, sample_ids: torch.Tensor, token_kinds: torch.Tensor) -> torch.Tensor:
        return sdpa_mask(sample_ids, token_kinds)

    def __call__(self, q, k, v, mask):
        return sdpa(q, k, v, mask)

    def __repr__(self) -> str:
        return "SdpaAttention()"


def prefix_lm_mask_mod(sample_ids: torch.Tensor, token_kinds: torch.Tensor):
    """FlexAttention ``mask_mod`` of ``masks.sdpa_mask`` for the rows ``sample_ids``/``token_kinds`` [B, L]."""

    def mask_mod(b, h, q_idx, kv_idx):
        return may_attend(q_idx, kv_idx, sample_ids[b, q_idx], sample_ids[b, kv_idx],
                          token_kinds[b, q_idx], token_kinds[b, kv_idx], pad_self=True)

    return mask_mod


@functools.cache
def _compiled(fn):
    """``fn`` under torch.compile, its compiled code wrapped in inductor's ``inductor_compiled_code`` operator
    (``wrap_inductor_compiled_regions``): a block that runs eagerly (ZeRO-3) calls the compiled FlexAttention
    inside selective checkpointing, whose policy sees that operator and keeps its outputs
    (``recompute.saved_ops``); unwrapped, the Triton kernels are invisible to it and the attention forward would
    run again in backward. Inside a compiled block the call is inlined into the block's graph instead."""
    return torch.compile(fn, dynamic=False, options={"wrap_inductor_compiled_regions": True})


def _on_device(fn, device: torch.device):
    """``fn`` compiled when the platform decision compiles and the tensors live on the accelerator; as is on CPU."""
    return _compiled(fn) if platform.current().compile and device.type != "cpu" else fn


def flex_block_mask(sample_ids: torch.Tensor, token_kinds: torch.Tensor, block_size: int = BLOCK_SIZE) -> BlockMask:
    """BlockMask [B, 1, L, L] of the prefix-LM rule (one per micro-batch, shared by all layers and heads)."""
    B, L = sample_ids.shape
    build = _on_device(create_block_mask, sample_ids.device)
    return build(prefix_lm_mask_mod(sample_ids, token_kinds), B, None, L, L, device=sample_ids.device,
                 BLOCK_SIZE=block_size)


class FlexAttention:
    """FlexAttention with the prefix-LM BlockMask; dense boolean masks (cached decoding) go to SDPA."""

    name = "flex"

    def build_mask(self, sample_ids: torch.Tensor, token_kinds: torch.Tensor) -> BlockMask:
        return flex_block_mask(sample_ids, token_kinds)

    def __call__(self, q, k, v, mask):
        if not isinstance(mask, BlockMask):
            return sdpa(q, k, v, mask)
        if q.device.type == "cpu":  # torch refuses CPU backward through the public function
            return compat.flex_attention_cpu(q, k, v, mask)
        return _on_device(flex_attention, q.device)(q, k, v, block_mask=mask)

    def __repr__(self) -> str:
        return "FlexAttention()"


# ------------------------------------------------------------------------------------------------------------------
# varlen: FlashAttention-2's variable-length kernel, two calls per layer


class VarlenLayoutError(ValueError):
    """Packed rows that the two-call decomposition cannot express (an image token after text in a sample)."""


def _pow2(n: int, floor: int = 64) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def segment_capacity(count: int, tokens: int) -> int:
    """The segment count a :class:`VarlenMask` of ``tokens`` flattened tokens and ``count`` real segments is padded
    to: a power of two, at least one segment per 64 tokens (few distinct shapes for the compiled blocks; the
    recipe's stage-1 micro-batches all give 1024). FA2's backward sizes its fp32 dq workspace by it."""
    return _pow2(max(count, tokens // 64))


def fa2_head_dim(head_dim: int) -> int:
    """The head dim FlashAttention-2 computes and keeps its backward workspace with: rounded up to a multiple of 32
    up to 192, else 256 (flash_api.cpp ``head_size_rounded``; its HEADDIM_SWITCH kernels are 32, 64, 96, 128, 160,
    192, 256): 72 -> 96."""
    return -(-head_dim // 32) * 32 if head_dim <= 192 else 256


@dataclasses.dataclass
class VarlenMask:
    """Segments of the flattened rows (token t = b * L + l) for the two FA2 calls of :class:`VarlenAttention`.

    ``cu_q``: int32 starts of the query segments of both calls: the runs of one kind inside a sample (image run,
    text run, padding chunk), each text run followed by an empty "gap" segment. ``cu_ka``: call A's key segment of
    each: the run itself for an image run or padding, empty for a text run (its queries see nothing in call A),
    the text run's keys for its gap (FA2's segments partition the keys, so some segment must hold them: one
    without queries, which runs no tile). ``cu_kb``: call B's: empty for an image run, the sample up to the run's
    end for a text run, empty for a gap, the run itself for padding. All three are padded with zero-length
    segments at the end to a power-of-two count (a compiled block sees few distinct shapes). ``max_q``/``max_kb``:
    the longest query (= call-A key) / call-B key segment rounded up to a power of two >= 128 (FA2's grid; a new
    value recompiles a compiled block, so they are coarse). ``take_a``: bool [N, 1, 1], the token's output comes
    from call A (image and padding tokens) else B (text). ``segments``: the real segment count (runs and gaps),
    for the cost model."""

    cu_q: torch.Tensor
    cu_ka: torch.Tensor
    cu_kb: torch.Tensor
    max_q: int
    max_kb: int
    take_a: torch.Tensor
    rows: int
    length: int
    segments: int


PAD_CHUNK = 128  # padding runs are cut into segments of at most this many tokens (they never set the longest one)


def _segment_starts(sample_ids: torch.Tensor, token_kinds: torch.Tensor):
    """Flattened flags of run starts (a new sample or a new kind), of sample starts, and of tokens that break the
    [image][text] layout (an image token after a text token of its sample). A padding run counts as samples of at
    most :data:`PAD_CHUNK` tokens: its outputs only need to be finite, and a long tail must not grow FA2's
    ``max_seqlen`` (a new value recompiles the compiled blocks)."""
    sid, kind = sample_ids.reshape(-1), token_kinds.reshape(-1)
    L = sample_ids.shape[-1]
    t = torch.arange(sid.numel(), device=sid.device)
    first = (t % L) == 0
    new_sample = first.clone()
    new_sample[1:] |= sid[1:] != sid[:-1]
    new_sample |= (sid < 0) & ((t - _begin(new_sample)) % PAD_CHUNK == 0)
    new_run = new_sample.clone()
    new_run[1:] |= kind[1:] != kind[:-1]
    broken = torch.zeros_like(first)
    broken[1:] = ~new_sample[1:] & (kind[1:] == KIND_IMAGE) & (kind[:-1] != KIND_IMAGE)
    return new_run, new_sample, broken


def _begin(starts: torch.Tensor) -> torch.Tensor:
    """For every flattened token, the position of the segment start at or before it (device, no host read)."""
    t = torch.arange(starts.numel(), device=starts.device)
    return torch.cummax(torch.where(starts, t, torch.zeros_like(t)), 0).values


def _longest(starts: torch.Tensor) -> torch.Tensor:
    """Length of the longest segment of the flattened start flags (device, no host read)."""
    return (torch.arange(starts.numel(), device=starts.device) - _begin(starts) + 1).max()


def _cu_seqlens(starts: torch.Tensor, capacity: int, values: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [capacity + 1]: ``values`` at the set ``starts`` flags in order (one per segment), then ``total``, the
    flattened token count (zero-length segments fill the capacity); static shapes: a scatter into a buffer with a
    dump slot, no ``nonzero``."""
    index = torch.where(starts, torch.cumsum(starts, 0) - 1, torch.full_like(starts, capacity + 1, dtype=torch.long))
    cu = torch.full((capacity + 2,), total, dtype=torch.int32, device=starts.device)
    cu.scatter_(0, index, values.to(torch.int32))
    return cu[: capacity + 1].contiguous()


def varlen_mask(sample_ids: torch.Tensor, token_kinds: torch.Tensor) -> VarlenMask:
    """The :class:`VarlenMask` of rows ``sample_ids``/``token_kinds`` [B, L]: built on their device, with one
    host read of four numbers (the segment count, the longest run and sample, the layout check)."""
    B, L = sample_ids.shape
    runs, samples, broken = _segment_starts(sample_ids, token_kinds)
    # the last token of each text run: its gap segment follows it
    run_end = torch.ones_like(runs)
    run_end[:-1] = runs[1:]
    text_end = run_end & (token_kinds == KIND_TEXT).reshape(-1)
    stats = torch.stack([runs.sum() + text_end.sum(), _longest(runs), _longest(samples), broken.sum()])
    count, long_q, long_k, n_broken = (int(x) for x in stats.cpu().tolist())  # the one host read
    if n_broken:
        t = int(torch.nonzero(broken)[0])
        raise VarlenLayoutError(
            f"model.attention=varlen needs every packed sample laid out [image][text] (GENLIP_SPEC.md §2.2); row "
            f"{t // L}, position {t % L} is an image token after text of its sample ({n_broken} such tokens): use "
            f"model.attention=flex for this data")
    image = (token_kinds == KIND_IMAGE).reshape(-1)
    take_a = (image | (sample_ids < 0).reshape(-1)).view(-1, 1, 1)
    # segment entries in order: entry 2t opens the run starting at token t, entry 2t + 1 the gap after the text
    # run ending at token t. Each entry's value is where its query / call-A key / call-B key segment starts; a
    # segment ends where the next entry's starts. Call A: a run's keys start at the run (a text run's next entry,
    # its gap, starts at the same key: empty), a gap's at its text run's start. Call B: a run's keys start at its
    # sample's start (an image run's next entry, the sample's text run, starts there too: empty), a gap's at the
    # text run's end (the next run starts there too: empty).
    t = torch.arange(runs.numel(), device=runs.device)
    flags = torch.stack([runs, text_end], 1).reshape(-1)
    q_start = torch.stack([t, t + 1], 1).reshape(-1)
    ka_start = torch.stack([t, _begin(runs)], 1).reshape(-1)
    kb_start = torch.stack([_begin(samples), t + 1], 1).reshape(-1)
    # few distinct shapes for the compiled blocks: the segment count to a power of two, at least one segment per
    # 64 tokens; the longest segments to powers of two from 128 (stage 1: 1024 segments per 4 rows, 256, 512)
    capacity = segment_capacity(count, B * L)
    cu_q, cu_ka, cu_kb = (_cu_seqlens(flags, capacity, v, B * L) for v in (q_start, ka_start, kb_start))
    return VarlenMask(cu_q, cu_ka, cu_kb, _pow2(long_q, 128), _pow2(long_k, 128), take_a, B, L, count)


def varlen_segments(q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, causal: bool,
                    rows: int) -> torch.Tensor:
    """Attention of each query segment of ``cu_q`` to its key segment of ``cu_k`` (bidirectional, or causal aligned
    at the segments' ends as FA2 aligns it: the last query sees every key) on [N, heads, head_dim] tensors (N =
    ``rows`` x L tokens; no segment crosses a row); a query whose key segment is empty gets 0. FA2 on CUDA (and on
    meta, where its fake kernel gives the shapes for the cost model); on CPU SDPA per row with the dense mask of the
    same segments."""
    if q.device.type == "cpu":
        n, h, d = q.shape
        t = torch.arange(n)
        seg_q = torch.bucketize(t, cu_q[1:].long(), right=True).view(rows, -1)
        seg_k = torch.bucketize(t, cu_k[1:].long(), right=True).view(rows, -1)
        allowed = seg_q[:, :, None] == seg_k[:, None, :]
        if causal:  # from the end: q's distance to its segment's end >= k's distance to its segment's end
            to_end_q = (cu_q.long()[seg_q + 1] - t.view(rows, -1))
            to_end_k = (cu_k.long()[seg_k + 1] - t.view(rows, -1))
            allowed &= to_end_k[:, None, :] >= to_end_q[:, :, None]
        has_key = allowed.any(-1)  # [rows, L]
        allowed |= ~has_key[:, :, None] & torch.eye(allowed.shape[-1], dtype=torch.bool)  # no NaN; zeroed below
        heads = [x.view(rows, -1, h, d).transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads, attn_mask=allowed[:, None])
        out = out * has_key[:, None, :, None]
        return out.transpose(1, 2).reshape(n, h, d)
    if q.device.type == "cuda" and q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"model.attention=varlen runs FlashAttention-2, which takes bf16/fp16 on CUDA; got {q.dtype}: "
                        "use train.precision=bf16 or model.attention=flex")
    from torch.nn.attention.varlen import varlen_attn

    # window_size as torch 2.11-2.13 take it (platform.SUPPORTED_TORCH): (-1, 0) causal, (-1, -1) unrestricted
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0) if causal else (-1, -1))


class VarlenAttention:
    """Exact-mask prefix-LM attention as two FlashAttention-2 variable-length calls (module docstring); dense
    boolean masks (cached decoding, image-only features) go to SDPA."""

    name = "varlen"

    def build_mask(self, sample_ids: torch.Tensor, token_kinds: torch.Tensor) -> VarlenMask:
        return varlen_mask(sample_ids, token_kinds)

    def __call__(self, q, k, v, mask):
        if not isinstance(mask, VarlenMask):
            return sdpa(q, k, v, mask)
        B, h, L, d = q.shape
        flat = [t.transpose(1, 2).reshape(B * L, h, d) for t in (q, k, v)]  # [B*L, h, d], token order (b, l)
        m = mask
        a = varlen_segments(*flat, m.cu_q, m.cu_ka, m.max_q, m.max_q, causal=False, rows=B)  # image <-> image
        b = varlen_segments(*flat, m.cu_q, m.cu_kb, m.max_q, m.max_kb, causal=True, rows=B)  # text -> sample
        out = torch.where(mask.take_a, a, b)
        return out.view(B, L, h, d).transpose(1, 2)

    def __repr__(self) -> str:
        return "VarlenAttention()"


KERNELS = {"sdpa": SdpaAttention(), "flex": FlexAttention(), "varlen": VarlenAttention()}


def get_attention(name: str):
    """The kernel for ``model.attention``."""
    return KERNELS[name]
