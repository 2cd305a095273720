"""Embedded default dataset: captioned synthetic shape scenes written as webdataset tar shards.

Each scene is a plain background with one to three filled shapes. The image is split into a 3x3 grid of
cells; every shape lies entirely inside its own cell, so shapes never overlap and each shape's position word
(``top left`` ... ``bottom right``) follows from where its centre actually is. The caption states the count,
then every shape's colour, kind and position, listed left to right (then top to bottom). The background
colour, which is visible in the image, picks one of several caption templates, so every word of a caption
can be predicted from the pixels.

Randomness comes only from a per-sample ``random.Random`` seeded from ``(seed, split, index)``; a sample
does not depend on the shard layout, and different splits with the same base seed give different scenes.
Shards are byte-identical for the same arguments (fixed tar metadata, fixed encoder settings), given the
same Pillow/zlib/libjpeg builds.

Shard layout (as the stage-1 loader expects, GENLIP_SPEC.md §4.1): ``{split}-000000.tar``, ... with
samples ``{"__key__": "{split}{index:08d}", "png" | "jpg": bytes, "json": {"caption": ...}}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator

from PIL import Image, ImageDraw
from webdataset import TarWriter

GENERATOR_VERSION = 1  # bump whenever the bytes produced for the same arguments change

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "purple": (150, 60, 190),
}
# Background name -> (RGB, caption template). The background picks the phrasing.
BACKGROUNDS = {
    "white": ((245, 245, 245), "there {verb} {count} on a white background: {items}."),
    "light gray": ((185, 185, 185), "a light gray picture with {count}: {items}."),
    "dark gray": ((70, 70, 70), "{count} against a dark gray background: {items}."),
    "black": ((15, 15, 15), "{count} on black, from left to right: {items}."),
}
COUNT_WORDS = ("one", "two", "three")
MAX_SHAPES = len(COUNT_WORDS)
GRID = 3  # the image is a GRID x GRID array of cells, at most one shape per cell
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
PREPOSITIONS = {"center": "in the", "left": "on the", "right": "on the"}  # all other positions: "at the"
SIZE_RANGE = (0.70, 0.90)  # shape size as a fraction of the cell side (>= 15 px at 64 px per image)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased, deterministic edges
STAR_INNER_RATIO = 0.45
CROSS_ARM_RATIO = 0.36

# 16,000 training scenes: with 4,000 the main job's tiny model overfit (train loss 0.012 vs validation 0.072 after
# 18 epochs; 73% exact held-out captions), with 16,000 it does not (0.020 vs 0.022 after 4.5 epochs; 88%)
DEFAULT_NUM_TRAIN = 16000
DEFAULT_NUM_VAL = 200
DEFAULT_SAMPLES_PER_SHARD = 500
DEFAULT_IMAGE_SIZE = 64  # the tiny config reads 48 px (3x3 patches of 16): 64 px is enough and 3x cheaper to draw
DEFAULT_IMAGE_FORMAT = "png"
INFO_FILE = "dataset_info.json"
TAR_MTIME = 0  # fixed tar header fields make shards byte-reproducible
TAR_USER = "genlip"
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 6


# --------------------------------------------------------------------------------------------------
# scenes


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of sample ``index`` of ``split``: a stable hash of (seed, split, index)."""
    digest = hashlib.sha256(f"genlip-synthetic/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def position_of(cx: float, cy: float) -> str:
    """Position word of a point in normalised [0, 1) image coordinates (thirds of the image)."""
    row = min(int(cy * GRID), GRID - 1)
    col = min(int(cx * GRID), GRID - 1)
    return POSITIONS[row][col]


def _sample_shape(rng: random.Random, cell: int) -> dict:
    """One shape inside grid cell ``cell`` (row-major), in normalised coordinates."""
    cell_side = 1.0 / GRID
    size = rng.uniform(*SIZE_RANGE) * cell_side
    slack = (cell_side - size) / 2
    row, col = divmod(cell, GRID)
    cx = (col + 0.5) * cell_side + rng.uniform(-slack, slack)
    cy = (row + 0.5) * cell_side + rng.uniform(-slack, slack)
    return {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(list(COLOURS)),
        "position": position_of(cx, cy),
        "center": [cx, cy],
        "size": size,
    }


def sample_scene(rng: random.Random) -> dict:
    """Scene facts: background and 1-3 shapes sorted left to right, then top to bottom.

    ``{"background": name, "count": n, "shapes": [{"shape", "colour", "position", "center": [x, y],
    "size"}, ...]}``. Coordinates and sizes are normalised to [0, 1] so the same scene renders at any
    resolution; ``size`` is the side of the shape's square bounding box.
    """
    background = rng.choice(list(BACKGROUNDS))
    count = rng.randint(1, MAX_SHAPES)
    cells = rng.sample(range(GRID * GRID), count)
    shapes = [_sample_shape(rng, cell) for cell in cells]
    shapes.sort(key=lambda s: (int(s["center"][0] * GRID), int(s["center"][1] * GRID)))
    return {"background": background, "count": count, "shapes": shapes}


def _shape_item(shape: dict) -> str:
    """'a red circle at the top left', 'an orange star in the center'."""
    colour, position = shape["colour"], shape["position"]
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape['shape']} {PREPOSITIONS.get(position, 'at the')} {position}"


def _join_items(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe_scene(scene: dict) -> str:
    """The caption of a scene: count, then each shape's colour, kind and position, in scene order."""
    count = scene["count"]
    template = BACKGROUNDS[scene["background"]][1]
    return template.format(
        verb="is" if count == 1 else "are",
        count=f"{COUNT_WORDS[count - 1]} shape{'' if count == 1 else 's'}",
        items=_join_items([_shape_item(s) for s in scene["shapes"]]),
    )


def shape_points(kind: str, cx: float, cy: float, size: float) -> list[tuple[float, float]]:
    """Polygon vertices of a polygonal shape kind centred at (cx, cy) inside a ``size`` x ``size`` box."""
    r = size / 2
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if kind == "star":
        radii = [r if i % 2 == 0 else r * STAR_INNER_RATIO for i in range(10)]
        angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
        return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in zip(radii, angles)]
    if kind == "cross":
        a = r * CROSS_ARM_RATIO
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown polygonal shape {kind!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: dict, canvas: int) -> None:
    """Fill one shape on a ``canvas`` x ``canvas`` drawing."""
    cx, cy = (c * canvas for c in shape["center"])
    size = shape["size"] * canvas
    fill = COLOURS[shape["colour"]]
    if shape["shape"] == "circle":
        draw.ellipse((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), fill=fill)
    else:
        draw.polygon(shape_points(shape["shape"], cx, cy, size), fill=fill)


def render_scene(scene: dict, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Draw a scene as an ``image_size`` x ``image_size`` RGB image (anti-aliased by supersampling)."""
    canvas = image_size * SUPERSAMPLE
    img = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene["background"]][0])
    draw = ImageDraw.Draw(img)
    for shape in scene["shapes"]:
        _draw_shape(draw, shape, canvas)
    return img.reduce(SUPERSAMPLE)


def make_scene(rng: random.Random, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[Image.Image, str, dict]:
    """A random scene: (RGB image, caption, scene facts). Consumes randomness only from ``rng``."""
    scene = sample_scene(rng)
    return render_scene(scene, image_size), describe_scene(scene), scene


# --------------------------------------------------------------------------------------------------
# shards


def encode_image(img: Image.Image, image_format: str) -> bytes:
    """PNG or JPEG bytes with fixed encoder settings (no timestamps or other varying metadata)."""
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif image_format == "jpg":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    return buf.getvalue()


def _encode_sample(split: str, index: int, seed: int, image_size: int, image_format: str) -> dict:
    """One webdataset sample dict with already-encoded byte values."""
    img, caption, _ = make_scene(sample_rng(seed, split, index), image_size)
    return {
        "__key__": f"{split}{index:08d}",
        image_format: encode_image(img, image_format),
        "json": json.dumps({"caption": caption}, sort_keys=True).encode("utf-8"),
    }


def shard_name(split: str, shard: int) -> str:
    """File name of shard number ``shard`` of ``split``."""
    return f"{split}-{shard:06d}.tar"


def _write_shard(path: str, samples: Iterator[dict]) -> None:
    """Write one tar shard with fixed header fields, atomically (temp file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as stream:
        with TarWriter(stream, user=TAR_USER, group=TAR_USER, encoder=False, mtime=TAR_MTIME) as writer:
            for sample in samples:
                writer.write(sample)
    os.replace(tmp, path)


def _remove_stale_shards(out_dir: str, split: str, keep: list[str]) -> None:
    """Delete ``{split}-NNNNNN.tar`` files in ``out_dir`` left over from an earlier, larger run."""
    pattern = re.compile(re.escape(split) + r"-\d{6}\.tar")
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if pattern.fullmatch(name) and path not in keep:
            os.remove(path)


def _with_progress(samples: Iterator[dict], progress: Callable[[int], object] | None) -> Iterator[dict]:
    """Pass samples through, reporting each one to ``progress``."""
    for sample in samples:
        yield sample
        if progress is not None:
            progress(1)


def write_shards(out_dir: str, split: str, num_samples: int, samples_per_shard: int, seed: int,
                 image_size: int = DEFAULT_IMAGE_SIZE, image_format: str = DEFAULT_IMAGE_FORMAT,
                 progress: Callable[[int], object] | None = None) -> list[str]:
    """Write ``num_samples`` scenes of ``split`` as ``out_dir/{split}-000000.tar``, ... and return their paths.

    Other ``{split}-NNNNNN.tar`` files already in ``out_dir`` are deleted so that a glob over the directory
    sees exactly this split. ``progress``, if given, is called with 1 after every sample.
    """
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError("num_samples and samples_per_shard must be positive")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        path = os.path.join(out_dir, shard_name(split, shard))
        indices = range(start, min(start + samples_per_shard, num_samples))
        _write_shard(path, _with_progress(
            (_encode_sample(split, i, seed, image_size, image_format) for i in indices), progress))
        paths.append(path)
    _remove_stale_shards(out_dir, split, paths)
    return paths


# --------------------------------------------------------------------------------------------------
# the default dataset


def load_dataset_info(out_dir: str) -> dict | None:
    """The ``dataset_info.json`` of a generated dataset directory, or None if there is none."""
    path = os.path.join(out_dir, INFO_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_complete(out_dir: str, info: dict | None, params: dict) -> bool:
    """Whether ``out_dir`` already holds a dataset made with ``params`` and all of its shards."""
    if info is None or info.get("params") != params:
        return False
    names = [name for split in info["splits"].values() for name in split["shards"]]
    return all(os.path.isfile(os.path.join(out_dir, name)) for name in names)


def generate_default_dataset(out_dir: str, num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                             seed: int = 0, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                             image_size: int = DEFAULT_IMAGE_SIZE, image_format: str = DEFAULT_IMAGE_FORMAT,
                             progress: Callable[[int], object] | None = None) -> dict:
    """Write the ``train`` and held-out ``val`` splits plus ``dataset_info.json`` into ``out_dir``.

    Does nothing if ``dataset_info.json`` records the same parameters and all its shards exist. Returns the
    info dict (shard names relative to ``out_dir``) with two extra keys that are not saved: ``out_dir`` and
    ``reused`` (True when nothing was written).
    """
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
              "samples_per_shard": samples_per_shard, "image_size": image_size, "image_format": image_format}
    info = load_dataset_info(out_dir)
    reused = _is_complete(out_dir, info, params)
    if not reused:
        info_path = os.path.join(out_dir, INFO_FILE)
        if os.path.exists(info_path):
            os.remove(info_path)  # an interrupted run must not look complete
        splits = {}
        for split, count in (("train", num_train), ("val", num_val)):
            paths = write_shards(out_dir, split, count, samples_per_shard, seed, image_size, image_format, progress)
            splits[split] = {"num_samples": count, "shards": [os.path.basename(p) for p in paths]}
        info = {"params": params, "splits": splits}
        with open(info_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(info_path + ".tmp", info_path)
    return {**info, "out_dir": out_dir, "reused": reused}


def iter_captions(split: str = "train", num_samples: int = DEFAULT_NUM_TRAIN, seed: int = 0) -> Iterator[str]:
    """The captions of ``split`` in sample order, as written by ``write_shards`` with the same seed.

    Renders no images and reads no files (captions do not depend on image size or format).
    """
    for index in range(num_samples):
        yield describe_scene(sample_scene(sample_rng(seed, split, index)))


# --------------------------------------------------------------------------------------------------
# labelled classification split (the main job's probes and zero-shot evaluation)

LABELLED_INFO = "labelled_info.json"
LABELLED_VERSION = 3  # bump whenever the labelled scenes change (2: random position and background; 3: 300 per class)


def probe_scene(index: int, seed: int = 0, split: str = "probe-train") -> dict:
    """A single-shape scene for classification: shape kind ``SHAPES[index % 6]`` and colour
    ``COLOURS[(index // 6) % 6]`` (so both labels are balanced over every 36 images), in a random cell on a random
    background, with a random size and offset. (On one fixed background in the centre cell a linear probe of a
    randomly initialised tiny model already reads the shape kind at 94%: nothing left to show; with position and
    background varying, 37-57% depending on the probe's training images, against 55-85% after the main job.)"""
    rng = sample_rng(seed, split, index)
    background = rng.choice(list(BACKGROUNDS))
    shape = _sample_shape(rng, rng.randrange(GRID * GRID))
    shape["shape"] = SHAPES[index % len(SHAPES)]
    shape["colour"] = list(COLOURS)[(index // len(SHAPES)) % len(COLOURS)]
    return {"background": background, "count": 1, "shapes": [shape]}


def zero_shot_templates() -> list[str]:
    """The beginning of a probe scene's caption, up to its shape kind (``{}``), once per background and colour
    (neither is the label: the zero-shot score averages over them; the position that follows is left out)."""
    out = []
    for background in BACKGROUNDS:
        for colour in COLOURS:
            caption = describe_scene({"background": background, "count": 1,
                                      "shapes": [{"colour": colour, "shape": "{}", "position": "center"}]})
            out.append(caption[:caption.index("{}") + 2])
    return out


def write_labelled_split(out_dir: str, train_per_class: int = 300, val_per_class: int = 48, seed: int = 0,
                         image_size: int = DEFAULT_IMAGE_SIZE) -> dict:
    """Two ImageFolder trees of the same single-shape images: ``out_dir/shapes/{train,val}/<shape>/`` (6 classes)
    and ``out_dir/colours/{train,val}/<colour>/`` (the colour as a second label). Idempotent: nothing is written
    when ``out_dir/labelled_info.json`` records the same parameters."""
    params = {"generator_version": GENERATOR_VERSION, "labelled_version": LABELLED_VERSION, "seed": seed,
              "train_per_class": train_per_class,
              "val_per_class": val_per_class, "image_size": image_size}
    info_path = os.path.join(out_dir, LABELLED_INFO)
    try:
        with open(info_path, encoding="utf-8") as f:
            if json.load(f).get("params") == params:
                return {"params": params, "reused": True}
    except (OSError, ValueError):
        pass
    if os.path.exists(info_path):
        os.remove(info_path)  # an interrupted run must not look complete
    counts = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        n = per_class * len(SHAPES)
        n += (-n) % (len(SHAPES) * len(COLOURS))  # whole cycles of 36: both labels balanced
        for index in range(n):
            scene = probe_scene(index, seed, f"probe-{split}")
            data = encode_image(render_scene(scene, image_size), "png")
            shape = scene["shapes"][0]
            for label, name in (("shapes", shape["shape"]), ("colours", shape["colour"])):
                folder = os.path.join(out_dir, label, split, name)
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, f"{split}{index:06d}.png"), "wb") as f:
                    f.write(data)
        counts[split] = n
    with open(info_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"params": params, "images": counts}, f, indent=2, sort_keys=True)
    os.replace(info_path + ".tmp", info_path)
    return {"params": params, "images": counts, "reused": False}
