"""Packed rows: several whole samples per fixed-length row, padding only at the end (GENLIP_SPEC.md §4.3).

Padding values: input_ids 0, labels -100, positions -1, sample_ids -1, token_kinds -1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_genlip.data.sample import IGNORE_INDEX, Sample
from megatron_genlip.model.masks import KIND_PAD


def fill_row(buffer_lengths: np.ndarray, seq_length: int) -> list[int]:
    """One row from a buffer (arrival order): take every sample that still fits, scanning in order.

    Returns positions into the buffer. The first sample always fits (samples never exceed a row).
    """
    taken: list[int] = []
    remaining = seq_length
    avail = np.ones(len(buffer_lengths), dtype=bool)
    while True:
        fits = avail & (buffer_lengths <= remaining)
        if not fits.any():
            return taken
        j = int(fits.argmax())
        taken.append(j)
        avail[j] = False
        remaining -= int(buffer_lengths[j])


def buffered_first_fit(lengths: np.ndarray, seq_length: int, buffer_size: int) -> list[list[int]]:
    """Rows of sample indices: a buffer of ``buffer_size`` samples in arrival order is refilled after
    each row; each row is filled by :func:`fill_row` (the official GenLIP packer's rule)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > seq_length:
        i = int(lengths.argmax())
        raise ValueError(f"sample {i} has {lengths[i]} tokens, more than seq_length={seq_length}")
    rows: list[list[int]] = []
    buf: list[int] = []
    nxt = 0
    while nxt < len(lengths) or buf:
        take = min(buffer_size - len(buf), len(lengths) - nxt)
        buf += range(nxt, nxt + take)
        nxt += take
        picked = fill_row(lengths[buf], seq_length)
        rows.append([buf[j] for j in sorted(picked)])  # a row keeps arrival order
        chosen = set(picked)
        buf = [b for j, b in enumerate(buf) if j not in chosen]
    return rows


def first_fit(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Greedy first-fit in arrival order: each sample goes into the first open row with room.

    Returns rows as lists of sample indices (each row keeps arrival order). A sample longer than
    ``seq_length`` is an error: the builder must have dropped it.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > seq_length:
            raise ValueError(f"sample {i} has {n} tokens, more than seq_length={seq_length}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_length - n)
    return rows


def collate_row(samples: Sequence[Sample], seq_length: int) -> dict[str, torch.Tensor]:
    """Concatenate whole samples into one row of exactly ``seq_length`` tokens."""
    used = sum(len(s) for s in samples)
    if used > seq_length:
        raise ValueError(f"samples of {used} tokens do not fit a row of {seq_length}")
    pad = seq_length - used

    def cat(parts: list[torch.Tensor], fill: int) -> torch.Tensor:
        filler = torch.full((pad,), fill, dtype=torch.long)
        return torch.cat(parts + [filler])

    return {
        "input_ids": cat([s.input_ids for s in samples], 0),
        "labels": cat([s.labels for s in samples], IGNORE_INDEX),
        "positions": torch.cat([s.positions for s in samples] + [torch.full((3, pad), -1, dtype=torch.long)], dim=1),
        "sample_ids": cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(samples)], -1),
        "token_kinds": cat([s.token_kinds for s in samples], KIND_PAD),
        "patches": torch.cat([s.patches for s in samples]) if samples else torch.empty(0),
    }


def stack_rows(collated: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack collated rows into a micro-batch; patches of all rows are concatenated in row order."""
    batch = {k: torch.stack([c[k] for c in collated]) for k in collated[0] if k != "patches"}
    batch["patches"] = torch.cat([c["patches"] for c in collated])
    return batch


def collate_batch(rows: Sequence[Sequence[Sample]], seq_length: int) -> dict[str, torch.Tensor]:
    """Collate and stack packed rows into a micro-batch."""
    return stack_rows([collate_row(r, seq_length) for r in rows])


def packing_efficiency(batch: dict[str, torch.Tensor]) -> float:
    """Real tokens / total slots."""
    return float((batch["sample_ids"] >= 0).float().mean())
