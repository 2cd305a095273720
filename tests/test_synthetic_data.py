"""The embedded synthetic shapes dataset: scenes, captions, shards, the default dataset and its CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from megatron_genlip.data import synthetic as syn

REPO = Path(__file__).resolve().parents[1]
BG_TOLERANCE = 60  # max per-channel difference from the background that still counts as background
CELL_OF_POSITION = {p: (r, c) for r, row in enumerate(syn.POSITIONS) for c, p in enumerate(row)}


def _scenes(n: int, seed: int = 0, image_size: int = 128):
    return [syn.make_scene(syn.sample_rng(seed, "test", i), image_size) for i in range(n)]


def _sha256_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _foreground(img: Image.Image, background: str) -> np.ndarray:
    """Boolean [H, W] mask of pixels that differ clearly from the background colour."""
    diff = np.abs(np.asarray(img, dtype=np.int32) - np.array(syn.BACKGROUNDS[background][0]))
    return diff.max(axis=-1) > BG_TOLERANCE


def _cell_pixels(cell: int, size: int) -> slice:
    """Pixel indices lying wholly inside grid band ``cell`` of an image of side ``size``."""
    return slice(math.ceil(cell * size / syn.GRID), math.floor((cell + 1) * size / syn.GRID))


# --------------------------------------------------------------------------------------------------
# scenes and captions


def test_scene_is_a_function_of_the_rng_only():
    (img_a, cap_a, meta_a), = _scenes(1, seed=5)
    (img_b, cap_b, meta_b), = _scenes(1, seed=5)
    assert cap_a == cap_b and meta_a == meta_b and img_a.tobytes() == img_b.tobytes()
    # Everything in the caption and image follows from the scene facts: no hidden draws in rendering.
    assert syn.describe_scene(meta_a) == cap_a
    assert syn.render_scene(meta_a, 128).tobytes() == img_a.tobytes()


@pytest.mark.parametrize("image_size", [64, 128])
def test_pixels_show_exactly_the_described_shapes_in_their_cells(image_size):
    for img, _, meta in _scenes(60, seed=1, image_size=image_size):
        assert img.mode == "RGB" and img.size == (image_size, image_size)
        fg = _foreground(img, meta["background"])
        described = {CELL_OF_POSITION[shape["position"]] for shape in meta["shapes"]}
        occupied = {(r, c) for r in range(syn.GRID) for c in range(syn.GRID)
                    if fg[_cell_pixels(r, image_size), _cell_pixels(c, image_size)].any()}
        assert occupied == described, meta
        assert len(described) == meta["count"] == len(meta["shapes"])  # one shape per cell: no overlap


@pytest.mark.parametrize("resize_to", [64, 224])
def test_shape_colours_survive_resizing(resize_to):
    for img, _, meta in _scenes(40, seed=2):
        small = np.asarray(img.resize((resize_to, resize_to), Image.BILINEAR), dtype=np.int32)
        for shape in meta["shapes"]:
            x, y = (int(v * resize_to) for v in shape["center"])
            assert np.abs(small[y, x] - np.array(syn.COLOURS[shape["colour"]])).max() <= 12, shape


def _expected_position(cx: float, cy: float) -> str:
    """Position words spelled out independently of the module's tables."""
    vertical = "top" if cy < 1 / 3 else "bottom" if cy >= 2 / 3 else ""
    horizontal = "left" if cx < 1 / 3 else "right" if cx >= 2 / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def test_position_words_follow_the_shape_centres():
    for _, _, meta in _scenes(100, seed=3):
        for shape in meta["shapes"]:
            cx, cy = shape["center"]
            assert shape["position"] == _expected_position(cx, cy)
            r, c = int(cy * syn.GRID), int(cx * syn.GRID)
            assert shape["position"] == syn.POSITIONS[r][c]
            half = shape["size"] / 2  # the whole shape lies inside its cell
            assert r / syn.GRID <= cy - half and cy + half <= (r + 1) / syn.GRID
            assert c / syn.GRID <= cx - half and cx + half <= (c + 1) / syn.GRID
        cells = [(int(s["center"][0] * syn.GRID), int(s["center"][1] * syn.GRID)) for s in meta["shapes"]]
        assert cells == sorted(cells)  # listed left to right, then top to bottom


def test_caption_states_count_colour_shape_and_position_in_order():
    counts = set()
    for _, caption, meta in _scenes(200, seed=4):
        counts.add(meta["count"])
        assert caption == caption.lower() and caption.endswith(".")
        assert 8 <= len(caption.split()) <= 30
        noun = "shape" if meta["count"] == 1 else "shapes"
        assert f"{syn.COUNT_WORDS[meta['count'] - 1]} {noun}" in caption
        assert meta["background"] in caption
        cursor = 0
        for shape in meta["shapes"]:
            phrase = re.compile(rf"\ban? {shape['colour']} {shape['shape']} (at|on|in) the {shape['position']}\b")
            match = phrase.search(caption, cursor)
            assert match is not None, (caption, shape)
            cursor = match.end()
        shape_words = [w for w in re.findall(r"[a-z]+", caption) if w in syn.SHAPES]
        assert len(shape_words) == meta["count"]
    assert counts == {1, 2, 3}


def test_background_picks_the_phrasing():
    frames: dict[str, set[str]] = {}
    for _, caption, meta in _scenes(200, seed=6):
        frame = caption.split(":")[0]
        frame = re.sub(r"\b(one|two|three)\b", "N", frame).replace("shapes", "shape").replace(" are ", " is ")
        frames.setdefault(meta["background"], set()).add(frame)
    assert set(frames) == set(syn.BACKGROUNDS)
    assert all(len(f) == 1 for f in frames.values()), frames  # one phrasing per background ...
    assert len({next(iter(f)) for f in frames.values()}) == len(syn.BACKGROUNDS)  # ... all different


def test_vocabulary_is_covered():
    facts = [s for _, _, meta in _scenes(300, seed=7) for s in meta["shapes"]]
    assert {s["shape"] for s in facts} == set(syn.SHAPES) and len(syn.SHAPES) >= 4
    assert {s["colour"] for s in facts} == set(syn.COLOURS) and len(syn.COLOURS) >= 6
    assert {s["position"] for s in facts} == {p for row in syn.POSITIONS for p in row}


def test_shape_kinds_are_distinct_at_64px():
    def mask(kind: str) -> np.ndarray:
        shape = {"shape": kind, "colour": "blue", "position": "center", "center": [0.5, 0.5],
                 "size": syn.SIZE_RANGE[0] / syn.GRID}  # the smallest shape the generator draws
        return _foreground(syn.render_scene({"background": "white", "count": 1, "shapes": [shape]}, 64), "white")

    masks = {kind: mask(kind) for kind in syn.SHAPES}
    assert all(m.sum() >= 80 for m in masks.values())
    for a, b in itertools.combinations(syn.SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.8, (a, b, iou)


def test_colours_and_backgrounds_are_distinct():
    rgb = list(syn.COLOURS.values())
    assert all(max(abs(x - y) for x, y in zip(p, q)) >= 60 for p, q in itertools.combinations(rgb, 2))
    for bg, _ in syn.BACKGROUNDS.values():
        assert all(max(abs(x - y) for x, y in zip(c, bg)) > BG_TOLERANCE for c in rgb)


# --------------------------------------------------------------------------------------------------
# shards


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_write_shards_is_byte_identical(tmp_path, image_format):
    args = dict(split="train", num_samples=9, samples_per_shard=4, seed=3, image_size=64, image_format=image_format)
    first = syn.write_shards(str(tmp_path / "a"), **args)
    second = syn.write_shards(str(tmp_path / "b"), **args)
    assert [os.path.basename(p) for p in first] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [os.path.basename(p) for p in second] == [os.path.basename(p) for p in first]
    assert _sha256_dir(tmp_path / "a") == _sha256_dir(tmp_path / "b")
    with tarfile.open(first[0]) as tar:
        members = tar.getmembers()
    assert {m.name for m in members[:2]} == {"train00000000.json", f"train00000000.{image_format}"}
    assert len(members) == 2 * 4
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, syn.TAR_USER, 0o444)}


def test_shards_read_back_with_webdataset(tmp_path):
    paths = syn.write_shards(str(tmp_path), "val", num_samples=7, samples_per_shard=3, seed=0, image_size=64)
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"val{i:08d}" for i in range(7)]
    assert [s["json"]["caption"] for s in samples] == list(syn.iter_captions("val", 7, seed=0))
    for s in samples:
        assert s["png"].size == (64, 64)
        assert s["png"].tobytes() == syn.make_scene(syn.sample_rng(0, "val", int(s["__key__"][3:])), 64)[0].tobytes()
    raw = next(iter(wds.WebDataset(paths[:1], shardshuffle=False)))
    assert Image.open(io.BytesIO(raw["png"])).mode == "RGB"  # stored as RGB, not palette or RGBA
    assert json.loads(raw["json"]) == {"caption": samples[0]["json"]["caption"]}


def test_seeds_and_splits_give_different_scenes(tmp_path):
    base = list(syn.iter_captions("train", 50, seed=0))
    for other in (list(syn.iter_captions("train", 50, seed=1)), list(syn.iter_captions("val", 50, seed=0))):
        assert sum(a == b for a, b in zip(base, other)) < 10
    train = syn.write_shards(str(tmp_path), "train", 4, 4, seed=0, image_size=32)
    val = syn.write_shards(str(tmp_path), "val", 4, 4, seed=0, image_size=32)
    images = [[s["png"] for s in wds.WebDataset(p, shardshuffle=False)] for p in (train, val)]
    assert not set(images[0]) & set(images[1])


def test_write_shards_replaces_stale_shards_and_rejects_bad_arguments(tmp_path):
    syn.write_shards(str(tmp_path), "train", 5, 2, seed=0, image_size=32)
    syn.write_shards(str(tmp_path), "val", 2, 2, seed=0, image_size=32)
    syn.write_shards(str(tmp_path), "train", 2, 2, seed=0, image_size=32)
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "val-000000.tar"]
    with pytest.raises(ValueError):
        syn.write_shards(str(tmp_path), "train", 2, 2, seed=0, image_format="gif")
    with pytest.raises(ValueError):
        syn.write_shards(str(tmp_path), "train", 0, 2, seed=0)


# --------------------------------------------------------------------------------------------------
# default dataset and CLI


def test_generate_default_dataset_writes_info_and_reuses(tmp_path):
    kwargs = dict(num_train=5, num_val=2, seed=0, samples_per_shard=3, image_size=32)
    info = syn.generate_default_dataset(str(tmp_path), **kwargs)
    assert info["reused"] is False
    assert info["splits"] == {"train": {"num_samples": 5, "shards": ["train-000000.tar", "train-000001.tar"]},
                              "val": {"num_samples": 2, "shards": ["val-000000.tar"]}}
    saved = syn.load_dataset_info(str(tmp_path))
    assert saved["params"]["generator_version"] == syn.GENERATOR_VERSION and saved["params"]["num_train"] == 5
    assert {k: v for k, v in info.items() if k not in ("out_dir", "reused")} == saved
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    assert syn.generate_default_dataset(str(tmp_path), **kwargs)["reused"] is True
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps

    (tmp_path / "val-000000.tar").unlink()  # an incomplete directory is regenerated
    assert syn.generate_default_dataset(str(tmp_path), **kwargs)["reused"] is False
    assert (tmp_path / "val-000000.tar").exists()

    smaller = syn.generate_default_dataset(str(tmp_path), **{**kwargs, "num_train": 2})
    assert smaller["reused"] is False
    assert sorted(os.listdir(tmp_path)) == ["dataset_info.json", "train-000000.tar", "val-000000.tar"]


def test_default_sizes_suit_a_cpu_demo():
    assert 1000 <= syn.DEFAULT_NUM_TRAIN <= 20000 and 50 <= syn.DEFAULT_NUM_VAL <= 1000
    assert syn.DEFAULT_NUM_TRAIN % syn.DEFAULT_SAMPLES_PER_SHARD == 0
    lengths = [len(c.split()) for c in syn.iter_captions("train", 500)]
    assert 8 <= min(lengths) and max(lengths) <= 30


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_synthetic_data", REPO / "tools" / "make_synthetic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_documents_every_flag(capsys):
    cli = _load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = ("--out-dir", "--num-train", "--num-val", "--seed", "--samples-per-shard", "--image-size",
             "--image-format")
    assert all(flag in text for flag in flags)
    assert text.count("(default:") == len(flags)  # every flag has a help line (the formatter appends defaults)


def test_cli_writes_and_reports(tmp_path, capsys):
    cli = _load_cli()
    argv = ["--out-dir", str(tmp_path), "--num-train", "3", "--num-val", "2", "--samples-per-shard", "2",
            "--image-size", "32", "--seed", "9"]
    cli.main(argv)
    out = capsys.readouterr().out
    assert "train: 3 samples in 2 shard(s)" in out and "val: 2 samples in 1 shard(s)" in out
    assert syn.load_dataset_info(str(tmp_path))["params"]["seed"] == 9
    cli.main(argv)
    assert "nothing written" in capsys.readouterr().out


def test_main_job_data_preparation_follows_changed_shards(tmp_path):
    """examples/pretrain_genlip.sh's preparation (training/prepare.py): an indexed dataset built from an older
    generation of the shards in the same folder is rebuilt, not trained on (it was reused as long as its manifest
    existed)."""
    from megatron_genlip.training.prepare import prepare_default_data

    def manifest(prefix: str) -> dict:
        return json.loads(Path(prefix + ".json").read_text())

    tiny = str(REPO / "examples" / "configs" / "tiny.yaml")
    first = prepare_default_data(tiny, str(tmp_path), workers=1, quiet=True, num_train=6, num_val=2)
    assert manifest(first["train"])["samples"] == 6
    again = prepare_default_data(tiny, str(tmp_path), workers=1, quiet=True, num_train=9, num_val=2)
    assert manifest(again["train"])["samples"] == 9 and manifest(again["val"])["samples"] == 2
