#!/usr/bin/env python
"""Print a GenLIP config's parameter counts and training FLOPs per stage-1 sample.

Parameters are counted on the real model class built on the meta device. Example:
    python tools/model_info.py --config examples/configs/So16.yaml
"""

from __future__ import annotations

import argparse
import json

from megatron_genlip.config import load_config
from megatron_genlip.model.accounting import build_meta_model, count_parameters, stage1_flops_per_sample
from megatron_genlip.training.memory import memory_report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config file (examples/configs/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. --set model.num_layers=4 (repeatable)")
    ap.add_argument("--caption-tokens", type=int, default=72,
                    help="caption length used for FLOPs per stage-1 sample (PERFORMANCE.md base case: 72)")
    ap.add_argument("--world-size", type=int, default=None,
                    help="GPUs of the memory plan (default: global_batch_size / micro_batch_size x TP x PP, as --dry-run)")
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="packed rows per GPU of the memory plan (default: train.micro_batch_size)")
    ap.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                    help="GPU memory (GiB) the plan is checked against (default 80)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)

    full = load_config(args.config, args.overrides)
    cfg = full.model
    counts = count_parameters(build_meta_model(cfg))
    ideal = stage1_flops_per_sample(cfg, args.caption_tokens)
    everywhere = stage1_flops_per_sample(cfg, args.caption_tokens, lm_head_everywhere=True)
    info = {
        "config": args.config,
        "encoder_params": counts.encoder,
        "encoder_gate_params": counts.gate,
        "encoder_params_without_gate": counts.encoder_without_gate,
        "text_params": counts.text,
        "total_params": counts.total,
        "train_flops_per_stage1_sample": ideal,
        "train_flops_per_stage1_sample_lm_head_everywhere": everywhere,
    }
    # per-GPU memory plan (megatron_genlip/training/memory.py): activation checkpointing as configured, then the other modes
    memory_text, info["memory"] = memory_report(full, args.world_size, args.gpu_memory, args.micro_batch_size)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        m = 1e6
        print(f"config                      {args.config}")
        print(f"vision encoder              {counts.encoder / m:9.1f} M  (patch embed + blocks + ln_post)")
        print(f"  of which gate half        {counts.gate / m:9.1f} M")
        print(f"  encoder without gate      {counts.encoder_without_gate / m:9.1f} M")
        print(f"text modules                {counts.text / m:9.1f} M  (embedding + in/out proj + lm_head)")
        print(f"total                       {counts.total / m:9.1f} M")
        print(f"train FLOPs / stage-1 sample {ideal / 1e12:8.3f} TF  (LM head on {args.caption_tokens} labelled "
              f"positions; {everywhere / 1e12:.3f} TF with the head on all positions, "
              f"+{100 * (everywhere / ideal - 1):.1f}%)")
        print(memory_text)
    return info


if __name__ == "__main__":
    main()
