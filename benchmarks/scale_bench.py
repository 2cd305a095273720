#!/usr/bin/env python
"""The data path at the size it is for: simulated metadata of N samples (default 1e7 on a 2-core machine;
``--samples 1e9`` is the real stage-1 size and needs ~60 GB of disk and a few CPU-hours), measured with process
CPU time, traced peak allocations and anonymous (private, not file-backed) memory, then extrapolated to
1B unique samples / 8B seen from the measured growth.

Simulated dataset: ``--parts`` parts (default 1000) of megatron-core ``.idx`` files written directly (sparse
``.bin``: the index path never needs image bytes), stage-1 lengths (196 image + 8 prompt/eos tokens + a
caption ~N(72, 20) clipped to [8, 130], PERFORMANCE.md §1.4), part reports as tools/preprocess_data.py writes
them, then the real metadata-only finalize, the real pack-index build (8 epochs by default, 16384-token rows,
buffer 4096) and the real readers. Loader images/s per worker come from benchmarks/data_bench.py's photos.

    python benchmarks/scale_bench.py                          # 1e7 samples, ~5 minutes on 2 cores
    python benchmarks/scale_bench.py --samples 1e9 --parts 100000 --epochs 8 --workers 32   # the real size

It also measures what checking every stored byte costs (``verify_*``): the start-up check of every part (one
process), the first touch of a pack-index chunk (sha256 of its 2^20 sample ids and its rows), a row lookup once
its chunk is verified, a part's first open (sha256 of its .idx, sums and lengths rows) and a sample's crc32.

The last line is one JSON object with every number (keys named in the issue).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

REAL_SAMPLES, REAL_SEEN, REAL_PARTS = 1e9, 8e9, 100_000


def anonymous_bytes() -> int:
    """Anonymous (private, not file-backed) memory of this process: what memory maps do not count in."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Anonymous line in /proc/self/smaps_rollup")


def resident() -> dict:
    """This process's resident memory by kind, in MB (/proc/self/status): ``anon`` (private heap: what the
    process itself holds), ``file`` (pages of files it has memory-mapped: the kernel's page cache, shared
    and reclaimable, dropped under memory pressure and on unmap), ``shmem``, and ``hwm`` (peak of the sum)."""
    out = {}
    names = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem", "VmHWM": "hwm"}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in names:
            out[names[key]] = int(value.split()[0]) / 1024
    return out


def cgroup_memory() -> dict:
    """This container's (cgroup's) memory in MB, when readable: ``cgroup_anon`` (private memory of every process in
    it) and ``cgroup_cache`` (page cache charged to it: every file it wrote or read, mapped or not; what a
    container's "memory usage" shows, and what the kernel reclaims first). Empty when no cgroup file is readable."""
    for path, anon, cache in (("/sys/fs/cgroup/memory.stat", "anon", "file"),
                              ("/sys/fs/cgroup/memory/memory.stat", "total_rss", "total_cache")):
        try:
            stat = dict(line.split() for line in Path(path).read_text().splitlines())
            return {"cgroup_anon": int(stat[anon]) / 2**20, "cgroup_cache": int(stat[cache]) / 2**20}
        except (OSError, KeyError, ValueError):
            continue
    return {}


RESIDENT_PROBE = """
import atexit, json, sys
sys.path.insert(0, sys.argv[1])
from scale_bench import resident
atexit.register(lambda: print("RESIDENT " + json.dumps(resident()), file=sys.stderr))
"""


def child_resident(stderr: str) -> dict:
    """The resident memory a bench subprocess reported at its exit (RESIDENT_PROBE)."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("RESIDENT "):
            return json.loads(line[len("RESIDENT "):])
    return {}


class ResidentSampler:
    """Peak anonymous and file-backed resident memory of this process per phase (sampled every 50 ms), so a peak
    of resident memory can be told apart: private memory the bench holds, or memory-mapped files (page cache)."""

    def __init__(self):
        import threading

        self.phases: dict[str, dict] = {}
        self._peak = {"anon": 0.0, "file": 0.0, "cgroup_anon": 0.0, "cgroup_cache": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def _sample(self) -> None:
        now = {**resident(), **cgroup_memory()}
        for k in self._peak:
            self._peak[k] = max(self._peak[k], now.get(k, 0.0))

    def phase(self, name: str, children: dict | None = None) -> None:
        """Close phase ``name``: its peaks (and a subprocess's own resident memory at its exit)."""
        self._sample()
        self.phases[name] = {f"peak_{k}_mb": round(v, 1) for k, v in self._peak.items()}
        if children:
            self.phases[name].update({f"child_{k}_mb": round(v, 1) for k, v in children.items()})
        self._peak = dict.fromkeys(self._peak, 0.0)
        self._sample()

    def stop(self) -> dict:
        self._stop.set()
        return self.phases


def stage1_tokens(n: int, rng: np.random.Generator) -> np.ndarray:
    return 196 + 8 + np.clip(np.round(rng.normal(72, 20, size=n)), 8, 130).astype(np.int64)


def write_part(prefix: str, text_tokens: np.ndarray, settings: dict, source: dict, image_bytes: int = 6400) -> dict:
    """A part as the builder writes it, with a sparse .bin: idx, lengths, report."""
    n = len(text_tokens)
    lengths = np.empty(3 * n, dtype=np.int32)
    lengths[0::3], lengths[1::3], lengths[2::3] = 4 * text_tokens, text_tokens, image_bytes
    pointers = np.zeros(3 * n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=pointers[1:])
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 1))
        f.write(struct.pack("<Q", 3 * n) + struct.pack("<Q", n + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(0, 3 * n + 1, 3, dtype=np.int64).tobytes())
        f.write(np.tile(np.array([0, 2, 1], dtype=np.int8), n).tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()))
    grid = np.full(n, 14, dtype=np.uint16)
    table = np.stack([grid, grid, text_tokens.astype(np.uint16)], axis=1)
    with open(prefix + ".lengths.npy", "wb") as f:
        np.save(f, table)
    sample_bytes = 5 * text_tokens + image_bytes  # the sparse .bin reads as zeros: crc32 by sample size
    crc = {int(b): zlib.crc32(bytes(int(b))) for b in np.unique(sample_bytes)}
    sums = np.asarray([crc[int(b)] for b in sample_bytes], dtype=np.uint32)
    with open(prefix + ".sums.npy", "wb") as f:
        np.save(f, sums)
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    report = {"shard": prefix, "written": n, "tokens": int(196 * n + text_tokens.sum()), "image_bytes": image_bytes * n,
              "skipped": {}, "skipped_samples": [], "settings": settings, "source": source, "duplicate_keys": [], "duplicate_key_count": 0, "fingerprint": os.urandom(8).hex(),
              "bin_bytes": int(lengths.sum()), "idx_bytes": os.path.getsize(prefix + ".idx"),
              "idx_sha256": sha(Path(prefix + ".idx").read_bytes()), "sums_sha256": sha(sums.tobytes()),
              "lengths_sha256": sha(table.tobytes())}
    Path(prefix + ".report.json").write_text(json.dumps(report))
    return report


def simulate(root: Path, samples: int, parts: int, cfg) -> tuple[list[str], str]:
    """Fake input shards and their committed parts; returns (inputs, dataset prefix)."""
    from megatron_genlip.data.builder import part_name, shard_identity
    from megatron_genlip.data.indexed import build_settings

    settings = build_settings(cfg, "encoded")
    rng = np.random.default_rng(0)
    shards_dir, prefix = root / "shards", str(root / "sim")
    shards_dir.mkdir()
    Path(prefix + ".parts").mkdir()
    inputs = []
    for p, count in enumerate(np.diff(np.linspace(0, samples, parts + 1).astype(np.int64))):
        shard = str(shards_dir / f"shard-{p:06d}.tar")
        Path(shard).touch()
        inputs.append(shard)
        write_part(part_name(Path(prefix + ".parts"), p, shard), stage1_tokens(int(count), rng) - 196, settings,
                   shard_identity(shard))
    return inputs, prefix


def measure_finalize(inputs: list[str], prefix: str, cfg) -> dict:
    """Finalize time and peak memory at parts/10 and at all parts: the slope is the cost per part (a subset
    is finalized under another prefix whose parts directory links to the same parts)."""
    from megatron_genlip.data.builder import finalize_dataset

    def once(shards: list[str], out: str) -> tuple[float, float]:
        before = anonymous_bytes()
        tracemalloc.start()
        t = time.process_time()
        finalize_dataset(shards, out, cfg)
        seconds = time.process_time() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return seconds, max(peak, anonymous_bytes() - before) / 2**20

    k = max(1, len(inputs) // 10)
    small = prefix + "-subset"
    os.symlink(Path(prefix + ".parts").name, small + ".parts")
    s_sec, s_mb = once(inputs[:k], small)
    f_sec, f_mb = once(inputs, prefix)
    per_part = max(0.0, (f_mb - s_mb) / (len(inputs) - k)) if len(inputs) > k else 0.0
    return {"finalize_seconds": f_sec, "finalize_peak_mb": f_mb, "finalize_mb_per_part": per_part,
            "finalize_seconds_per_part": (f_sec - s_sec) / max(1, len(inputs) - k),
            "finalize_peak_mb_1000_parts": s_mb + per_part * (1000 - k), "subset_prefix": small}


def measure_pack(rows, epochs: int, workers: int) -> dict:
    """Epoch 0 under tracemalloc (peak), then every epoch timed (process CPU time of this process; with
    workers the children's CPU time is read from os.times())."""
    from megatron_genlip.data.pack_index import build_epoch

    n = len(rows.dataset)
    source = rows.dataset.lengths_source()
    tracemalloc.start()
    build_epoch(rows.cache_dir, rows.settings, source, 0, workers=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    cpu = []
    for e in range(epochs):
        t0, c0 = time.process_time(), os.times()
        w0 = time.perf_counter()
        build_epoch(rows.cache_dir, rows.settings, source, e, workers=workers)
        c1 = os.times()
        cpu.append((time.process_time() - t0 + (c1.children_user + c1.children_system)
                    - (c0.children_user + c0.children_system), time.perf_counter() - w0))
    rows.index.refresh()
    per_sample = [c / n * 1e6 for c, _ in cpu]
    return {"pack_us_per_sample": float(np.median(per_sample)), "pack_us_per_sample_all_epochs": per_sample,
            "pack_wall_s_per_epoch": float(np.median([w for _, w in cpu])), "pack_workers": workers,
            "pack_peak_bytes_per_sample": peak / n, "pack_peak_mb": peak / 2**20,
            "packing_efficiency": rows.efficiency(0), "rows_per_epoch": rows.rows_in_epoch(0),
            "index_bytes_per_epoch": sum(os.path.getsize(rows.cache_dir / f"epoch0000.{x}.npy") for x in ("order", "rows"))}


READER = r'''
import json, random, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from scale_bench import anonymous_bytes
from megatron_genlip.config import load_config
from megatron_genlip.data.pack_index import PackIndex
from megatron_genlip.data.packed_dataset import open_rows

cfg = load_config(sys.argv[2], sys.argv[4:])
base = anonymous_bytes()
rows = open_rows(sys.argv[3], cfg.data)
index, ds = rows.index, rows.dataset
rng = random.Random(0)
out = {}
for e in (0, 7 if index.epochs > 7 else index.epochs - 1):
    lo, hi = int(index.row_starts[e]), int(index.row_starts[e + 1])
    picks = [rng.randrange(lo, hi) for _ in range(20)]
    t = time.perf_counter()
    for g in picks:  # what a resumed worker does first: read the epoch table, locate, open, fetch
        fresh = PackIndex(index.directory, rows.settings)
        ids = fresh.row_samples(g)
        for i in ids:
            ds.grid_and_text(int(i))
    out[f"resume_ms_epoch{e}"] = (time.perf_counter() - t) / len(picks) * 1e3
    picks = [rng.randrange(lo, hi) for _ in range(2000)]
    index.row_samples(picks[0])
    t = time.process_time()
    for g in picks:
        index.row_samples(g)
    out[f"fetch_index_us_epoch{e}"] = (time.process_time() - t) / len(picks) * 1e6
    t = time.process_time()
    for g in picks[:200]:
        for i in index.row_samples(g):
            ds.raw(int(i))
    out[f"fetch_row_with_part_reads_us_epoch{e}"] = (time.process_time() - t) / 200 * 1e6
out["rank_metadata_bytes"] = anonymous_bytes() - base
out["rank_metadata_bytes_per_sample"] = out["rank_metadata_bytes"] / len(ds)
print(json.dumps(out))
'''


VERIFY = r'''
import json, sys, time, zlib
sys.path.insert(0, sys.argv[1])
import numpy as np
from megatron_genlip.config import load_config
from megatron_genlip.data.pack_index import PackIndex
from megatron_genlip.data.packed_dataset import check_data_files, open_rows

cfg = load_config(sys.argv[2], sys.argv[4:])
rows = open_rows(sys.argv[3], cfg.data)
index, ds = rows.index, rows.dataset
out = {}
t = time.perf_counter()
check_data_files(rows)  # the start-up check (one process): every part's files exist with their sizes
out["verify_startup_s"] = time.perf_counter() - t
out["verify_startup_ms_per_part"] = out["verify_startup_s"] / len(ds.part_paths) * 1e3
fresh = PackIndex(index.directory, rows.settings)  # first touch of every chunk of epoch 0 (hashes each once)
meta = fresh.epoch_meta[0]
starts = np.cumsum([0] + meta["chunk_rows"])
t = time.process_time()
for c in range(len(meta["chunk_rows"])):
    fresh.row_samples(int(starts[c]))
out["verify_chunk_ms"] = (time.process_time() - t) / len(meta["chunk_rows"]) * 1e3
out["rows_per_chunk"] = float(np.mean(meta["chunk_rows"]))
rng = np.random.default_rng(1)
picks = rng.integers(0, int(starts[-1]), 5000)
t = time.process_time()
for g in picks:  # every chunk verified: what is left per row is a set lookup and a binary search
    fresh.row_samples(int(g))
out["verify_fetch_index_us_verified"] = (time.process_time() - t) / len(picks) * 1e6
fresh._check_row = lambda *a: None
t = time.process_time()
for g in picks:
    fresh.row_samples(int(g))
out["verify_fetch_index_us_unchecked"] = (time.process_time() - t) / len(picks) * 1e6
parts = rng.choice(len(ds.part_paths), min(200, len(ds.part_paths)), replace=False)
t = time.process_time()
for p in parts:  # first open of a part in a process: sizes, .idx sha256, sums sha256, its lengths rows
    i = int(ds.part_starts[p])
    ds.grid_and_text(i)
    ds.raw(i)
first = (time.process_time() - t) / len(parts)
t = time.process_time()
for p in parts:  # the same parts again (open, nothing checked): the difference is the first-open check
    ds._parts.clear()
    i = int(ds.part_starts[p])
    ds.grid_and_text(i)
    ds.raw(i)
again = (time.process_time() - t) / len(parts)
out["verify_part_first_open_ms"] = (first - again) * 1e3
for size in (7_000, 50_000, 150_000):  # simulated stage-1 sample, an encoded photo, stage-1 pixels
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    for _ in range(2000):
        zlib.crc32(data)
    out[f"verify_crc32_us_{size}"] = (time.perf_counter() - t) / 2000 * 1e6
out["verify_crc32_mb_per_s"] = 150_000 / out["verify_crc32_us_150000"]
print(json.dumps(out))
'''


def measure_verification(config: str, prefix: str, overrides: list[str]) -> dict:
    """What checking every stored byte costs: the start-up part check, a pack-index chunk's first touch, a row
    lookup once its chunk is verified, a part's first open, a sample's crc32 (a fresh process)."""
    out = subprocess.run([sys.executable, "-c", RESIDENT_PROBE + VERIFY, str(Path(__file__).parent), config, prefix,
                          *overrides], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"verification measurement failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "resident": child_resident(out.stderr)}


DATASET = r'''
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from scale_bench import anonymous_bytes
from megatron_genlip.config import load_config
from megatron_genlip.data.indexed import GenLIPIndexedDataset

cfg = load_config(sys.argv[2], sys.argv[4:])
base = anonymous_bytes()
ds = GenLIPIndexedDataset(sys.argv[3], cfg.data, max_open_parts=4)  # the open-part cache is bounded anyway
for i in np.random.default_rng(0).integers(0, len(ds), 5000):
    ds.grid_and_text(int(i))
    ds.raw(int(i))
print(anonymous_bytes() - base)
'''


def measure_dataset_memory(config: str, prefix: str, overrides: list[str]) -> tuple[int, dict]:
    """Private bytes of an opened dataset after 5000 random sample reads (parts opened, LRU full), and the
    subprocess's resident memory at its exit."""
    out = subprocess.run([sys.executable, "-c", RESIDENT_PROBE + DATASET, str(Path(__file__).parent), config, prefix,
                          *overrides], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(out.stdout.strip().splitlines()[-1]), child_resident(out.stderr)


def measure_reader(config: str, prefix: str, overrides: list[str]) -> dict:
    """Resume and fetch costs and per-rank private memory, in a fresh process (a clean memory baseline)."""
    out = subprocess.run([sys.executable, "-c", RESIDENT_PROBE + READER, str(Path(__file__).parent), config, prefix,
                          *overrides], capture_output=True, text=True, cwd=ROOT, check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "resident": child_resident(out.stderr)}


def measure_loader(config: str, samples: int) -> dict:
    """Current loader images/s per worker (CPU time) on the scikit-image photos, encoded and pixels."""
    import data_bench
    from megatron_genlip.config import load_config
    from megatron_genlip.data.builder import build_indexed_dataset
    from megatron_genlip.data.packed_dataset import open_rows

    cfg = load_config(config, ["data.seq_length=4096", "data.pack_buffer_size=256"])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = data_bench.photo_shards(tmp, samples)
        for storage in ("encoded", "pixels"):
            build_indexed_dataset(shards, f"{tmp}/{storage}", cfg, storage=storage, progress=False)
            rows = open_rows(f"{tmp}/{storage}", cfg.data)
            rows.ensure(log=lambda *_: None)
            mbs = [[r, r + 1] for r in range(0, rows.rows_in_epoch(0) - 1, 2)]
            data_bench.cpu_rate(lambda r, mb: r.batch(mb), rows, mbs[:1])
            out[f"loader_images_per_s_{storage}"] = data_bench.cpu_rate(lambda r, mb: r.batch(mb), rows, mbs)
    return out


def extrapolate(m: dict, samples: int, parts: int, epochs: int) -> list[tuple[str, str, str]]:
    scale = REAL_SAMPLES / samples
    last = min(7, epochs - 1)
    cpu_h = m["pack_us_per_sample"] * REAL_SAMPLES * 8 / 1e6 / 3600
    return [
        ("pack index build", f"{m['pack_us_per_sample']:.2f} us/sample/process, {m['pack_wall_s_per_epoch']:.1f} s "
         f"wall per epoch ({m['pack_workers']} workers)",
         f"{cpu_h:.1f} CPU-h for 8 epochs: {cpu_h * 60 / 32 / 8:.0f} min per epoch on 32 cores"),
        ("pack build peak memory", f"{m['pack_peak_mb']:.0f} MB ({m['pack_peak_bytes_per_sample']:.2f} B/sample)",
         f"{m['pack_peak_mb']:.0f} MB per process (one 2^20-sample chunk at a time: independent of N)"),
        ("resident memory", f"bench process: private {m['resident_peak_anon_mb']:.0f} MB, memory-mapped files "
         f"{m['resident_peak_file_mb']:.0f} MB (peaks); readers: private {m['resident_children_peak_anon_mb']:.0f} MB, "
         f"mapped {m['resident_children_peak_file_mb']:.0f} MB; container: private {m['cgroup_peak_anon_mb']:.0f} MB, "
         f"page cache {m['cgroup_peak_cache_mb'] / 1024:.1f} GiB",
         "private: same (independent of N); mapped files and page cache grow with N (the files written and "
         "memory-mapped: lengths, .idx, pack index) and are reclaimable, not held"),
        ("pack index on disk", f"{m['index_bytes_per_epoch'] / 2**20:.0f} MB/epoch",
         f"{m['index_bytes_per_epoch'] * scale * 8 / 2**30:.0f} GiB for 8 epochs (memory-mapped, shared page cache)"),
        ("packing efficiency", f"{100 * m['packing_efficiency']:.2f}%", "same (a property of the lengths)"),
        ("resume lookup", f"epoch 0 {m['resume_ms_epoch0']:.2f} ms, epoch {last} {m['resume_ms_epoch7']:.2f} ms",
         "same: one binary search over 8 epochs, two memory maps"),
        ("row-fetch index cost", f"epoch 0 {m['fetch_index_us_epoch0']:.1f} us, epoch {last} "
         f"{m['fetch_index_us_epoch7']:.1f} us",
         "same"),
        ("per-rank metadata (private)", f"{m['rank_metadata_bytes'] / 2**20:.1f} MB = "
         f"{m['rank_metadata_bytes_per_sample']:.3f} B/sample ({m['dataset_bytes_per_part']:.0f} B/part)",
         f"~{(m['rank_metadata_bytes'] + m['dataset_bytes_per_part'] * (REAL_PARTS - parts)) / 2**20:.0f} MB for "
         f"{REAL_PARTS:,} parts (grows with parts, not samples: samples stay memory-mapped)"),
        ("part reads (index + bytes)", f"{m['fetch_row_with_part_reads_us_epoch0'] / 60:.0f} us/sample",
         "same (every sample from another part: one part open per sample at worst)"),
        ("finalize", f"{parts} parts: {m['finalize_seconds']:.1f} s CPU, {m['finalize_peak_mb']:.0f} MB peak",
         f"{REAL_PARTS:,} parts: ~{m['finalize_seconds_per_part'] * REAL_PARTS / 60:.0f} min, "
         f"~{m['finalize_peak_mb'] + m['finalize_mb_per_part'] * (REAL_PARTS - parts):.0f} MB peak "
         "(O(parts); lengths streamed)"),
        ("verification at start-up", f"{parts} parts: {m['verify_startup_s']:.2f} s "
         f"({m['verify_startup_ms_per_part']:.3f} ms/part: listing + 2 stats per part, one process)",
         f"{REAL_PARTS:,} parts: ~{m['verify_startup_ms_per_part'] * REAL_PARTS / 1e3:.0f} s on a local disk, "
         "one process (rank 0) for the whole job"),
        ("verification per row", f"chunk first touch {m['verify_chunk_ms']:.1f} ms per {m['rows_per_chunk']:.0f} "
         f"rows; verified lookup {m['verify_fetch_index_us_verified']:.1f} us vs "
         f"{m['verify_fetch_index_us_unchecked']:.1f} us unchecked",
         "same per chunk (2^20 samples, fixed); per process, not per step"),
        ("verification per sample", f"part first open {m['verify_part_first_open_ms']:.2f} ms; crc32 "
         f"{m['verify_crc32_us_50000']:.0f} us per 50 kB photo ({m['verify_crc32_mb_per_s']:.0f} MB/s)",
         "same (per part: ~10,000 samples; per sample: its own bytes)"),
        ("loader per worker", f"encoded {m['loader_images_per_s_encoded']:.0f}, pixels "
         f"{m['loader_images_per_s_pixels']:.0f} images/s", f"So16 at 50% MFU needs ~576 images/s per GPU: "
         f"{576 / m['loader_images_per_s_encoded']:.1f} encoded or {576 / m['loader_images_per_s_pixels']:.1f} pixel workers"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=float, default=1e7, help="simulated samples (default 1e7; the real size is 1e9)")
    ap.add_argument("--parts", type=int, default=1000, help="simulated parts (default 1000)")
    ap.add_argument("--epochs", type=int, default=8, help="pack-index epochs to build (default 8)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="pack-index build processes")
    ap.add_argument("--config", default=str(ROOT / "examples/configs/stage1-So16.yaml"),
                    help="recipe whose data settings are used (default: stage1-So16, 16384-token rows)")
    ap.add_argument("--photo-samples", type=int, default=180,
                    help="photo samples for the loader measurement (at least 60; default 180)")
    ap.add_argument("--workdir", default=None, help="where the simulated dataset goes (default: a temporary dir)")
    args = ap.parse_args()
    if args.photo_samples < 60:
        ap.error("--photo-samples must be at least 60 (a few packed micro-batches of 4096-token rows)")
    from megatron_genlip.config import load_config
    from megatron_genlip.data.packed_dataset import open_rows

    samples = int(args.samples)
    overrides = ["data.valid_data=null"]
    cfg = load_config(args.config, overrides)
    m: dict = {"samples": samples, "parts": args.parts, "epochs": args.epochs}
    sampler = ResidentSampler()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t = time.perf_counter()
        inputs, prefix = simulate(Path(tmp), samples, args.parts, cfg)
        print(f"simulated {samples:,} samples in {args.parts} parts in {time.perf_counter() - t:.0f} s")
        sampler.phase("simulate")
        m.update(measure_finalize(inputs, prefix, cfg))
        sampler.phase("finalize")
        small = m.pop("subset_prefix")
        rows = open_rows(prefix, cfg.data)
        m.update(measure_pack(rows, args.epochs, args.workers))
        sampler.phase("pack")
        print(f"packed {args.epochs} epochs: {m['pack_us_per_sample']:.2f} us/sample")
        reader = measure_reader(args.config, prefix, overrides)
        sampler.phase("reader", reader.pop("resident"))
        m.update(reader)
        verify = measure_verification(args.config, prefix, overrides)
        sampler.phase("verify", verify.pop("resident"))
        m.update(verify)
        few, _ = measure_dataset_memory(args.config, small, overrides)
        many, there = measure_dataset_memory(args.config, prefix, overrides)
        sampler.phase("dataset", there)
        k = max(1, args.parts // 10)
        m["dataset_bytes_per_part"] = max(0.0, (many - few) / max(1, args.parts - k))
        m["dataset_bytes"] = many
    m.update(measure_loader(args.config, args.photo_samples))
    sampler.phase("loader")
    m["resident_phases"] = sampler.stop()
    m["resident_peak_anon_mb"] = max(p["peak_anon_mb"] for p in m["resident_phases"].values())
    m["resident_peak_file_mb"] = max(p["peak_file_mb"] for p in m["resident_phases"].values())
    m["resident_children_peak_anon_mb"] = max([p.get("child_anon_mb", 0.0) for p in m["resident_phases"].values()])
    m["resident_children_peak_file_mb"] = max([p.get("child_file_mb", 0.0) for p in m["resident_phases"].values()])
    m["cgroup_peak_anon_mb"] = max(p["peak_cgroup_anon_mb"] for p in m["resident_phases"].values())
    m["cgroup_peak_cache_mb"] = max(p["peak_cgroup_cache_mb"] for p in m["resident_phases"].values())
    m["children_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # pack workers too
    last = 7 if args.epochs > 7 else args.epochs - 1
    m.setdefault("resume_ms_epoch7", m[f"resume_ms_epoch{last}"])
    m.setdefault("fetch_index_us_epoch7", m[f"fetch_index_us_epoch{last}"])
    print(f"\n{'what':28s} | {'measured at ' + f'{samples:,.0f} samples':44s} | at 1B samples / 8B seen")
    for what, here, real in extrapolate(m, samples, args.parts, args.epochs):
        print(f"{what:28s} | {here:44s} | {real}")
    print(json.dumps(m))


if __name__ == "__main__":
    random.seed(0)
    main()
