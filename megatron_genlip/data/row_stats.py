"""How many samples a packed row holds, read from a dataset's stored lengths (``--dry-run``).

Exact when epoch 0 of the pack index is built (its JSON metadata counts rows, samples and tokens), or when the
dataset is small enough to pack whole: epoch 0 of a dataset of at most ``SAMPLE_CAP`` samples (one pack index
chunk) is exactly the buffered first-fit packing of its first arrivals, which is what is computed then.
Otherwise estimated by packing the first ``SAMPLE_CAP`` arrivals of epoch 0 (a pseudo-random sample of the
dataset, packed by the same rule as the build): O(1) in the dataset size, at most ``SAMPLE_CAP`` lengths read.
The sample composition (image and text tokens) always comes from those sampled lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_genlip.data.pack_index import pack_arrivals, shuffle_positions

SAMPLE_CAP = 1 << 16  # lengths read at most; relative error of the mean ~ std / 256


@dataclass
class RowStats:
    """Packing statistics of one dataset's epoch 0 (``exact`` False: estimated from ``sampled`` samples)."""

    dataset: str
    samples: int  # samples per epoch (the whole dataset)
    rows_per_epoch: float
    samples_per_row: float
    efficiency: float  # real tokens / row slots
    image_tokens: float  # mean per sample over the sampled lengths
    text_tokens: float
    composition: list[tuple[int, int, int]]  # (image tokens, text tokens, how many) of the sampled samples
    sampled: int
    exact: bool
    source: str  # how the row counts were obtained, in words

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "composition"}


def row_stats(rows, cap: int | None = None) -> RowStats:
    """Statistics of a ``PackedRows`` (one dataset, possibly concatenated parts) at its packing settings, from at
    most ``cap`` (default ``SAMPLE_CAP``) of its samples' lengths."""
    settings = rows.settings
    n = settings.num_samples
    k = min(n, cap or SAMPLE_CAP)
    ids = shuffle_positions(np.arange(k), n, settings.seed, 0)  # the first k arrivals of epoch 0
    order = np.argsort(ids)  # read the memory-mapped lengths front to back
    cols = np.empty((k, 3), dtype=np.int64)
    cols[order] = rows.dataset.lengths_source().columns(ids[order])
    image, text = cols[:, 0] * cols[:, 1], cols[:, 2]
    lengths = image + text
    combos, counts = np.unique(np.stack((image, text), axis=1), axis=0, return_counts=True)
    composition = [(int(a), int(b), int(c)) for (a, b), c in zip(combos, counts)]
    index = rows.index
    index.refresh()
    if index.epochs:
        meta = index.epoch_meta[0]
        n_rows, tokens, exact = float(meta["rows"]), float(meta["tokens"]), True
        source = f"pack index epoch 0 in {rows.cache_dir}"
    else:
        _, row_sizes = pack_arrivals(lengths, settings.seq_length, settings.buffer_size)
        if k == n and n <= settings.chunk_size:
            n_rows, tokens, exact = float(len(row_sizes)), float(lengths.sum()), True
            source = f"all {n:,} samples packed as epoch 0 will be; no pack index built yet"
        else:
            n_rows = len(row_sizes) * n / k
            tokens = float(lengths.mean()) * n
            exact = False
            source = (f"packed {k:,} of the {n:,} samples, the first arrivals of epoch 0; no pack index built "
                      "yet")
    return RowStats(dataset=rows.dataset.prefix, samples=n, rows_per_epoch=n_rows, samples_per_row=n / n_rows,
                    efficiency=tokens / (n_rows * settings.seq_length), image_tokens=float(image.mean()),
                    text_tokens=float(text.mean()), composition=composition, sampled=k, exact=exact, source=source)
