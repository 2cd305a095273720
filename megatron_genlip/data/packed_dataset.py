"""Packed rows over an indexed dataset, and the data-parallel sampler (ARCHITECTURE.md §4.1).

Epoch ``e`` shuffles the samples with ``(seed, e)`` and packs them with the buffered first-fit rule; the
pack index (row pointers + sample order) is cached on disk next to the dataset and reused. Rows of all
epochs form one endless stream addressed by a *global row index*; training's position in it is
``consumed_samples`` (rows consumed by all data-parallel ranks together, Megatron's convention).

Micro-batch ``b`` of data-parallel rank ``r`` holds global rows ``consumed + b*m*D + r*m ... + m`` (m = micro
batch, D = DP size): ranks get disjoint rows whose union is the stream, TP/PP peers of a DP rank get the
same rows, and a resumed run continues with exactly the rows an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from megatron_genlip.data.indexed import GenLIPIndexedDataset
from megatron_genlip.data.packing import buffered_first_fit, collate_row, stack_rows

PACK_VERSION = 1


class PackedRows(torch.utils.data.Dataset):
    """Global row index -> collated packed row (tokens, labels, positions, sample ids, kinds, patches)."""

    def __init__(self, dataset: GenLIPIndexedDataset, seq_length: int, seed: int, buffer_size: int,
                 cache_dir: str | Path | None = None):
        self.dataset = dataset
        self.seq_length = seq_length
        self.seed = seed
        self.buffer_size = buffer_size
        self.lengths = dataset.sample_lengths()
        if len(self.lengths) == 0:
            raise ValueError(f"dataset {dataset.prefix} holds no samples")
        self.cache_dir = Path(cache_dir or dataset.prefix + ".packs")
        key = f"{dataset.fingerprint()}-{seq_length}-{seed}-{buffer_size}-v{PACK_VERSION}"
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self._epoch = lru_cache(maxsize=4)(self._load_or_pack)

    # -- pack index ----------------------------------------------------------------------------------

    def _load_or_pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.cache_dir / f"{self.key}-epoch{epoch}.npz"
        if path.is_file():
            with np.load(path) as z:
                return z["row_ptr"], z["order"]
        row_ptr, order = self.pack(epoch)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, row_ptr=row_ptr, order=order)
        os.replace(tmp, path)
        return row_ptr, order

    def pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row_ptr [R+1], order [N]): row r holds samples order[row_ptr[r]:row_ptr[r+1]]."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        rows = buffered_first_fit(self.lengths[perm], self.seq_length, self.buffer_size)
        order = np.fromiter((perm[i] for row in rows for i in row), dtype=np.int64, count=len(perm))
        row_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        row_ptr[1:] = np.cumsum([len(r) for r in rows])
        return row_ptr, order

    def rows_in_epoch(self, epoch: int) -> int:
        return len(self._epoch(epoch)[0]) - 1

    def efficiency(self, epoch: int = 0) -> float:
        """Real tokens / row slots of one epoch's packing."""
        return float(self.lengths.sum()) / (self.rows_in_epoch(epoch) * self.seq_length)

    def locate(self, global_row: int) -> tuple[int, int]:
        """Global row index -> (epoch, row within the epoch)."""
        epoch = 0
        while global_row >= (n := self.rows_in_epoch(epoch)):
            global_row -= n
            epoch += 1
        return epoch, global_row

    def row_samples(self, global_row: int) -> np.ndarray:
        epoch, r = self.locate(global_row)
        row_ptr, order = self._epoch(epoch)
        return order[row_ptr[r]:row_ptr[r + 1]]

    # -- data ----------------------------------------------------------------------------------------

    def __len__(self) -> int:  # one epoch; indices beyond it address later epochs
        return self.rows_in_epoch(0)

    def __getitem__(self, global_row: int) -> dict[str, torch.Tensor]:
        ids = self.row_samples(int(global_row))
        row = collate_row([self.dataset[int(i)] for i in ids], self.seq_length)
        row["row_index"] = torch.tensor(int(global_row))
        return row


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


def collate_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """DataLoader collate: stack rows into a micro-batch."""
    return stack_rows(rows)


def build_loader(rows: PackedRows, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_world: int,
                 num_workers: int = 0, limit: int | None = None, worker_init_fn=None) -> torch.utils.data.DataLoader:
    """A DataLoader over packed rows for one DP rank (deterministic: no randomness in loading)."""
    sampler = MicroBatchSampler(consumed_samples, micro_batch_size, dp_rank, dp_world, limit)
    return torch.utils.data.DataLoader(
        rows, batch_sampler=sampler, collate_fn=collate_rows, num_workers=num_workers,
        persistent_workers=False, prefetch_factor=4 if num_workers else None, worker_init_fn=worker_init_fn,
    )
