"""Packed rows: several whole samples per fixed-length row, padding only at the end (GENLIP_SPEC.md §4.3).

Padding values: input_ids 0, labels -100, positions -1, sample_ids -1, token_kinds -1. Patches are uint8
``[N, 3, p, p]``, all images of the micro-batch in row-major token order (normalised on the device).

Two ways to build a micro-batch:

* :func:`assemble_batch` (the indexed path): fills preallocated arrays in place straight from the stored
  token ids, label flags and images, so a DataLoader worker spends its time decoding images, not building
  per-sample tensors; inside a worker the arrays live in shared memory from the start, so handing the batch
  to the trainer copies nothing.
* :func:`collate_row` / :func:`stack_rows` on :class:`Sample` objects (the streaming path and tests).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from megatron_genlip.data.sample import IGNORE_INDEX, Sample
from megatron_genlip.model.masks import KIND_IMAGE, KIND_PAD, KIND_TEXT


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


# -------------------------------------------------------------------------------------------------
# the indexed path


@lru_cache(maxsize=256)
def _image_rows_cols(gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.divmod(np.arange(gh * gw, dtype=np.int64), gw)
    return r, c


def _empty(shape: tuple, dtype: torch.dtype, fill: int | None = None) -> torch.Tensor:
    """A tensor in shared memory when built inside a DataLoader worker (the batch then crosses to the
    trainer without a copy), in ordinary memory otherwise."""
    t = torch.empty(shape, dtype=dtype)
    if torch.utils.data.get_worker_info() is not None:
        t.share_memory_()
    if fill is not None:
        t.fill_(fill)
    return t


def assemble_batch(rows: Sequence[tuple[object, np.ndarray]], seq_length: int, patch_size: int,
                   draft: bool = False) -> dict[str, torch.Tensor]:
    """A micro-batch from packed rows, each ``(dataset, sample ids)`` (an indexed dataset: see
    ``GenLIPIndexedDataset.raw`` / ``image_patches`` / ``grid_and_text``)."""
    b = len(rows)
    meta = [[ds.grid_and_text(int(i)) for i in ids] for ds, ids in rows]
    num_patches = sum(gh * gw for row in meta for gh, gw, _ in row)
    input_ids = _empty((b, seq_length), torch.int64, 0)
    labels = _empty((b, seq_length), torch.int64, IGNORE_INDEX)
    positions = _empty((b, 3, seq_length), torch.int64, -1)
    sample_ids = _empty((b, seq_length), torch.int64, -1)
    kinds = _empty((b, seq_length), torch.int64, KIND_PAD)
    patches = _empty((num_patches, 3, patch_size, patch_size), torch.uint8)
    np_ids, np_labels, np_pos = input_ids.numpy(), labels.numpy(), positions.numpy()
    np_sid, np_kinds, np_patches = sample_ids.numpy(), kinds.numpy(), patches.numpy()
    next_patch = 0
    for r, ((ds, ids), row_meta) in enumerate(zip(rows, meta)):
        at = 0
        for s, (i, (gh, gw, n_txt)) in enumerate(zip(ids, row_meta)):
            n_img = gh * gw
            if at + n_img + n_txt > seq_length:
                raise ValueError(f"samples of row {r} do not fit a row of {seq_length} tokens")
            text, flags, image = ds.raw(int(i))
            ds.image_patches(int(i), image, (gh, gw), np_patches[next_patch:next_patch + n_img], draft)
            next_patch += n_img
            img, txt = slice(at, at + n_img), slice(at + n_img, at + n_img + n_txt)
            rr, cc = _image_rows_cols(gh, gw)
            np_pos[r, 0, img] = 0
            np_pos[r, 1, img] = rr
            np_pos[r, 2, img] = cc
            np_pos[r, :, txt] = np.arange(max(gh, gw), max(gh, gw) + n_txt)
            np_ids[r, txt] = text
            np_labels[r, txt] = np.where(flags.astype(bool), text, IGNORE_INDEX)
            np_kinds[r, img] = KIND_IMAGE
            np_kinds[r, txt] = KIND_TEXT
            np_sid[r, at:at + n_img + n_txt] = s
            at += n_img + n_txt
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "sample_ids": sample_ids,
            "token_kinds": kinds, "patches": patches}


# -------------------------------------------------------------------------------------------------
# Sample objects (the streaming path, tests)


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
        "patches": torch.cat([s.patches for s in samples]) if samples else torch.empty(0, dtype=torch.uint8),
    }


def stack_rows(collated: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack collated rows into a micro-batch; patches of all rows are concatenated in row order."""
    batch = {k: torch.stack([c[k] for c in collated]) for k in collated[0] if k != "patches"}
    batch["patches"] = torch.cat([c["patches"] for c in collated])
    return batch


def collate_batch(rows: Sequence[Sequence[Sample]], seq_length: int) -> dict[str, torch.Tensor]:
    """Collate and stack packed rows into a micro-batch."""
    return stack_rows([collate_row(r, seq_length) for r in rows])
