"""Command line of the trainer (``examples/pretrain_genlip.py``): train, or ``--dry-run`` a config."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from megatron_genlip.config import Config, ConfigError, load_config, resolve_layout, warmup_steps

# average sample composition used by --dry-run (GENLIP_SPEC.md §4.1/§4.2, PERFORMANCE.md §1.4):
# stage 1: 196 image + 74 text tokens (72 of them labelled); stage 2: ~1,200 tokens per sample
DRY_RUN_SAMPLE = {1: (196, 74, 72), 2: (900, 300, 290)}

EPILOG = """
Launch examples:
  deepspeed --num_gpus 2 examples/pretrain_genlip.py --config examples/configs/tiny.yaml
  torchrun --nproc_per_node 8 examples/pretrain_genlip.py --config examples/configs/stage1-So16.yaml
  python examples/pretrain_genlip.py --config examples/configs/stage1-So16.yaml --dry-run
Resuming is automatic: a run restarted with the same train.output_dir continues from its newest checkpoint that
verifies (older ones are tried when a newer one is damaged); a finished run exits at once, its summary kept.
SIGTERM or SIGUSR1 make the trainer save a checkpoint at the end of the current step and exit cleanly (during
start-up they end it at once). Only one run at a time may use an output directory (a lock); the ranks stop
when their launcher dies.
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pretrain_genlip", description="Train a GenLIP vision encoder on DeepSpeed.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (examples/configs/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override of any config field, e.g. --set train.train_steps=200 (repeatable)")
    ap.add_argument("--output-dir", help="shortcut for --set train.output_dir=DIR")
    ap.add_argument("--load", help="shortcut for --set train.load=DIR (used when the output dir has no checkpoint)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build everything on the meta device (no data, no GPU, no processes) and print the "
                         "resolved DeepSpeed config, parameters, FLOPs/tokens per step and total steps/samples")
    ap.add_argument("--dry-run-world-size", type=int, default=None,
                    help="world size assumed by --dry-run (default: global_batch_size / micro_batch_size x TP x PP, "
                         "i.e. no gradient accumulation)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher; the trainer reads LOCAL_RANK from the environment")
    args = ap.parse_args(argv)
    if args.output_dir:
        args.overrides.append(f"train.output_dir={args.output_dir}")
    if args.load:
        args.overrides.append(f"train.load={args.load}")
    return args


def dry_run(cfg: Config, world_size: int | None) -> dict:
    from megatron_genlip import platform
    from megatron_genlip.model.accounting import build_meta_model, count_parameters, flops_per_sample
    from megatron_genlip.training.ds_config import deepspeed_config

    t, p = cfg.train, cfg.parallel
    if world_size is None:
        world_size = t.global_batch_size // t.micro_batch_size * p.tensor_parallel * p.pipeline_parallel
    layout = resolve_layout(cfg, world_size)
    here = platform.decide(platform.Capabilities.probe(), t.compile)  # decided, not applied: no patch, no group
    counts = count_parameters(build_meta_model(cfg.model))
    n_img, n_txt, n_lab = DRY_RUN_SAMPLE[cfg.data.stage]
    samples_per_row = cfg.data.seq_length / (n_img + n_txt)
    samples_per_step = t.global_batch_size * samples_per_row
    flops_step = samples_per_step * flops_per_sample(cfg.model, n_img, n_txt, n_lab)
    tokens_step = t.global_batch_size * cfg.data.seq_length
    info = {
        "layout": layout.__dict__,
        "deepspeed_config": deepspeed_config(cfg, layout, here),
        "platform": here.describe(),
        "parameters": {"encoder": counts.encoder, "encoder_without_gate": counts.encoder_without_gate,
                       "text": counts.text, "total": counts.total},
        "tokens_per_step": tokens_step,
        "samples_per_step": samples_per_step,
        "flops_per_step": flops_step,
        "train_steps": t.train_steps,
        "warmup_steps": warmup_steps(t),
        "total_samples": samples_per_step * t.train_steps,
        "total_tokens": tokens_step * t.train_steps,
        "total_flops": flops_step * t.train_steps,
        "gpu_hours_at_50pct_mfu": flops_step * t.train_steps / (0.5 * t.peak_tflops * 1e12) / 3600,
    }
    print(json.dumps(info["deepspeed_config"], indent=2))
    print(f"{here.describe()} (this machine)")
    print(f"layout: world {layout.world_size} = TP {layout.tensor_parallel} x PP {layout.pipeline_parallel} x "
          f"DP {layout.data_parallel}; gradient accumulation {layout.grad_accumulation}")
    print(f"parameters: encoder {counts.encoder / 1e6:.1f}M (without gate {counts.encoder_without_gate / 1e6:.1f}M), "
          f"text {counts.text / 1e6:.1f}M, total {counts.total / 1e6:.1f}M")
    print(f"per step: {t.global_batch_size} rows x {cfg.data.seq_length} = {tokens_step:,} tokens, "
          f"~{samples_per_step:,.0f} samples ({n_img}+{n_txt} tokens each), {flops_step / 1e15:.2f} PFLOP")
    print(f"run: {t.train_steps:,} steps (warmup {warmup_steps(t):,}), ~{info['total_samples'] / 1e9:.3f}B samples, "
          f"{info['total_tokens'] / 1e12:.2f}T tokens, {info['total_flops']:.3e} FLOP, "
          f"~{info['gpu_hours_at_50pct_mfu']:,.0f} GPU-hours at 50% MFU of {t.peak_tflops:g} TFLOP/s")
    return info


def main(argv=None) -> dict:
    from megatron_genlip.data.pack_index import MissingEpochError
    from megatron_genlip.training.errors import RunAborted
    from megatron_genlip.training.signals import StopBeforeTraining, install_early_stop_handlers, watch_launcher

    install_early_stop_handlers()
    watch_launcher()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg, args.dry_run_world_size)
        from megatron_genlip.training.trainer import Trainer

        summary = Trainer(cfg).train()
    except ConfigError as e:
        _say(f"configuration error: {e}")
        raise SystemExit(2) from None
    except MissingEpochError as e:  # data.build_missing_pack_index=false and an epoch the run reads is not built
        _say(f"data error: {e}")
        raise SystemExit(2) from None
    except RunAborted as e:
        _say(f"error: {e}", every_rank=e.per_rank)
        raise SystemExit(e.exit_code) from None
    except StopBeforeTraining as e:
        _say(str(e))
        raise SystemExit(e.exit_code) from None
    if summary.get("already_finished"):
        _say(f"the run in {cfg.train.output_dir} is finished (step {summary.get('steps')} of "
             f"{cfg.train.train_steps}, checkpoint {summary['checkpoint']}): nothing to do; "
             f"{summary['summary_file']} is kept as it was. Raise train.train_steps to train on", stream=sys.stdout)
        return summary
    _print_summary(summary)
    return summary


def _say(text: str, every_rank: bool = False, stream=None) -> None:
    """One message for a run whose ranks all stop the same way: printed by rank 0 only (every rank prints its
    own when ``every_rank``, prefixed with its number)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if every_rank and os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) != "1":
        text = f"[rank {rank}] {text}"
    elif rank != "0":
        return
    print(text, file=stream or sys.stderr, flush=True)


def _print_summary(s: dict) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print("\n==== summary ====")
    print(f"steps {s['steps']}{' (stopped by signal)' if s['stopped_by_signal'] else ''}, skipped {s['skipped_steps']}, "
          f"final train loss {s['final_train_loss']:.4f}")
    if "caption_exact_match" in s:
        print(f"validation loss {s['val_loss']:.4f}, teacher-forced token accuracy "
              f"{100 * s['val_token_accuracy']:.1f}%")
        print(f"held-out captions: exact match {100 * s['caption_exact_match']:.1f}%, token accuracy "
              f"{100 * s['caption_token_accuracy']:.1f}% ({s['caption_images']} images)")
        for e in s.get("caption_examples", []):
            print(f"  ref: {e['reference']}\n  gen: {e['generated']}")
    print(f"outputs: checkpoint {s['checkpoint']}\n         log {s['train_log']}\n         tensorboard "
          f"{s['tensorboard']}\n         summary {s['output_dir']}/summary.json")
    if not math.isfinite(s["final_train_loss"]):
        print("warning: the final training loss is not finite")
