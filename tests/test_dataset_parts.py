"""Datasets made of many parts (never merged), built by several tasks, read lazily; blends; the loader's
in-place micro-batches against the per-sample reference; resume deep into a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_genlip.batch import PackedBatch
from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset, finalize_dataset
from megatron_genlip.data.indexed import DatasetError, DatasetMismatch, GenLIPIndexedDataset
from megatron_genlip.data.packed_dataset import BlendedRows, PackedRows, blend_schedule, build_loader, open_rows
from megatron_genlip.data.packing import collate_row, stack_rows
from megatron_genlip.data.synthetic import write_shards

from data_harness import read_files

ROOT = Path(__file__).parent.parent
TINY = ROOT / "examples/configs/tiny.yaml"
QUIET = {"log": lambda *_: None}


def cfg(*overrides):
    return load_config(TINY, list(overrides))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """90 samples in 3 shards of 30, and the same 90 samples in one shard."""
    d = tmp_path_factory.mktemp("parts-shards")
    three = write_shards(str(d / "three"), "train", 90, 30, seed=4, image_size=48)
    one = write_shards(str(d / "one"), "train", 90, 90, seed=4, image_size=48)
    return three, one


@pytest.fixture(scope="module")
def built(tmp_path_factory, shards):
    d = tmp_path_factory.mktemp("parts-built")
    three, one = shards
    build_indexed_dataset(three, str(d / "three"), cfg(), progress=False)
    build_indexed_dataset(one, str(d / "one"), cfg(), progress=False)
    return d


def rows_of(prefix, *overrides) -> PackedRows:
    rows = open_rows(str(prefix), cfg(*overrides).data)
    rows.ensure(epochs=2, **QUIET)
    return rows


def test_three_parts_read_and_pack_like_one_merged_part(built):
    """Row for row, over two epochs, a dataset of 3 parts gives the same micro-batches as one part holding the
    same samples (a merged dataset): parts change nothing but where bytes live."""
    three, one = rows_of(built / "three"), rows_of(built / "one")
    assert len(three.dataset.part_paths) == 3 and len(one.dataset.part_paths) == 1
    total = three.index.total_rows
    assert total == one.index.total_rows and three.rows_in_epoch(1) > 0
    for g in range(0, total, 3):
        a, b = three.batch(range(g, min(g + 3, total))), one.batch(range(g, min(g + 3, total)))
        assert all(torch.equal(a[k], b[k]) for k in a), g


def test_in_place_batch_equals_per_sample_reference(built):
    """The loader's in-place micro-batch equals stacking the per-sample reference rows (Sample objects)."""
    rows = rows_of(built / "three")
    ids = [2, 0, rows.rows_in_epoch(0) + 1]
    fast = rows.batch(ids)
    reference = stack_rows([collate_row([rows.dataset[int(i)] for i in rows.row_samples(g)], rows.seq_length)
                            for g in ids])
    assert fast["patches"].dtype == torch.uint8
    PackedBatch(seq_length=rows.seq_length, patch_size=rows.dataset.patch_size).validate(fast)
    for k in reference:
        assert fast[k].dtype == reference[k].dtype and torch.equal(fast[k], reference[k]), k
    assert fast["row_index"].tolist() == ids


def test_lists_globs_and_txt_lists_concatenate_datasets(built, tmp_path):
    a, b = str(built / "three"), str(built / "one")
    listing = tmp_path / "datasets.txt"
    listing.write_text(f"# two datasets\n{os.path.relpath(a, tmp_path)}\n{b}  # absolute\n")
    by_list = GenLIPIndexedDataset([a, b], cfg().data)
    for spec in (str(listing), [str(built / "thr*"), b]):
        other = GenLIPIndexedDataset(spec, cfg().data)
        assert len(other) == 180 and other.fingerprint() == by_list.fingerprint()
    first, second = GenLIPIndexedDataset(a, cfg().data), GenLIPIndexedDataset(b, cfg().data)
    for i in (0, 89, 90, 179):
        want = first[i] if i < 90 else second[i - 90]
        got = by_list[i]
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.patches, want.patches), i
    assert by_list.fingerprint() not in (first.fingerprint(), second.fingerprint())
    with pytest.raises(DatasetError, match="matches no dataset"):
        GenLIPIndexedDataset(str(built / "nothing*"), cfg().data)
    with pytest.raises(FileNotFoundError, match="tools/preprocess_data.py"):
        GenLIPIndexedDataset(str(built / "absent"), cfg().data)


def test_parts_open_lazily_and_at_most_max_open_parts(built):
    ds = GenLIPIndexedDataset(str(built / "three"), cfg().data, max_open_parts=2)
    assert len(ds._parts) == 0  # nothing opened by the constructor
    for i in (0, 30, 60, 0, 31):
        ds.raw(i)
        assert len(ds._parts) <= 2
    assert list(ds._parts) == [0, 1]  # least recently used first: part 2 was evicted by the last read


def test_truncated_or_replaced_part_is_a_clear_error(built, tmp_path):
    import shutil

    for f in built.glob("three*"):
        if f.is_dir():
            shutil.copytree(f, tmp_path / f.name)
        else:
            shutil.copy(f, tmp_path / f.name)
    (part,) = [p for p in (tmp_path / "three.parts").glob("000001-*.bin")]
    part.write_bytes(part.read_bytes()[:-10])
    ds = GenLIPIndexedDataset(str(tmp_path / "three"), cfg().data)
    ds.raw(0)  # other parts still read
    with pytest.raises(DatasetError, match=r"000001-.*\.bin .*truncated or replaced"):
        ds.raw(30)


def test_sharded_build_then_finalize_equals_one_build(shards, tmp_path):
    three, _ = shards
    reference = str(tmp_path / "ref")
    build_indexed_dataset(three, reference, cfg(), progress=False)
    prefix = str(tmp_path / "split")
    for i in (2, 0, 1):  # tasks finish in any order; none finalizes
        out = build_indexed_dataset(three, prefix, cfg(), progress=False, shard_index=i, num_shards=3)
        assert out["shards"] == 1 and not Path(prefix + ".json").exists()
    finalize_dataset(three, prefix, cfg())
    assert read_files(prefix) == read_files(reference)


def test_finalize_names_missing_and_stale_parts(shards, tmp_path):
    three, _ = shards
    prefix = str(tmp_path / "ds")
    build_indexed_dataset(three, prefix, cfg(), progress=False, shard_index=0, num_shards=3)
    with pytest.raises(ValueError, match=r"2 part\(s\) not built"):
        finalize_dataset(three, prefix, cfg())
    other = cfg("tokenizer.prompt=Caption this.")
    with pytest.raises(ValueError, match=r"built with other settings"):
        finalize_dataset(three[:1], prefix, other)


def test_stale_parts_are_rebuilt_with_the_new_settings(shards, tmp_path):
    """A build resumed with another prompt (or tokenizer, image size...) must not reuse parts built with the
    old one: every such part is rebuilt, and the dataset carries the new settings only."""
    three, _ = shards
    prefix = str(tmp_path / "ds")
    build_indexed_dataset(three[:2], prefix, cfg(), progress=False, shard_index=0, num_shards=2)
    new = cfg("tokenizer.prompt=Caption this.")
    report = build_indexed_dataset(three[:2], prefix, new, progress=False)
    assert report["build"]["shards_reused"] == 0
    ds = GenLIPIndexedDataset(prefix, new.data)
    assert ds.meta["prompt"] == "Caption this."
    fresh = str(tmp_path / "fresh")
    build_indexed_dataset(three[:2], fresh, new, progress=False)
    assert read_files(prefix) == read_files(fresh)


@pytest.mark.slow
def test_the_same_build_started_twice_at_once(shards, tmp_path):
    """Two identical preprocess commands racing on one output prefix both finish; the dataset is complete and
    equals a single build (temporary names are per host and process; commits are atomic renames)."""
    three, _ = shards
    prefix = str(tmp_path / "race")
    cmd = [sys.executable, "tools/preprocess_data.py", "--config", str(TINY), "--input", *three, "--output-prefix",
           prefix, "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    reference = str(tmp_path / "ref")
    build_indexed_dataset(three, reference, cfg(), progress=False)
    assert read_files(prefix) == read_files(reference)
    assert not list(Path(prefix + ".parts").glob("*.tmp-*"))


def test_blend_schedule_and_rows(built):
    w = [0.75, 0.25]
    sched = blend_schedule(w, 1000)
    assert np.bincount(sched).tolist() == [750, 250]
    for t in (1, 7, 100, 999):  # every prefix within one row of the weights
        assert abs(np.sum(sched[:t] == 0) - 0.75 * t) <= 1
    a, b = rows_of(built / "three"), rows_of(built / "one", "data.seed=99")
    blend = BlendedRows([a, b], w, period=8)
    want = [blend.locate(g) for g in range(40)]
    assert [d for d, _ in want].count(0) == 30
    assert [r for d, r in want if d == 0] == list(range(30)) and [r for d, r in want if d == 1] == list(range(10))
    got = blend.batch([9, 10, 11])
    for j, g in enumerate((9, 10, 11)):
        d, r = blend.locate(g)
        ref = (a, b)[d][r]
        assert torch.equal(got["input_ids"][j], ref["input_ids"])
    assert blend.rows_needed(40) == [30, 10]
    assert blend.fingerprint() != BlendedRows([a, b], [0.5, 0.5], period=8).fingerprint()
    with pytest.raises(ValueError, match="positive"):
        blend_schedule([1.0, 0.0])


def test_resume_deep_in_the_run_gives_the_same_rows(built):
    """At epoch >= 5 and across an epoch boundary, a loader started at consumed_samples=k yields exactly the
    micro-batches an uninterrupted loader yields from k (with worker processes, as training uses)."""
    rows = open_rows(str(built / "three"), cfg().data)
    rows.ensure(epochs=7, **QUIET)
    boundary = int(rows.index.row_starts[5]) - 2  # 2 rows before epoch 5 starts
    m, world, rank = 1, 2, 1
    full = list(zip(range(8), build_loader(rows, boundary - 4, m, rank, world)))
    resumed = list(zip(range(6), build_loader(rows, boundary, m, rank, world, num_workers=2)))
    for (_, a), (_, b) in zip(full[2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert {rows.index.locate(int(b["row_index"][0]))[0] for _, b in resumed} == {4, 5}


def test_blend_resumes_at_any_row_with_workers(built):
    a, b = rows_of(built / "three"), rows_of(built / "one", "data.seed=99")
    blend = BlendedRows([a, b], [2.0, 1.0], period=3)
    full = [x for _, x in zip(range(10), build_loader(blend, 0, 2, 0, 1))]
    resumed = [x for _, x in zip(range(4), build_loader(blend, 12, 2, 0, 1, num_workers=2))]
    for x, y in zip(full[6:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_data_config_errors_name_the_fields():
    from megatron_genlip.config import ConfigError
    from megatron_genlip.data.packed_dataset import open_train_rows

    bad = cfg("data.train_blend=[{data: x, weight: 0}]", "data.max_open_parts=0", "data.prefetch_factor=0",
              "data.max_sample_length=70000")
    with pytest.raises(ConfigError) as e:
        open_train_rows(bad.data)
    for field in ("data.train_data or data.train_blend", "data.train_blend[0].weight", "data.max_open_parts",
                  "data.prefetch_factor", "data.max_sample_length"):
        assert field in str(e.value)


def test_part_reader_returns_what_megatron_core_reads(built, tmp_path):
    """The light part reader against megatron-core's own IndexedDataset on every sample of every part."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_genlip.data.indexed import PartReader

    ds = GenLIPIndexedDataset(str(built / "three"), cfg().data)
    for prefix in ds.part_paths:
        ours, theirs = PartReader(prefix), IndexedDataset(prefix, multimodal=True)
        assert len(ours.documents) - 1 == len(theirs.document_indices) - 1 == 30
        for d in range(30):
            first = int(theirs.document_indices[d])
            want, modes = theirs[first:first + 3]
            assert modes.tolist() == [0, 2, 1]
            assert all(np.array_equal(a, b) for a, b in zip(ours.items(d), want))
        ours.close()
    copy = str(tmp_path / "part")
    Path(copy + ".bin").write_bytes(Path(ds.part_paths[0] + ".bin").read_bytes())
    Path(copy + ".idx").write_bytes(b"NOTANIDX" + Path(ds.part_paths[0] + ".idx").read_bytes()[8:])
    with pytest.raises(DatasetError, match="not a megatron-core uint8 index"):
        PartReader(copy)


def test_a_replaced_shard_is_rebuilt_not_reused(shards, tmp_path):
    """Former: a shard replaced at the same path (re-downloaded, fixed) kept its old part: the dataset held the
    old samples while claiming to be built from the new files."""
    import shutil

    three, _ = shards
    inputs = []
    for s in three:
        inputs.append(str(tmp_path / Path(s).name))
        shutil.copy(s, inputs[-1])
    prefix = str(tmp_path / "ds")
    build_indexed_dataset(inputs, prefix, cfg(), progress=False)
    other = write_shards(str(tmp_path / "other"), "train", 30, 30, seed=77, image_size=48)
    shutil.copy(other[0], inputs[1])  # same name, new content
    report = build_indexed_dataset(inputs, prefix, cfg(), progress=False)
    assert report["build"]["shards_reused"] == 2
    fresh = str(tmp_path / "fresh")
    build_indexed_dataset(inputs, fresh, cfg(), progress=False)
    assert read_files(prefix) == read_files(fresh)


def test_datasets_read_together_must_share_their_settings(built, shards, tmp_path):
    three, _ = shards
    build_indexed_dataset(three, str(tmp_path / "pix"), cfg(), storage="pixels", progress=False)
    with pytest.raises(DatasetMismatch, match="image_storage"):
        GenLIPIndexedDataset([str(built / "three"), str(tmp_path / "pix")], cfg().data)
    as_json = GenLIPIndexedDataset(str(built / "three") + ".json", cfg().data)  # the manifest's own name works too
    assert len(as_json) == 90
    pixels = GenLIPIndexedDataset(str(tmp_path / "pix"), cfg().data)
    assert pixels.fingerprint() != GenLIPIndexedDataset(str(built / "three"), cfg().data).fingerprint()


def test_lengths_files_are_checked(built, shards, tmp_path):
    import shutil

    _, one_shard = shards
    for f in built.glob("one*"):
        (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / f.name)
    np.save(tmp_path / "one.lengths.npy", np.zeros((89, 3), dtype=np.uint16))
    with pytest.raises(DatasetError, match=r"needs 90 x 3 uint16.*--finalize"):
        GenLIPIndexedDataset(str(tmp_path / "one"), cfg().data)
    (part,) = (tmp_path / "one.parts").glob("*.lengths.npy")
    np.save(part, np.zeros((5, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match="damaged; delete its .report.json"):
        finalize_dataset(one_shard, str(tmp_path / "one"), cfg())


def test_stage2_reads_use_the_stored_grid(tmp_path):
    """An image accepted under data.max_aspect_ratio=300 (beyond smart_resize's default 200) and draft-mode
    JPEG decoding both read back at the grid the build stored (the former reader recomputed it and failed)."""
    import io
    import json as _json

    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    shard = str(tmp_path / "s2-000000.tar")
    with wds.TarWriter(shard) as w:
        for i, (wd, ht) in enumerate([(2500, 10), (707, 1660), (300, 200)]):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (ht, wd, 3), dtype=np.uint8)).save(buf, format="JPEG")
            w.write({"__key__": f"k{i}", "jpg": buf.getvalue(), "json": _json.dumps({"caption": f"image {i}."}).encode()})
    c = cfg("data.stage=2", "data.max_sample_length=4096", "data.max_aspect_ratio=300")
    build_indexed_dataset([shard], str(tmp_path / "ds"), c, progress=False)
    for draft in (False, True):
        ds = GenLIPIndexedDataset(str(tmp_path / "ds"), c.data)
        for i in range(3):
            gh, gw, _ = ds.grid_and_text(i)
            assert ds[i].patches.shape[0] == gh * gw
            assert ds.image_patches(i, ds.raw(i)[2], (gh, gw), draft=draft).shape == (gh * gw, 3, 16, 16)


def test_slurm_array_environment_gives_the_shard_task(monkeypatch):
    from megatron_genlip.data.builder import shard_task_from_env

    for key in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(key, raising=False)
    assert shard_task_from_env() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    for task, first, step, want in (("3", "0", "1", (3, 4)), ("6", "0", "2", (3, 4)), ("9", "3", "2", (3, 4))):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", first)
        monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", step)
        assert shard_task_from_env() == want
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")  # not on the grid of min 3, step 2
    with pytest.raises(ValueError, match="--shard-index/--num-shards"):
        shard_task_from_env()


def test_small_blend_weights_get_a_longer_period():
    from megatron_genlip.data.packed_dataset import blend_period

    assert blend_period([1, 1]) == 1000
    sched = blend_schedule([1, 0.0004])
    assert len(sched) == blend_period([1, 0.0004]) and np.sum(sched == 1) >= 10
    with pytest.raises(ValueError, match="would get no rows"):
        blend_schedule([1, 1e-7])
