"""The indexed multimodal dataset: megatron-core's ``.bin``/``.idx`` format, one document per sample.

Layout (``IndexedDataset`` with ``dtype=uint8``, ``multimodal=True``), each sample is a document of three items:

  mode 0  TEXT    int32 token ids of the text part (prompt/conversation + ``<|im_end|>`` ``\\n``), as bytes
  mode 2  LABELS  uint8 per text token: 1 = supervised (caption, ``<|im_end|>``, ``\\n``), 0 = prompt
  mode 1  IMAGE   the image: the original encoded bytes (``encoded``) or uint8 RGB pixels already resized
                  to the training resolution (``pixels``, H x W x 3 with H, W = grid x patch)

Beside them: ``PREFIX.lengths.npy`` (int32 [N, 3]: gh, gw, text tokens; what packing needs without touching
the ``.bin``) and ``PREFIX.json`` (how the dataset was built: stage, resolution, tokenizer fingerprint, storage,
counts), checked against the training config at load time.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_genlip.config import DataConfig
from megatron_genlip.data.image_processing import normalize, patchify
from megatron_genlip.data.records import Record, decode_image, sample_from_parts
from megatron_genlip.data.sample import Sample, assemble_sample

MODE_TEXT, MODE_IMAGE, MODE_LABELS = 0, 1, 2
STORAGES = ("encoded", "pixels")
FORMAT_VERSION = 1


class DatasetMismatch(ValueError):
    """The dataset on disk was built for other settings than the ones training asks for."""


def record_items(rec: Record, grid: tuple[int, int], ids: list[int], flags: list[bool], cfg: DataConfig,
                 storage: str, patch_size: int = 16) -> list[tuple[np.ndarray, int]]:
    """The three (bytes, mode) items of one sample."""
    if storage == "encoded":
        image = np.frombuffer(rec.image_bytes, dtype=np.uint8)
    elif storage == "pixels":
        size = (grid[1] * patch_size, grid[0] * patch_size)
        rgb = rec.image.convert("RGBA").convert("RGB") if rec.image.mode == "P" else rec.image.convert("RGB")
        image = np.asarray(rgb.resize(size, resample=PIL.Image.BILINEAR), dtype=np.uint8).reshape(-1)
    else:
        raise ValueError(f"image storage must be one of {STORAGES}, got {storage!r}")
    return [
        (np.asarray(ids, dtype=np.int32).view(np.uint8), MODE_TEXT),
        (np.asarray(flags, dtype=np.uint8), MODE_LABELS),
        (image, MODE_IMAGE),
    ]


class SampleWriter:
    """Writes samples into one ``.bin``/``.idx`` pair plus its lengths array."""

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
        np.save(self.prefix + ".lengths.npy", np.asarray(self.lengths, dtype=np.int32).reshape(-1, 3))


def merge_parts(parts: list[str], prefix: str | Path) -> None:
    """Concatenate part datasets (in the given order) into ``prefix``."""
    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint8, multimodal=True)
    lengths = []
    for part in parts:
        builder.add_index(part)
        lengths.append(np.load(part + ".lengths.npy"))
    builder.finalize(prefix + ".idx")
    merged = np.concatenate(lengths) if lengths else np.zeros((0, 3), dtype=np.int32)
    np.save(prefix + ".lengths.npy", merged)


class GenLIPIndexedDataset:
    """Random access to stored samples: ``dataset[i]`` -> training :class:`Sample` (image preprocessed)."""

    def __init__(self, prefix: str | Path, cfg: DataConfig, tokenizer_fingerprint: str | None = None):
        self.prefix = str(prefix)
        meta_path = Path(self.prefix + ".json")
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: build the dataset with tools/preprocess_data.py --output-prefix {self.prefix}"
            )
        self.meta = json.loads(meta_path.read_text())
        self.cfg = cfg
        self._check(tokenizer_fingerprint)
        self.storage = self.meta["image_storage"]
        self.patch_size = self.meta["patch_size"]
        self.lengths = np.load(self.prefix + ".lengths.npy")
        self._data: IndexedDataset | None = None  # opened lazily (one mmap per DataLoader worker)

    def _check(self, fingerprint: str | None) -> None:
        m, c = self.meta, self.cfg
        wanted = {"stage": c.stage, "format_version": FORMAT_VERSION}
        if c.stage == 1:
            wanted["image_size"] = c.image_size
        else:
            wanted.update(min_pixels=c.min_pixels, max_pixels=c.max_pixels)
        if fingerprint is not None:
            wanted["tokenizer_fingerprint"] = fingerprint
        bad = [f"{k}: dataset {m.get(k)!r} vs config {v!r}" for k, v in wanted.items() if m.get(k) != v]
        if bad:
            raise DatasetMismatch(f"dataset {self.prefix} does not match the config ({'; '.join(bad)}); "
                                  "rebuild it with tools/preprocess_data.py")

    @property
    def data(self) -> IndexedDataset:
        if self._data is None:
            self._data = IndexedDataset(self.prefix, multimodal=True, mmap=True)
        return self._data

    def __len__(self) -> int:
        return len(self.lengths)

    def sample_lengths(self) -> np.ndarray:
        """Tokens per sample: gh * gw + text tokens."""
        return (self.lengths[:, 0] * self.lengths[:, 1] + self.lengths[:, 2]).astype(np.int64)

    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def raw(self, i: int) -> tuple[tuple[int, int], list[int], list[bool], np.ndarray]:
        """Stored parts of sample ``i``: grid, token ids, label flags, image bytes/pixels."""
        first = int(self.data.document_indices[i])
        text, _ = self.data[first]
        flags, _ = self.data[first + 1]
        image, _ = self.data[first + 2]
        gh, gw, _ = self.lengths[i]
        return (int(gh), int(gw)), text.view(np.int32).tolist(), flags.astype(bool).tolist(), image

    def __getitem__(self, i: int) -> Sample:
        grid, ids, flags, image = self.raw(i)
        if self.storage == "pixels":
            p = self.patch_size
            arr = np.asarray(image).reshape(grid[0] * p, grid[1] * p, 3)
            patches, _ = patchify(normalize(PIL.Image.fromarray(arr)), p)
            return assemble_sample(patches, grid, ids, flags)
        img = decode_image(bytes(image))
        return sample_from_parts(img, grid, ids, flags, self.cfg, self.patch_size)

    def pil_image(self, i: int) -> PIL.Image.Image:
        """The stored image as a PIL image (for evaluation/inspection)."""
        grid, _, _, image = self.raw(i)
        if self.storage == "pixels":
            p = self.patch_size
            return PIL.Image.fromarray(np.asarray(image).reshape(grid[0] * p, grid[1] * p, 3))
        return PIL.Image.open(io.BytesIO(bytes(image)))
