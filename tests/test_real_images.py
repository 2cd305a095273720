"""Build and pack a dataset from real photographs that scikit-image ships offline (no download)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from megatron_genlip.batch import normalize_pixels
from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset
from megatron_genlip.data.image_processing import process_image
from megatron_genlip.data.indexed import GenLIPIndexedDataset
from megatron_genlip.data.packed_dataset import PackedRows

skdata = pytest.importorskip("skimage.data", reason="scikit-image is in requirements.txt; install it")

# bundled images (no pooch download): name -> caption is the first line of its docstring
NAMES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "horse", "hubble_deep_field",
         "immunohistochemistry", "page", "text", "brick", "logo", "colorwheel", "clock", "cell", "microaneurysms"]
TINY = Path(__file__).parent.parent / "examples/configs/tiny.yaml"


def real_images():
    for name in NAMES:
        arr = getattr(skdata, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        caption = getattr(skdata, name).__doc__.strip().splitlines()[0]
        yield name, Image.fromarray(arr), caption


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("real") / "real-000000.tar")
    with wds.TarWriter(path) as w:
        for name, img, caption in real_images():
            buf = io.BytesIO()
            if img.mode == "RGB":
                img.save(buf, format="JPEG", quality=92)
                ext = "jpg"
            else:
                img.save(buf, format="PNG")  # grayscale, RGBA
                ext = "png"
            w.write({"__key__": name, ext: buf.getvalue(), "json": json.dumps({"caption": caption}).encode()})
    return path


@pytest.mark.parametrize("stage", [1, 2])
def test_real_photos_build_and_pack(tmp_path, shard, stage):
    cfg = load_config(TINY, [f"data.stage={stage}", "data.max_sample_length=2048", "data.seq_length=2048"])
    prefix = str(tmp_path / "real")
    report = build_indexed_dataset([shard], prefix, cfg, progress=False)
    assert report["samples_written"] == len(NAMES) and report["samples_skipped"] == 0
    ds = GenLIPIndexedDataset(prefix, cfg.data)
    raw = {k["__key__"]: k for k in wds.WebDataset([shard], shardshuffle=False).decode("pil")}
    for i, name in enumerate(NAMES):
        sample = ds[i]
        img = raw[name].get("jpg") or raw[name].get("png")
        patches, grid = process_image(img, stage=stage, image_size=cfg.data.image_size,
                                      min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
        assert sample.grid == grid
        assert torch.equal(normalize_pixels(sample.patches), patches)  # uint8 on the host, normalised on the device
        if stage == 2:
            assert 16 <= grid[0] * grid[1] <= 1024  # smart_resize's patch budget
        else:
            assert grid == (cfg.data.image_size // 16,) * 2
    if stage == 2:
        assert len({ds[i].grid for i in range(len(NAMES))}) >= 5  # native aspect ratios differ
    rows = PackedRows(ds, cfg.data.seq_length, seed=0, buffer_size=64)
    rows.ensure(log=lambda *_: None)
    seen = sorted(int(i) for r in range(rows.rows_in_epoch(0)) for i in rows.row_samples(r))
    assert seen == list(range(len(NAMES)))
    row = rows[0]
    assert row["patches"].shape[0] == int((row["token_kinds"] == 1).sum())
