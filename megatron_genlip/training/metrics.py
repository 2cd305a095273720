"""Step metrics (analytic FLOPs, throughput, MFU) and the run logger (console, JSONL, TensorBoard).

FLOPs are counted per sample of the actual batch with the ideal GenLIP formula (PERFORMANCE.md §1.2:
LM head on labelled positions only, attention dense-equivalent within each sample), so MFU is comparable
across packing and caption lengths. ``peak_tflops`` is per device (H100 dense bf16: 989).
"""

from __future__ import annotations

import json
import sys
import time
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


class RunLogger:
    """Rank-0 logging: one readable console line per log step, every record in JSONL, scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool, progress_total: int | None,
                 progress_initial: int = 0):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
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
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and np.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

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


def format_step(step: int, total: int, m: dict) -> str:
    """One readable console line."""
    return (f"step {step:>6d}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad norm {m['grad_norm']:.3f} | "
            f"{m['samples_per_s']:.1f} samples/s | {m['tokens_per_s']:.0f} tok/s | "
            f"{m['tflops_per_device']:.3f} TFLOP/s/dev | MFU {100 * m['mfu']:.2f}% | "
            f"pack {100 * m['packing_efficiency']:.1f}% | data wait {100 * m['data_wait_fraction']:.1f}% | "
            f"skipped {m['skipped_steps']} | mem {m['memory_gb']:.2f} GB")
