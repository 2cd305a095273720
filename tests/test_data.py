"""Indexed dataset builder, bad input, packing and sampling (issue: data)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset
from megatron_genlip.data.tokenizer import tokenizer_fingerprint
from megatron_genlip.data.indexed import DatasetMismatch, GenLIPIndexedDataset
from megatron_genlip.data.packed_dataset import MicroBatchSampler, PackedRows, build_loader
from megatron_genlip.data.synthetic import write_shards

from data_harness import read_files

ROOT = Path(__file__).parent.parent
TINY = ROOT / "examples/configs/tiny.yaml"


def tiny_cfg(*overrides):
    return load_config(TINY, list(overrides))


def scene(size: tuple[int, int], colour=(200, 10, 10)) -> Image.Image:
    """An image with content: ``colour`` with a white block (one flat colour is skipped as flat_image)."""
    img = Image.new("RGB", size, colour)
    img.paste((255, 255, 255), (0, 0, max(1, size[0] // 3), max(1, size[1] // 3)))
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return write_shards(str(d), "train", num_samples=120, samples_per_shard=30, seed=3, image_size=64)


def build(tmp, shards, name, workers=1, cfg=None, **kw):
    prefix = str(tmp / name)
    report = build_indexed_dataset(shards, prefix, cfg or tiny_cfg(), workers=workers, progress=False, **kw)
    return prefix, report


@pytest.mark.slow
def test_build_is_identical_for_1_and_4_workers(tmp_path, shards):
    p1, r1 = build(tmp_path, shards, "one", workers=1)
    p4, r4 = build(tmp_path, shards, "four", workers=4)
    assert r1["samples_written"] == r4["samples_written"] == 120
    assert read_files(p1) == read_files(p4)
    ds = GenLIPIndexedDataset(p1, tiny_cfg().data)
    assert len(ds) == 120 and ds.meta["samples"] == 120


def test_stored_sample_equals_direct_processing(tmp_path, shards):
    """A sample read back from the .bin equals the sample built straight from the shard."""
    from megatron_genlip.batch import normalize_pixels
    from megatron_genlip.data.image_processing import process_image
    from megatron_genlip.data.sample import build_sample
    from megatron_genlip.data.tokenizer import load_tokenizer

    cfg = tiny_cfg()
    prefix, _ = build(tmp_path, shards[:1], "ds")
    first = next(iter(wds.WebDataset(shards[:1], shardshuffle=False).decode("pil")))
    patches, grid = process_image(first["png"], stage=1, image_size=cfg.data.image_size)
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    want = build_sample(tok, patches, grid, first["json"]["caption"], cfg.tokenizer.prompt)
    for storage in ("encoded", "pixels"):
        p, _ = build(tmp_path, shards[:1], f"ds-{storage}", storage=storage)
        got = GenLIPIndexedDataset(p, cfg.data)[0]
        for field in ("input_ids", "labels", "positions", "token_kinds"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        assert torch.equal(normalize_pixels(got.patches), want.patches)  # bit-identical after on-device normalisation
    assert prefix


@pytest.mark.slow
def test_killed_build_resumes_to_identical_files(tmp_path):
    shards = write_shards(str(tmp_path / "many"), "train", num_samples=600, samples_per_shard=25, seed=5,
                          image_size=64)
    reference, _ = build(tmp_path, shards, "ref")
    prefix = str(tmp_path / "killed")
    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--config", str(TINY), "--input", *shards,
           "--output-prefix", prefix, "--workers", "1", "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = Path(prefix + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.report.json"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.report.json")))
    assert 2 <= done < len(shards), "the build should have been killed half-way"
    assert not Path(prefix + ".json").exists()  # no manifest before every part is committed
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert f"({done} reused)" in out.stdout
    assert read_files(prefix) == read_files(reference)
    assert not list(parts.glob("*.tmp-*"))  # the killed builder's half-written part was cleaned up


def bad_shard(path: str) -> dict[str, str]:
    """A shard with one good sample and every kind of bad one; returns key -> expected reason."""
    good = scene((40, 30))
    good_png = png(good)
    expected = {}
    with wds.TarWriter(path) as w:
        w.write({"__key__": "good0", "png": good_png, "json": json.dumps({"caption": "a red image."}).encode()})
        w.write({"__key__": "trunc", "jpg": jpeg(good)[:200], "json": b'{"caption": "x"}'})
        expected["trunc"] = "undecodable_image"
        w.write({"__key__": "garbage", "jpg": b"this is not a jpeg at all", "json": b'{"caption": "x"}'})
        expected["garbage"] = "undecodable_image"
        w.write({"__key__": "onebyone", "png": png(Image.new("RGB", (1, 1))), "json": b'{"caption": "dot"}'})
        expected["onebyone"] = "too_small_image"
        w.write({"__key__": "empty", "png": good_png, "json": b'{"caption": "   "}'})
        expected["empty"] = "empty_caption"
        w.write({"__key__": "numeric", "png": good_png, "json": b'{"caption": 12345}'})
        expected["numeric"] = "non_text_caption"
        w.write({"__key__": "binarytxt", "png": good_png, "txt": b"\xff\xfe\xfa"})
        expected["binarytxt"] = "non_text_caption"
        w.write({"__key__": "noimage", "json": b'{"caption": "no image here"}'})
        expected["noimage"] = "missing_image"
        w.write({"__key__": "nocaption", "png": good_png, "json": b'{"url": "http://x"}'})
        expected["nocaption"] = "missing_caption"
        w.write({"__key__": "badjson", "png": good_png, "json": b'{"caption": '})
        expected["badjson"] = "bad_json"
        w.write({"__key__": "toolong", "png": good_png, "json": json.dumps({"caption": "red " * 400}).encode()})
        expected["toolong"] = "too_long"
        w.write({"__key__": "conv", "png": good_png, "json": json.dumps({"conversations": [
            {"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A red image."}]}).encode()})
        w.write({"__key__": "txtcap", "png": good_png, "txt": b"a red image, plain text caption."})
    return expected


def test_every_bad_input_is_skipped_and_counted(tmp_path):
    shard = str(tmp_path / "bad-000000.tar")
    expected = bad_shard(shard)
    prefix, report = build(tmp_path, [shard], "bad")
    assert report["samples_written"] == 3  # good0, conv, txtcap
    got = {s["key"]: s["reason"] for s in report["skipped_samples"]}
    assert got == expected
    assert all(s["shard"] == shard for s in report["skipped_samples"])
    assert report["skipped_by_reason"]["undecodable_image"] == 2
    ds = GenLIPIndexedDataset(prefix, tiny_cfg().data)
    g = tiny_cfg().data.image_size // 16
    assert [ds[i].grid for i in range(3)] == [(g, g)] * 3  # nothing half-written
    # the conversation sample: user turn without loss, assistant turn with loss
    from megatron_genlip.data.tokenizer import load_tokenizer

    tok = load_tokenizer("bpe", "tiny_bpe.tiktoken")
    conv = ds[1]
    labelled = conv.input_ids[conv.labels != -100].tolist()
    assert labelled == tok.encode("A red image.") + [tok.eos_id, tok.newline_id]
    assert tok.decode(conv.input_ids[g * g:][conv.labels[g * g:] == -100].tolist()) == "What is it?"


def test_aspect_ratio_rejected_in_stage2_and_truncated_shard(tmp_path):
    shard = str(tmp_path / "s2-000000.tar")
    with wds.TarWriter(shard) as w:
        w.write({"__key__": "wide", "png": png(scene((4020, 20))), "json": b'{"caption": "a line."}'})
        w.write({"__key__": "ok", "png": png(scene((300, 200))), "json": b'{"caption": "a box."}'})
    broken = str(tmp_path / "s2-000001.tar")
    import tarfile

    with tarfile.open(shard) as tf:
        last = tf.getmembers()[-1]
    Path(broken).write_bytes(Path(shard).read_bytes()[: last.offset_data + last.size // 2])  # cut mid-member
    cfg = tiny_cfg("data.stage=2", "data.max_sample_length=4096")
    _, report = build(tmp_path, [shard, broken], "s2", cfg=cfg)
    reasons = [(Path(s["shard"]).name, s["key"], s["reason"]) for s in report["skipped_samples"]]
    assert ("s2-000000.tar", "wide", "bad_aspect_ratio") in reasons
    assert ("s2-000001.tar", "wide", "bad_aspect_ratio") in reasons
    assert ("s2-000001.tar", None, "broken_shard") in reasons
    assert report["samples_written"] == 1


@pytest.mark.slow
def test_missing_input_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--config", str(TINY),
                           "--input", str(tmp_path / "nope-*.tar"), "--output-prefix", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "matches no file" in proc.stderr
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_indexed_dataset([str(tmp_path / "missing.tar")], str(tmp_path / "y"), tiny_cfg(), progress=False)


def test_config_mismatch_is_detected(tmp_path, shards):
    prefix, _ = build(tmp_path, shards[:1], "ds")
    with pytest.raises(DatasetMismatch, match="image_size"):
        GenLIPIndexedDataset(prefix, tiny_cfg("data.image_size=32").data)
    with pytest.raises(DatasetMismatch, match="tokenizer_fingerprint"):
        GenLIPIndexedDataset(prefix, tiny_cfg().data, tokenizer_fingerprint("qwen", None))


@pytest.fixture(scope="module")
def packed(tmp_path_factory, shards):
    tmp = tmp_path_factory.mktemp("packed")
    prefix, _ = build(tmp, shards, "train")
    cfg = tiny_cfg()
    rows = PackedRows(GenLIPIndexedDataset(prefix, cfg.data), cfg.data.seq_length, seed=7, buffer_size=64)
    rows.ensure(epochs=2, log=lambda *_: None)
    return rows


def test_rows_hold_whole_samples_and_cache_is_reused(packed):
    rows = [packed.row_samples(r) for r in range(packed.rows_in_epoch(0))]
    assert sorted(np.concatenate(rows).tolist()) == list(range(120))
    row = packed[0]
    n = len(rows[0])
    assert int(row["sample_ids"].max()) == n - 1
    for s in range(n):  # each sample contiguous, its image first, its text positions from max(gh, gw)
        idx = (row["sample_ids"] == s).nonzero().flatten()
        assert torch.equal(idx, torch.arange(idx[0], idx[-1] + 1))
        kinds = row["token_kinds"][idx]
        g = packed.dataset.cfg.image_size // 16
        assert (kinds[: g * g] == 1).all() and (kinds[g * g:] == 0).all()
        assert row["positions"][:, idx[g * g]].tolist() == [g, g, g]
    assert sorted(p.name for p in packed.cache_dir.glob("epoch0000.*")) == [
        "epoch0000.json", "epoch0000.lock", "epoch0000.order.npy", "epoch0000.rows.npy", "epoch0000.verified"]
    again = PackedRows(packed.dataset, packed.seq_length, 7, 64)  # reads the index built by the fixture
    assert np.array_equal(again.row_samples(3), packed.row_samples(3))
    # the next epoch is a different packing of the same samples
    e1 = [packed.row_samples(packed.rows_in_epoch(0) + r) for r in range(packed.rows_in_epoch(1))]
    assert sorted(np.concatenate(e1).tolist()) == list(range(120))
    assert not all(np.array_equal(a, b) for a, b in zip(rows, e1))


def test_dp_ranks_get_disjoint_rows_covering_the_epoch(packed):
    n = packed.rows_in_epoch(0)
    m, world = 2, 2
    seen = {r: [] for r in range(world)}
    for r in range(world):
        for b, batch in zip(range(n // (m * world)), MicroBatchSampler(0, m, r, world)):
            seen[r] += batch
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range((n // (m * world)) * m * world))


def test_resume_at_consumed_samples_gives_the_same_rows(packed):
    full = [b for _, b in zip(range(6), build_loader(packed, 0, 2, 1, 2))]
    resumed = [b for _, b in zip(range(3), build_loader(packed, 3 * 2 * 2, 2, 1, 2, num_workers=2))]
    for a, b in zip(full[3:], resumed):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_rows_with_mixed_image_sizes(tmp_path):
    shard = str(tmp_path / "mixed-000000.tar")
    sizes = [(320, 160), (64, 64), (100, 700), (500, 250)]
    with wds.TarWriter(shard) as w:
        for i, (wd, ht) in enumerate(sizes):
            w.write({"__key__": f"m{i}", "jpg": jpeg(scene((wd, ht), (i * 40, 90, 10))),
                     "json": json.dumps({"caption": f"image number {i}."}).encode()})
    cfg = tiny_cfg("data.stage=2", "data.max_sample_length=2048", "data.seq_length=2048")
    prefix, _ = build(tmp_path, [shard], "mixed", cfg=cfg)
    ds = GenLIPIndexedDataset(prefix, cfg.data)
    rows = PackedRows(ds, 2048, seed=0, buffer_size=16)
    rows.ensure(log=lambda *_: None)
    grids = {}
    for r in range(rows.rows_in_epoch(0)):
        row, ids = rows[r], rows.row_samples(r)
        for s, sample_index in enumerate(ids):
            gh, gw, _ = ds.grid_and_text(int(sample_index))
            grids[int(sample_index)] = (int(gh), int(gw))
            pos = row["positions"][:, row["sample_ids"] == s]
            n = gh * gw
            rr, cc = np.divmod(np.arange(n), gw)
            assert pos[0, :n].eq(0).all() and pos[1, :n].tolist() == rr.tolist() and pos[2, :n].tolist() == cc.tolist()
            text = pos[:, n:]
            start = max(gh, gw)
            assert torch.equal(text, torch.arange(start, start + text.shape[1]).expand(3, -1))
    assert len(set(grids.values())) == 4  # four different grids
    assert grids[2] == (44, 6)  # 100x700 -> smart_resize (704, 96)

