#!/usr/bin/env python
"""Loader throughput per DataLoader worker on real photographs, today's loader against the former one,
measured side by side in one run (PERFORMANCE.md §4.2: one thread, interleaved ABBA rounds, median and IQR of
the per-round ratios).

Data: the 18 photographs scikit-image ships (astronaut, coffee, chelsea, ...; 300-1024 px), JPEG-encoded,
repeated to ``--samples`` samples, built into indexed datasets with encoded images and with stage-1 pixels
(So16 data settings: Qwen tokenizer, 224 px). Each measurement reads the same packed micro-batches.

* ``former``: the loader before the data-path rework, kept here as the reference: one ``Sample`` per image with
  float32 patches normalised on the host, collated row by row, then moved to shared memory when a worker
  hands the batch over (what ``torch.multiprocessing`` does to a tensor built in ordinary memory).
* ``current``: ``PackedRows.batch``: uint8 patches written in place into arrays allocated in shared memory.
* ``draft``: the current path with ``data.jpeg_draft=true`` (PIL decodes JPEGs at 1/2, 1/4 or 1/8 scale when
  the target allows: faster, but the pixels differ; the run prints by how much).

Two views: process CPU time of building micro-batches in this process (plus the hand-over copy for
``former``), and wall time through a real ``DataLoader`` with one worker process. A per-stage breakdown of
the current encoded path (read, decode, resize, patchify, assemble) follows.

    python benchmarks/data_bench.py                    # 360 samples, 6 rounds (~2 min on 2 cores)
    python benchmarks/data_bench.py --samples 180 --rounds 4
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import webdataset as wds

from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset
from megatron_genlip.data.image_processing import patchify_into, resized_rgb, to_rgb
from megatron_genlip.data.packed_dataset import PackedRows, build_loader, open_rows
from megatron_genlip.data.packing import assemble_batch, collate_row, stack_rows
from megatron_genlip.data.records import decode_image
from megatron_genlip.data.sample import assemble_sample

ROOT = Path(__file__).parent.parent
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "horse", "hubble_deep_field",
          "immunohistochemistry", "page", "text", "brick", "logo", "colorwheel", "clock", "cell", "microaneurysms"]
H100_IMAGES_PER_S = {"L16": 686, "So16": 576, "g16": 234}


def photo_jpegs() -> list[tuple[bytes, str]]:
    """The scikit-image photographs (shipped in its wheel) as JPEG bytes (quality 90) and a one-line title each."""
    import skimage.data as skdata

    photos = []
    for name in PHOTOS:
        arr = getattr(skdata, name)()
        arr = arr.astype(np.uint8) * 255 if arr.dtype == bool else arr
        buf = io.BytesIO()
        to_rgb(PIL.Image.fromarray(arr)).save(buf, format="JPEG", quality=90)
        photos.append((buf.getvalue(), getattr(skdata, name).__doc__.strip().splitlines()[0]))
    return photos


def photo_shards(directory: str, samples: int, per_shard: int = 60) -> list[str]:
    """The scikit-image photographs as JPEG (quality 90) + caption, repeated to ``samples``."""
    photos = photo_jpegs()
    shards = []
    for s in range(0, samples, per_shard):
        path = f"{directory}/photos-{s // per_shard:06d}.tar"
        with wds.TarWriter(path) as w:
            for i in range(s, min(s + per_shard, samples)):
                jpg, caption = photos[i % len(photos)]
                w.write({"__key__": f"{i:06d}", "jpg": jpg, "json": json.dumps({"caption": f"{caption} ({i})"}).encode()})
        shards.append(path)
    return shards


# -------------------------------------------------------------------------------------------------
# the former loader (reference): per-sample float32 Samples, row collation, hand-over copy to shared memory


def _former_patches(ds, image: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    p, c = ds.patch_size, ds.cfg
    if ds.storage == "pixels":
        img = PIL.Image.fromarray(image.reshape(grid[0] * p, grid[1] * p, 3))
    else:
        img = to_rgb(decode_image(bytes(image))).resize((c.image_size, c.image_size), resample=PIL.Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    pixels = torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1).contiguous()
    x = pixels.view(3, grid[0], p, grid[1], p).permute(1, 3, 0, 2, 4)
    return x.reshape(grid[0] * grid[1], 3, p, p).contiguous()


def former_batch(rows: PackedRows, global_rows: list[int]) -> dict[str, torch.Tensor]:
    ds = rows.dataset
    collated = []
    for g in global_rows:
        samples = []
        for i in rows.row_samples(g):
            gh, gw, _ = ds.grid_and_text(int(i))
            text, flags, image = ds.raw(int(i))
            patches = _former_patches(ds, image, (gh, gw))
            samples.append(assemble_sample(patches, (gh, gw), text.tolist(), flags.astype(bool).tolist()))
        collated.append(collate_row(samples, rows.seq_length))
    return stack_rows(collated)


class FormerRows(torch.utils.data.Dataset):
    """The former loader behind the same sampler (one row per __getitem__, collated by the DataLoader)."""

    def __init__(self, rows: PackedRows):
        self.rows = rows

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        return {k: v[0] if k != "patches" else v for k, v in former_batch(self.rows, [int(g)]).items()}

    def __len__(self) -> int:
        return len(self.rows)


def _former_collate(rows: list[dict]) -> dict:
    return stack_rows(rows)


def handed_over(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a worker's hand-over costs: tensors not yet in shared memory are copied there."""
    return {k: (v if v.is_shared() else v.share_memory_()) for k, v in batch.items()}


# -------------------------------------------------------------------------------------------------
# measurements


def cpu_rate(fn, rows: PackedRows, micro_batches: list[list[int]]) -> float:
    """Images per CPU second of building (and handing over) the micro-batches in this process."""
    images = 0
    t = time.process_time()
    for mb in micro_batches:
        batch = handed_over(fn(rows, mb))
        images += int(sum(int(r.max()) + 1 for r in batch["sample_ids"]))
    return images / (time.process_time() - t)


def loader_rate(loader: torch.utils.data.DataLoader, batches: int) -> float:
    """Images per wall second through a DataLoader with one worker (the worker is the bottleneck)."""
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    images = 0
    t = time.perf_counter()
    for _, batch in zip(range(batches), it):
        images += int(sum(int(r.max()) + 1 for r in batch["sample_ids"]))
    return images / (time.perf_counter() - t)


def stage_breakdown(rows: PackedRows, micro_batches: list[list[int]]) -> dict[str, float]:
    """Microseconds per image of each stage of the current encoded path."""
    ds = rows.dataset
    c, p = ds.cfg, ds.patch_size
    spent = dict.fromkeys(("read", "decode", "resize", "patchify"), 0.0)
    images = 0
    for mb in micro_batches:
        for g in mb:
            for i in rows.row_samples(g):
                t0 = time.process_time()
                gh, gw, _ = ds.grid_and_text(int(i))
                _, _, image = ds.raw(int(i))
                t1 = time.process_time()
                img = decode_image(image.tobytes())
                t2 = time.process_time()
                rgb = resized_rgb(img, stage=c.stage, image_size=c.image_size, patch_size=p)
                t3 = time.process_time()
                patchify_into(rgb, p)
                t4 = time.process_time()
                for k, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    spent[k] += dt
                images += 1
    t = time.process_time()
    for mb in micro_batches:
        assemble_batch([(ds, rows.row_samples(g)) for g in mb], rows.seq_length, p)
    whole = time.process_time() - t
    out = {k: 1e6 * v / images for k, v in spent.items()}
    out["whole assemble_batch"] = 1e6 * whole / images  # the stages above plus positions/labels bookkeeping
    return out


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/configs/So16.yaml"),
                    help="config whose tokenizer/data settings are used (default So16: Qwen tokenizer, 224 px)")
    ap.add_argument("--samples", type=int, default=360, help="samples (the 18 photos repeated; default 360)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved ABBA rounds (default 6)")
    ap.add_argument("--seq-length", type=int, default=4096, help="packed row length (default 4096)")
    ap.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the medians as the last line")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"data.seq_length={args.seq_length}", "data.pack_buffer_size=256"])
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = photo_shards(tmp, args.samples)
        rows: dict[str, PackedRows] = {}
        for storage in ("encoded", "pixels"):
            prefix = f"{tmp}/indexed-{storage}"
            report = build_indexed_dataset(shards, prefix, cfg, storage=storage, progress=False)
            rows[storage] = open_rows(prefix, cfg.data)
            rows[storage].ensure(log=lambda *_: None)
            print(f"{storage:8s} dataset: {report['image_bytes'] / report['images'] / 1e3:6.1f} kB/image in .bin")
        n_rows = min(r.rows_in_epoch(0) for r in rows.values())
        m = args.micro_batch
        mbs = [list(range(b, b + m)) for b in range(0, n_rows - m + 1, m)]
        paths = {f"{kind}-{storage}": (fn, rows[storage]) for storage in ("encoded", "pixels")
                 for kind, fn in (("former", former_batch), ("current", lambda r, mb: r.batch(mb)))}
        draft = open_rows(f"{tmp}/indexed-encoded", load_config(args.config, [
            f"data.seq_length={args.seq_length}", "data.pack_buffer_size=256", "data.jpeg_draft=true"]).data)
        paths["draft-encoded"] = (lambda r, mb: r.batch(mb), draft)
        for fn, r in paths.values():  # warm-up: page cache, imports
            cpu_rate(fn, r, mbs[:1])
        rate = {k: [] for k in paths}
        order = list(paths)
        for i in range(args.rounds):
            for name in (order if i % 2 == 0 else order[::-1]):
                fn, r = paths[name]
                rate[name].append(cpu_rate(fn, r, mbs))
        encoded = rows["encoded"]
        loaders = {"former-encoded": lambda: torch.utils.data.DataLoader(
                       FormerRows(encoded), batch_size=m, num_workers=1, collate_fn=_former_collate, prefetch_factor=2),
                   "current-encoded": lambda: build_loader(encoded, 0, m, 0, 1, num_workers=1)}
        wall = {k: [] for k in loaders}
        for i in range(max(2, args.rounds // 2)):
            for name in (list(loaders) if i % 2 == 0 else list(loaders)[::-1]):
                wall[name].append(loader_rate(loaders[name](), len(mbs) - 1))
        stages = stage_breakdown(rows["encoded"], mbs)
        a = rows["encoded"].batch(mbs[0])["patches"].float()
        b = draft.batch(mbs[0])["patches"].float()
        result["draft_mean_abs_pixel_difference"] = float((a - b).abs().mean())

    print(f"\n{len(mbs)} micro-batches of {m} x {args.seq_length} tokens ({args.samples} photo samples), "
          f"{args.rounds} ABBA rounds, 1 thread")
    print(f"{'path':18s} {'images/s (CPU)':>15s}   ratio current/former (q1 / median / q3)")
    for storage in ("encoded", "pixels"):
        base = rate[f"former-{storage}"]
        for kind in ("former", "current", "draft"):
            if f"{kind}-{storage}" not in rate:
                continue
            xs = rate[f"{kind}-{storage}"]
            q1, med, q3 = quartiles([a / b for a, b in zip(xs, base)])
            print(f"{kind + '-' + storage:18s} {statistics.median(xs):15.0f}   {q1:.2f} / {med:.2f} / {q3:.2f}")
            result[f"{kind}_{storage}_images_per_s"] = statistics.median(xs)
        result[f"ratio_{storage}"] = quartiles([a / b for a, b in zip(rate[f"current-{storage}"], base)])[1]
    q1, med, q3 = quartiles([a / b for a, b in zip(wall["current-encoded"], wall["former-encoded"])])
    print(f"\nthrough a DataLoader worker (wall): former {statistics.median(wall['former-encoded']):.0f}, current "
          f"{statistics.median(wall['current-encoded']):.0f} images/s; ratio {q1:.2f} / {med:.2f} / {q3:.2f}")
    result["ratio_encoded_dataloader_wall"] = med
    result["ratio_draft_encoded"] = quartiles([a / b for a, b in zip(rate["draft-encoded"], rate["former-encoded"])])[1]
    print(f"data.jpeg_draft=true changes pixels by {result['draft_mean_abs_pixel_difference']:.2f} (mean |difference| "
          "on the 0-255 scale), which is why it is off by default")
    print("\ncurrent encoded path, microseconds per image: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print("worker cores per H100 at 50% MFU (images/s from PERFORMANCE.md), current path:")
    for model, need in H100_IMAGES_PER_S.items():
        print(f"  {model:5s} ({need} img/s): encoded {need / result['current_encoded_images_per_s']:.1f}, "
              f"pixels {need / result['current_pixels_images_per_s']:.1f}")
    result["stage_us_per_image"] = stages
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
