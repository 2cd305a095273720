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

Integrity (every stored byte is checked before it is used; nothing per step grows with the dataset):

* start-up, by one process (:func:`check_parts`, wrapped by the trainer so that rank 0 decides): every part's
  ``.bin``/``.idx`` exist with the manifest's sizes (one listing per parts folder, the sizes stat-ed by a few
  threads);
* first open of a part in a process: its ``.idx`` and ``.sums.npy`` (crc32 of every sample's bytes) against the
  sha256 the build recorded, and the part's rows of ``PREFIX.lengths.npy`` against the part's own lengths;
* every sample read: its bytes against its crc32 (one pass over bytes that are about to be decoded anyway).

Datasets built before ``.sums.npy`` existed are read with the size checks only, after a one-time warning.

``data.train_data`` may name several datasets (a list, a glob, or a ``.txt`` file with one prefix per line):
they are concatenated in the order given.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import mmap
import os
import struct
import sys
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_genlip.config import DataConfig
from megatron_genlip.data.image_processing import ImageError, patchify_into, resized_rgb, to_rgb
from megatron_genlip.data.pack_index import array_sha256, worker_message
from megatron_genlip.data.records import Record, SkipSample, decode_image
from megatron_genlip.data.sample import Sample, assemble_sample
from megatron_genlip.data.tokenizer import tokenizer_fingerprint

MODE_TEXT, MODE_IMAGE, MODE_LABELS = 0, 1, 2
STORAGES = ("encoded", "pixels")
FORMAT_VERSION = 2
LENGTHS_DTYPE = np.uint16  # gh, gw and text tokens of one sample all stay below 65536 (seq_length <= 65535)


class DatasetMismatch(ValueError):
    """The dataset on disk was built for other settings than the ones training asks for."""


class DatasetError(ValueError):
    """A dataset that cannot be read as it is (missing, truncated, damaged or replaced files). Raised in a
    DataLoader worker, it reaches the trainer with the worker's message, not its traceback."""

    def __init__(self, *args):
        super().__init__(*(worker_message(a) if isinstance(a, str) else a for a in args))


SUMS_DTYPE = np.uint32  # PART.sums.npy: crc32 of each sample's stored bytes (its three items, as in the .bin)
DIGEST_BYTES = 16  # sha256 digests kept per part in memory (truncated): 48 bytes per part, not 3 hex strings
_warned_unverified: set[str] = set()


def sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_checksum(items) -> int:
    """crc32 of one sample's items in stored order (what PartReader.items reads as one span)."""
    crc = 0
    for data in items:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"), crc)
    return crc


def build_settings(cfg, storage: str) -> dict:
    """The settings a dataset's bytes depend on (stored in every part and manifest, checked by training)."""
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
        self.sums: list[int] = []

    def add(self, items: list[tuple[np.ndarray, int]], grid: tuple[int, int], num_text: int) -> None:
        for data, mode in items:
            self.builder.add_item(torch.from_numpy(np.array(data)), mode)  # copy: frombuffer views are read-only
        self.builder.end_document()
        self.lengths.append((grid[0], grid[1], num_text))
        self.sums.append(sample_checksum([np.asarray(data, dtype=np.uint8) for data, _ in items]))

    def finalize(self) -> dict:
        """Close the part; returns the sha256 of its ``.idx``, of its sums and of its lengths (array bytes)."""
        self.builder.finalize(self.prefix + ".idx")
        lengths = np.asarray(self.lengths, dtype=LENGTHS_DTYPE).reshape(-1, 3)
        sums = np.asarray(self.sums, dtype=SUMS_DTYPE)
        with open(self.prefix + ".lengths.npy", "wb") as f:  # explicit name: np.save would append ".npy"
            np.save(f, lengths)
        with open(self.prefix + ".sums.npy", "wb") as f:
            np.save(f, sums)
        return {"idx_sha256": sha256_hex(Path(self.prefix + ".idx").read_bytes()),
                "sums_sha256": sha256_hex(sums.tobytes()), "lengths_sha256": sha256_hex(lengths.tobytes())}


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
        try:
            lines = [ln.split("#", 1)[0].strip() for ln in listing.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"dataset list {entry} cannot be read ({e})") from None
        if not any(lines):
            raise DatasetError(f"dataset list {entry} names no dataset (it is empty or holds only comments)")
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

    def __init__(self, prefix: str, digests: np.ndarray | None = None, sums_at: int = 0):
        """``digests``: the (idx, sums) sha256 the build recorded (truncated), checked here before anything is
        read (the first open of the part in a process). ``sums_at``: reopening a part checked before, where the
        crc32s start in its ``.sums.npy``. Neither: a part built before checksums existed (no content check).
        Each sample read is checked against its crc32 (one 4-byte ``pread``)."""
        self.prefix = prefix
        self.fd = self.sums_fd = None
        self.sums_at = sums_at
        try:
            f = open(prefix + ".idx", "rb")
        except OSError as e:
            raise DatasetError(f"{prefix}.idx cannot be opened ({e.strerror}): it went missing; rebuild that part") from None
        with f:
            head = f.read(len(self.HEADER) + 25)
            if len(head) < len(self.HEADER) + 25 or head[:len(self.HEADER)] != self.HEADER:
                raise DatasetError(f"{prefix}.idx is not a megatron-core uint8 index (version 1): rebuild that part")
            version, code, items, docs = struct.unpack_from("<QBQQ", head, len(self.HEADER))
            if version != 1 or code != 1:
                raise DatasetError(f"{prefix}.idx is not a megatron-core uint8 index (version 1): rebuild that part")
            idx = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if digests is not None:
            if hashlib.sha256(idx).digest()[:DIGEST_BYTES] != bytes(digests[0]):
                raise DatasetError(f"{prefix}.idx does not match the checksum its build recorded: it was damaged or "
                                   "replaced; rebuild that part (delete its .report.json and rerun "
                                   "tools/preprocess_data.py, then --finalize)")
            self.sums_at = self._check_sums(docs - 1, bytes(digests[1]))
        if len(idx) < len(head) + 13 * items + 8 * docs:  # lengths, pointers, documents, modes
            raise DatasetError(f"{prefix}.idx is truncated ({len(idx)} bytes for {items} items): rebuild that part")
        at = len(head)
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=items, offset=at)
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=items, offset=at + 4 * items)
        self.documents = np.frombuffer(idx, dtype=np.int64, count=docs, offset=at + 12 * items)
        for attr, ext, wanted in (("sums_fd", ".sums.npy", self.sums_at), ("fd", ".bin", True)):
            try:
                if wanted:
                    setattr(self, attr, os.open(prefix + ext, os.O_RDONLY))
            except OSError as e:
                self.close()
                raise DatasetError(f"{prefix}{ext} went missing during the run ({e.strerror}); rebuild that part") from None

    def _check_sums(self, samples: int, digest: bytes) -> int:
        """The part's ``.sums.npy`` read whole (4 bytes per sample) and checked; returns where its data starts."""
        path = self.prefix + ".sums.npy"
        try:
            raw = Path(path).read_bytes()
            f = io.BytesIO(raw)
            major, _ = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if major == 1
                                     else np.lib.format.read_array_header_2_0)(f)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path} is missing or unreadable ({e}); rebuild that part") from None
        at = f.tell()
        if dtype != np.dtype("<u4") or shape != (samples,) or fortran or \
                hashlib.sha256(memoryview(raw)[at:]).digest()[:DIGEST_BYTES] != digest:
            raise DatasetError(f"{path} does not match the checksum its build recorded: it was damaged or replaced; "
                               "rebuild that part")
        return at

    def close(self) -> None:
        for name in ("fd", "sums_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    __del__ = close

    def items(self, document: int, count: int = 3) -> list[np.ndarray]:
        """The ``count`` items of one document (contiguous in the .bin), as uint8 arrays."""
        first = int(self.documents[document])
        start = int(self.pointers[first])
        stop = int(self.pointers[first + count - 1]) + int(self.lengths[first + count - 1])
        data = os.pread(self.fd, stop - start, start)
        if len(data) != stop - start:
            raise DatasetError(f"{self.prefix}.bin ends before sample {document}: the part is truncated; rebuild it")
        if self.sums_fd is not None and zlib.crc32(data) != int.from_bytes(
                os.pread(self.sums_fd, 4, self.sums_at + 4 * document), "little"):
            raise DatasetError(f"{self.prefix}.bin: sample {document} (bytes {start}..{stop}) does not match its "
                               f"checksum in {self.prefix}.sums.npy: the part is damaged; rebuild it (delete its "
                               ".report.json and rerun tools/preprocess_data.py, then --finalize)")
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
        digests: list[bytes] = []  # per part: idx, sums and lengths sha256 (truncated); empty: built without them
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
                try:
                    digests.append(b"".join(bytes.fromhex(part[k])[:DIGEST_BYTES]
                                            for k in ("idx_sha256", "sums_sha256", "lengths_sha256")))
                except (KeyError, TypeError, ValueError):
                    digests.append(b"")
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
        self.part_checked = np.asarray([len(d) == 3 * DIGEST_BYTES for d in digests], dtype=bool)
        self.part_digests = np.zeros((len(paths), 3, DIGEST_BYTES), dtype=np.uint8)
        for k, d in enumerate(digests):
            if d:
                self.part_digests[k] = np.frombuffer(d, dtype=np.uint8).reshape(3, DIGEST_BYTES)
        unchecked = int((~self.part_checked).sum())
        if unchecked and self.prefix not in _warned_unverified:
            _warned_unverified.add(self.prefix)
            print(f"warning: {unchecked} of {len(paths)} parts of dataset {self.prefix} were built without content "
                  "checksums (before .sums.npy existed): only their sizes are checked, damage inside them goes "
                  "unseen; rebuild them with tools/preprocess_data.py to have every sample checked", file=sys.stderr)
        self._opened = self._sums_at = None  # per process: what was checked of each part (:meth:`_state`)
        self.lengths_starts = np.concatenate(([0], np.cumsum(self.lengths_sizes, dtype=np.int64)))
        self._fingerprint = (fingerprints[0] if len(fingerprints) == 1 else
                             hashlib.sha256(",".join(fingerprints).encode()).hexdigest()[:16])
        self._lengths: list[np.ndarray] | None = None
        self._parts: OrderedDict[int, PartReader] = OrderedDict()
        if int(self.part_starts[-1]) != int(self.lengths_starts[-1]):
            raise DatasetError(f"dataset {self.prefix}: parts hold {self.part_starts[-1]} samples but the lengths "
                               f"files {self.lengths_starts[-1]}; rerun tools/preprocess_data.py --finalize")

    def __getstate__(self) -> dict:  # DataLoader workers open their own memory maps and check what they open
        return dict(self.__dict__, _lengths=None, _parts=OrderedDict(), _opened=None, _sums_at=None)

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

        checks = [(int(self.part_starts[p]), int(self.part_starts[p + 1]), self.part_digests[p, 2].tobytes(),
                   self.part_paths[p]) for p in range(len(self.part_paths)) if self.part_checked[p]]
        return LengthSource(self.lengths_files, self.lengths_sizes, checks)

    def grid_and_text(self, i: int) -> tuple[int, int, int]:
        """(gh, gw, text tokens) of sample ``i`` from the memory-mapped lengths."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside dataset {self.prefix} of {len(self)} samples (a damaged pack index? "
                             "check it with tools/build_pack_index.py --verify)")
        if self._lengths is None:
            self._lengths = [np.load(f, mmap_mode="r") for f in self.lengths_files]
        s = int(np.searchsorted(self.lengths_starts, i, side="right")) - 1
        opened = self._state()
        p = int(np.searchsorted(self.part_starts, i, side="right")) - 1
        if not opened[p] & 2:
            self._check_lengths(p, s)
            opened[p] |= 2
        gh, gw, n = self._lengths[s][i - self.lengths_starts[s]]
        return int(gh), int(gw), int(n)

    def _state(self) -> np.ndarray:
        """Per process and part: bit 1 its files checked, bit 2 its rows of the lengths file checked."""
        if self._opened is None:
            self._opened = np.zeros(len(self.part_paths), dtype=np.uint8)
            self._sums_at = np.zeros(len(self.part_paths), dtype=np.uint32)  # where a checked part's crc32s start
        return self._opened

    def _check_lengths(self, p: int, s: int) -> None:
        """Part ``p``'s rows of lengths file ``s`` are the lengths the part's build recorded (what packing and
        batching trust about the sample's size): a permuted or edited ``PREFIX.lengths.npy`` stops here."""
        if not self.part_checked[p]:
            return
        lo, hi = int(self.part_starts[p] - self.lengths_starts[s]), int(self.part_starts[p + 1] - self.lengths_starts[s])
        if array_sha256(self._lengths[s][lo:hi]).digest()[:DIGEST_BYTES] != self.part_digests[p, 2].tobytes():
            raise DatasetError(f"lengths file {self.lengths_files[s]}: rows {lo}..{hi} (part {self.part_paths[p]}) "
                               "do not match the lengths that part was built with: the file was damaged or "
                               "replaced; rerun tools/preprocess_data.py --finalize with the same arguments")

    # -- parts ---------------------------------------------------------------------------------------

    def _part(self, p: int) -> PartReader:
        ds = self._parts.get(p)
        if ds is not None:
            self._parts.move_to_end(p)
            return ds
        prefix = self.part_paths[p]
        opened = self._state()
        first = not opened[p] & 1
        if first:  # sizes and content checksums: once per process and part (a reopen after eviction is not)
            problem = self._size_problem(p)
            if problem:
                raise DatasetError(problem)
        if first:
            ds = PartReader(prefix, self.part_digests[p, :2] if self.part_checked[p] else None)
            self._sums_at[p] = ds.sums_at
        else:
            ds = PartReader(prefix, sums_at=int(self._sums_at[p]))
        opened[p] |= 1
        self._parts[p] = ds
        if len(self._parts) > self.max_open_parts:
            self._parts.popitem(last=False)[1].close()
        return ds

    def _size_problem(self, p: int, sizes: tuple | None = None) -> str | None:
        """What is wrong with part ``p``'s ``.bin``/``.idx`` sizes (``sizes``: already stat-ed, None = missing)."""
        prefix = self.part_paths[p]
        for k, (ext, want) in enumerate(zip((".bin", ".idx"), self.part_bytes[p])):
            if sizes is None:
                try:
                    got = os.path.getsize(prefix + ext)
                except OSError:
                    got = None
            else:
                got = sizes[k]
            if got != int(want):
                return (f"part {prefix}{ext} of dataset {self.prefix} is {'missing' if got is None else f'{got} bytes'}, "
                        f"the manifest says {want} bytes: it was deleted, truncated or replaced; rebuild that part "
                        "(delete its .report.json and rerun tools/preprocess_data.py, then --finalize)")
        return None

    def check_parts(self, threads: int = 16, limit: int = 10) -> list[str]:
        """Start-up check of every part: ``.bin``, ``.idx`` (and ``.sums.npy`` where recorded) exist, with the
        manifest's sizes. One process does it (the trainer: rank 0, the verdict broadcast): one listing per
        parts folder, then the sizes stat-ed by ``threads`` threads (100,000 parts: 200,000 stats from one
        process, not from every rank and worker). Returns up to ``limit`` problems (empty: all there)."""
        listed: dict[str, set[str]] = {}
        for d in sorted({os.path.dirname(q) for q in self.part_paths}):
            try:
                listed[d] = set(os.listdir(d))
            except OSError:
                listed[d] = set()  # a missing or unreadable parts folder: each of its parts is reported missing

        def sizes(p: int) -> tuple:
            prefix = self.part_paths[p]
            names = listed[os.path.dirname(prefix)]
            base = os.path.basename(prefix)
            out = []
            for ext in (".bin", ".idx"):
                try:
                    out.append(os.stat(prefix + ext).st_size if base + ext in names else None)
                except OSError:
                    out.append(None)
            if self.part_checked[p] and base + ".sums.npy" not in names:
                out.append("sums")
            return tuple(out)

        problems: list[str] = []
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for p, got in enumerate(pool.map(sizes, range(len(self.part_paths)), chunksize=256)):
                problem = self._size_problem(p, got[:2])
                if problem is None and len(got) > 2:
                    problem = (f"part {self.part_paths[p]}.sums.npy of dataset {self.prefix} is missing: rebuild that "
                               "part (delete its .report.json and rerun tools/preprocess_data.py, then --finalize)")
                if problem:
                    problems.append(problem)
                    if len(problems) >= limit:
                        break
        return problems

    def verify_part(self, p: int) -> str | None:
        """Everything of part ``p`` checked afresh, every sample's bytes included (reads the whole part: for
        ``tools/build_pack_index.py --verify-data``, not for training); the first problem found, or None."""
        problem = self._size_problem(p)
        if problem:
            return problem
        try:
            part = PartReader(self.part_paths[p], self.part_digests[p, :2] if self.part_checked[p] else None)
            if self._lengths is None:
                self._lengths = [np.load(f, mmap_mode="r") for f in self.lengths_files]
            self._check_lengths(p, int(np.searchsorted(self.lengths_starts, self.part_starts[p], side="right")) - 1)
            for d in range(int(self.part_starts[p + 1] - self.part_starts[p])):
                part.items(d)
        except DatasetError as e:
            return str(e)
        finally:
            if "part" in locals():
                part.close()
        return None

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
