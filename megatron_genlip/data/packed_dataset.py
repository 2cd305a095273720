"""Packed rows over indexed datasets, weighted blends, and the data-parallel sampler (ARCHITECTURE.md §4.1, §6).

Rows of all epochs form one endless stream addressed by a *global row index* (the pack index of
``megatron_genlip.data.pack_index``: built ahead, memory-mapped, O(1) per row at any epoch); training's
position in it is ``consumed_samples`` (rows consumed by all data-parallel ranks together, Megatron's
convention). A blend of several datasets interleaves their row streams by weight with a fixed periodic
schedule, so the blended stream is just as addressable.

Micro-batch ``b`` of data-parallel rank ``r`` holds global rows ``consumed + b*m*D + r*m ... + m`` (m = micro
batch, D = DP size): ranks get disjoint rows whose union is the stream, TP/PP peers of a DP rank get the
same rows, and a resumed run continues with exactly the rows an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from megatron_genlip.config import ConfigError
from megatron_genlip.data.indexed import GenLIPIndexedDataset
from megatron_genlip.data.pack_index import PackIndex, PackSettings, ensure_epochs
from megatron_genlip.data.packing import assemble_batch

BLEND_PERIOD = 1000  # rows per period of a blend's schedule, at least (weights are realised to 1/period)
MAX_BLEND_PERIOD = 1_000_000


class PackedRows(torch.utils.data.Dataset):
    """Global row index -> collated packed row(s) of one (possibly concatenated) indexed dataset."""

    def __init__(self, dataset: GenLIPIndexedDataset, seq_length: int, seed: int, buffer_size: int,
                 cache_dir: str | Path | None = None, draft: bool = False):
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.prefix} holds no samples")
        self.dataset = dataset
        self.seq_length = seq_length
        self.draft = draft
        self.settings = PackSettings(dataset.fingerprint(), len(dataset), seq_length, buffer_size, seed)
        if cache_dir is not None:
            for up in (Path(cache_dir), *Path(cache_dir).parents):
                if up.exists():
                    if not up.is_dir():
                        raise ConfigError(f"data.pack_index_dir: {cache_dir} is not a folder ({up} is a file); "
                                          "name a folder for the pack index, or leave it unset (beside the dataset)")
                    break
        self.cache_dir = Path(cache_dir or dataset.prefix + ".packs") / self.settings.key()
        self.index = PackIndex(self.cache_dir, self.settings)

    def fingerprint(self) -> str:
        return self.dataset.fingerprint()

    def ensure(self, *, epochs: int = 1, rows: int = 0, build: bool = True, workers: int = 1, log=print) -> None:
        """Make sure the pack index covers ``epochs`` epochs and ``rows`` global rows (see ``ensure_epochs``)."""
        self.index = ensure_epochs(self.cache_dir, self.settings, self.dataset.lengths_source(), epochs=epochs,
                                   rows=rows, build=build, workers=workers, log=log)

    def rows_in_epoch(self, epoch: int) -> int:
        return self.index.rows_in_epoch(epoch)

    def efficiency(self, epoch: int = 0) -> float:
        """Real tokens / row slots of one epoch's packing."""
        return self.index.efficiency(epoch)

    def row_samples(self, global_row: int) -> np.ndarray:
        return self.index.row_samples(global_row)

    def batch(self, global_rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """The micro-batch of ``global_rows`` ([B, L] tensors, patches [N, 3, p, p] uint8, row_index [B])."""
        rows = [(self.dataset, self.row_samples(int(g))) for g in global_rows]
        out = assemble_batch(rows, self.seq_length, self.dataset.patch_size, self.draft)
        out["row_index"] = torch.as_tensor([int(g) for g in global_rows], dtype=torch.int64)
        return out

    __getitems__ = batch  # DataLoader: one call per micro-batch (no per-row collation)

    def __getitem__(self, global_row: int) -> dict[str, torch.Tensor]:
        """One packed row (no batch dimension)."""
        b = self.batch([int(global_row)])
        return {k: (v if k == "patches" else v[0]) for k, v in b.items()}

    def __len__(self) -> int:  # one epoch; indices beyond it address later epochs
        return self.rows_in_epoch(0)


def blend_period(weights: Sequence[float]) -> int:
    """Rows per period: BLEND_PERIOD, longer when the smallest weight needs it to get 10 rows per period."""
    w = np.asarray(weights, dtype=np.float64)
    need = int(np.ceil(10 / (w.min() / w.sum())))
    if need > MAX_BLEND_PERIOD:
        raise ValueError(f"blend weight {w.min():g} is below 1e-5 of the total: it would get no rows; drop that "
                         "dataset or raise its weight")
    return max(BLEND_PERIOD, need)


def blend_schedule(weights: Sequence[float], period: int | None = None) -> np.ndarray:
    """Source of each row in one period: greedy on the largest deficit ``weight * (t + 1) - taken``, so
    every prefix of the period is as close to the weights as whole rows allow (ties: the lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
    period = period or blend_period(w)
    w = w / w.sum()
    taken = np.zeros(len(w))
    out = np.empty(period, dtype=np.int64)
    for t in range(period):
        d = int(np.argmax(w * (t + 1) - taken))
        out[t] = d
        taken[d] += 1
    return out


class BlendedRows(torch.utils.data.Dataset):
    """A weighted mixture of packed-row streams: global row g -> (source, that source's own global row).

    The schedule repeats every ``period`` rows, so the map is O(1) and resuming needs nothing but the row
    index. Each source runs through its own epochs independently (a small source repeats more often)."""

    def __init__(self, sources: Sequence[PackedRows], weights: Sequence[float], period: int | None = None):
        self.sources = list(sources)
        self.weights = [float(x) for x in weights]
        self.schedule = blend_schedule(self.weights, period)
        self.period = len(self.schedule)
        counts = np.stack([np.cumsum(self.schedule == d) for d in range(len(self.sources))])  # [S, P]
        self.per_period = counts[:, -1]
        self.before = np.concatenate((np.zeros((len(self.sources), 1), dtype=np.int64), counts[:, :-1]), axis=1)
        self.seq_length = self.sources[0].seq_length
        self.dataset = self.sources[0].dataset

    def locate(self, global_row: int) -> tuple[int, int]:
        q, t = divmod(int(global_row), self.period)
        d = int(self.schedule[t])
        return d, q * int(self.per_period[d]) + int(self.before[d, t])

    def rows_needed(self, total_rows: int) -> list[int]:
        """Rows of each source among global rows [0, total_rows)."""
        q, t = divmod(int(total_rows), self.period)
        return [q * int(self.per_period[d]) + int(np.sum(self.schedule[:t] == d)) for d in range(len(self.sources))]

    def fingerprint(self) -> str:
        text = ";".join(f"{w}:{s.fingerprint()}" for w, s in zip(self.weights, self.sources))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def ensure(self, *, epochs: int = 1, rows: int = 0, build: bool = True, workers: int = 1, log=print) -> None:
        for src, need in zip(self.sources, self.rows_needed(rows)):
            src.ensure(epochs=epochs, rows=need, build=build, workers=workers, log=log)

    def efficiency(self, epoch: int = 0) -> float:
        """Weighted mean of the sources' packing efficiency."""
        return float(sum(w * s.efficiency(epoch) for w, s in zip(self.weights, self.sources)) / sum(self.weights))

    def batch(self, global_rows: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = []
        for g in global_rows:
            d, local = self.locate(int(g))
            rows.append((self.sources[d].dataset, self.sources[d].row_samples(local)))
        out = assemble_batch(rows, self.seq_length, self.dataset.patch_size, self.sources[0].draft)
        out["row_index"] = torch.as_tensor([int(g) for g in global_rows], dtype=torch.int64)
        return out

    __getitems__ = batch
    __getitem__ = PackedRows.__getitem__


class MicroBatchSampler(torch.utils.data.Sampler):
    """Endless micro-batches of global row indices for one data-parallel rank, from ``consumed_samples``."""

    def __init__(self, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_world: int,
                 limit: int | None = None):
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"data-parallel rank {dp_rank} outside world {dp_world}")
        self.consumed = consumed_samples
        self.m = micro_batch_size
        self.rank = dp_rank
        self.world = dp_world
        self.limit = limit  # stop after this many micro-batches (evaluation); None = endless

    def __iter__(self) -> Iterator[list[int]]:
        b = 0
        while self.limit is None or b < self.limit:
            start = self.consumed + b * self.m * self.world + self.rank * self.m
            yield list(range(start, start + self.m))
            b += 1

    def __len__(self) -> int:
        if self.limit is None:
            raise TypeError("endless sampler")
        return self.limit


def _as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataLoader collate: the dataset already built the micro-batch (``__getitems__``)."""
    return batch


def build_loader(rows: PackedRows | BlendedRows, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_world: int, num_workers: int = 0, limit: int | None = None, worker_init_fn=None,
                 prefetch_factor: int = 2, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over packed rows for one DP rank (deterministic: no randomness in loading)."""
    sampler = MicroBatchSampler(consumed_samples, micro_batch_size, dp_rank, dp_world, limit)
    return torch.utils.data.DataLoader(
        rows, batch_sampler=sampler, collate_fn=_as_is, num_workers=num_workers, persistent_workers=False,
        prefetch_factor=prefetch_factor if num_workers else None, worker_init_fn=worker_init_fn,
        pin_memory=pin_memory,
    )


def check_data_config(cfg) -> None:
    """The data fields this module reads, checked before anything is opened (errors name the fields)."""
    problems = []
    if cfg.train_data and cfg.train_blend:
        problems.append("set data.train_data or data.train_blend, not both")
    for i, b in enumerate(cfg.train_blend):
        if not (b.weight > 0 and np.isfinite(b.weight)):
            problems.append(f"data.train_blend[{i}].weight must be a positive number, got {b.weight}")
    for name, low in (("max_open_parts", 1), ("prefetch_factor", 1), ("pack_index_workers", 0),
                      ("pack_buffer_size", 1)):
        if getattr(cfg, name) < low:
            problems.append(f"data.{name} must be >= {low}, got {getattr(cfg, name)}")
    if cfg.max_sample_length > np.iinfo(np.uint16).max:
        problems.append(f"data.max_sample_length ({cfg.max_sample_length}) must be <= 65535: sample lengths are "
                        "stored as uint16")
    if problems:
        raise ConfigError("invalid data configuration:\n  - " + "\n  - ".join(problems))


def check_rows_match(rows: PackedRows | BlendedRows, cfg) -> None:
    """Dataset settings that only the full config can check: the model's patch size and the prompt."""
    for src in getattr(rows, "sources", [rows]):
        meta, where = src.dataset.meta, src.dataset.prefix
        if meta["patch_size"] != cfg.model.patch_size:
            raise ConfigError(f"dataset {where} was built with patch size {meta['patch_size']}, model.patch_size is "
                              f"{cfg.model.patch_size}: rebuild it with this config")
        if meta["prompt"] != cfg.tokenizer.prompt:
            raise ConfigError(f"dataset {where} was built with the prompt {meta['prompt']!r}, tokenizer.prompt is "
                              f"{cfg.tokenizer.prompt!r} (captioning would use another prompt than training): set "
                              "tokenizer.prompt to the dataset's or rebuild the dataset")


def check_data_files(*rows_list, threads: int = 16) -> None:
    """Start-up check of every dataset part that ``rows_list`` (PackedRows / BlendedRows; None is skipped) read:
    ``.bin``, ``.idx`` and ``.sums.npy`` exist with the manifest's sizes. Pure and collective-free, meant to run
    on one process (the trainer: rank 0, its verdict broadcast). Raises DatasetError listing the problems."""
    from megatron_genlip.data.indexed import DatasetError

    problems: list[str] = []
    seen: set[int] = set()
    for rows in rows_list:
        for src in getattr(rows, "sources", [rows] if rows is not None else []):
            if id(src.dataset) not in seen:
                seen.add(id(src.dataset))
                problems += src.dataset.check_parts(threads=threads)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DatasetError("; ".join(problems[:3]) + more)


def open_rows(spec: str | list[str], cfg, tokenizer_fingerprint: str | None = None) -> PackedRows:
    """Packed rows of the dataset(s) ``spec`` (a ``data.train_data``-style value) under data config ``cfg``."""
    dataset = GenLIPIndexedDataset(spec, cfg, tokenizer_fingerprint, cfg.max_open_parts)
    return PackedRows(dataset, cfg.seq_length, cfg.seed, cfg.pack_buffer_size, cfg.pack_index_dir, cfg.jpeg_draft)


def open_train_rows(cfg, tokenizer_fingerprint: str | None = None) -> PackedRows | BlendedRows:
    """The training stream: ``data.train_data``, or the weighted mixture ``data.train_blend``."""
    check_data_config(cfg)
    if cfg.train_blend:
        sources = [open_rows(b.data, cfg, tokenizer_fingerprint) for b in cfg.train_blend]
        return BlendedRows(sources, [b.weight for b in cfg.train_blend])
    return open_rows(cfg.train_data, cfg, tokenizer_fingerprint)
