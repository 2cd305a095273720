"""Step metrics (analytic FLOPs, throughput, MFU) and the run logger (console, JSONL, TensorBoard).

FLOPs are counted per sample of the actual batch with the ideal GenLIP formula (PERFORMANCE.md §1.2:
LM head on labelled positions only, attention dense-equivalent within each sample), so MFU is comparable
across packing and caption lengths. ``peak_tflops`` is per device (H100 dense bf16: 989).
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from megatron_genlip import platform
from megatron_genlip.config import ModelConfig
from megatron_genlip.model.accounting import batch_flops


def batch_stats(batch: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, float]:
    """Samples, real tokens, slots and training FLOPs of one packed micro-batch."""
    flops, samples = batch_flops(cfg, batch)
    sids = batch["sample_ids"]
    return {"samples": float(samples), "tokens": float((sids >= 0).sum()), "slots": float(sids.numel()),
            "flops": flops}


def memory_gb() -> float:
    if platform.current().cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def check_wandb(project: str) -> None:
    """``train.wandb_project`` asks for Weights & Biases: fail at start-up, before any work, when wandb is not
    installed (a run never silently logs less than asked)."""
    if not project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        from megatron_genlip.config import ConfigError

        raise ConfigError(f"train.wandb_project is set ({project!r}) but wandb is not installed: pip install wandb "
                          "(or leave train.wandb_project empty to log to JSONL and TensorBoard only)") from None


def scalars(kind: str, values: dict) -> dict[str, float]:
    """The finite numbers of a record, named ``kind/key``: what TensorBoard and Weights & Biases get."""
    return {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and np.isfinite(v)}


WANDB_ID_FILE = "wandb_run_id"  # in OUTPUT_DIR/logs: a restarted run continues the same W&B run


class RunLogger:
    """Rank-0 logging: one readable console line per log step, every record in JSONL, scalars to TensorBoard and
    (``wandb``: {"project", "mode", "config"}) to Weights & Biases."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool, progress_total: int | None,
                 progress_initial: int = 0, wandb: dict | None = None):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        logs = Path(output_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(logs / "train.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self.print("tensorboard is not installed: TensorBoard logging is off (pip install tensorboard)")
        if wandb and wandb.get("project"):
            self.wandb = _start_wandb(Path(output_dir), wandb)
        if progress_total is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=progress_total, initial=progress_initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        numbers = scalars(kind, values)
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None and numbers:
            self.wandb.log({**numbers, "step": step})

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(output_dir: Path, settings: dict):
    """A Weights & Biases run in ``output_dir`` (its files under ``output_dir/wandb``), resumed when the output
    directory already started one. Steps are the logged ``step`` value, not W&B's own counter, so the records
    of a resumed run (which repeats the steps after its checkpoint) are kept."""
    import wandb

    id_file = output_dir / "logs" / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    run = wandb.init(project=settings["project"], mode=settings.get("mode") or None, dir=str(output_dir),
                     name=output_dir.name, id=run_id, resume="allow", config=settings.get("config"))
    id_file.write_text(run_id)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def format_duration(seconds: float) -> str:
    """A duration for people: 42s, 7m05s, 1h23m, 2d03h."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_step(step: int, total: int, m: dict) -> str:
    """One readable console line."""
    return (f"step {step:>6d}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad norm {m['grad_norm']:.3f} | "
            f"{m['samples_per_s']:.1f} samples/s | {m['tokens_per_s']:.0f} tok/s | "
            f"{m['tflops_per_device']:.3f} TFLOP/s/dev | MFU {100 * m['mfu']:.2f}% | "
            f"pack {100 * m['packing_efficiency']:.1f}% | data wait {100 * m['data_wait_fraction']:.1f}% | "
            f"skipped {m['skipped_steps']} | mem {m['memory_gb']:.2f} GB | {m['s_per_step']:.3g} s/step | "
            f"ETA {format_duration(m['eta_s'])}")
