"""The indexed multimodal dataset: a manifest of parts, each a megatron-core ``.bin``/``.idx`` pair.

A dataset ``PREFIX`` is the manifest ``PREFIX.json`` plus the parts it lists (``PREFIX.parts/NNNNNN-<shard>``,
one per input shard, written by ``tools/preprocess_data.py``, possibly by many machines at once) and
``PREFIX.lengths.npy``. Parts are never merged: training addresses a sample by the cumulative part sizes and
opens the parts it touches lazily, keeping at most ``data.max_open_parts`` memory maps per process.

Each part is an ``IndexedDataset`` (``dtype=uint8``, ``multimodal=True``) with one document per sample:

  mode 0  TEXT    int32 token ids of the text part (prompt/conversation + ``<|im_end|>`` ``\\n``), as bytes
  mode 2  LABELS  uint8 per text token: 1 = supervised (caption, ``<|im_end|>``, ``\\n``), 0 = prompt
  mode 1  IMAGE   the image: the original encoded bytes (``encoded``) or uint8 RGB pixels already resized
                  to the training resolution (``pixels``, H x W x 3 with H, W = grid x patch)

``PART.lengths.npy`` / ``PREFIX.lengths.npy``: uint16 ``[N, 3]`` (gh, gw, text tokens), what packing needs
without touching the ``.bin``; memory-mapped, never copied per rank. The manifest holds the build settings
(checked against the training config), the parts with their sizes and fingerprints, and the dataset
fingerprint (a hash of the part fingerprints: computing it never reads sample data).

``data.train_data`` may name several datasets (a list, a glob, or a ``.txt`` file with one prefix per line):
they are concatenated in the order given.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_genlip.config import DataConfig
from megatron_genlip.data.image_processing import ImageError, patchify_into, resized_rgb, to_rgb
from megatron_genlip.data.records import Record, SkipSample, decode_image
from megatron_genlip.data.sample import Sample, assemble_sample

MODE_TEXT, MODE_IMAGE, MODE_LABELS = 0, 1, 2
STORAGES = ("encoded", "pixels")
FORMAT_VERSION = 2
LENGTHS_DTYPE = np.uint16  # gh, gw and text tokens of one sample all stay below 65536 (seq_length <= 65535)


class DatasetMismatch(ValueError):
    """The dataset on disk was built for other settings than the ones training asks for."""


class DatasetError(ValueError):
    """A dataset that cannot be read as it is (missing, truncated or replaced files)."""


def build_settings(cfg, storage: str) -> dict:
    """The settings a dataset's bytes depend on (stored in every part and manifest, checked by training)."""
    from megatron_genlip.data.builder import tokenizer_fingerprint

    d = cfg.data
    settings = {"format_version": FORMAT_VERSION, "stage": d.stage, "patch_size": cfg.model.patch_size,
                "max_sample_length": d.max_sample_length, "prompt": cfg.tokenizer.prompt,
                "tokenizer_fingerprint": tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path),
                "image_storage": storage, "background": list(d.background), "max_aspect_ratio": d.max_aspect_ratio,
                "drop_duplicate_keys": d.drop_duplicate_keys}
    if d.stage == 1:
        settings["image_size"] = d.image_size
    else:
        settings.update(min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    return settings


MANIFEST_FIELDS = ("samples", "tokens", "fingerprint", "lengths", "parts")  # a manifest: build settings + these


def _check_lengths_file(path: str, samples: int) -> None:
    """The header of a lengths file matches its dataset (reads no data)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DatasetError(f"lengths file {path} is missing or unreadable ({e}); rerun tools/preprocess_data.py "
                           "--finalize with the same arguments") from None
    if arr.shape != (samples, 3) or arr.dtype != LENGTHS_DTYPE:
        raise DatasetError(f"lengths file {path} holds {arr.dtype} {arr.shape}, the manifest needs {samples} x 3 "
                           f"{np.dtype(LENGTHS_DTYPE)}; rerun tools/preprocess_data.py --finalize")


def record_items(rec: Record, grid: tuple[int, int], ids: list[int], flags: list[bool], cfg: DataConfig,
                 storage: str, patch_size: int = 16) -> list[tuple[np.ndarray, int]]:
    """The three (bytes, mode) items of one sample."""
    if storage == "encoded":
        image = np.frombuffer(rec.image_bytes, dtype=np.uint8)
    elif storage == "pixels":
        image = resized_rgb(rec.image, cfg.background, stage=cfg.stage, image_size=cfg.image_size,
                            patch_size=patch_size, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels).reshape(-1)
    else:
        raise ValueError(f"image storage must be one of {STORAGES}, got {storage!r}")
    return [
        (np.asarray(ids, dtype=np.int32).view(np.uint8), MODE_TEXT),
        (np.asarray(flags, dtype=np.uint8), MODE_LABELS),
        (image, MODE_IMAGE),
    ]


def file_fingerprint(paths: list[str | Path]) -> str:
    """sha256 (16 hex) of files' bytes, streamed."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16]


class SampleWriter:
    """Writes samples into one part: ``.bin``/``.idx`` (megatron-core builder) plus its lengths array."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.builder = IndexedDatasetBuilder(self.prefix + ".bin", dtype=np.uint8, multimodal=True)
        self.lengths: list[tuple[int, int, int]] = []

    def add(self, items: list[tuple[np.ndarray, int]], grid: tuple[int, int], num_text: int) -> None:
        for data, mode in items:
            self.builder.add_item(torch.from_numpy(np.array(data)), mode)  # copy: frombuffer views are read-only
        self.builder.end_document()
        self.lengths.append((grid[0], grid[1], num_text))

    def finalize(self) -> None:
        self.builder.finalize(self.prefix + ".idx")
        with open(self.prefix + ".lengths.npy", "wb") as f:  # explicit name: np.save would append ".npy"
            np.save(f, np.asarray(self.lengths, dtype=LENGTHS_DTYPE).reshape(-1, 3))


# -------------------------------------------------------------------------------------------------
# resolving data.train_data / valid_data to manifests


def _manifests_of(entry: str, seen: tuple = ()) -> list[Path]:
    """One ``data.train_data`` entry -> manifest paths: a prefix (or its ``.json``), a glob of prefixes, or a
    ``.txt`` file listing entries (relative to the file)."""
    if any(c in entry for c in "*?["):
        pattern = entry if entry.endswith(".json") else entry + ".json"
        found = sorted(p for p in glob.glob(pattern) if not p.endswith(".report.json"))
        if not found:
            raise DatasetError(f"data path pattern {entry!r} matches no dataset (looked for {pattern})")
        return [Path(p) for p in found]
    if entry.endswith(".txt"):
        listing = Path(entry)
        if not listing.is_file():
            raise DatasetError(f"dataset list {entry} does not exist")
        if listing.resolve() in seen:
            raise DatasetError(f"dataset list {entry} includes itself")
        lines = [ln.split("#", 1)[0].strip() for ln in listing.read_text().splitlines()]
        return [m for ln in lines if ln for m in _manifests_of(str(listing.parent / ln), seen + (listing.resolve(),))]
    return [Path(entry if entry.endswith(".json") else entry + ".json")]


def resolve_data_paths(spec: str | list[str]) -> list[Path]:
    """``data.train_data`` (a prefix, glob or .txt list, or a list of those) -> manifest paths, in order."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise DatasetError("no dataset given")
    return [m for e in entries for m in _manifests_of(e)]


PART_KEYS = ("path", "samples", "fingerprint", "bin_bytes", "idx_bytes")


def read_manifest(path: Path) -> dict:
    if not path.is_file():
        prefix = str(path)[:-5]
        raise FileNotFoundError(f"{path} not found: build the dataset with tools/preprocess_data.py "
                                f"--output-prefix {prefix} (several machines: --num-shards, then --finalize)")
    rebuild = "rerun tools/preprocess_data.py --finalize with the same arguments to rewrite it"
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"dataset manifest {path} is not valid JSON ({e}); {rebuild}") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"dataset manifest {path} does not hold a mapping; {rebuild}")
    if meta.get("format_version") != FORMAT_VERSION or "parts" not in meta:
        raise DatasetMismatch(f"dataset {path} has format version {meta.get('format_version')!r}, this trainer reads "
                              f"{FORMAT_VERSION}: rebuild it with tools/preprocess_data.py")
    if not isinstance(meta["parts"], list) or not all(isinstance(p, dict) and all(k in p for k in PART_KEYS)
                                                      for p in meta["parts"]):
        raise DatasetError(f"dataset manifest {path} has malformed parts (each needs {', '.join(PART_KEYS)}); {rebuild}")
    return meta


# settings that may differ between datasets read together: they only decided which samples were kept
PER_DATASET_SETTINGS = ("max_aspect_ratio", "drop_duplicate_keys", "max_sample_length")


# -------------------------------------------------------------------------------------------------
# reading


class PartReader:
    """Random access to one part as megatron-core's ``IndexedDatasetBuilder`` wrote it (``.idx``: header, item
    lengths int32, item byte offsets int64, document starts int64, modes int8; ``.bin``: the items).

    megatron-core's ``IndexedDataset`` reads the same files, but opening one takes ~0.3 ms (two memory maps,
    eleven log calls); training draws every sample of a row from another part, so here a part is one memory
    map of its ``.idx`` and a file descriptor, and a sample's three items are one ``os.pread``.
    tests/test_dataset_parts.py checks it returns exactly what ``IndexedDataset`` returns."""

    HEADER = b"MMIDIDX\x00\x00"

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.fd = None
        with open(prefix + ".idx", "rb") as f:
            head = f.read(len(self.HEADER) + 25)
            if len(head) < len(self.HEADER) + 25 or head[:len(self.HEADER)] != self.HEADER:
                raise DatasetError(f"{prefix}.idx is not a megatron-core uint8 index (version 1): rebuild that part")
            version, code, items, docs = struct.unpack_from("<QBQQ", head, len(self.HEADER))
            if version != 1 or code != 1:
                raise DatasetError(f"{prefix}.idx is not a megatron-core uint8 index (version 1): rebuild that part")
            idx = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        at = len(head)
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=items, offset=at)
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=items, offset=at + 4 * items)
        self.documents = np.frombuffer(idx, dtype=np.int64, count=docs, offset=at + 12 * items)
        self.fd = os.open(prefix + ".bin", os.O_RDONLY)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close

    def items(self, document: int, count: int = 3) -> list[np.ndarray]:
        """The ``count`` items of one document (contiguous in the .bin), as uint8 arrays."""
        first = int(self.documents[document])
        start = int(self.pointers[first])
        stop = int(self.pointers[first + count - 1]) + int(self.lengths[first + count - 1])
        data = os.pread(self.fd, stop - start, start)
        if len(data) != stop - start:
            raise DatasetError(f"{self.prefix}.bin ends before sample {document}: the part is truncated; rebuild it")
        buf = np.frombuffer(data, dtype=np.uint8)
        return [buf[int(self.pointers[k]) - start:int(self.pointers[k]) - start + int(self.lengths[k])]
                for k in range(first, first + count)]


class GenLIPIndexedDataset:
    """Random access to stored samples of one or more datasets: ``dataset[i]`` -> training :class:`Sample`.

    Private memory per process is O(parts): part paths, cumulative sizes and byte sizes; the lengths arrays
    and every part's index are memory maps (shared page cache), opened lazily."""

    def __init__(self, spec: str | list[str], cfg: DataConfig, tokenizer_fingerprint: str | None = None,
                 max_open_parts: int | None = None):
        self.cfg = cfg
        self.max_open_parts = max_open_parts or getattr(cfg, "max_open_parts", 64)
        self.manifest_paths = resolve_data_paths(spec)
        self.prefix = str(self.manifest_paths[0])[:-5]
        paths: list[str] = []
        sizes: list[int] = []
        nbytes: list[tuple[int, int]] = []
        self.lengths_files: list[str] = []
        self.lengths_sizes: list[int] = []
        fingerprints = []
        settings = None
        for m in self.manifest_paths:
            meta = read_manifest(m)
            self._check(m, meta, tokenizer_fingerprint)
            these = {k: v for k, v in meta.items() if k not in MANIFEST_FIELDS + PER_DATASET_SETTINGS}
            if settings is not None and these != settings:
                differ = sorted(k for k in set(these) | set(settings) if these.get(k) != settings.get(k))
                raise DatasetMismatch(f"datasets {self.manifest_paths[0]} and {m} were built with different settings "
                                      f"({', '.join(differ)}); datasets read together must agree on them")
            settings = these
            root = m.parent
            for part in meta["parts"]:
                paths.append(str(root / part["path"]))
                sizes.append(part["samples"])
                nbytes.append((part["bin_bytes"], part["idx_bytes"]))
            self.lengths_files.append(str(root / meta["lengths"]))
            self.lengths_sizes.append(meta["samples"])
            fingerprints.append(meta["fingerprint"])
            _check_lengths_file(self.lengths_files[-1], meta["samples"])
        self.meta = dict(settings, samples=int(sum(sizes)))  # what the datasets share, and their total size
        self.storage = settings["image_storage"]
        self.patch_size = settings["patch_size"]
        self.part_paths = paths
        self.part_starts = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
        self.part_bytes = np.asarray(nbytes, dtype=np.int64).reshape(-1, 2)
        self.lengths_starts = np.concatenate(([0], np.cumsum(self.lengths_sizes, dtype=np.int64)))
        self._fingerprint = (fingerprints[0] if len(fingerprints) == 1 else
                             hashlib.sha256(",".join(fingerprints).encode()).hexdigest()[:16])
        self._lengths: list[np.ndarray] | None = None
        self._parts: OrderedDict[int, PartReader] = OrderedDict()
        if int(self.part_starts[-1]) != int(self.lengths_starts[-1]):
            raise DatasetError(f"dataset {self.prefix}: parts hold {self.part_starts[-1]} samples but the lengths "
                               f"files {self.lengths_starts[-1]}; rerun tools/preprocess_data.py --finalize")

    def __getstate__(self) -> dict:  # DataLoader workers open their own memory maps
        return dict(self.__dict__, _lengths=None, _parts=OrderedDict())

    def _check(self, manifest: Path, meta: dict, fingerprint: str | None) -> None:
        c = self.cfg
        wanted = {"stage": c.stage, "background": list(c.background)}  # encoded images are converted while training
        if c.stage == 1:
            wanted["image_size"] = c.image_size
        else:
            wanted.update(min_pixels=c.min_pixels, max_pixels=c.max_pixels)
        if fingerprint is not None:
            wanted["tokenizer_fingerprint"] = fingerprint
        bad = [f"{k}: dataset {meta.get(k)!r} vs config {v!r}" for k, v in wanted.items() if meta.get(k) != v]
        if bad:
            raise DatasetMismatch(f"dataset {str(manifest)[:-5]} does not match the config ({'; '.join(bad)}); "
                                  "rebuild it with tools/preprocess_data.py")

    # -- metadata ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.part_starts[-1])

    def fingerprint(self) -> str:
        return self._fingerprint

    def lengths_source(self):
        """Tokens per sample for the pack-index builder."""
        from megatron_genlip.data.pack_index import LengthSource

        return LengthSource(self.lengths_files, self.lengths_sizes)

    def grid_and_text(self, i: int) -> tuple[int, int, int]:
        """(gh, gw, text tokens) of sample ``i`` from the memory-mapped lengths."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside dataset {self.prefix} of {len(self)} samples (a damaged pack index? "
                             "check it with tools/build_pack_index.py --verify)")
        if self._lengths is None:
            self._lengths = [np.load(f, mmap_mode="r") for f in self.lengths_files]
        s = int(np.searchsorted(self.lengths_starts, i, side="right")) - 1
        gh, gw, n = self._lengths[s][i - self.lengths_starts[s]]
        return int(gh), int(gw), int(n)

    # -- parts ---------------------------------------------------------------------------------------

    def _part(self, p: int) -> PartReader:
        ds = self._parts.get(p)
        if ds is not None:
            self._parts.move_to_end(p)
            return ds
        prefix = self.part_paths[p]
        for ext, want in zip((".bin", ".idx"), self.part_bytes[p]):
            try:
                got = os.path.getsize(prefix + ext)
            except OSError:
                got = None
            if got != int(want):
                raise DatasetError(f"part {prefix}{ext} of dataset {self.prefix} is {'missing' if got is None else f'{got} bytes'}, "
                                   f"the manifest says {want} bytes: it was truncated or replaced; rebuild that part "
                                   "(delete its .report.json and rerun tools/preprocess_data.py, then --finalize)")
        ds = PartReader(prefix)
        self._parts[p] = ds
        if len(self._parts) > self.max_open_parts:
            self._parts.popitem(last=False)[1].close()
        return ds

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored items of sample ``i``: int32 token ids, uint8 label flags, image bytes or pixels."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside dataset {self.prefix} of {len(self)} samples")
        p = int(np.searchsorted(self.part_starts, i, side="right")) - 1
        text, flags, image = self._part(p).items(i - int(self.part_starts[p]))
        return text.view(np.int32), flags, image

    def image_patches(self, i: int, image: np.ndarray, grid: tuple[int, int], out: np.ndarray | None = None,
                      draft: bool = False) -> np.ndarray:
        """uint8 patches [gh*gw, 3, p, p] of sample ``i``'s stored image: stored pixels, or the encoded image
        decoded, converted and resized straight to the stored grid (the grid the build computed is authoritative:
        no recomputation that a config change or a draft-mode decode could alter)."""
        p = self.patch_size
        if self.storage == "pixels":
            if image.size != grid[0] * grid[1] * p * p * 3:
                raise DatasetError(f"sample {i} ({self.locate(i)}) holds {image.size} pixel bytes, its grid {grid} "
                                   "needs another size: the part's files do not belong together; rebuild that part")
            return patchify_into(image.reshape(grid[0] * p, grid[1] * p, 3), p, out)
        try:
            img = to_rgb(decode_image(image.tobytes(), draft_size=(grid[1] * p, grid[0] * p) if draft else None),
                         self.cfg.background)
        except (SkipSample, ImageError) as e:
            raise DatasetError(f"sample {i} ({self.locate(i)}) does not decode although the build checked it ({e}): "
                               "the part's files are damaged or do not belong together; rebuild that part") from None
        rgb = np.asarray(img.resize((grid[1] * p, grid[0] * p), resample=PIL.Image.BILINEAR))
        return patchify_into(rgb, p, out)

    def locate(self, i: int) -> str:
        """Where sample ``i`` lives, for messages."""
        p = int(np.searchsorted(self.part_starts, i, side="right")) - 1
        return f"sample {i - int(self.part_starts[p])} of part {self.part_paths[p]}"

    def __getitem__(self, i: int) -> Sample:
        gh, gw, _ = self.grid_and_text(i)
        ids, flags, image = self.raw(i)
        patches = self.image_patches(i, image, (gh, gw))
        return assemble_sample(torch.from_numpy(patches), (gh, gw), ids.tolist(), flags.astype(bool).tolist())
