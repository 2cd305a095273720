"""The packed-batch contract (megatron_genlip.batch): what the packer builds passes PackedBatch.validate, every
broken rule is reported by name, and the pipeline tuple and label rule are the ones the model reads."""

from __future__ import annotations

import pytest
import torch

from megatron_genlip.batch import (
    FIELDS, IGNORE_INDEX, KIND_IMAGE, KIND_TEXT, PIPELINE_INPUTS, BatchError, PackedBatch, pipeline_inputs,
    predicts_label,
)
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import assemble_sample

LENGTH = 64


def sample(grid: tuple[int, int], n_txt: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 256, (grid[0] * grid[1], 3, 4, 4), generator=g, dtype=torch.uint8)
    ids = torch.randint(1, 1000, (n_txt,), generator=g).tolist()
    return assemble_sample(patches, grid, ids, [False] * 2 + [True] * (n_txt - 2))


def packed() -> dict[str, torch.Tensor]:
    """Two rows: three samples with padding at the end; two stage-2-like grids filling the row but one slot."""
    return collate_batch([[sample((2, 3), 8, 0), sample((3, 3), 10, 1), sample((2, 2), 6, 2)],
                          [sample((4, 5), 20, 3), sample((3, 2), 17, 4)]], LENGTH)


def test_packed_rows_satisfy_the_contract():
    batch = packed()
    PackedBatch(seq_length=LENGTH, patch_size=4).validate(batch)
    PackedBatch().validate({**batch, "row_index": torch.tensor([7, 8])})
    assert [f.pad for f in FIELDS.values() if f.pad is not None] == [0, IGNORE_INDEX, -1, -1, -1]
    for key, field in FIELDS.items():
        if key in batch:
            assert batch[key].dtype == field.dtype, key


def _first(batch, kind: int) -> int:
    """Index of the first slot of ``kind`` in row 0."""
    return int((batch["token_kinds"][0] == kind).nonzero()[0])


def _set(key: str, value, where=lambda b: (0, LENGTH - 1)):
    def mutate(b):
        b[key][where(b)] = value
    return mutate


def _pad_first_slot(b):
    for f in FIELDS.values():
        if f.pad is not None:
            b[f.key][0, ..., 0] = f.pad


def _relabel_captions(b):
    b["labels"][b["labels"] != IGNORE_INDEX] = 1


BROKEN = {
    "missing labels": lambda b: b.pop("labels"),
    "unknown key extra": lambda b: b.update(extra=torch.zeros(2)),
    "input_ids is torch.int32": lambda b: b.update(input_ids=b["input_ids"].int()),
    "positions has shape": lambda b: b.update(positions=b["positions"][:, :2]),
    "padding slots with labels != -100": _set("labels", 5),
    "padding before the end of a row": _pad_first_slot,
    "token kinds other than": _set("token_kinds", 2, lambda b: (0, _first(b, KIND_TEXT))),
    "token_kinds -1 exactly at padding": _set("token_kinds", -1, lambda b: (0, _first(b, KIND_TEXT))),
    "sample ids that do not count": _set("sample_ids", 2, lambda b: (0, slice(0, 14))),
    "an image slot after a text slot": _set("token_kinds", KIND_IMAGE, lambda b: (0, _first(b, KIND_TEXT) + 1)),
    "input_ids != 0 at image slots": _set("input_ids", 3, lambda b: (0, 0)),
    "labels on image slots": _set("labels", 0, lambda b: (0, 0)),
    "labels that are not the slot's own token id": _relabel_captions,
    "image positions not (0, r, c)": _set("positions", 1, lambda b: (0, 0, 0)),
    "text positions that differ between the three axes": _set("positions", 99, lambda b: (0, 1, _first(b, KIND_TEXT))),
    "patches for": lambda b: b.update(patches=b["patches"][1:]),
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_each_broken_rule_is_named(rule):
    batch = {k: v.clone() for k, v in packed().items()}
    BROKEN[rule](batch)
    with pytest.raises(BatchError, match=rule.replace("(", r"\(").replace(")", r"\)")):
        PackedBatch().validate(batch)


def test_run_settings_are_checked():
    with pytest.raises(BatchError, match="rows of 64 slots, not seq_length 65"):
        PackedBatch(seq_length=65).validate(packed())
    with pytest.raises(BatchError, match="patches of size 4, not patch_size 16"):
        PackedBatch(patch_size=16).validate(packed())


def test_pipeline_tuple_and_label_rule():
    batch = packed()
    inputs, labels = pipeline_inputs(batch)
    assert labels is batch["labels"] and len(inputs) == len(PIPELINE_INPUTS) == 6
    assert all(t is batch[k] for t, k in zip(inputs, PIPELINE_INPUTS)) and set(PIPELINE_INPUTS) <= set(FIELDS)
    selected = predicts_label(batch["labels"])  # slot i predicts slot i + 1
    assert selected.shape == (2, LENGTH - 1) and int(selected.sum()) == int((batch["labels"] != IGNORE_INDEX).sum())
    first_caption = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
    assert selected[0, first_caption - 1] and not selected[0, first_caption - 2]
