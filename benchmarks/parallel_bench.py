#!/usr/bin/env python
"""Time of one training step for TP=1 (DP=2), TP=2, TP=2 with sequence parallelism and PP=2 on the same global batch, side by side, through
the real trainer and the deepspeed launcher (2 ranks). On a 2-core CPU this shows the overhead of the parallel
paths (communication, pipeline bubbles), not speed-ups. Layouts are run in interleaved rounds; the table gives
the median step time of each (steps after the first two of every run) and its ratio to TP=1.

    python benchmarks/parallel_bench.py --steps 12 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from trainer_harness import run, train_log  # noqa: E402

from megatron_genlip.config import load_config  # noqa: E402
from megatron_genlip.data.builder import build_indexed_dataset  # noqa: E402
from megatron_genlip.data.synthetic import write_shards  # noqa: E402

LAYOUTS = {
    "TP=1 x DP=2 (ZeRO-1)": [],
    "TP=2": ["parallel.tensor_parallel=2"],
    "TP=2 + SP": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    "PP=2": ["parallel.pipeline_parallel=2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the layouts (default 2)")
    ap.add_argument("--global-batch", type=int, default=4, help="packed rows per step (default 4)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "examples/configs/tiny.yaml")
        data = {}
        for split, n in (("train", 400), ("val", 20)):
            shards = write_shards(f"{tmp}/shards", split, n, 100, seed=1)
            build_indexed_dataset(shards, f"{tmp}/{split}", cfg, progress=False)
            data[split] = f"{tmp}/{split}"
        common = [f"train.train_steps={args.steps}", "train.warmup_steps=1", "train.log_interval=1",
                  "train.eval_interval=100000", "train.save_interval=100000", "train.precision=fp32",
                  f"train.global_batch_size={args.global_batch}", "train.micro_batch_size=2"]
        times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
        for r in range(args.rounds):
            order = list(LAYOUTS) if r % 2 == 0 else list(LAYOUTS)[::-1]
            for name in order:
                out = Path(tmp) / f"run-{r}-{list(LAYOUTS).index(name)}"
                run(2, data, out, common + LAYOUTS[name], timeout=900)
                log = train_log(out)
                times[name] += [log[s]["s_per_step"] for s in sorted(log)[2:]]
    base = statistics.median(times["TP=1 x DP=2 (ZeRO-1)"])
    print(f"\n2 ranks, global batch {args.global_batch} rows of {cfg.data.seq_length} tokens, tiny model, fp32, "
          f"{args.rounds} interleaved rounds")
    print(f"{'layout':24s} {'median s/step':>14s} {'vs TP=1':>8s}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:24s} {m:14.3f} {m / base:8.2f}")


if __name__ == "__main__":
    main()
