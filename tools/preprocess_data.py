#!/usr/bin/env python
"""Turn image+caption webdataset shards into an indexed multimodal dataset for training.

Input shards: Recap-DataComp-1B layout (jpg + json {"caption": ...}), stage-2 json {"conversations": [...]},
or plain txt captions. Output (OUTPUT_PREFIX = P): P.parts/NNNNNN-<shard>.{bin,idx,lengths.npy,sums.npy,report.json}
(one megatron-core indexed part per input shard; parts are the dataset and are never merged), P.lengths.npy,
P.report.json (samples written, skipped per reason with shard and key, tokens, bytes) and the manifest P.json
(build settings, parts, fingerprint; written last).

One machine: the command below builds every shard with --workers processes and finalizes. Many machines:
give each task --shard-index i --num-shards n (defaults come from a SLURM array job: SLURM_ARRAY_TASK_ID /
SLURM_ARRAY_TASK_COUNT), each builds shards i, i+n, ...; then run once with --finalize (metadata only: seconds
for thousands of parts). Identical results for any number of tasks and workers; a killed build rerun with the
same command redoes only the shards without a committed part (or whose part was built with other settings).
Bad samples (undecodable or truncated images, 1x1 images, empty or non-text captions, missing keys, rejected
aspect ratios, over-long samples) are skipped and counted.

Examples:
    python tools/preprocess_data.py --config examples/configs/tiny.yaml \\
        --input 'data/synthetic/train-*.tar' --output-prefix data/tiny/train --workers 2
    # SLURM array job over 64 machines (examples/slurm/preprocess_data.sbatch), then:
    python tools/preprocess_data.py --config examples/configs/So16.yaml --input '/data/recap/*.tar' \\
        --output-prefix /data/indexed/recap-train --finalize --pack-epochs 8 --workers 32
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_genlip.config import ConfigError, load_config
from megatron_genlip.data.builder import build_indexed_dataset, finalize_dataset, shard_task_from_env
from megatron_genlip.data.indexed import STORAGES, DatasetError
from megatron_genlip.data.packed_dataset import open_rows
from megatron_genlip.data.tokenizer import tokenizer_fingerprint


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True,
                    help="project YAML config: its tokenizer and data sections (stage, image size, pixel budget, "
                         "per-sample cap, seq_length for --pack-epochs) define the dataset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. --set data.stage=2 (repeatable)")
    ap.add_argument("--input", nargs="+", required=True,
                    help="webdataset shards: files, directories (every .tar, .tar.gz and .tgz inside) or quoted glob "
                         "patterns (a shard named twice is read once); every task of a multi-machine build and "
                         "--finalize must be given the same inputs")
    ap.add_argument("--output-prefix", required=True,
                    help="output path prefix P; writes P.parts/, P.lengths.npy, P.report.json and the manifest P.json")
    ap.add_argument("--workers", type=int, default=1,
                    help="worker processes on this machine, one shard at a time each (default 1)")
    ap.add_argument("--image-storage", choices=STORAGES, default="encoded",
                    help="'encoded': the original image bytes (compact; decoded and resized while training); "
                         "'pixels': uint8 RGB already resized to the stage-1 resolution (no decode at training "
                         "time, larger files). Default: encoded")
    try:
        task_i, task_n = shard_task_from_env()
    except ValueError as e:
        ap.error(str(e))
    ap.add_argument("--shard-index", type=int, default=task_i,
                    help="this task's index among --num-shards tasks: it builds input shards i, i+n, i+2n, ... "
                         f"(default: from SLURM_ARRAY_TASK_ID, else 0; here {task_i})")
    ap.add_argument("--num-shards", type=int, default=task_n,
                    help="number of tasks the build is split over; with more than one, no task finalizes: run "
                         f"--finalize once all have finished (default: SLURM_ARRAY_TASK_COUNT, else 1; here {task_n})")
    ap.add_argument("--finalize", action="store_true",
                    help="only write the manifest, lengths and report from the committed parts (no shard is read)")
    ap.add_argument("--pack-epochs", type=int, default=0, metavar="N",
                    help="after finalizing, build the pack index of epochs 0..N-1 for data.seq_length "
                         "(tools/build_pack_index.py does the same later); --workers processes")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.finalize:
            report = finalize_dataset(args.input, args.output_prefix, cfg, args.image_storage)
        else:
            report = build_indexed_dataset(args.input, args.output_prefix, cfg, workers=args.workers,
                                           storage=args.image_storage, progress=not args.no_progress,
                                           shard_index=args.shard_index, num_shards=args.num_shards)
    except (FileNotFoundError, PermissionError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if "samples_written" not in report:  # one task of a split build
        print(f"task {args.shard_index}/{args.num_shards}: built {report['shards'] - report['shards_reused']} of its "
              f"{report['shards']} shards ({report['shards_reused']} reused) in {report['seconds']:.1f} s; when every "
              "task has finished, run the same command once with --finalize")
        return report
    print(f"wrote {args.output_prefix}.json: {report['samples_written']} samples, {report['tokens']} tokens, "
          f"{report['image_bytes'] / 1e6:.1f} MB of images ({report['image_storage']}) in {report['shards']} parts"
          + (f" ({report['build']['shards_reused']} reused)" if report["build"] else ""))
    if report["repeated_inputs_ignored"]:
        print(f"warning: {len(report['repeated_inputs_ignored'])} input shard(s) were named more than once and read "
              f"once, e.g. {report['repeated_inputs_ignored'][0]}")
    dup = report["duplicate_keys"]
    if dup["count"]:
        print(f"warning: {dup['count']} sample key(s) repeat an earlier key of their shard, e.g. {dup['examples'][0]}; "
              + ("they were dropped" if dup["dropped"] else "kept (--set data.drop_duplicate_keys=true drops them)"))
    if report["samples_skipped"]:
        print(f"skipped {report['samples_skipped']} samples: {json.dumps(report['skipped_by_reason'])} "
              f"(shard and key of each in {args.output_prefix}.report.json)")
    if args.pack_epochs > 0:
        try:
            rows = open_rows(args.output_prefix, cfg.data, tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path))
            rows.ensure(epochs=args.pack_epochs, workers=args.workers)
        except (DatasetError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        report["packing"] = {"seq_length": cfg.data.seq_length, "rows_epoch0": rows.rows_in_epoch(0),
                             "efficiency_epoch0": rows.efficiency(0)}
    return report


if __name__ == "__main__":
    main()
