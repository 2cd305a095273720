"""Learning-rate schedule of GENLIP_SPEC.md §5, exactly (steps counted from 0, W warmup steps, N total):

    lr(s) = peak * s / W                                                  for s < W
    lr(s) = min + (peak - min) * 0.5 * (1 + cos(pi * (s - W) / (N - W)))   afterwards
"""

from __future__ import annotations

import math

import torch

from megatron_genlip.config import TrainConfig, warmup_steps


def learning_rate(step: int, peak: float, min_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor times the peak lr is :func:`learning_rate` (DeepSpeed steps it per optimizer step)."""
    w = warmup_steps(t)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate(s, t.lr, t.min_lr, w, t.train_steps) / t.lr
    )
