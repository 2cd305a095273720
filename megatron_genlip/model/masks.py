"""The prefix-LM attention rule for packed rows (GENLIP_SPEC.md §2.7) as a dense boolean mask.

Each row carries per-token ``sample_ids`` (0, 1, ... per packed sample; -1 = padding) and ``token_kinds``
(``megatron_genlip.batch``: 1 = image patch, 0 = text, -1 = padding). Query q may attend key k iff

    (q >= k  and  sample[q] == sample[k]  and  sample[q] >= 0)                 # causal inside the sample
 or (kind[q] > 0  and  kind[q] == kind[k]  and  sample[q] == sample[k])          # image<->image, bidirectional

so image tokens see their own image, text sees its image and earlier text, nothing crosses samples and
padding neither sees nor is seen. :func:`may_attend` states the rule once, elementwise; the dense masks below
and the FlexAttention ``mask_mod`` (``megatron_genlip.model.attention``) both evaluate it. The dense form is the
reference every attention kernel is tested against.
"""

from __future__ import annotations

import torch


def may_attend(q_idx, k_idx, s_q, s_k, kind_q, kind_k, pad_self: bool = False):
    """The §2.7 rule, elementwise on broadcastable tensors (or vmapped scalars): True = q may attend k.

    ``pad_self`` adds the padding diagonal of :func:`sdpa_mask` (a padding query sees itself only).
    """
    same = s_q == s_k
    allowed = (same & (s_q >= 0) & (q_idx >= k_idx)) | ((kind_q > 0) & (kind_q == kind_k) & same)
    if pad_self:
        allowed = allowed | ((s_q < 0) & (q_idx == k_idx))
    return allowed


def prefix_lm_mask(sample_ids: torch.Tensor, token_kinds: torch.Tensor) -> torch.Tensor:
    """Exact rule of §2.7: bool [B, L, L], True = query (dim 1) may attend key (dim 2)."""
    L = sample_ids.shape[-1]
    q = torch.arange(L, device=sample_ids.device)
    return may_attend(q[:, None], q[None, :], sample_ids[:, :, None], sample_ids[:, None, :],
                      token_kinds[:, :, None], token_kinds[:, None, :])


def sdpa_mask(sample_ids: torch.Tensor, token_kinds: torch.Tensor) -> torch.Tensor:
    """The mask handed to ``F.scaled_dot_product_attention``: bool [B, 1, L, L], True = attend.

    Identical to :func:`prefix_lm_mask` except that a padding query may see itself: a query row
    with no visible key would make softmax produce NaN. Padding outputs carry no label and are
    seen by no other token, so this changes no real token's output or gradient.
    """
    L = sample_ids.shape[-1]
    q = torch.arange(L, device=sample_ids.device)
    mask = may_attend(q[:, None], q[None, :], sample_ids[:, :, None], sample_ids[:, None, :],
                      token_kinds[:, :, None], token_kinds[:, None, :], pad_self=True)
    return mask[:, None]


def image_only_mask(num_tokens: int, device: torch.device | None = None) -> torch.Tensor:
    """Full bidirectional attention over image tokens (encoder use, GENLIP_SPEC.md §6)."""
    return torch.ones(1, 1, num_tokens, num_tokens, dtype=torch.bool, device=device)
