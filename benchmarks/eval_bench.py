#!/usr/bin/env python
"""Evaluation throughput, measured side by side in one process (one thread, wall time, warm-up first, the two
ways interleaved A B B A over ``--pairs`` pairs, median of the per-pair ratios):

1. probe features: ``evaluation.extract_features`` (image tokens alone, batched; what linear/attentive probes
   and the readout run) vs the training forward of the same images (packed rows of
   ``[patches][prompt][caption]`` samples through ``model(batch)``, loss included, no backward), in images/s;
2. captions: ``inference.generate.generate_captions`` (``--batch-size`` images per forward) vs
   ``generate_caption`` one image at a time, on ``--images`` images (default 64), in captions/s; the generated
   tokens are checked equal.

Images are the embedded synthetic scenes at the config's resolution; the model is the config's (default the
tiny CPU demo model), randomly initialised (captions then run to ``--max-new-tokens``: both ways decode the
same tokens).

    python benchmarks/eval_bench.py                     # examples/configs/tiny.yaml, 64 images
    python benchmarks/eval_bench.py --config examples/configs/tiny.yaml --images 64 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def synthetic_images(n: int, image_size: int, patch: int, seed: int = 0):
    from megatron_genlip.data.image_processing import image_to_patches
    from megatron_genlip.data.synthetic import make_scene

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img, caption, _ = make_scene(rng, image_size)
        patches, grid = image_to_patches(img, stage=1, image_size=image_size, patch_size=patch)
        out.append((torch.from_numpy(patches), grid, caption))
    return out


def training_batches(images, tokenizer, prompt: str, seq_length: int, rows_per_batch: int):
    """The images as training samples packed first-fit into rows of ``seq_length`` tokens."""
    from megatron_genlip.data.packing import collate_batch
    from megatron_genlip.data.sample import build_sample

    rows, row, used = [], [], 0
    for patches, grid, caption in images:
        s = build_sample(tokenizer, patches, grid, caption, prompt)
        if used + len(s) > seq_length:
            rows.append(row)
            row, used = [], 0
        row.append(s)
        used += len(s)
    rows.append(row)
    return [collate_batch(rows[i:i + rows_per_batch], seq_length) for i in range(0, len(rows), rows_per_batch)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def abba(a, b, pairs: int) -> tuple[list[float], list[float]]:
    ta, tb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            ta.append(timed(a))
            tb.append(timed(b))
        else:
            tb.append(timed(b))
            ta.append(timed(a))
    return ta, tb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples" / "configs" / "tiny.yaml"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward for batched captions/features")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--pairs", type=int, default=4, help="A/B pairs per comparison (features)")
    ap.add_argument("--caption-pairs", type=int, default=2, help="A/B pairs for the captions")
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from megatron_genlip import platform

    platform.start_process()
    platform.initialize()
    from megatron_genlip.config import load_config
    from megatron_genlip.data.tokenizer import load_tokenizer
    from megatron_genlip.evaluation import extract_features
    from megatron_genlip.inference.generate import generate_caption, generate_captions
    from megatron_genlip.model.genlip import build_model

    cfg = load_config(args.config)
    cfg.model.drop_path_rate = 0.0
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    model = build_model(cfg.model, seed=0).eval()
    prompt = cfg.tokenizer.prompt
    images = synthetic_images(args.images, cfg.data.image_size, cfg.model.patch_size)
    pats = [p for p, _, _ in images]
    grid = images[0][1]
    batches = training_batches(images, tok, prompt, cfg.data.seq_length, cfg.train.micro_batch_size)
    print(f"model: {Path(args.config).name} (d={cfg.model.hidden_size}, layers={cfg.model.num_layers}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), {args.images} images of "
          f"{cfg.data.image_size}px = {grid[0]}x{grid[1]} patches, 1 thread")

    def features():
        extract_features(model, pats, grid, batch_size=args.batch_size)

    def train_forward():
        with torch.no_grad():
            for b in batches:
                model(b)

    features(), train_forward()  # warm-up
    tf, tt = abba(features, train_forward, args.pairs)
    ratios = [t / f for f, t in zip(tf, tt)]
    n = args.images
    print(f"probe features : {n / statistics.median(tf):9.1f} images/s  (extract_features, batch {args.batch_size})")
    print(f"training fwd   : {n / statistics.median(tt):9.1f} images/s  ({len(batches)} micro-batches of packed "
          f"rows, {cfg.data.seq_length} tokens, loss, no backward)")
    print(f"  ratio features / training forward: {statistics.median(ratios):.2f}x (median of {len(ratios)} pairs, "
          f"range {min(ratios):.2f}-{max(ratios):.2f})")

    grids = [g for _, g, _ in images]
    got: dict[str, list] = {}

    def batched():
        got["batched"] = generate_captions(model, tok, pats, grids, prompt, args.max_new_tokens, args.batch_size)

    def one_by_one():
        got["one"] = [generate_caption(model, tok, p, g, prompt, args.max_new_tokens) for p, g in zip(pats, grids)]

    generate_captions(model, tok, pats[:2], grids[:2], prompt, 2, 2)  # warm-up
    tb, to = abba(batched, one_by_one, args.caption_pairs)
    same = got["batched"] == got["one"]
    tokens = sum(len(c) for c in got["one"])
    cr = [o / b for b, o in zip(tb, to)]
    print(f"captions batched   : {n / statistics.median(tb):8.1f} captions/s  (batch {args.batch_size}, "
          f"{tokens / n:.1f} tokens per caption)")
    print(f"captions one by one: {n / statistics.median(to):8.1f} captions/s")
    print(f"  ratio batched / one at a time: {statistics.median(cr):.2f}x (median of {len(cr)} pairs, range "
          f"{min(cr):.2f}-{max(cr):.2f}); identical tokens: {same}")
    ok = same and statistics.median(cr) >= 3.0
    print("PASS" if ok else "FAIL: batched captions must equal one-at-a-time captions and be >= 3x faster")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
