"""Prepare the embedded default data for the main job: synthetic shards -> indexed train/val datasets.

Idempotent and safe to call from every rank: a file lock serialises the work, finished steps are skipped.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from pathlib import Path

from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset
from megatron_genlip.data.synthetic import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, generate_default_dataset, write_labelled_split

MAIN_CONFIG = "examples/configs/tiny-main.yaml"  # the main job's default: its probe evaluators read DATA_DIR/probe
PROBE_EVALUATORS = {"shape_probe": "shapes", "colour_probe": "colours", "shape_zero_shot": "shapes"}


def prepare_default_data(config: str, data_dir: str, overrides: list[str] | None = None, workers: int = 2,
                         quiet: bool = False, num_train: int = DEFAULT_NUM_TRAIN,
                         num_val: int = DEFAULT_NUM_VAL) -> dict[str, str]:
    """Generate ``data_dir/shards`` (unless they are there, made with the same parameters) and build
    ``data_dir/indexed/{train,val}`` from them (reusing what is built and up to date); write the labelled
    single-shape scenes of the probe evaluators to ``data_dir/probe`` (unless they are there)."""
    cfg = load_config(config, overrides)
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = generate_default_dataset(str(root / "shards"), num_train=num_train, num_val=num_val)
        if not quiet:
            print(f"synthetic data: {'reused' if info.get('reused') else 'generated'} {root / 'shards'} "
                  f"({info['params']['num_train']} train, {info['params']['num_val']} val)")
        out = {}
        for split in ("train", "val"):
            prefix = root / "indexed" / split
            # always called: finished parts are reused, parts whose shard or settings changed (a new generator
            # version, other build settings) are rebuilt, so an older build in data_dir is never trained on by mistake
            report = build_indexed_dataset([str(root / "shards" / f"{split}-*.tar")], str(prefix), cfg,
                                           workers=workers, progress=not quiet)
            if not quiet:
                print(f"indexed {split}: {report['samples_written']} samples, {report['samples_skipped']} skipped")
            out[split] = str(prefix)
        probe = write_labelled_split(str(root / "probe"))
        if not quiet:
            print(f"labelled scenes: {'reused' if probe['reused'] else 'written'} {root / 'probe'} (shapes/, colours/)")
        out["probe"] = str(root / "probe")
        fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def data_overrides(config: str, data_dir: str) -> list[str]:
    """The main job's ``--set`` arguments pointing a config at the embedded data in ``data_dir``: the datasets, and
    the probe evaluators' folders when the config is the main job's own (``tiny-main.yaml``)."""
    sets = [f"data.train_data={data_dir}/indexed/train", f"data.valid_data={data_dir}/indexed/val"]
    if Path(config).resolve() == (Path(__file__).resolve().parents[2] / MAIN_CONFIG).resolve():
        sets += [f"evaluation.{name}.data={data_dir}/probe/{folder}" for name, folder in PROBE_EVALUATORS.items()]
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="config whose tokenizer/data sections define the dataset")
    ap.add_argument("--data-dir", required=True, help="where shards/ and indexed/ are written")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override (repeatable)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="preprocessing processes")
    ap.add_argument("--print-overrides", action="store_true",
                    help="print the trainer's --set arguments for this data dir, one per line, instead of preparing")
    args = ap.parse_args()
    if args.print_overrides:
        print("\n".join(data_overrides(args.config, args.data_dir)))
        return
    prepare_default_data(args.config, args.data_dir, args.overrides, args.workers)


if __name__ == "__main__":
    main()
