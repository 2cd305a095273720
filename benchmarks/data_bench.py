#!/usr/bin/env python
"""Data-loading throughput per worker: the indexed path (encoded images or stored pixels) vs the streaming
webdataset path, measured side by side in one process on the same shards (PERFORMANCE.md §4.2: one thread,
process CPU time, interleaved ABBA rounds, median and IQR of the per-round ratios).

Each path produces packed rows (decode, resize to the stage-1 resolution, normalise, patchify, tokens,
labels, 3-axis positions) exactly as the trainer consumes them. The last table gives images/s per worker
core and the cores one H100 needs at 50% MFU (PERFORMANCE.md: 686 images/s for L/16, 576 for So/16).

    python benchmarks/data_bench.py                       # So16 data settings, 600 synthetic 256 px JPEGs
    python benchmarks/data_bench.py --samples 200 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset
from megatron_genlip.data.indexed import GenLIPIndexedDataset
from megatron_genlip.data.packed_dataset import PackedRows
from megatron_genlip.data.streaming import StreamingPackedRows
from megatron_genlip.data.synthetic import write_shards

ROOT = Path(__file__).parent.parent
H100_IMAGES_PER_S = {"L16": 686, "So16": 576, "g16": 234}


def images_in(row: dict) -> int:
    return int(row["sample_ids"].max()) + 1


def run_indexed(rows: PackedRows, n_rows: int) -> tuple[float, int]:
    """CPU seconds and images for the first ``n_rows`` rows."""
    t = time.process_time()
    images = sum(images_in(rows[r]) for r in range(n_rows))
    return time.process_time() - t, images


def run_streaming(shards: list[str], cfg, n_rows: int) -> tuple[float, int]:
    t = time.process_time()
    images = 0
    for i, row in enumerate(StreamingPackedRows(shards, cfg, shuffle_buffer=100)):
        images += images_in(row)
        if i + 1 == n_rows:
            break
    return time.process_time() - t, images


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/configs/So16.yaml"),
                    help="config whose tokenizer/data settings are used (default So16: Qwen tokenizer, 224 px)")
    ap.add_argument("--samples", type=int, default=600, help="synthetic samples to generate (default 600)")
    ap.add_argument("--source-size", type=int, default=256, help="side of the generated JPEGs in px (default 256)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved ABBA rounds (default 6)")
    ap.add_argument("--seq-length", type=int, default=4096, help="packed row length for the benchmark (default 4096)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"data.seq_length={args.seq_length}", "data.pack_buffer_size=256"])

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(tmp, "bench", args.samples, max(1, args.samples // 4), seed=0,
                              image_size=args.source_size, image_format="jpg")
        datasets = {}
        for storage in ("encoded", "pixels"):
            prefix = f"{tmp}/indexed-{storage}"
            t = time.perf_counter()
            report = build_indexed_dataset(shards, prefix, cfg, storage=storage, progress=False)
            datasets[storage] = PackedRows(GenLIPIndexedDataset(prefix, cfg.data), cfg.data.seq_length,
                                           cfg.data.seed, cfg.data.pack_buffer_size)
            print(f"built {storage:8s} dataset: {report['image_bytes'] / report['images'] / 1e3:7.1f} kB/image "
                  f"in .bin, {time.perf_counter() - t:.1f} s to build")
        n_rows = min(r.rows_in_epoch(0) for r in datasets.values()) - 1
        paths = {
            "streaming": lambda: run_streaming(shards, cfg, n_rows),
            "indexed-encoded": lambda: run_indexed(datasets["encoded"], n_rows),
            "indexed-pixels": lambda: run_indexed(datasets["pixels"], n_rows),
        }
        for fn in paths.values():  # warm-up: page cache, pack-index cache, imports
            fn()
        rate: dict[str, list[float]] = {k: [] for k in paths}
        row_rate: dict[str, list[float]] = {k: [] for k in paths}
        order = list(paths)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):  # ABBA
                cpu, images = paths[name]()
                rate[name].append(images / cpu)
                row_rate[name].append(n_rows / cpu)

    print(f"\n{n_rows} rows of {args.seq_length} tokens per measurement, {args.rounds} interleaved rounds, "
          "1 thread, process CPU time")
    print(f"{'path':18s} {'images/s/worker':>16s} {'rows/s/worker':>14s} {'ratio vs streaming (q1/median/q3)':>36s}")
    base = rate["streaming"]
    for name, xs in rate.items():
        ratios = [a / b for a, b in zip(xs, base)]
        q1, med, q3 = quartiles(ratios)
        print(f"{name:18s} {statistics.median(xs):16.0f} {statistics.median(row_rate[name]):14.2f} "
              f"{q1:12.2f} /{med:6.2f} /{q3:6.2f}")
    print("\nworker cores needed per H100 at 50% MFU (images/s from PERFORMANCE.md):")
    for model, need in H100_IMAGES_PER_S.items():
        cells = ", ".join(f"{name} {need / statistics.median(xs):.1f}" for name, xs in rate.items())
        print(f"  {model:5s} ({need} img/s): {cells}")


if __name__ == "__main__":
    main()
