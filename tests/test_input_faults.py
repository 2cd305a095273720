"""Odd and hostile input to preprocessing: transparency, 16-bit and other PIL modes, flat images, extreme
aspect ratios, duplicate tar members and keys, repeated and gzipped shards. Each case names what the former
builder did wrong; the files are written here byte for byte."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset
from megatron_genlip.data.image_processing import to_rgb
from megatron_genlip.data.indexed import GenLIPIndexedDataset
from megatron_genlip.data.records import SkipSample, decode_record

TINY = Path(__file__).parent.parent / "examples/configs/tiny.yaml"
CAPTION = json.dumps({"caption": "a test image."}).encode()


def cfg(*overrides):
    return load_config(TINY, list(overrides))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scene_rgba(hidden=(0, 0, 0)) -> Image.Image:
    """A red opaque square on a fully transparent background whose hidden colour is ``hidden``."""
    arr = np.zeros((32, 32, 4), dtype=np.uint8)
    arr[..., :3] = hidden
    arr[8:24, 8:24] = (200, 30, 30, 255)
    return Image.fromarray(arr, "RGBA")


def decoded(data: bytes, ext: str = "png", *overrides) -> Image.Image:
    return decode_record({"__key__": "k", ext: data, "json": CAPTION}, cfg(*overrides).data).image


def test_transparency_is_composited_onto_the_background_not_dropped():
    """Former: RGBA -> RGB dropped alpha, so the transparent background became whatever colour it hid (black
    here, a random colour in real files)."""
    for hidden in ((0, 0, 0), (17, 99, 201)):
        img = decoded(encode(scene_rgba(hidden)))
        assert img.mode == "RGB"
        assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((16, 16)) == (200, 30, 30)
    grey = decoded(encode(scene_rgba()), "png", "data.background=[128, 128, 128]")
    assert grey.getpixel((0, 0)) == (128, 128, 128)
    half = Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 1), 128, np.uint8)]), "RGBA")
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)  # 50% black over white
    la = Image.fromarray(np.dstack([np.full((8, 8), 40, np.uint8), np.eye(8, dtype=np.uint8) * 255]), "LA")
    la_rgb = decoded(encode(la))
    assert la_rgb.getpixel((0, 0)) == (40, 40, 40) and la_rgb.getpixel((1, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0  # palette index 0 (black) is transparent
    p_rgb = decoded(encode(pal))
    assert p_rgb.getpixel((0, 0)) == (255, 255, 255) and p_rgb.getpixel((3, 3)) == (10, 200, 10)


def test_16_bit_grayscale_is_scaled_not_clipped():
    """Former: a 16-bit PNG came out 99.6% white (values above 255 clipped)."""
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    data = encode(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img = np.asarray(decoded(data))
    want = np.rint(ramp / 257).astype(np.uint8)
    assert np.array_equal(img[..., 0], want) and np.array_equal(img[..., 1], want)
    assert (img == 255).mean() < 0.01


@pytest.mark.parametrize("mode", ["1", "L", "CMYK", "YCbCr", "I"])
def test_other_modes_convert_to_the_same_picture(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    if mode == "I":
        src = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.int32) * 257), "I")
        want = np.asarray(rgb.convert("L").convert("RGB"))
    else:
        src = rgb.convert(mode)
        want = np.asarray(src.convert("RGB"))
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "TIFF" if mode == "I" else "PNG"
    data = encode(src, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    got = np.asarray(decoded(data, "jpg" if fmt == "JPEG" else "png"))
    if fmt == "JPEG":  # lossy: compare with PIL's decode of the same bytes
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert got.shape == (16, 16, 3) and np.array_equal(got, want)


def test_float_images_and_flat_images_are_skipped_with_a_reason():
    f = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "F")
    with pytest.raises(SkipSample) as e:
        decoded(encode(f, "TIFF"))
    assert e.value.reason == "unsupported_image_mode"
    clear = np.zeros((16, 16, 4), dtype=np.uint8)
    clear[..., :3] = np.random.default_rng(1).integers(0, 256, (16, 16, 3))  # all transparent: nothing to see
    for flat in (Image.fromarray(clear, "RGBA"), Image.new("RGB", (20, 20), (3, 4, 5))):
        with pytest.raises(SkipSample) as e:
            decoded(encode(flat))
        assert e.value.reason == "flat_image"


def test_extreme_aspect_ratios_are_skipped_in_both_stages():
    """Former: a 100000x10 image was squashed into 48x48 in stage 1 without a word."""
    strip = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (10, 100_000, 3), dtype=np.uint8)))
    for stage in ("data.stage=1", "data.stage=2"):
        with pytest.raises(SkipSample) as e:
            decoded(strip, "png", stage, "data.max_sample_length=4096")
        assert e.value.reason == "bad_aspect_ratio" and "data.max_aspect_ratio" in e.value.detail
    assert decoded(strip, "png", "data.max_aspect_ratio=20000").size == (100_000, 10)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def sample_members(i: int) -> list[tuple[str, bytes]]:
    img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    return [(f"s{i:04d}.png", encode(img)), (f"s{i:04d}.json", json.dumps({"caption": f"sample {i}."}).encode())]


def test_a_duplicate_member_skips_one_sample_and_the_shard_goes_on(tmp_path):
    """Former: webdataset stopped at the duplicate, losing the rest of the shard, reported as one skip."""
    members = [m for i in range(50) for m in sample_members(i)]
    members.insert(21, members[20])  # s0010.png twice
    shard = write_tar(tmp_path / "dup-000000.tar", members)
    report = build_indexed_dataset([shard], str(tmp_path / "ds"), cfg(), progress=False)
    assert report["samples_written"] == 49 and report["skipped_by_reason"] == {"duplicate_member": 1}
    (entry,) = report["skipped_samples"]
    assert entry["key"] == "s0010" and "s0010.png" in entry["detail"]


def test_duplicate_keys_are_reported_and_dropped_on_request(tmp_path):
    members = [m for i in (0, 1, 2, 1, 3) for m in sample_members(i)]  # key s0001 twice (not adjacent)
    shard = write_tar(tmp_path / "keys-000000.tar", members)
    kept = build_indexed_dataset([shard], str(tmp_path / "kept"), cfg(), progress=False)
    assert kept["samples_written"] == 5
    assert kept["duplicate_keys"] == {"count": 1, "examples": [f"{shard}:s0001"], "dropped": False}
    dropped = build_indexed_dataset([shard], str(tmp_path / "dropped"), cfg("data.drop_duplicate_keys=true"),
                                    progress=False)
    assert dropped["samples_written"] == 4 and dropped["skipped_by_reason"] == {"duplicate_key": 1}


def test_repeated_shards_are_read_once_and_gzipped_shards_are_found(tmp_path):
    """Former: the same shard given twice was built twice; a directory's *.tar.gz shards were ignored."""
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "a-000000.tar", [m for i in range(3) for m in sample_members(i)])
    plain = write_tar(tmp_path / "b.tar", [m for i in range(3, 5) for m in sample_members(i)])
    with open(plain, "rb") as src, gzip.open(d / "b-000001.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    report = build_indexed_dataset([str(d), str(d / "a-000000.tar"), str(d / ".." / "shards" / "a-000000.tar")],
                                   str(tmp_path / "ds"), cfg(), progress=False)
    assert report["shards"] == 2 and report["samples_written"] == 5
    assert len(report["repeated_inputs_ignored"]) == 2
    ds = GenLIPIndexedDataset(str(tmp_path / "ds"), cfg().data)
    assert [p.split("/")[-1] for p in ds.part_paths] == ["000000-a-000000", "000001-b-000001"]


def test_exported_image_processor_converts_every_mode_like_the_trainer():
    """The self-contained processor shipped in exported folders gives the trainer's pixels for every mode."""
    import torch

    from megatron_genlip.data.image_processing import process_image
    from megatron_genlip.hf.image_processing_genlip import GenLIPImageProcessor

    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    pal = rgb.convert("P")
    pal.info["transparency"] = 5
    zoo = [scene_rgba((9, 9, 9)).resize((56, 40)), rgb.convert("LA"), pal, rgb.convert("CMYK"), rgb.convert("L"),
           rgb.convert("1"), Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))]
    for background in ((255, 255, 255), (0, 64, 128)):
        for img in zoo:
            for stage in (1, 2):
                ours = GenLIPImageProcessor(stage=stage, image_size=48, background=background)([img])
                ref, _ = process_image(img, stage=stage, image_size=48, background=background)
                assert torch.equal(ours["pixel_values"], ref), (img.mode, background, stage)
