"""Evaluation data in the formats people have: labelled images and captioned images.

Labelled images (the probes, zero-shot, the patch readout):

* an **ImageFolder** tree ``ROOT/<split>/<class>/*.jpg`` (splits ``train`` and ``val`` by default). The classes are
  the sub-folders of the training split, sorted; their readable names come from ``ROOT/classnames.txt`` when it
  exists (one name per line in sorted-folder order, or ``folder<TAB>name`` lines), else from the folder names
  (``_`` read as a space);
* **webdataset shards** with a class member: ``ROOT/<split>/*.tar`` or ``ROOT/<split>-*.tar`` (or an explicit glob /
  brace pattern), each sample an image (jpg/jpeg/png/webp/bmp) plus ``cls`` (an integer) or a ``json`` whose key
  ``class_key`` holds an integer or a class name, with the class names in ``ROOT/classnames.txt`` (or the file the
  ``classnames`` option names).

Captioned images (captioning): our indexed datasets (``GenLIPIndexedDataset``: a prefix, glob or .txt list) or
captioned webdataset shards (image + ``json`` ``{"caption": ...}`` or ``txt``).

Images are preprocessed like training stage 1 (``data.image_processing``: RGB, bilinear resize to
``image_size`` x ``image_size``, patches, uint8). Bad input is a clear :class:`EvalDataError` naming the path (empty
folder, a validation class absent from training, a class without images); an unreadable image is skipped and
counted, never a traceback.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megatron_genlip.data.image_processing import ImageError, image_to_patches

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


class EvalDataError(ValueError):
    """Evaluation data that cannot be used; the message names the path."""


@dataclass
class Preprocess:
    """Stage-1 preprocessing settings."""

    image_size: int = 224
    patch_size: int = 16
    background: tuple = (255, 255, 255)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    def patches(self, data: bytes, where: str) -> np.ndarray | None:
        """Encoded image -> uint8 patches [N, 3, p, p]; None when the image cannot be read (counted by callers)."""
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            patches, _ = image_to_patches(img, stage=1, image_size=self.image_size, patch_size=self.patch_size,
                                          background=tuple(self.background))
            return patches
        except (OSError, SyntaxError, ValueError, ImageError, Image.DecompressionBombError):
            return None


# ------------------------------------------------------------------------------------------------------
# labelled images


@dataclass
class LabelledImages:
    """One split: where each image's bytes are, its label, and the class names (shared by the splits)."""

    root: str
    split: str
    classnames: list[str]
    sources: list  # str path, or (tar path, offset, size)
    labels: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.sources)

    def describe(self, i: int) -> str:
        s = self.sources[i]
        return s if isinstance(s, str) else f"{s[0]} (member at byte {s[1]})"

    def read(self, i: int) -> bytes:
        s = self.sources[i]
        if isinstance(s, str):
            return Path(s).read_bytes()
        with open(s[0], "rb") as f:
            f.seek(s[1])
            return f.read(s[2])

    def patches(self, i: int, pre: Preprocess, cache: bool = True) -> np.ndarray | None:
        """uint8 patches of image i (None: unreadable), kept in memory after the first read when ``cache``."""
        key = (i, pre.image_size, pre.patch_size)
        if key in self._cache:
            return self._cache[key]
        try:
            data = self.read(i)
        except OSError:
            data = b""
        out = pre.patches(data, self.describe(i))
        if cache:
            self._cache[key] = out
        return out


def _read_classnames(path: Path, folders: list[str] | None) -> list[str]:
    lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if folders is None:
        return [ln.strip() for ln in lines]
    if all("\t" in ln for ln in lines):
        table = dict(ln.split("\t", 1) for ln in lines)
        missing = [f for f in folders if f not in table]
        if missing:
            raise EvalDataError(f"{path}: no name for class folder(s) {missing[:5]}")
        return [table[f].strip() for f in folders]
    if len(lines) != len(folders):
        raise EvalDataError(f"{path}: {len(lines)} class names for {len(folders)} class folders (one name per line "
                            "in sorted folder order, or 'folder<TAB>name' lines)")
    return [ln.strip() for ln in lines]


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _imagefolder(root: Path, split: str, classes: list[str], names: list[str], train_dir: Path | None
                 ) -> LabelledImages:
    split_dir = root / split
    index = {c: i for i, c in enumerate(classes)}
    sources, labels = [], []
    for c in _class_dirs(split_dir):
        if c not in index:
            raise EvalDataError(f"class {c!r} of {split_dir / c} is absent from the training split {train_dir}")
        files = _images_in(split_dir / c)
        if not files:
            raise EvalDataError(f"class folder {split_dir / c} holds no images ({', '.join(IMAGE_EXTS)})")
        sources += files
        labels += [index[c]] * len(files)
    if not sources:
        raise EvalDataError(f"{split_dir} holds no class folders with images")
    return LabelledImages(str(root), split, names, sources, np.asarray(labels, dtype=np.int64))


def _shards(root: Path, split: str) -> list[str]:
    pattern = str(root)
    if any(ch in pattern for ch in "*?[{"):
        found = _expand(pattern)
    else:
        found = sorted(glob.glob(str(root / split / "*.tar"))) or sorted(glob.glob(str(root / f"{split}-*.tar"))) \
            or sorted(glob.glob(str(root / f"{split}*.tar")))
    return found


def _expand(pattern: str) -> list[str]:
    import braceexpand  # webdataset's dependency

    out = []
    for p in braceexpand.braceexpand(pattern):
        out += sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else ([p] if os.path.exists(p) else [])
    return out


def _tar_samples(path: str):
    """(key, {ext: (offset, size)}) per sample of a tar shard, in order."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = os.path.join(os.path.dirname(m.name), key)
                samples.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise EvalDataError(f"cannot read shard {path}: {e}") from None
    return samples


def _read_at(path: str, where: tuple[int, int]) -> bytes:
    with open(path, "rb") as f:
        f.seek(where[0])
        return f.read(where[1])


def _wds_labelled(root: Path, split: str, class_key: str, names: list[str] | None) -> tuple[list, list, str]:
    shards = _shards(root, split)
    if not shards:
        raise EvalDataError(f"no shards for split {split!r} under {root} (looked for {root / split}/*.tar and "
                            f"{root}/{split}-*.tar)")
    sources, labels = [], []
    for shard in shards:
        for key, members in _tar_samples(shard).items():
            img = next((members[k] for k in WDS_IMAGE_KEYS if k in members), None)
            if img is None:
                continue
            if "cls" in members:
                raw = _read_at(shard, members["cls"]).decode("utf-8", "replace").strip()
            elif "json" in members:
                try:
                    meta = json.loads(_read_at(shard, members["json"]))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise EvalDataError(f"{shard}: sample {key}: bad json ({e})") from None
                if not isinstance(meta, dict) or class_key not in meta:
                    raise EvalDataError(f"{shard}: sample {key} has no class: no 'cls' member and no json key "
                                        f"{class_key!r}")
                raw = meta[class_key]
            else:
                raise EvalDataError(f"{shard}: sample {key} has no class member ('cls' or json key {class_key!r})")
            sources.append((shard, img[0], img[1]))
            labels.append(raw)
    if not sources:
        raise EvalDataError(f"shards {shards[0]}... of split {split!r} hold no labelled images")
    return sources, labels, shards[0]


def _as_indices(raw: list, names: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    ints = []
    for r in raw:
        if isinstance(r, bool):
            ints = None
            break
        if isinstance(r, int) or (isinstance(r, str) and r.lstrip("-").isdigit()):
            ints.append(int(r))
        else:
            ints = None
            break
    if ints is not None:
        if names is None:
            names = [f"class {i}" for i in range(max(ints) + 1)]
        bad = [i for i in ints if not 0 <= i < len(names)]
        if bad:
            raise EvalDataError(f"{where}: class index {bad[0]} outside the {len(names)} class names")
        return np.asarray(ints, dtype=np.int64), names
    if names is None:
        names = sorted({str(r) for r in raw})
    index = {n: i for i, n in enumerate(names)}
    missing = sorted({str(r) for r in raw} - set(index))
    if missing:
        raise EvalDataError(f"{where}: class {missing[0]!r} is not in the class names")
    return np.asarray([index[str(r)] for r in raw], dtype=np.int64), names


def open_labelled(root: str, splits: list[str], fmt: str = "auto", classnames: str | None = None,
                  class_key: str = "cls") -> dict[str, LabelledImages]:
    """The splits of a labelled dataset, labels indexing one shared class list (the first split's). Raises
    :class:`EvalDataError` naming the path."""
    if root is None:
        raise EvalDataError("no data: set the evaluator's data to an ImageFolder root or a shard folder")
    r = Path(root)
    if not any(ch in root for ch in "*?[{") and not r.exists():
        raise EvalDataError(f"evaluation data {root} does not exist")
    if fmt == "auto":
        fmt = "imagefolder" if (r / splits[0]).is_dir() and not glob.glob(str(r / splits[0] / "*.tar")) else "wds"
    names_file = Path(classnames) if classnames else r / "classnames.txt"
    if classnames and not names_file.exists():
        raise EvalDataError(f"class names file {names_file} does not exist")
    out: dict[str, LabelledImages] = {}
    if fmt == "imagefolder":
        first = r / splits[0]
        if not first.is_dir():
            raise EvalDataError(f"{first} is not a folder (expected {root}/<split>/<class>/*.jpg)")
        classes = _class_dirs(first)
        if not classes:
            raise EvalDataError(f"{first} holds no class folders (expected {first}/<class>/*.jpg)")
        names = (_read_classnames(names_file, classes) if names_file.is_file()
                 else [c.replace("_", " ") for c in classes])
        for s in splits:
            if not (r / s).is_dir():
                raise EvalDataError(f"split folder {r / s} does not exist")
            out[s] = _imagefolder(r, s, classes, names, first)
        for c in classes:  # every class has training images
            if not _images_in(first / c):
                raise EvalDataError(f"class folder {first / c} holds no images")
        return out
    if fmt != "wds":
        raise EvalDataError(f"unknown data format {fmt!r} (auto, imagefolder, wds)")
    names = _read_classnames(names_file, None) if names_file.is_file() else None
    for s in splits:
        sources, raw, where = _wds_labelled(r, s, class_key, names)
        labels, names = _as_indices(raw, names, where)
        out[s] = LabelledImages(str(root), s, names, sources, labels)
    for s in splits:
        out[s].classnames = names
    first = out[splits[0]]
    if len(splits) > 1:
        have = set(first.labels.tolist())
        for s in splits[1:]:
            absent = sorted(set(out[s].labels.tolist()) - have)
            if absent:
                raise EvalDataError(f"validation class {names[absent[0]]!r} of {root} split {s!r} is absent from "
                                    f"the training split {splits[0]!r}")
    return out


# ------------------------------------------------------------------------------------------------------
# captioned images


class CaptionedImages:
    """Held-out captioned images: ``get(i)`` -> (uint8 patches, grid, reference token ids) or None (unreadable)."""

    @classmethod
    def wrap(cls, dataset) -> "CaptionedImages":
        """Around an already opened ``GenLIPIndexedDataset`` (e.g. the trainer's held-out set)."""
        self = cls.__new__(cls)
        self.spec, self.tokenizer, self.pre, self.shards, self.dataset = dataset.prefix, None, None, [], dataset
        return self

    def __init__(self, spec: str, cfg, tokenizer, fingerprint: str | None = None, pre: Preprocess | None = None):
        self.spec = spec
        self.tokenizer = tokenizer
        self.pre = pre
        self.shards = self._shard_list(spec)
        if self.shards:
            self.items = []
            for shard in self.shards:
                for key, members in _tar_samples(shard).items():
                    img = next((members[k] for k in WDS_IMAGE_KEYS if k in members), None)
                    text = members.get("json") or members.get("txt")
                    if img is not None and text is not None:
                        self.items.append((shard, key, img, members.get("json"), members.get("txt")))
            if not self.items:
                raise EvalDataError(f"captioned shards {self.shards[0]}... hold no image with a caption")
            self.dataset = None
        else:
            from megatron_genlip.data.indexed import DatasetError, GenLIPIndexedDataset

            try:
                self.dataset = GenLIPIndexedDataset(spec, cfg.data, fingerprint)
            except (DatasetError, FileNotFoundError, OSError, ValueError) as e:
                raise EvalDataError(f"captioning data {spec}: {e}") from None
            if len(self.dataset) == 0:
                raise EvalDataError(f"captioning data {spec} holds no samples")

    @staticmethod
    def _shard_list(spec) -> list[str]:
        if not isinstance(spec, str):
            return []
        if spec.endswith(".tar") or ("{" in spec and ".tar" in spec) or (any(c in spec for c in "*?[")
                                                                          and ".tar" in spec):
            found = _expand(spec)
            if not found:
                raise EvalDataError(f"no shards match {spec}")
            return found
        if os.path.isdir(spec) and glob.glob(os.path.join(spec, "*.tar")):
            return sorted(glob.glob(os.path.join(spec, "*.tar")))
        return []

    def __len__(self) -> int:
        return len(self.items) if self.dataset is None else len(self.dataset)

    def get(self, i: int):
        if self.dataset is not None:
            from megatron_genlip.batch import IGNORE_INDEX

            s = self.dataset[i]
            ref = s.input_ids[s.labels != IGNORE_INDEX].tolist()[:-2]
            return s.patches, tuple(s.grid), ref
        shard, key, img, js, txt = self.items[i]
        caption = None
        try:
            if js is not None:
                meta = json.loads(_read_at(shard, js))
                caption = meta.get("caption") if isinstance(meta, dict) else None
            if caption is None and txt is not None:
                caption = _read_at(shard, txt).decode("utf-8")
        except (json.JSONDecodeError, UnicodeDecodeError):
            caption = None
        if not isinstance(caption, str) or not caption.strip():
            return None
        patches = self.pre.patches(_read_at(shard, img), f"{shard}:{key}")
        if patches is None:
            return None
        return torch.from_numpy(patches), self.pre.grid, self.tokenizer.encode(caption.strip())
