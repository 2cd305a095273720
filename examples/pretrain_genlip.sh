#!/usr/bin/env bash
""":"
# ---------------------------------------------------------------------------------------------------
# The main job: train GenLIP with the deepspeed launcher.
#
#   bash examples/pretrain_genlip.sh [--set KEY=VALUE ...]      # 2 CPU/GPU ranks, DP=2, ZeRO-1, tiny config
#   deepspeed examples/pretrain_genlip.sh [--set KEY=VALUE ...] # also works: one rank per visible device
#
# With the defaults it generates the embedded synthetic dataset (if absent), preprocesses it into indexed
# train/val datasets (if absent), trains the tiny config, evaluates it (held-out loss and captions, and a linear
# probe and zero-shot classification of single-shape scenes, also on the initial model), saves a checkpoint and
# prints a summary. Environment variables:
#   CONFIG         config file                                  (examples/configs/tiny-main.yaml)
#   NPROC          processes on this machine                    (2)
#   OUTPUT_DIR     checkpoints, logs, TensorBoard, summary      (outputs/tiny)
#   DATA_DIR       embedded data: shards/ and indexed/          (data/tiny)
#   EMBEDDED_DATA  1: prepare and use the embedded data; 0: use the config's data.train_data/valid_data (1)
#   MASTER_PORT    rendezvous port                              (a free port)
# Extra arguments go to the trainer (examples/pretrain_genlip.py --help lists them).
# This file is both a bash script and a Python program, so `deepspeed examples/pretrain_genlip.sh`
# (which runs it with Python once per rank) behaves like `bash examples/pretrain_genlip.sh`.
# ---------------------------------------------------------------------------------------------------
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-examples/configs/tiny-main.yaml}
NPROC=${NPROC:-2}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny}
DATA_DIR=${DATA_DIR:-data/tiny}
EMBEDDED_DATA=${EMBEDDED_DATA:-1}
PORT=${MASTER_PORT:-$(python -m megatron_genlip.training.ports)}  # below the ephemeral range
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # compile/dynamo: the trainer's platform decision
DATA_ARGS=()
if [ "$EMBEDDED_DATA" = "1" ]; then
  python -m megatron_genlip.training.prepare --config "$CONFIG" --data-dir "$DATA_DIR"
  while IFS= read -r line; do DATA_ARGS+=(--set "$line"); done < <(
    python -m megatron_genlip.training.prepare --config "$CONFIG" --data-dir "$DATA_DIR" --print-overrides)
fi
exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" examples/pretrain_genlip.py --config "$CONFIG" \
  "${DATA_ARGS[@]}" --output-dir "$OUTPUT_DIR" "$@"
exit
":"""
# ---- Python part: the deepspeed launcher runs this file with Python on every rank -------------------
import os
import sys
from pathlib import Path


def _run() -> None:
    os.chdir(Path(__file__).resolve().parent.parent)
    from megatron_genlip import platform

    platform.start_process()  # before the data preparation imports megatron-core
    from megatron_genlip.training.entry import run_and_exit
    from megatron_genlip.training.prepare import data_overrides, prepare_default_data

    config = os.environ.get("CONFIG", "examples/configs/tiny-main.yaml")
    data_dir = os.environ.get("DATA_DIR", "data/tiny")
    argv = ["--config", config, "--output-dir", os.environ.get("OUTPUT_DIR", "outputs/tiny")]
    if os.environ.get("EMBEDDED_DATA", "1") == "1":
        prepare_default_data(config, data_dir, quiet=os.environ.get("RANK", "0") != "0")  # file-locked, idempotent
        argv += [arg for item in data_overrides(config, data_dir) for arg in ("--set", item)]
    run_and_exit(argv + sys.argv[1:])


if __name__ == "__main__":  # preprocessing workers are spawned and re-import this file
    _run()
