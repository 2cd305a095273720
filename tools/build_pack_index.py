#!/usr/bin/env python
"""Build (or check) the pack index of a config's datasets ahead of training.

The pack index says which samples form each packed row of each epoch (megatron_genlip/data/pack_index.py).
Training needs one epoch per pass over the data; a missing epoch is otherwise built by the trainer at
start-up (one process, under a lock) or, with data.build_missing_pack_index=false, is an error naming this
command. For large datasets build it here, ahead, in parallel:

    python tools/build_pack_index.py --config examples/configs/stage1-So16.yaml --workers 32   # what train_steps needs
    # several machines: each builds epochs e with e % n == i (SLURM array: defaults from the environment)
    python tools/build_pack_index.py --config CONFIG --epochs 8 --epoch-shard-index 3 --num-epoch-shards 8
    python tools/build_pack_index.py --config CONFIG --verify      # recompute the stored checksums
    python tools/build_pack_index.py --config CONFIG --verify-data # and read every sample of every part

Training checks the same checksums lazily (each pack-index chunk and dataset part the first time a process
touches it, each sample's crc32 when it is read); --verify finds damage before a run meets it.

It reads data.train_data (or every dataset of data.train_blend) and data.valid_data (epoch 0), with
data.seq_length, data.pack_buffer_size, data.seed and data.pack_index_dir, so pass the training config and
the same --set overrides as training.
"""

from __future__ import annotations

import argparse
import os
import sys

# Only the standard library at module level: the pack workers are spawned processes, and a spawned process
# first re-runs this file (as __mp_main__); what it imports is what each worker pays for at start-up. The
# datasets' modules (torch, webdataset, the tokenizer) are imported by main(), in this process only; a worker
# imports numpy and megatron_genlip.data.pack_index. All epochs share one pool of workers (shared_pool).


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_genlip.data.builder import shard_task_from_env

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the training config (its data section names the datasets)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, as given to training (repeatable)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="build epochs 0..N-1 of the training data (default: every epoch the run reads, from "
                         "train.train_steps x train.global_batch_size; each blended dataset as many as its share)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes packing chunks of an epoch in parallel (default min(8, CPUs))")
    try:
        task_i, task_n = shard_task_from_env()
    except ValueError as e:
        ap.error(str(e))
    ap.add_argument("--epoch-shard-index", type=int, default=task_i,
                    help=f"build only epochs e with e %% n == i (default: SLURM_ARRAY_TASK_ID, else 0; here {task_i})")
    ap.add_argument("--num-epoch-shards", type=int, default=task_n,
                    help=f"n of --epoch-shard-index (default: SLURM_ARRAY_TASK_COUNT, else 1; here {task_n})")
    ap.add_argument("--verify", action="store_true", help="recompute the checksums of every built epoch and report; "
                    "also check that every dataset part exists with its recorded size")
    ap.add_argument("--verify-data", action="store_true",
                    help="--verify, and read every sample of every dataset part against its checksum (reads the "
                         "whole dataset)")
    return ap.parse_args(argv)


def _sources(cfg) -> list[tuple[str, object, int | None, int]]:
    """(name, packed rows, fixed epochs or None, rows the run reads) for the training data (each blend source)
    and the validation data (epoch 0)."""
    from megatron_genlip.data.packed_dataset import BlendedRows, open_rows, open_train_rows
    from megatron_genlip.data.tokenizer import tokenizer_fingerprint

    fp = tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path)
    train = open_train_rows(cfg.data, fp)
    run_rows = cfg.train.train_steps * cfg.train.global_batch_size
    if isinstance(train, BlendedRows):
        out = [(f"train[{i}]", s, None, n) for i, (s, n) in enumerate(zip(train.sources, train.rows_needed(run_rows)))]
    else:
        out = [("train", train, None, run_rows)]
    if cfg.data.valid_data:
        out.append(("valid", open_rows(cfg.data.valid_data, cfg.data, fp), 1, 0))
    return out


def main(argv=None) -> int:
    from megatron_genlip.config import ConfigError, load_config
    from megatron_genlip.data.indexed import DatasetError, DatasetMismatch
    from megatron_genlip.data.pack_index import shared_pool

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        sources = _sources(cfg)
    except (ConfigError, DatasetError, DatasetMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.num_epoch_shards > 1 and args.epochs is None:
        print("error: --num-epoch-shards needs --epochs N (which epochs to split over the tasks)", file=sys.stderr)
        return 2
    args.verify = args.verify or args.verify_data
    with shared_pool(args.workers):  # one pool of workers for every epoch of every dataset, started when needed
        return _build_or_verify(args, sources)


def _build_or_verify(args, sources) -> int:
    from megatron_genlip.data.indexed import DatasetError
    from megatron_genlip.data.pack_index import MissingEpochError, ensure_epoch

    problems = 0
    checked: set[int] = set()
    for name, rows, wanted, run_rows in sources:
        index = rows.index
        if args.verify:
            if id(rows.dataset) not in checked:
                checked.add(id(rows.dataset))
                found = rows.dataset.check_parts(limit=1000)
                if args.verify_data and not found:
                    found = [f for p in range(len(rows.dataset.part_paths)) if (f := rows.dataset.verify_part(p))]
                problems += len(found)
                print(f"{name} data ({len(rows.dataset.part_paths)} parts): "
                      f"{'; '.join(found) if found else 'intact' if args.verify_data else 'every part present'}")
            epoch = 0
            while index._read_meta(epoch, marked=True) is not None:
                found = index.verify(epoch)
                if not found and (mark := index.damage_mark(epoch)):
                    found = [f"epoch {epoch}: marked damaged by a reader ({mark}), now intact"]
                problems += len(found)
                print(f"{name} epoch {epoch}: {'; '.join(found) if found else 'intact'}")
                epoch += 1
            continue
        log = (lambda msg, name=name: print(f"{name}: {msg}"))
        source = rows.dataset.lengths_source()
        try:
            if wanted or args.epochs is not None:
                for e in range(args.epoch_shard_index, wanted or args.epochs, args.num_epoch_shards):
                    ensure_epoch(rows.cache_dir, rows.settings, source, e, workers=args.workers, log=log)
            else:  # every epoch the run reads from this source
                rows.ensure(rows=run_rows, workers=args.workers, log=log)
        except (MissingEpochError, DatasetError, OSError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        try:
            index.refresh()
            print(f"{name}: epochs 0..{index.epochs - 1} built, {index.total_rows:,} rows in all ({rows.cache_dir})")
        except MissingEpochError as e:
            print(f"{name}: {e}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
