"""The streaming path: webdataset shards -> packed rows on the fly, without preprocessing.

For quick experiments on raw shards. Shards are split explicitly by *data-parallel* rank (never by global
rank, so TP/PP peers read the same data) and then by DataLoader worker; samples are shuffled in a seeded
buffer, decoded, validated (bad samples are skipped and counted), and packed with the same first-fit rule
as the indexed path. Unlike the indexed path it cannot resume mid-epoch at an exact row: use
``tools/preprocess_data.py`` for real runs.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from megatron_genlip.config import Config
from megatron_genlip.data.packing import collate_row, fill_row
from megatron_genlip.data.records import SkipSample, decode_record, sample_from_parts, tokenize_record
from megatron_genlip.data.sample import Sample
from megatron_genlip.data.tokenizer import load_tokenizer


def dp_worker_shards(urls: list[str], dp_rank: int, dp_world: int, worker: int, num_workers: int) -> list[str]:
    """Shards of one DataLoader worker of one data-parallel rank: rank-major, then worker."""
    mine = urls[dp_rank::dp_world][worker::num_workers]
    if not mine:
        raise ValueError(f"{len(urls)} shards cannot feed {dp_world} data-parallel ranks x {num_workers} workers; "
                         "use at least dp_world x num_workers shards")
    return mine


class StreamingPackedRows(torch.utils.data.IterableDataset):
    """Iterable of collated packed rows for one data-parallel rank (one pass over its shards)."""

    def __init__(self, urls: list[str], cfg: Config, dp_rank: int = 0, dp_world: int = 1,
                 shuffle_buffer: int = 1000, seed: int | None = None):
        self.urls = list(urls)
        self.cfg = cfg
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.shuffle_buffer = shuffle_buffer
        self.seed = cfg.data.seed if seed is None else seed
        self.skipped: Counter[str] = Counter()

    def _samples(self, shards: list[str], worker_seed: int) -> Iterator[Sample]:
        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
        stream = wds.DataPipeline(
            wds.SimpleShardList(shards),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.shuffle_buffer, rng=random.Random(worker_seed)),
        )
        for raw in stream:
            try:
                rec = decode_record(raw, cfg.data)
                grid, ids, flags = tokenize_record(rec, tokenizer, cfg.data, cfg.tokenizer.prompt, cfg.model.patch_size)
                yield sample_from_parts(rec.image, grid, ids, flags, cfg.data, cfg.model.patch_size)
            except SkipSample as e:
                self.skipped[e.reason] += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = dp_worker_shards(self.urls, self.dp_rank, self.dp_world, worker, workers)
        seed = self.seed * 1_000_003 + self.dp_rank * 1000 + worker
        seq, size = self.cfg.data.seq_length, self.cfg.data.pack_buffer_size
        buf: list[Sample] = []
        source = self._samples(shards, seed)
        exhausted = False
        while buf or not exhausted:
            while not exhausted and len(buf) < size:
                try:
                    buf.append(next(source))
                except StopIteration:
                    exhausted = True
            if not buf:
                return
            picked = sorted(fill_row(np.array([len(s) for s in buf]), seq))
            yield collate_row([buf[j] for j in picked], seq)
            chosen = set(picked)
            buf = [s for j, s in enumerate(buf) if j not in chosen]
