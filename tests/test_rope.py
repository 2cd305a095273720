"""Interleaved 3-axis M-RoPE (GENLIP_SPEC.md §2.6)."""

from __future__ import annotations

import torch

from megatron_genlip.model.rope import AXIS_H, AXIS_T, AXIS_W, MultimodalRotaryEmbedding, apply_rotary, channel_axes


def counts(axes: torch.Tensor) -> tuple[int, int, int]:
    return tuple(int((axes == a).sum()) for a in (AXIS_T, AXIS_H, AXIS_W))


def test_channel_table_of_the_spec():
    # §2.6 table: T/H/W channel counts
    assert counts(channel_axes(72, [8, 12, 12])) == (12, 12, 12)
    assert counts(channel_axes(72, [12, 12, 12])) == (12, 12, 12)
    assert counts(channel_axes(96, [16, 16, 16])) == (16, 16, 16)
    assert counts(channel_axes(64, [8, 12, 12])) == (11, 11, 10)
    assert counts(channel_axes(64, [16, 16, 16])) == (11, 11, 10)


def test_interleaving_pattern_and_section0_ignored():
    axes = channel_axes(72, [8, 12, 12]).tolist()
    assert axes[:6] == [AXIS_T, AXIS_H, AXIS_W, AXIS_T, AXIS_H, AXIS_W]
    assert axes == channel_axes(72, [0, 12, 12]).tolist() == channel_axes(72, [99, 12, 12]).tolist()
    # H/W caps: with section [*, 2, 1] only channels 1, 4 are H and channel 2 is W
    small = channel_axes(16, [5, 2, 1]).tolist()
    assert [i for i, a in enumerate(small) if a == AXIS_H] == [1, 4]
    assert [i for i, a in enumerate(small) if a == AXIS_W] == [2]
    # hd 64: the last channel (31, 31 % 3 == 1) is H; W stops at 29 (< 3*12=36 but hd/2 = 32)
    a64 = channel_axes(64, [8, 12, 12]).tolist()
    assert a64[31] == AXIS_H and a64[29] == AXIS_W and a64[30] == AXIS_T


def standard_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Plain 1-D NeoX RoPE: x [B, H, L, hd], pos [B, L]."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = pos.float()[..., None] * inv  # [B, L, hd/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def test_text_positions_reduce_to_1d_rope():
    """Equal positions on the three axes give exactly 1-D RoPE (max abs diff <= 1e-6)."""
    for hd, section in ((64, [8, 12, 12]), (72, [12, 12, 12]), (96, [16, 16, 16])):
        rope = MultimodalRotaryEmbedding(hd, section)
        pos1 = torch.arange(14, 40)[None].repeat(2, 1)
        cos, sin = rope(pos1[:, None].expand(2, 3, -1), torch.float32)
        x = torch.randn(2, 3, pos1.shape[1], hd)
        assert torch.allclose(apply_rotary(x, cos, sin), standard_rope(x, pos1), atol=1e-5, rtol=0)


def test_image_tokens_rotate_by_row_and_column():
    """An image query/key pair's score depends only on (dr, dc), not on absolute position (t = 0)."""
    rope = MultimodalRotaryEmbedding(72, [12, 12, 12])
    q, k = torch.randn(72), torch.randn(72)

    def score(pq, pk):
        pos = torch.tensor([pq, pk]).T[None]  # [1, 3, 2]
        cos, sin = rope(pos, torch.float32)
        x = torch.stack((q, k))[None, None]  # [1, 1, 2, hd]
        r = apply_rotary(x, cos, sin)[0, 0]
        return float(r[0] @ r[1])

    assert abs(score((0, 2, 3), (0, 1, 1)) - score((0, 5, 7), (0, 4, 5))) < 1e-4
    assert abs(score((0, 2, 3), (0, 1, 1)) - score((0, 2, 3), (0, 1, 2))) > 1e-3


def test_cos_sin_cast_to_activation_dtype():
    rope = MultimodalRotaryEmbedding(64, [8, 12, 12])
    pos = torch.arange(300)[None, None].expand(1, 3, -1)
    cos, sin = rope(pos, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
    ref_cos, _ = rope(pos, torch.float32)
    assert torch.equal(cos, ref_cos.to(torch.bfloat16))  # computed in fp32, then cast
