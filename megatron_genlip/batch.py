"""The packed micro-batch: the one contract between data, model, pipeline, metrics and evaluation.

The data path builds it (``data/packing.py``); the model, the pipeline stages, the step metrics and the evaluation
read it. None of them imports another to learn the format: it lives here, in a module that imports only torch
(the part megatron-core's ``PackedSeqParams`` and torchtitan's batch contract play). A micro-batch stays a plain
``dict`` of tensors, which is what DataLoader collation, the DeepSpeed engine and the pipeline pass around;
:class:`PackedBatch` describes it and checks one (:meth:`PackedBatch.validate`).

============  ============  =====  =======  ==========================================================================
key           shape         dtype  padding  meaning
============  ============  =====  =======  ==========================================================================
input_ids     [B, L]        int64  0        token id; 0 at image slots
labels        [B, L]        int64  -100     the token id at supervised slots (caption, ``<|im_end|>``, ``\\n``),
                                            :data:`IGNORE_INDEX` on image, prompt and padding slots
positions     [B, 3, L]     int64  -1       3-axis M-RoPE positions, restarting per sample: image patch (r, c) ->
                                            (0, r, c); text token j -> S + j on all three axes, S = max(gh, gw)
sample_ids    [B, L]        int64  -1       index of the packed sample within its row: 0, 1, ...
token_kinds   [B, L]        int64  -1       :data:`KIND_IMAGE`, :data:`KIND_TEXT`, :data:`KIND_PAD`
patches       [N, 3, p, p]  uint8  -        every image patch of the micro-batch, in row-major token order; the
                                            model normalises them on the device (:func:`normalize_pixels`). The
                                            host reference path and tests may pass normalised floats instead.
row_index     [B]           int64  -        optional: each row's global packed-row number (the data position)
============  ============  =====  =======  ==========================================================================

A row holds whole samples ``[patches][prompt][caption][<|im_end|>][\\n]`` back to back, padding only at its end.
Slot i predicts the label of slot i + 1 (:func:`predicts_label`); a sample's last slot is followed by the next
sample's first, an image slot whose label is -100, so no prediction crosses samples.

Pipeline parallelism hands the first stage the tuple :data:`PIPELINE_INPUTS` and the last stage the labels
(:func:`pipeline_inputs`, DeepSpeed's ``(inputs, labels)`` convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of a slot without a target (cross-entropy's ignore_index)

KIND_TEXT = 0
KIND_IMAGE = 1
KIND_PAD = -1

PIXEL_MEAN = 0.5  # the device-side normalisation of uint8 pixels (GENLIP_SPEC.md §2.1): [0, 255] -> [-1, 1]
PIXEL_STD = 0.5


@dataclass(frozen=True)
class Field:
    """One key of the batch. ``dims`` name the sizes: B rows, L slots per row, N patches, p patch size."""

    key: str
    dims: tuple[str | int, ...]
    dtype: torch.dtype
    pad: int | None = None  # value at padding slots (None: the tensor has no per-slot padding)
    optional: bool = False

    def shape(self, **sizes: int) -> tuple[int, ...]:
        """The concrete shape for ``sizes`` (e.g. ``B=2, L=1024``)."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


SLOT_FIELDS = (  # one value per slot of every row
    Field("input_ids", ("B", "L"), torch.int64, pad=0),
    Field("labels", ("B", "L"), torch.int64, pad=IGNORE_INDEX),
    Field("positions", ("B", 3, "L"), torch.int64, pad=-1),
    Field("sample_ids", ("B", "L"), torch.int64, pad=-1),
    Field("token_kinds", ("B", "L"), torch.int64, pad=KIND_PAD),
)
PATCHES = Field("patches", ("N", 3, "p", "p"), torch.uint8)
ROW_INDEX = Field("row_index", ("B",), torch.int64, optional=True)
FIELDS = {f.key: f for f in SLOT_FIELDS + (PATCHES, ROW_INDEX)}

PIPELINE_INPUTS = ("input_ids", "positions", "sample_ids", "token_kinds", "labels", "patches")


def pipeline_inputs(batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A micro-batch -> (the first stage's input tuple, the last stage's labels), as DeepSpeed's pipeline expects."""
    return tuple(batch[k] for k in PIPELINE_INPUTS), batch["labels"]


def predicts_label(labels: torch.Tensor) -> torch.Tensor:
    """bool [B, L-1]: slot i is followed by a labelled slot, so the LM head and the loss run on it."""
    return labels[:, 1:] != IGNORE_INDEX


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]: scale 1/255, then (x - mean) / std. The host-side
    reference (``data.image_processing.process_image``) and the model's patch embedding both call this, so the
    device sees bit-identical values."""
    return (pixels.to(torch.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD


def denormalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalize_pixels` for display: float pixels in [-1, 1] -> uint8 (rounded, clipped);
    uint8 pixels pass through unchanged."""
    if pixels.dtype == torch.uint8:
        return pixels
    return ((pixels.to(torch.float32) * PIXEL_STD + PIXEL_MEAN) * 255.0).round().clamp(0, 255).to(torch.uint8)


class BatchError(ValueError):
    """A micro-batch that breaks the contract; the message lists every rule it breaks."""


@dataclass(frozen=True)
class PackedBatch:
    """The format of one run's micro-batches: rows of ``seq_length`` slots and ``patch_size`` patches (None:
    any). :meth:`validate` checks a batch against the module docstring's table and row rules."""

    seq_length: int | None = None
    patch_size: int | None = None

    def validate(self, batch: dict[str, torch.Tensor]) -> None:
        """Raise :class:`BatchError` naming every broken rule (keys, dtypes, shapes, padding, kinds, labels,
        sample order, positions, patch count)."""
        errors = self._format_errors(batch)
        if not errors:  # the row rules need well-formed tensors
            errors = _row_errors(batch)
        if errors:
            raise BatchError("packed batch: " + "; ".join(errors))

    def _format_errors(self, batch: dict[str, torch.Tensor]) -> list[str]:
        missing = [k for k, f in FIELDS.items() if k not in batch and not f.optional]
        unknown = sorted(set(batch) - set(FIELDS))
        errors = [f"missing {k}" for k in missing] + [f"unknown key {k}" for k in unknown]
        if missing or unknown:
            return errors
        rows, length = batch["input_ids"].shape[0], batch["input_ids"].shape[-1]
        sizes = {"B": rows, "L": length, "N": batch["patches"].shape[0],
                 "p": batch["patches"].shape[-1] if batch["patches"].dim() == 4 else -1}
        for key in batch:
            errors += _field_errors(FIELDS[key], batch[key], sizes)
        if self.seq_length is not None and length != self.seq_length:
            errors.append(f"rows of {length} slots, not seq_length {self.seq_length}")
        if self.patch_size is not None and sizes["p"] != self.patch_size:
            errors.append(f"patches of size {sizes['p']}, not patch_size {self.patch_size}")
        return errors


def _field_errors(field: Field, value: torch.Tensor, sizes: dict[str, int]) -> list[str]:
    dtype_ok = value.dtype == field.dtype or (field is PATCHES and value.dtype.is_floating_point)
    errors = [] if dtype_ok else [f"{field.key} is {value.dtype}, not {field.dtype}"]
    if tuple(value.shape) != field.shape(**sizes):
        errors.append(f"{field.key} has shape {tuple(value.shape)}, not {list(field.dims)} = {field.shape(**sizes)}")
    return errors


def _row_errors(batch: dict[str, torch.Tensor]) -> list[str]:
    """The rules of the module docstring that tie the fields together."""
    sid, kinds, labels, ids = (batch[k] for k in ("sample_ids", "token_kinds", "labels", "input_ids"))
    pad, image, text = sid < 0, kinds == KIND_IMAGE, kinds == KIND_TEXT
    errors = [f"padding slots with {f.key} != {f.pad}" for f in SLOT_FIELDS
              if not _at(batch[f.key], pad).eq(f.pad).all()]
    checks = {
        "token_kinds -1 exactly at padding (sample_ids -1)": torch.equal(kinds == KIND_PAD, pad),
        "token kinds other than image (1), text (0) and padding (-1)": bool((image | text | pad).all()),
        "padding before the end of a row": not bool((pad[:, :-1] & ~pad[:, 1:]).any()),
        "sample ids that do not count 0, 1, ... along the row": _samples_in_order(sid),
        "an image slot after a text slot of the same sample": not bool(
            (text[:, :-1] & image[:, 1:] & (sid[:, :-1] == sid[:, 1:])).any()),
        "input_ids != 0 at image slots": not bool(ids[image].any()),
        "labels on image slots": bool((labels[image] == IGNORE_INDEX).all()),
        "labels that are not the slot's own token id": bool(
            ((labels == IGNORE_INDEX) | ((labels == ids) & text)).all()),
        "image positions not (0, r, c)": bool((_at(batch["positions"][:, 0], image) == 0).all()),
        "text positions that differ between the three axes": _text_axes_equal(batch["positions"], text),
        f"{batch['patches'].shape[0]} patches for {int(image.sum())} image slots":
            batch["patches"].shape[0] == int(image.sum()),
    }
    return errors + [rule for rule, ok in checks.items() if not ok]


def _at(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``values`` at the slots ``where`` selects ([B, L] mask; a [B, 3, L] tensor is read on every axis)."""
    return values.transpose(1, 2)[where] if values.dim() == 3 else values[where]


def _samples_in_order(sid: torch.Tensor) -> bool:
    """Row by row, the non-padding ids start at 0 and step by 0 or 1."""
    steps = sid[:, 1:] - sid[:, :-1]
    real = sid[:, 1:] >= 0
    return bool(((sid[:, 0] == 0) | (sid[:, 0] == -1)).all() and ((steps == 0) | (steps == 1))[real].all())


def _text_axes_equal(positions: torch.Tensor, text: torch.Tensor) -> bool:
    at_text = _at(positions, text)  # [T, 3]
    return bool((at_text == at_text[:, :1]).all())
