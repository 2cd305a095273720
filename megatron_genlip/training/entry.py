"""Command line of the trainer (``examples/pretrain_genlip.py``): train, or ``--dry-run`` a config."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from megatron_genlip.config import Config, ConfigError, field_errors, load_config, resolve_layout, warmup_steps

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
                    help="build everything on the meta device (no GPU, no processes) and print the resolved "
                         "DeepSpeed config, parameters, FLOPs/tokens/samples per step, steps per epoch and total "
                         "steps/samples; samples are counted from data.train_data's stored lengths when it is on "
                         "this machine (else from a hard-coded average sample); checks the tokenizer against "
                         "model.vocab_size")
    ap.add_argument("--dry-run-world-size", type=int, default=None,
                    help="world size assumed by --dry-run (default: parallel.data_parallel x TP x PP when set, else "
                         "global_batch_size / micro_batch_size x TP x PP, "
                         "i.e. no gradient accumulation)")
    ap.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                    help="GPU memory (GiB) --dry-run checks the per-GPU memory plan against (default 80: H100/A100-80GB)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher; the trainer reads LOCAL_RANK from the environment")
    args = ap.parse_args(argv)
    if args.output_dir:
        args.overrides.append(f"train.output_dir={args.output_dir}")
    if args.load:
        args.overrides.append(f"train.load={args.load}")
    return args


def checked_tokenizer(cfg: Config):
    """The configured tokenizer, its fingerprint, and the check that ``model.vocab_size`` holds all its ids
    (the trainer's start-up does the same)."""
    from megatron_genlip.data.tokenizer import tokenizer_fingerprint
    from megatron_genlip.data.tokenizer import check_vocab_size, load_tokenizer, tokenizer_description

    with field_errors("tokenizer.path"):
        fingerprint = tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path)
        tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    check_vocab_size(tokenizer, cfg.model.vocab_size, tokenizer_description(cfg.tokenizer))
    return tokenizer, fingerprint


def dataset_statistics(cfg: Config, fingerprint: str | None) -> tuple[list[tuple[float, object]], str]:
    """([(row fraction, RowStats)] of each training dataset, "") from their stored lengths, or ([], why not)
    when no training data is configured or it is not on this machine."""
    from megatron_genlip.data.indexed import DatasetError, resolve_data_paths
    from megatron_genlip.data.packed_dataset import check_rows_match, open_train_rows
    from megatron_genlip.data.row_stats import row_stats

    d = cfg.data
    name = "data.train_blend" if d.train_blend else "data.train_data"
    specs = [b.data for b in d.train_blend] if d.train_blend else [d.train_data] if d.train_data else []
    if not specs:
        return [], "data.train_data is not set"
    try:
        manifests = [m for spec in specs for m in resolve_data_paths(spec)]
    except DatasetError as e:
        return [], f"{name}: {e}"
    if missing := [m for m in manifests if not m.is_file()]:
        return [], f"{name}: {missing[0]} not found"
    with field_errors(name):
        rows = open_train_rows(d, fingerprint)
    check_rows_match(rows, cfg)
    sources = getattr(rows, "sources", [rows])
    weights = getattr(rows, "weights", [1.0])
    with field_errors("data.seq_length"):  # a sample longer than a row
        stats = [row_stats(src) for src in sources]
    return [(w / sum(weights), st) for w, st in zip(weights, stats)], ""


def _count(x: float) -> str:
    """8.000B, 3.07T, 12.50M, 1,234."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3f}{unit}" if unit == "B" else f"{x / scale:.2f}{unit}"
    return f"{x:,.0f}"


def _labelled(cfg: Config, num_text: int, prompt_tokens: int) -> int:
    """Labelled positions of a sample with ``num_text`` text tokens: all but the prompt's (stage 1); stage 2's
    user turns are not in the stored lengths, so the hard-coded sample's labelled fraction is used."""
    if cfg.data.stage == 1:
        return max(0, num_text - prompt_tokens)
    _, n_txt, n_lab = DRY_RUN_SAMPLE[2]
    return round(num_text * n_lab / n_txt)


def _checked_evaluators(cfg: Config, pipeline_parallel: int, tokenizer) -> list:
    """The run's evaluators as the trainer will build them (their specs, the layout, train.best_metric); their data
    is read only by the trainer."""
    from megatron_genlip.evaluation import build_evaluators, check_layout
    from megatron_genlip.training.best import resolve_metric

    evaluators = build_evaluators(cfg, tokenizer, cfg.evaluation)
    if not cfg.evaluation and pipeline_parallel > 1:
        evaluators = [ev for ev in evaluators if not ev.needs_full_model]
    check_layout(evaluators, pipeline_parallel)
    resolve_metric(cfg, evaluators)
    return evaluators


def dry_run(cfg: Config, world_size: int | None, gpu_memory: float = 80.0) -> dict:
    from megatron_genlip import platform
    from megatron_genlip.model.accounting import build_meta_model, count_parameters, flops_per_sample
    from megatron_genlip.training.ds_config import deepspeed_config
    from megatron_genlip.training.metrics import check_wandb

    t = cfg.train
    if world_size is None:
        from megatron_genlip.training.memory import default_world_size

        world_size = default_world_size(cfg)
    layout = resolve_layout(cfg, world_size)
    here = platform.decide(platform.Capabilities.probe(), t.compile)  # decided, not applied: no patch, no group
    counts = count_parameters(build_meta_model(cfg.model))
    tokenizer, fingerprint = checked_tokenizer(cfg)
    evaluators = _checked_evaluators(cfg, layout.pipeline_parallel, tokenizer)
    check_wandb(t.wandb_project)
    datasets, why_not = dataset_statistics(cfg, fingerprint)
    seq = cfg.data.seq_length
    if datasets:  # the datasets' real lengths
        prompt_tokens = len(tokenizer.encode(cfg.tokenizer.prompt.strip()))
        samples_per_row = flops_per_row = n_img = n_txt = 0.0
        for fraction, st in datasets:
            total = sum(c for _, _, c in st.composition)
            mean_flops = sum(c * flops_per_sample(cfg.model, a, b, _labelled(cfg, b, prompt_tokens))
                             for a, b, c in st.composition) / total
            samples_per_row += fraction * st.samples_per_row
            flops_per_row += fraction * st.samples_per_row * mean_flops
            n_img += fraction * st.samples_per_row * st.image_tokens
            n_txt += fraction * st.samples_per_row * st.text_tokens
        n_img, n_txt = n_img / samples_per_row, n_txt / samples_per_row
        basis = "the dataset's lengths"
    else:  # the hard-coded average sample
        a, b, c = DRY_RUN_SAMPLE[cfg.data.stage]
        samples_per_row = seq / (a + b)
        flops_per_row = samples_per_row * flops_per_sample(cfg.model, a, b, c)
        n_img, n_txt = float(a), float(b)
        basis = "a hard-coded average sample"
    samples_per_step = t.global_batch_size * samples_per_row
    flops_step = t.global_batch_size * flops_per_row
    tokens_step = t.global_batch_size * seq
    data_info = {"basis": "dataset" if datasets else "hard-coded", "note": why_not,
                 "mean_image_tokens": n_img, "mean_text_tokens": n_txt, "datasets": []}
    for fraction, st in datasets:
        steps_per_epoch = st.rows_per_epoch / (fraction * t.global_batch_size)
        data_info["datasets"].append(dict(st.as_dict(), row_fraction=fraction, steps_per_epoch=steps_per_epoch,
                                          epochs=t.train_steps / steps_per_epoch))
    info = {
        "evaluators": [ev.spec.to_dict() for ev in evaluators],
        "layout": layout.__dict__,
        "deepspeed_config": deepspeed_config(cfg, layout, here),
        "platform": here.describe(),
        "parameters": {"encoder": counts.encoder, "encoder_without_gate": counts.encoder_without_gate,
                       "text": counts.text, "total": counts.total},
        "tokenizer_ids": tokenizer.n_vocab,
        "data": data_info,
        "samples_per_row": samples_per_row,
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
    if len(datasets) == 1:
        info["steps_per_epoch"] = data_info["datasets"][0]["steps_per_epoch"]
        info["epochs"] = data_info["datasets"][0]["epochs"]
    print(json.dumps(info["deepspeed_config"], indent=2))
    print(f"{here.describe()} (this machine)")
    print(f"layout: world {layout.world_size} = TP {layout.tensor_parallel} x PP {layout.pipeline_parallel} x "
          f"DP {layout.data_parallel}; gradient accumulation {layout.grad_accumulation}")
    print(f"parameters: encoder {counts.encoder / 1e6:.1f}M (without gate {counts.encoder_without_gate / 1e6:.1f}M), "
          f"text {counts.text / 1e6:.1f}M, total {counts.total / 1e6:.1f}M")
    print(f"tokenizer: {tokenizer.n_vocab:,} ids, model.vocab_size {cfg.model.vocab_size:,}")
    print("evaluators: " + ("; ".join(f"{ev.name} ({ev.type_name}, every {ev.interval} steps, data "
                                      f"{ev.spec.data or 'data.valid_data'})" for ev in evaluators) or "none"))
    if datasets:
        for fraction, st in datasets:
            share = f" ({100 * fraction:.1f}% of the rows)" if len(datasets) > 1 else ""
            print(f"data: {st.dataset}{share}: {st.samples:,} samples, mean {st.image_tokens:.1f} image + "
                  f"{st.text_tokens:.1f} text tokens; {st.samples_per_row:.2f} samples per row of {seq} tokens, "
                  f"packing efficiency {100 * st.efficiency:.1f}%, {st.rows_per_epoch:,.0f} rows per epoch "
                  f"({'exact' if st.exact else 'estimate'}: {st.source})")
    else:
        print(f"data: {why_not}: sized with {basis} of {n_img:.0f} image + {n_txt:.0f} text tokens, "
              f"{samples_per_row:.2f} samples per row of {seq} tokens (the dataset's own lengths are used when "
              "data.train_data is on this machine)")
    per_step = f"{samples_per_step:,.1f}" if samples_per_step < 100 else f"{samples_per_step:,.0f}"
    print(f"per step: {t.global_batch_size} rows x {seq} = {tokens_step:,} tokens, ~{per_step} samples "
          f"({samples_per_row:.2f} per row), {flops_step / 1e15:.2f} PFLOP")
    for entry in data_info["datasets"]:
        of = f" of {entry['dataset']}" if len(datasets) > 1 else ""
        print(f"epochs{of}: {entry['steps_per_epoch']:,.1f} steps per epoch; train.train_steps={t.train_steps:,} "
              f"covers {entry['epochs']:,.2f} epochs")
    hours = info["gpu_hours_at_50pct_mfu"]
    hours_text = f"{hours:,.0f}" if hours >= 10 else f"{hours:.2g}"
    print(f"run: {t.train_steps:,} steps (warmup {warmup_steps(t):,}), ~{_count(info['total_samples'])} samples, "
          f"{_count(info['total_tokens'])} tokens, {info['total_flops']:.3e} FLOP, "
          f"~{hours_text} GPU-hours at 50% MFU of {t.peak_tflops:g} TFLOP/s "
          f"(samples and FLOPs from {basis})")
    from megatron_genlip.training.memory import memory_report

    # per-GPU memory (training/memory.py): activation checkpointing as configured, then its other two modes
    fractions = {"image_fraction": n_img / (n_img + n_txt)} if n_img + n_txt > 0 else {}
    text, info["memory"] = memory_report(cfg, layout.world_size, gpu_memory, **fractions)
    print(text)
    return info


def main(argv=None) -> dict:
    from megatron_genlip import platform

    platform.start_process()  # before megatron-core and DeepSpeed are imported (below, and by the trainer)
    from megatron_genlip.data.indexed import DatasetError
    from megatron_genlip.data.pack_index import MissingEpochError
    from megatron_genlip.evaluation.data import EvalDataError
    from megatron_genlip.training.errors import RunAborted
    from megatron_genlip.training.signals import StopBeforeTraining, install_early_stop_handlers, watch_launcher

    install_early_stop_handlers()
    watch_launcher()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg, args.dry_run_world_size, args.gpu_memory)
        from megatron_genlip.training.trainer import Trainer

        summary = Trainer(cfg).train()
    except ConfigError as e:
        _say(f"configuration error: {e}")
        raise SystemExit(2) from None
    except MissingEpochError as e:  # data.build_missing_pack_index=false and an epoch the run reads is not built
        _say(f"data error: {e}")
        raise SystemExit(2) from None
    except DatasetError as e:  # damaged data found while training: only the rank that read it knows
        _say(f"data error: {e}", every_rank=True)
        raise SystemExit(2) from None
    except EvalDataError as e:  # an evaluator's data (its folder, shards or held-out set) cannot be used
        _say(f"evaluation data error: {e}", every_rank=True)
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


def run_and_exit(argv=None) -> None:
    """The launchers' entry: :func:`main`, then end the process with its exit status without the interpreter's
    teardown. Tearing down the modules torch, DeepSpeed and megatron-core load takes ~2.5 s per process on a CPU,
    after every file is written; exit handlers (``atexit``) still run and the streams are flushed. An uncaught
    exception is left to Python (traceback, status 1)."""
    import atexit

    try:
        main(argv)
        code = 0
    except SystemExit as e:  # main's own exits: configuration/data errors (2), aborted runs (their code), --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


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
    if s.get("best_val_loss") is not None:
        kept = f", checkpoint {s['best_checkpoint']}" if s.get("best_checkpoint") else ""
        print(f"best validation loss {s['best_val_loss']:.4f} at step {s['best_val_step']}{kept}")
    elif s.get("best_value") is not None:  # train.best_metric names another metric
        kept = f", checkpoint {s['best_checkpoint']}" if s.get("best_checkpoint") else ""
        print(f"best {s['best_metric']} {s['best_value']:.4g} at step {s['best_val_step']}{kept}")
    if s.get("val_loss_rising"):
        print(f"note: {s['val_loss_rising']}")
    print(f"outputs: checkpoint {s['checkpoint']}\n         log {s['train_log']}\n         tensorboard "
          f"{s['tensorboard']}\n         summary {s['output_dir']}/summary.json")
    if s.get("first_evaluation_best"):
        print(f"note: {s['first_evaluation_best']}")
    if s.get("step0"):  # train.eval_at_start: what training bought
        print(f"what training bought (step 0 -> step {s['steps']}):")
        for key, before in s["step0"].items():
            after = s.get(key)
            if isinstance(before, (int, float)) and isinstance(after, (int, float)):
                print(f"  {key:32s} {before:10.4g} -> {after:10.4g}")
    if not math.isfinite(s["final_train_loss"]):
        print("warning: the final training loss is not finite")
