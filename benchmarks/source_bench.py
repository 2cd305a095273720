#!/usr/bin/env python
"""Preprocessing cost per sample of every source against webdataset tars, on the same images, side by side in one
run (PERFORMANCE.md §4.2: one thread, process CPU time, interleaved rounds, median and IQR of per-round ratios).

Data: the 18 photographs scikit-image ships (300-1024 px), JPEG quality 90, repeated to ``--samples`` samples with
a caption each, written in every layout ``tools/preprocess_data.py`` reads, each as ONE unit of work:

* ``tar``: webdataset, ``jpg`` + ``json {"caption"}`` (the reference);
* ``img2dataset``: ``jpg`` + ``txt`` + ``json`` with ``re_caption``/``org_caption`` and img2dataset's metadata, read
  with ``--caption-field re_caption --caption-fallback org_caption --max-caption-chars 1024``;
* ``parquet-struct``: a Hugging Face ``Image`` struct with the bytes embedded; ``parquet-path``: the struct holding
  only a path to a file in an image folder;
* ``jsonl``, ``json``: LLaVA-style entries beside an image folder.

Each round builds the part of every source once (``builder.build_part``, what a worker runs: read, decode and
validate the image, choose the caption, tokenize, write the part and its checksums), in a rotating order; the
ratio of a source is its CPU time over the tar's in the same round. The tokenizer is loaded once and reused (in
a real build it is loaded once per part of thousands of samples; its load time is printed apart). Every
source's part must hold exactly the tar's bytes (checked), so the work compared is the same.

    python benchmarks/source_bench.py                       # So16 stage-1 settings, 144 samples, 9 rounds
    python benchmarks/source_bench.py --storage pixels --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the layout writers the tests use

from data_harness import write_llava, write_parquet, write_webdataset  # noqa: E402
from data_bench import photo_jpegs  # noqa: E402  (benchmarks/, this script's folder)

from megatron_genlip.config import load_config  # noqa: E402
from megatron_genlip.data import builder  # noqa: E402
from megatron_genlip.data.indexed import build_settings  # noqa: E402
from megatron_genlip.data.sources import SourceOptions, list_units  # noqa: E402
from megatron_genlip.data.tokenizer import load_tokenizer  # noqa: E402


def photo_specs(samples: int) -> list[dict]:
    """``samples`` records cycling over the scikit-image photographs (data_bench's JPEGs), each with a caption."""
    photos = photo_jpegs()
    return [{"key": f"{i:06d}", "image": photos[i % len(photos)][0], "ext": "jpg",
             "caption": f"{photos[i % len(photos)][1]} ({i})"} for i in range(samples)]


def img2dataset_tar(path: Path, specs: list[dict]) -> str:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in specs:
            meta = {"url": f"http://example.com/{s['key']}.jpg", "key": s["key"], "status": "success",
                    "error_message": None, "width": 512, "height": 512, "original_width": 1024,
                    "original_height": 1024, "sha256": "0" * 64, "re_caption": s["caption"],
                    "org_caption": "alt text", "clip_l14_similarity_score": 0.3}
            w.write({"__key__": s["key"], "jpg": s["image"], "txt": b"alt text", "json": json.dumps(meta).encode()})
    return str(path)


def layouts(d: Path, specs: list[dict]) -> dict[str, tuple[list[str], SourceOptions]]:
    recap = SourceOptions(caption_field="re_caption", caption_fallback="org_caption", max_caption_chars=1024)
    return {
        "tar": ([write_webdataset(d / "wds.tar", specs)], SourceOptions()),
        "img2dataset": ([img2dataset_tar(d / "i2d.tar", specs)], recap),
        "parquet-struct": ([write_parquet(d / "struct.parquet", specs)], SourceOptions()),
        "parquet-path": ([write_parquet(d / "pq" / "path.parquet", specs, image="path", image_dir=d / "pq" / "img")],
                         SourceOptions()),
        "jsonl": ([write_llava(d / "js" / "l.jsonl", specs, d / "js" / "img", jsonl=True)], SourceOptions()),
        "json": ([write_llava(d / "js" / "l.json", specs, d / "js" / "img")], SourceOptions()),
    }


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/configs/stage1-So16.yaml"))
    ap.add_argument("--samples", type=int, default=144)
    ap.add_argument("--rounds", type=int, default=9, help="measured rounds after one warm-up round")
    ap.add_argument("--storage", choices=("encoded", "pixels"), default="encoded")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [])
    t = time.process_time()
    tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    tokenizer_s = time.process_time() - t
    builder.load_tokenizer = lambda *_: tokenizer  # loaded once (a real part amortises it over its samples)
    settings = build_settings(cfg, args.storage)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        specs = photo_specs(args.samples)
        sources = layouts(d, specs)
        units, list_s = {}, {}
        for name, (inputs, opts) in sources.items():
            t = time.process_time()
            (units[name],) = list_units(inputs, opts)
            list_s[name] = time.process_time() - t
        names = list(sources)
        seconds: dict[str, list[float]] = {n: [] for n in names}
        ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
        reference = None
        for r in range(args.rounds + 1):
            order = names if r % 2 == 0 else names[::-1]
            order = order[r % len(order):] + order[:r % len(order)]  # every source in every slot over the rounds
            got = {}
            for name in order:
                part = str(d / "parts" / f"{r:02d}-{name}")
                Path(part).parent.mkdir(exist_ok=True)
                task = {"unit": units[name], "part": part, "config": cfg, "storage": args.storage,
                        "settings": settings, "source": sources[name][1]}
                t = time.process_time()
                report = builder.build_part(task)
                got[name] = time.process_time() - t
                assert report["written"] == args.samples and not report["skipped"], (name, report["skipped"])
                content = [Path(part + ext).read_bytes() for ext in (".bin", ".idx", ".lengths.npy", ".sums.npy")]
                reference = reference or content
                assert content == reference, f"{name}: its part differs from the tar's"
                for ext in (".bin", ".idx", ".lengths.npy", ".sums.npy", ".report.json"):
                    os.remove(part + ext)
            if r == 0:
                continue  # warm-up: page cache, imports, first-call costs
            for name in names:
                seconds[name].append(got[name])
            for name in names[1:]:
                ratios[name].append(got[name] / got["tar"])
    n = args.samples
    print(f"config {Path(args.config).name}, storage {args.storage}, {n} samples per unit (scikit-image photos, JPEG 90), "
          f"{args.rounds} rounds, 1 thread, process CPU time; tokenizer load {tokenizer_s:.2f} s once per part (not "
          "in the numbers)")
    print(f"{'source':15s} {'CPU ms/sample':>14s} {'vs tar (median)':>16s} {'IQR':>15s} {'listing ms':>11s}")
    results = {}
    for name in names:
        per = statistics.median(seconds[name]) / n * 1e3
        if name == "tar":
            print(f"{name:15s} {per:14.2f} {'1 (reference)':>16s} {'':>15s} {list_s[name] * 1e3:11.1f}")
            results[name] = {"ms_per_sample": per}
            continue
        q1, med, q3 = quartiles(ratios[name])
        print(f"{name:15s} {per:14.2f} {med:16.3f} {f'{q1:.3f}-{q3:.3f}':>15s} {list_s[name] * 1e3:11.1f}")
        results[name] = {"ms_per_sample": per, "ratio_median": med, "ratio_q1": q1, "ratio_q3": q3}
    worst = max(r["ratio_q3"] for k, r in results.items() if k != "tar")
    print(f"worst upper quartile of the ratio: {worst:.3f} ({'within' if worst <= 1.10 else 'OVER'} the 10% goal); "
          "every part byte-identical to the tar's")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
