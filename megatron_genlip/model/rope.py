"""Interleaved 3-axis multimodal RoPE (GENLIP_SPEC.md §2.6).

Frequency channel ``i`` (0 <= i < head_dim/2) takes its position from axis
  H  if i % 3 == 1 and i < 3 * section[1],
  W  if i % 3 == 2 and i < 3 * section[2],
  T  otherwise.
``section[0]`` is never read. The rotation is NeoX rotate-half: channel j pairs with j + head_dim/2.
cos/sin are computed in fp32 and cast to the activation dtype before use.
"""

from __future__ import annotations

import torch

AXIS_T, AXIS_H, AXIS_W = 0, 1, 2


def channel_axes(head_dim: int, mrope_section: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Axis index (0=T, 1=H, 2=W) of each of the head_dim/2 frequency channels."""
    half = head_dim // 2
    axes = torch.full((half,), AXIS_T, dtype=torch.long)
    for i in range(half):
        if i % 3 == 1 and i < 3 * mrope_section[1]:
            axes[i] = AXIS_H
        elif i % 3 == 2 and i < 3 * mrope_section[2]:
            axes[i] = AXIS_W
    return axes


def unplaceable_section(head_dim: int, mrope_section: list[int] | tuple[int, ...]) -> str | None:
    """Why the H/W entries of ``mrope_section`` name channels that do not exist at ``head_dim`` (None if they
    fit). The rule silently caps such a section (hd 64 with [8, 12, 12] places 11 H and 10 W channels), so a
    config that asks for more describes a model other than the one it builds: refused instead
    (GENLIP_SPEC.md §9 pitfall 1; section[0] is never read and the sum need not equal head_dim/2)."""
    half = head_dim // 2
    h_slots, w_slots = (half + 1) // 3, half // 3  # channels i < half with i % 3 == 1 (H), i % 3 == 2 (W)
    _, h, w = mrope_section
    if 0 <= h <= h_slots and 0 <= w <= w_slots:
        return None
    axes = channel_axes(head_dim, [0, max(h, 0), max(w, 0)]).tolist()
    same = [axes.count(AXIS_T), axes.count(AXIS_H), axes.count(AXIS_W)]
    return (f"mrope_section {list(mrope_section)} names H/W channels that do not exist at head dim {head_dim} "
            f"({h_slots} H and {w_slots} W channels fit; the interleaved rule would silently place "
            f"{same[1]} H and {same[2]} W: write {same} for that model)")


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/head_dim), fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class MultimodalRotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) of shape [B, L, head_dim] from 3-axis positions [B, 3, L]."""

    def __init__(self, head_dim: int, mrope_section: list[int], theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta), persistent=False)
        self.register_buffer("axes", channel_axes(head_dim, mrope_section), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, 3, L] (int). Pick per channel the axis it follows: [B, L, half].
        pos = positions.float().permute(0, 2, 1)  # [B, L, 3]
        per_channel = pos[..., self.axes.to(pos.device)]  # [B, L, half]
        freqs = per_channel * self.inv_freq.to(pos.device)
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, L, head_dim]; cos/sin: [B, L, head_dim]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
