#!/usr/bin/env python
"""Turn image+caption webdataset shards into an indexed multimodal dataset for training.

Input shards: Recap-DataComp-1B layout (jpg + json {"caption": ...}), stage-2 json {"conversations": [...]},
or plain txt captions. Output: OUTPUT_PREFIX.bin/.idx (megatron-core indexed dataset, one document per
sample: token ids, label flags, image), OUTPUT_PREFIX.lengths.npy, OUTPUT_PREFIX.json (build settings) and
OUTPUT_PREFIX.report.json (samples written, skipped per reason with shard and key, tokens, images, bytes).

The build is multiprocess (--workers), gives identical files for any worker count, and resumes after a
kill: finished shards are not redone. Bad samples (undecodable or truncated images, 1x1 images, empty or
non-text captions, missing keys, rejected aspect ratios, over-long samples) are skipped and counted.

Examples:
    python tools/preprocess_data.py --config examples/configs/tiny.yaml \\
        --input 'data/synthetic/train-*.tar' --output-prefix data/tiny/train --workers 2
    python tools/preprocess_data.py --config examples/configs/So16.yaml --input /data/recap/ \\
        --output-prefix /data/indexed/recap-train --workers 32 --pack
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset, tokenizer_fingerprint
from megatron_genlip.data.indexed import STORAGES, GenLIPIndexedDataset
from megatron_genlip.data.packed_dataset import PackedRows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True,
                    help="project YAML config: its tokenizer and data sections (stage, image size, pixel budget, "
                         "per-sample cap, seq_length for --pack) define the dataset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. --set data.stage=2 (repeatable)")
    ap.add_argument("--input", nargs="+", required=True,
                    help="webdataset .tar shards: files, directories (all *.tar inside) or quoted glob patterns")
    ap.add_argument("--output-prefix", required=True,
                    help="output path prefix; writes PREFIX.bin, .idx, .lengths.npy, .json, .report.json")
    ap.add_argument("--workers", type=int, default=1, help="worker processes, one shard at a time each (default 1)")
    ap.add_argument("--image-storage", choices=STORAGES, default="encoded",
                    help="'encoded': the original image bytes (compact; decoded and resized while training); "
                         "'pixels': uint8 RGB already resized to the stage-1 resolution (no decode at training "
                         "time, larger files). Default: encoded")
    ap.add_argument("--pack", action="store_true",
                    help="also build (and cache) the epoch-0 pack index for data.seq_length and report its "
                         "packing efficiency")
    ap.add_argument("--keep-parts", action="store_true", help="keep the per-shard part files after merging")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        report = build_indexed_dataset(args.input, args.output_prefix, cfg, workers=args.workers,
                                       storage=args.image_storage, progress=not args.no_progress,
                                       keep_parts=args.keep_parts)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.output_prefix}.bin/.idx: {report['samples_written']} samples, {report['tokens']} tokens, "
          f"{report['image_bytes'] / 1e6:.1f} MB of images ({report['image_storage']}), "
          f"{report['shards']} shards ({report['shards_reused']} reused) in {report['seconds']:.1f} s")
    if report["samples_skipped"]:
        print(f"skipped {report['samples_skipped']} samples: {json.dumps(report['skipped_by_reason'])} "
              f"(shard and key of each in {args.output_prefix}.report.json)")
    if args.pack:
        ds = GenLIPIndexedDataset(args.output_prefix, cfg.data,
                                  tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path))
        rows = PackedRows(ds, cfg.data.seq_length, cfg.data.seed, cfg.data.pack_buffer_size)
        report["packing"] = {"seq_length": cfg.data.seq_length, "rows_epoch0": rows.rows_in_epoch(0),
                             "efficiency_epoch0": rows.efficiency(0)}
        print(f"packed epoch 0 into {rows.rows_in_epoch(0)} rows of {cfg.data.seq_length} tokens: "
              f"efficiency {100 * rows.efficiency(0):.2f}%")
    return report


if __name__ == "__main__":
    main()
