"""Packed rows: several whole samples per fixed-length row, padding only at the end (GENLIP_SPEC.md §4.3).

The batch format (keys, dtypes, padding values, token kinds) is ``megatron_genlip.batch``; this module fills it.

Two ways to build a micro-batch:

* :func:`assemble_batch` (the indexed path): fills preallocated arrays in place straight from the stored
  token ids, label flags and images, so a DataLoader worker spends its time decoding images, not building
  per-sample tensors; inside a worker the arrays live in shared memory from the start, so handing the batch
  to the trainer copies nothing.
* :func:`collate_row` / :func:`stack_rows` on :class:`Sample` objects (the per-sample reference of tests).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from megatron_genlip.batch import IGNORE_INDEX, KIND_IMAGE, KIND_TEXT, PATCHES, SLOT_FIELDS
from megatron_genlip.data.sample import Sample


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
    batch = {f.key: _empty(f.shape(B=b, L=seq_length), f.dtype, f.pad) for f in SLOT_FIELDS}  # all padding
    batch["patches"] = _empty(PATCHES.shape(N=num_patches, p=patch_size), PATCHES.dtype)
    np_ids, np_labels, np_pos, np_sid, np_kinds, np_patches = (batch[k].numpy() for k in (
        "input_ids", "labels", "positions", "sample_ids", "token_kinds", "patches"))
    next_patch = 0
    for r, ((ds, ids), row_meta) in enumerate(zip(rows, meta)):
        at = 0
        for s, (i, (gh, gw, n_txt)) in enumerate(zip(ids, row_meta)):
            n_img = gh * gw
            if at + n_img + n_txt > seq_length:
                raise _data_error(f"samples {[int(x) for x in ids[:8]]}{'...' if len(ids) > 8 else ''} packed into "
                                  f"one row need {sum(g * w + t for g, w, t in row_meta)} tokens, more than a row of "
                                  f"{seq_length}: the pack index does not belong to dataset {ds.prefix} or its "
                                  "lengths file (check it with tools/build_pack_index.py --verify)")
            text, flags, image = ds.raw(int(i))
            if len(text) != n_txt or len(flags) != n_txt:
                raise _data_error(f"{ds.locate(int(i))} holds {len(text)} text tokens, the lengths file says "
                                  f"{n_txt}: the lengths file of dataset {ds.prefix} does not belong to its parts; "
                                  "rerun tools/preprocess_data.py --finalize")
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
    return batch


def _data_error(text: str) -> Exception:
    from megatron_genlip.data.indexed import DatasetError

    return DatasetError(text)


# -------------------------------------------------------------------------------------------------
# Sample objects (the per-sample reference, tests)


def collate_row(samples: Sequence[Sample], seq_length: int) -> dict[str, torch.Tensor]:
    """Concatenate whole samples into one row of exactly ``seq_length`` tokens."""
    used = sum(len(s) for s in samples)
    if used > seq_length:
        raise ValueError(f"samples of {used} tokens do not fit a row of {seq_length}")
    parts = {"input_ids": [s.input_ids for s in samples], "labels": [s.labels for s in samples],
             "positions": [s.positions for s in samples], "token_kinds": [s.token_kinds for s in samples],
             "sample_ids": [torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(samples)]}
    padding = {f.key: torch.full(f.shape(B=1, L=seq_length - used), f.pad, dtype=f.dtype)[0] for f in SLOT_FIELDS}
    row = {key: torch.cat(parts[key] + [fill], dim=-1) for key, fill in padding.items()}
    row["patches"] = torch.cat([s.patches for s in samples]) if samples else torch.empty(0, dtype=torch.uint8)
    return row


def stack_rows(collated: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack collated rows into a micro-batch; patches of all rows are concatenated in row order."""
    batch = {k: torch.stack([c[k] for c in collated]) for k in collated[0] if k != "patches"}
    batch["patches"] = torch.cat([c["patches"] for c in collated])
    return batch


def collate_batch(rows: Sequence[Sequence[Sample]], seq_length: int) -> dict[str, torch.Tensor]:
    """Collate and stack packed rows into a micro-batch."""
    return stack_rows([collate_row(r, seq_length) for r in rows])
