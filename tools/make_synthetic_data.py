#!/usr/bin/env python
"""Generate the embedded synthetic shapes dataset (train + held-out val webdataset shards).

Example:
    python tools/make_synthetic_data.py --out-dir data/synthetic
    python tools/make_synthetic_data.py --out-dir /tmp/shapes --num-train 500 --num-val 50 --image-size 64
"""

from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from megatron_genlip.data import synthetic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; every default comes from megatron_genlip.data.synthetic."""
    parser = argparse.ArgumentParser(
        description="Write the synthetic captioned-shapes dataset as webdataset tar shards "
                    "({split}-000000.tar, ...) plus dataset_info.json. Output is byte-identical for the same "
                    "flags; a directory that already holds a complete dataset made with the same flags is "
                    "left untouched.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out-dir", default="data/synthetic",
                        help="directory for the shards and dataset_info.json (created if missing); existing "
                             "train-NNNNNN.tar / val-NNNNNN.tar files in it are replaced")
    parser.add_argument("--num-train", type=int, default=synthetic.DEFAULT_NUM_TRAIN,
                        help="number of samples in the train split")
    parser.add_argument("--num-val", type=int, default=synthetic.DEFAULT_NUM_VAL,
                        help="number of samples in the held-out val split")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed; each split and sample derives its own generator from it")
    parser.add_argument("--samples-per-shard", type=int, default=synthetic.DEFAULT_SAMPLES_PER_SHARD,
                        help="samples per tar shard (the last shard of a split may hold fewer)")
    parser.add_argument("--image-size", type=int, default=synthetic.DEFAULT_IMAGE_SIZE,
                        help="side of the square images in pixels")
    parser.add_argument("--image-format", choices=("png", "jpg"), default=synthetic.DEFAULT_IMAGE_FORMAT,
                        help="image encoding stored in the shards (png is lossless)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Generate (or reuse) the dataset and print what is on disk."""
    args = parse_args(argv)
    start = time.perf_counter()
    with tqdm(total=args.num_train + args.num_val, unit="img", desc="synthetic shapes") as bar:
        info = synthetic.generate_default_dataset(
            args.out_dir, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
            samples_per_shard=args.samples_per_shard, image_size=args.image_size,
            image_format=args.image_format, progress=bar.update,
        )
    elapsed = time.perf_counter() - start
    if info["reused"]:
        print(f"{args.out_dir}: dataset with these parameters already present; nothing written")
    else:
        print(f"wrote {args.out_dir} in {elapsed:.1f} s")
    for split, entry in info["splits"].items():
        paths = [os.path.join(args.out_dir, name) for name in entry["shards"]]
        megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
        print(f"  {split}: {entry['num_samples']} samples in {len(paths)} shard(s) ({megabytes:.1f} MB): "
              f"{entry['shards'][0]} .. {entry['shards'][-1]}")
    print(f"  info: {os.path.join(args.out_dir, synthetic.INFO_FILE)}")


if __name__ == "__main__":
    main()
