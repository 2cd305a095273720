#!/usr/bin/env python
"""Evaluate a GenLIP model with the trainer's evaluators (megatron_genlip/evaluation), one process, no launcher.

    # an exported Hugging Face folder (tools/convert_checkpoint.py) or a trainer checkpoint directory
    python tools/evaluate.py --model exports/tiny-hf --task linear_probe --dataset /data/digits --output report.json
    python tools/evaluate.py --load outputs/tiny/checkpoints --task captioning --dataset data/tiny/indexed/val \\
        --task zero_shot --dataset /data/digits --option zero_shot.templates='["a photo of a {}."]'
    python tools/evaluate.py --model exports/tiny-hf --evaluators evals.yaml     # a list of evaluator entries

``--task TYPE[:NAME]`` (repeatable) picks an evaluator type (validation_loss, captioning, linear_probe,
attentive_probe, zero_shot, patch_readout); ``--dataset`` gives its data (one per task in order, or one for all);
``--option NAME.KEY=VALUE`` sets an option (VALUE read as YAML). Prints a table, shows a progress bar on a
terminal, and writes ``--output`` (JSON): each task's metrics under its name, the model's identity (source,
config hash, training step), the settings (seed, device, prompt, each task's spec) and, with ``--records``, the
per-image records (captions, patch top tokens).

Exit status: 0 done, 2 bad arguments / config / data (one message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="HF_FOLDER", help="exported Hugging Face folder")
    src.add_argument("--load", metavar="CHECKPOINT_DIR", help="trainer checkpoint directory (any layout)")
    ap.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    ap.add_argument("--task", action="append", default=[], metavar="TYPE[:NAME]", help="evaluator type (repeatable)")
    ap.add_argument("--dataset", action="append", default=[], metavar="PATH",
                    help="data of each --task, in order (one value: every task)")
    ap.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="an evaluator option (VALUE parsed as YAML); NAME is the task's name (default: its type)")
    ap.add_argument("--evaluators", metavar="YAML", help="a YAML list (or mapping) of evaluator entries")
    ap.add_argument("--output", metavar="JSON", help="write the report here")
    ap.add_argument("--records", action="store_true", help="include per-image records in the report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--prompt", default=None, help="caption prompt (default: the model's training prompt)")
    ap.add_argument("--progress", choices=("auto", "always", "never"), default="auto")
    return ap


def specs_from_args(args) -> list:
    import yaml

    from megatron_genlip.config import ConfigError
    from megatron_genlip.evaluation import parse_specs

    entries = []
    if args.evaluators:
        raw = yaml.safe_load(Path(args.evaluators).read_text())
        entries = [s.to_dict() for s in parse_specs(raw)]
    if args.dataset and len(args.dataset) not in (1, len(args.task)):
        raise ConfigError(f"--dataset given {len(args.dataset)} times for {len(args.task)} --task values "
                          "(give one per task, or one for all)")
    for i, task in enumerate(args.task):
        type_, _, name = task.partition(":")
        data = args.dataset[0 if len(args.dataset) == 1 else i] if args.dataset else None
        entries.append({"name": name or type_, "type": type_, "data": data, "options": {}})
    if not entries:
        raise ConfigError("nothing to evaluate: give --task TYPE (repeatable) or --evaluators FILE")
    by_name = {e["name"]: e for e in entries}
    for opt in args.option:
        key, eq, value = opt.partition("=")
        name, dot, field = key.partition(".")
        if not eq or not dot or name not in by_name:
            raise ConfigError(f"--option {opt!r}: expected NAME.KEY=VALUE with NAME one of {sorted(by_name)}")
        by_name[name].setdefault("options", {})[field] = yaml.safe_load(value)
    return parse_specs([{k: v for k, v in e.items() if v is not None} for e in entries])


class Bar:
    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.what = enabled, None, None

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or self.what != what:
            self.close()
            self.bar, self.what = tqdm(total=total, desc=what, leave=False, file=sys.stderr), what
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def table(results: dict) -> str:
    lines = [f"{'task':<20} {'metric':<22} {'value':>12}", "-" * 56]
    for name, res in results.items():
        for i, (k, v) in enumerate(res["metrics"].items()):
            lines.append(f"{name if i == 0 else '':<20} {k:<22} {v:>12.4f}")
        lines.append(f"{'':<20} {'seconds':<22} {res['seconds']:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from megatron_genlip import platform
    from megatron_genlip.config import ConfigError
    from megatron_genlip.evaluation import EvalContext, EvalDataError, build_evaluator
    from megatron_genlip.evaluation.loading import load_model
    from megatron_genlip.hf.convert import CheckpointError

    platform.start_process()
    platform.initialize()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        specs = specs_from_args(args)
        model, cfg, tokenizer, identity = load_model(args.model, args.load, args.iteration, device, dtype)
        evaluators = [build_evaluator(s, cfg, tokenizer) for s in specs]
        bar = Bar(args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty()))
        ctx = EvalContext(device=device, tokenizer=tokenizer, prompt=args.prompt or cfg.tokenizer.prompt,
                          step=identity["step"], seed=args.seed, progress=bar)
        for ev in evaluators:  # every data error before the first minute of model time
            ev.prepare(ctx)
        torch.manual_seed(args.seed)
        results = {}
        for ev in evaluators:
            start = time.perf_counter()
            res = ev.run(model, ctx)
            bar.close()
            results[ev.name] = {"type": ev.type_name, "metrics": res.metrics,
                                "seconds": round(time.perf_counter() - start, 3)}
            if args.records:
                results[ev.name]["records"] = res.records
    except (ConfigError, EvalDataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    report = {"model": identity, "settings": {"seed": args.seed, "device": str(device), "dtype": args.dtype,
                                              "prompt": ctx.prompt, "image_size": cfg.data.image_size,
                                              "tasks": [s.to_dict() for s in specs]},
              "tasks": results}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
