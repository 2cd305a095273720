"""Attention kernels for packed prefix-LM rows, each with the builder of the mask argument it takes.

A kernel is called by the layer as ``kernel(q, k, v, mask)`` with q, k, v [B, heads, L, head_dim]. The model
builds ``mask`` ONCE per forward with ``kernel.build_mask(sample_ids, token_kinds)`` and hands it to every layer:

* ``sdpa``: ``F.scaled_dot_product_attention`` with the dense boolean mask of ``masks.sdpa_mask`` [B, 1, L, L]
  (the reference; O(L^2) memory, fine on CPU and for short rows).
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` whose ``mask_mod`` evaluates the same
  rule (``masks.may_attend`` with the padding diagonal, so padding rows give no NaN). Fully masked 128x128 tiles
  are skipped, which is what makes 16384-token rows of ~270-token samples cheap (GENLIP_SPEC.md §2.7, §11).

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

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_genlip import compat, platform
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
    return torch.compile(fn, dynamic=False)


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


KERNELS = {"sdpa": SdpaAttention(), "flex": FlexAttention()}


def get_attention(name: str):
    """The kernel for ``model.attention``."""
    return KERNELS[name]
