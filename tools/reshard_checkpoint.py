#!/usr/bin/env python
"""Convert a megatron-genlip checkpoint for another parallel layout (tensor, pipeline, data parallel, ZeRO stage).

The result is a DeepSpeed universal checkpoint: every parameter's full fp32 master weight with its Adam moments
and step, plus the trainer state (step, consumed samples, lr schedule), so training continues where it stopped
at the new layout. Runs on CPU, in one process, without a launcher. Example:

    python tools/reshard_checkpoint.py --load outputs/run/checkpoints --save outputs/run-tp1/checkpoints --tp 1 --pp 1
    deepspeed --num_gpus 1 examples/pretrain_genlip.py --config CONFIG --set parallel.tensor_parallel=1 \\
        --set parallel.pipeline_parallel=1 --set train.load=outputs/run-tp1/checkpoints --output-dir outputs/run-tp1

Sources: checkpoints written by the trainer with ZeRO stage 1, 2 or 3 (any TP/PP/DP), verified against their
manifest before they are read (without --iteration, the newest one that verifies). Targets: any TP/PP/DP the
model allows, with parallel.zero_stage 1 or 2 (or 3 at TP=1). Per-rank RNG states are not carried over (DropPath
restarts from the seed); neither is Transformer Engine's FP8 scaling state of a model.fp8=delayed run, so such a
checkpoint is refused unless --drop-fp8-history accepts restarting its amax histories. Exit status 2 with a message
naming the file or setting when a checkpoint cannot be converted.
"""

from __future__ import annotations

import argparse
import sys

from megatron_genlip.training.reshard import ReshardError, reshard


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="reshard_checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, metavar="CKPT_DIR",
                    help="checkpoint directory of the run (OUTPUT_DIR/checkpoints: holds 'latest' and iter_NNNNNNN/)")
    ap.add_argument("--iteration", type=int, default=None, metavar="N",
                    help="convert iter_N (default: the newest checkpoint of CKPT_DIR that verifies)")
    ap.add_argument("--save", required=True, metavar="NEW_CKPT_DIR",
                    help="directory to write the converted checkpoint to (same iter_ tag, plus 'latest'); "
                         "start the new run with --set train.load=NEW_CKPT_DIR")
    ap.add_argument("--tp", type=int, required=True, help="target parallel.tensor_parallel")
    ap.add_argument("--pp", type=int, required=True, help="target parallel.pipeline_parallel")
    ap.add_argument("--dp", type=int, default=None,
                    help="target data-parallel size, only checked against the batch sizes (the converted checkpoint "
                         "loads at any data-parallel size)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes DeepSpeed's converter uses to extract and merge shards (default 1)")
    ap.add_argument("--drop-fp8-history", action="store_true",
                    help="convert a checkpoint holding Transformer Engine's FP8 scaling state (model.fp8=delayed: "
                         "amax history and scales), which a universal checkpoint cannot carry: the resumed run "
                         "restarts its amax histories as at step 0 (refused without this flag)")
    args = ap.parse_args(argv)
    for flag in ("tp", "pp", "dp", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag} must be >= 1, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        reshard(args.load, args.save, args.tp, args.pp, args.dp, args.iteration, args.workers,
                drop_fp8_history=args.drop_fp8_history)
    except ReshardError as e:
        print(f"reshard_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
