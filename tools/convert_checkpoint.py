#!/usr/bin/env python
"""Convert between megatron-genlip trainer checkpoints and Hugging Face model folders.

Export (any TP / PP / DP layout, ZeRO-1/2/3, or a weights-only checkpoint):
    python tools/convert_checkpoint.py --load outputs/tiny/checkpoints --save exports/tiny-hf
    python tools/convert_checkpoint.py --load CKPT --iteration 2000 --save HF_DIR --dtype fp32
    python tools/convert_checkpoint.py --load CKPT --save HF_ENCODER --vision-only
Import (continue training from a released official GenLIP folder or one of our exports; fresh optimizer,
step 0, any TP/PP):
    python tools/convert_checkpoint.py --from-hf HF_DIR --save CKPT_DIR --tp 2 --pp 2
    then train with  --set train.load=CKPT_DIR

An exported folder holds config.json in the official GenLIP schema (GENLIP_SPEC.md §6.9: ``ls_init_value``,
``rope_scaling.mrope_section``, ...; our own fields only where that schema has none), model.safetensors with
the §6 key names (sharded with model.safetensors.index.json above --max-shard-size), the modeling code for
``AutoModel.from_pretrained(HF_DIR, trust_remote_code=True)``, the tokenizer (``tokenizer.json`` for
``AutoTokenizer`` plus the tiktoken ranks), preprocessor_config.json + image_processing_genlip.py, and a
model card. --from-hf reads the official schema and our earlier exports, and refuses, naming the fields, a
config.json it cannot train (unknown fields, mrope_interleaved/use_swiglu_ffn false, LayerScale off, which
ls_init_value <= 1e-6 means to the official class, num_key_value_heads other than the heads, an M-RoPE section
naming channels the head dim does not have, ...); it reads what the official trainer's save_pretrained writes.
Fields the trainer does not use (num_patches, architectures, initializer_factor, ...) are written back as they
were by an export of the imported weights. Weights with NaN or inf are refused, naming the tensor.

Checkpoints are verified against their manifest (sizes and sha256) before they are read: without --iteration the
newest one that verifies is exported. --save must be a new or empty folder (or --overwrite), and never, even with
--overwrite, a training run's output directory (.genlip.lock, logs/train.jsonl, checkpoints/), a directory of
checkpoints (latest, iter_*) or a checkpoint tag directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_genlip.config import ConfigError  # noqa: E402
from megatron_genlip.hf.convert import (CheckpointError, check_save_dir, parse_size, read_checkpoint,  # noqa: E402
                                         read_trainer_state, write_hf_folder, write_weights_only_checkpoint)
from megatron_genlip.hf.official_config import MODEL_FIELDS  # noqa: E402


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", metavar="CKPT_DIR",
                     help="trainer checkpoint directory (the one holding 'latest' and iter_* folders) to export")
    src.add_argument("--from-hf", metavar="HF_DIR",
                     help="Hugging Face folder (a released official GenLIP checkpoint or our export) to turn into "
                          "a trainer checkpoint (weights only)")
    ap.add_argument("--save", required=True, metavar="DIR",
                    help="output: the Hugging Face folder (with --load) or the checkpoint directory (with --from-hf)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a --save folder that is not empty; never, even with --overwrite, into a training "
                         "run's output directory, a directory of checkpoints or a checkpoint tag (or inside one)")
    ap.add_argument("--iteration", type=int, default=None,
                    help="export the checkpoint of this step (default: the newest one that verifies)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="dtype of the exported weights (default bf16, as the official checkpoints)")
    ap.add_argument("--vision-only", action="store_true",
                    help="export only the encoder (patch embedding, blocks, ln_post) for MLLM builders")
    ap.add_argument("--max-shard-size", default="5GB", type=_size,
                    help="split model.safetensors into shards of at most this size, with an index (default 5GB; "
                         "units B, KB, MB, GB)")
    ap.add_argument("--tp", type=int, default=1,
                    help="with --from-hf: the tensor-parallel size the run will use (checked against the model)")
    ap.add_argument("--pp", type=int, default=1,
                    help="with --from-hf: the pipeline-parallel size the run will use (checked against the model)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        check_save_dir(args.save, args.overwrite, "checkpoint" if args.from_hf else "hf")  # before minutes of reading
        if args.from_hf:
            tag = write_weights_only_checkpoint(args.from_hf, args.save, args.tp, args.pp, args.overwrite)
            model = read_trainer_state(tag)["config"]["model"]
            fields = [*MODEL_FIELDS.values(), "mrope_section"]
            print(f"[convert] wrote {tag} from {args.from_hf} ({time.time() - start:.1f} s); start a run from it "
                  f"with --set train.load={args.save} (fresh optimizer, step 0). The run's model section must "
                  f"describe this model (checked when the weights load):\n  "
                  + " ".join(f"model.{k}={model[k]}".replace(" ", "") for k in fields))
            return 0
        print(f"[convert] reading {args.load} ...", flush=True)
        state, client = read_checkpoint(args.load, args.iteration)
        client = dict(client, source=str(Path(args.load).resolve()))
        n = sum(t.numel() for t in state.values())
        print(f"[convert] merged {len(state)} tensors, {n / 1e6:.2f}M parameters, step {client.get('iteration')}, "
              f"layout {client.get('layout') or client.get('target_layout')}", flush=True)
        out = write_hf_folder(state, client, args.save, args.dtype, args.vision_only, args.max_shard_size,
                              args.overwrite)
        print(f"[convert] wrote {out} ({args.dtype}{', vision only' if args.vision_only else ''}) "
              f"in {time.time() - start:.1f} s")
        return 0
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
