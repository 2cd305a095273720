#!/usr/bin/env python
"""Turn image+caption data, in the forms it is published in, into an indexed multimodal dataset for training.

Inputs (--input: files, folders or quoted globs; the format from the extension, or --input-format):
  webdataset tars (.tar/.tar.gz/.tgz): jpg|jpeg|png|webp + json {"caption": ...} / {"conversations": [...]} or txt,
      img2dataset's shards included (caption in .txt, metadata and extra columns in .json);
  parquet (.parquet, or a Hugging Face dataset folder): an image column of bytes or {"bytes", "path"} structs,
      a caption column or a conversations column; one part per row group;
  JSON / JSONL lists ({"id", "image": relative path, "conversations": [...]}, the LLaVA layout) beside an image
      folder (--image-root); one part per --rows-per-unit entries.
The caption comes from --caption-field (a .json key / column, or txt), else conversations, else caption, else the
.txt; --caption-fallback org_caption --max-caption-chars 1024 reproduces GenLIP's stage-1 rule at commit e853212.

Output (OUTPUT_PREFIX = P): P.parts/NNNNNN-<unit>.{bin,idx,lengths.npy,sums.npy,report.json} (one megatron-core
indexed part per unit of work: a tar, a parquet row group, a range of JSON entries; parts are the dataset and
are never merged), P.lengths.npy, P.report.json (samples written, skipped per reason with file, unit and key,
tokens, bytes) and the manifest P.json (build settings, parts, fingerprint; written last).

One machine: the command below builds every unit with --workers processes and finalizes. Many machines:
give each task --shard-index i --num-shards n (defaults come from a SLURM array job: SLURM_ARRAY_TASK_ID /
SLURM_ARRAY_TASK_COUNT), each builds units i, i+n, ...; then run once with --finalize (metadata only: seconds
for thousands of parts) with the same --input and source flags. Identical results for any number of tasks and
workers; a killed build rerun with the same command redoes only the units without a committed part (or whose
part was built with other settings or source flags, or from another version of its file).
Bad samples (undecodable or truncated images, missing image files, 1x1 images, empty, over-long or non-text
captions, missing keys or fields, entries with several images, lines that are not JSON, rejected aspect
ratios, over-long samples) are skipped and counted; a wrong column name or a caption column that is not text
is an error before anything is built.

Examples:
    python tools/preprocess_data.py --config examples/configs/tiny.yaml \\
        --input 'data/synthetic/train-*.tar' --output-prefix data/tiny/train --workers 2
    python tools/preprocess_data.py --config examples/configs/stage1-So16.yaml --input '/data/recap-img2dataset/*.tar' \\
        --caption-field re_caption --caption-fallback org_caption --max-caption-chars 1024 --output-prefix /data/indexed/recap
    python tools/preprocess_data.py --config examples/configs/stage2-So16.yaml --input /data/hf/LLaVA-OneVision-Data \\
        --output-prefix /data/indexed/ov
    python tools/preprocess_data.py --config examples/configs/stage2-So16.yaml --input /data/llava/llava_v1_5_mix665k.json \\
        --image-root /data/llava/images --output-prefix /data/indexed/llava665k
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
from megatron_genlip.data.sources import FORMATS, SourceOptions
from megatron_genlip.data.tokenizer import tokenizer_fingerprint


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True,
                    help="project YAML config: its tokenizer and data sections (stage, image size, pixel budget, "
                         "per-sample cap, seq_length for --pack-epochs) define the dataset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. --set data.stage=2 (repeatable)")
    ap.add_argument("--input", nargs="+", required=True,
                    help="files, folders or quoted glob patterns: webdataset tars (a folder: every .tar, .tar.gz, "
                         ".tgz in it), parquet files (a folder: every .parquet under it, e.g. a Hugging Face dataset "
                         "folder), JSON / JSONL lists (a folder: every .json/.jsonl in it); a file named twice is read "
                         "once; every task of a multi-machine build and --finalize must be given the same inputs")
    src = ap.add_argument_group("source", "how the inputs are read (every task and --finalize need the same ones)")
    src.add_argument("--input-format", choices=FORMATS, default="auto",
                     help="auto (default): by extension (.tar/.tar.gz/.tgz, .parquet, .json/.jsonl); or force one")
    src.add_argument("--caption-field", default=None, metavar="NAME",
                     help="the caption: a key of a tar's .json or 'txt' (the .txt member), a parquet column, a JSON "
                          "entry's key (e.g. re_caption). Default: 'conversations' when the record has them (stage 2), "
                          "else 'caption', else the .txt member")
    src.add_argument("--caption-fallback", default=None, metavar="NAME",
                     help="taken instead when the caption is missing, empty or longer than --max-caption-chars "
                          "(e.g. org_caption); a sample whose fallback is missing, empty or too long too is skipped")
    src.add_argument("--max-caption-chars", type=int, default=0, metavar="N",
                     help="captions longer than N characters are replaced by --caption-fallback, or skipped "
                          "(caption_too_long); 0 (default): no limit. GenLIP's stage-1 rule at one commit: 1024")
    src.add_argument("--conversations-field", default="conversations", metavar="NAME",
                     help="the stage-2 conversation ([{from: human|user, value}, {from: gpt|assistant, value}], or "
                          "role/content turns) when no --caption-field is given (default: conversations)")
    src.add_argument("--image-field", default=None, metavar="NAME",
                     help="parquet / JSON: the image (bytes, a {bytes, path} struct, a path, or a list of one). "
                          "Default: parquet: the first of image, jpg, jpeg, png, webp, images; JSON: image. "
                          "Tars: the jpg|jpeg|png|webp member")
    src.add_argument("--key-field", default=None, metavar="NAME",
                     help="parquet / JSON: the sample key in the report (default: key, else id, else file:row)")
    src.add_argument("--image-root", default=None, metavar="DIR",
                     help="folder that relative image paths start from (JSON entries, parquet structs holding only "
                          "a path); default: the folder of the JSON / parquet file")
    src.add_argument("--rows-per-unit", type=int, default=10000, metavar="N",
                     help="JSON / JSONL entries per unit of work, hence per part (default 10000); parquet: one "
                          "unit per row group, tars: one per shard")
    ap.add_argument("--output-prefix", required=True,
                    help="output path prefix P; writes P.parts/, P.lengths.npy, P.report.json and the manifest P.json")
    ap.add_argument("--workers", type=int, default=1,
                    help="worker processes on this machine, one unit of work at a time each (default 1)")
    ap.add_argument("--image-storage", choices=STORAGES, default="encoded",
                    help="'encoded': the original image bytes (compact; decoded and resized while training); "
                         "'pixels': uint8 RGB already resized to the stage-1 resolution (no decode at training "
                         "time, larger files). Default: encoded")
    try:
        task_i, task_n = shard_task_from_env()
    except ValueError as e:
        ap.error(str(e))
    ap.add_argument("--shard-index", type=int, default=task_i,
                    help="this task's index among --num-shards tasks: it builds units i, i+n, i+2n, ... "
                         f"(default: from SLURM_ARRAY_TASK_ID, else 0; here {task_i})")
    ap.add_argument("--num-shards", type=int, default=task_n,
                    help="number of tasks the build is split over; with more than one, no task finalizes: run "
                         f"--finalize once all have finished (default: SLURM_ARRAY_TASK_COUNT, else 1; here {task_n})")
    ap.add_argument("--finalize", action="store_true",
                    help="only write the manifest, lengths and report from the committed parts (no image is read; "
                         "JSON lists are parsed once to name their units)")
    ap.add_argument("--pack-epochs", type=int, default=0, metavar="N",
                    help="after finalizing, build the pack index of epochs 0..N-1 for data.seq_length "
                         "(tools/build_pack_index.py does the same later); --workers processes")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        source = SourceOptions(args.input_format, args.caption_field, args.caption_fallback, args.max_caption_chars,
                               args.conversations_field, args.image_field, args.key_field, args.image_root,
                               args.rows_per_unit).check()
        if args.finalize:
            report = finalize_dataset(args.input, args.output_prefix, cfg, args.image_storage, source=source)
        else:
            report = build_indexed_dataset(args.input, args.output_prefix, cfg, workers=args.workers,
                                           storage=args.image_storage, progress=not args.no_progress,
                                           shard_index=args.shard_index, num_shards=args.num_shards, source=source)
    except (FileNotFoundError, PermissionError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if "samples_written" not in report:  # one task of a split build
        print(f"task {args.shard_index}/{args.num_shards}: built {report['shards'] - report['shards_reused']} of its "
              f"{report['shards']} parts ({report['shards_reused']} reused) in {report['seconds']:.1f} s; when every "
              "task has finished, run the same command once with --finalize")
        return report
    kinds = ", ".join(f"{n} {k}" for k, n in report["units_by_kind"].items())
    print(f"wrote {args.output_prefix}.json: {report['samples_written']} samples, {report['tokens']} tokens, "
          f"{report['image_bytes'] / 1e6:.1f} MB of images ({report['image_storage']}) in {report['shards']} parts"
          + (f" ({report['build']['shards_reused']} reused)" if report["build"] else "") + (f" [{kinds}]" if kinds else ""))
    if report["caption_fallbacks"]:
        print(f"{report['caption_fallbacks']} caption(s) taken from --caption-fallback {args.caption_fallback}")
    if report["repeated_inputs_ignored"]:
        print(f"warning: {len(report['repeated_inputs_ignored'])} input shard(s) were named more than once and read "
              f"once, e.g. {report['repeated_inputs_ignored'][0]}")
    dup = report["duplicate_keys"]
    if dup["count"]:
        print(f"warning: {dup['count']} sample key(s) repeat an earlier key of their shard, e.g. {dup['examples'][0]}; "
              + ("they were dropped" if dup["dropped"] else "kept (--set data.drop_duplicate_keys=true drops them)"))
    if report["samples_skipped"]:
        print(f"skipped {report['samples_skipped']} samples: {json.dumps(report['skipped_by_reason'])} "
              f"(file, unit and key of each in {args.output_prefix}.report.json)")
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
