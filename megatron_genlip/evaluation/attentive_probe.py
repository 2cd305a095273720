"""``attentive_probe``: the paper's ImageNet protocol (GENLIP_SPEC.md §7, Tab. 11): a learned-query attention
pooling over all frozen ``ln_post`` patch features, then a linear classifier, trained with AdamW.

The pooler (as in V-JEPA / AIM / DINOv2's attentive probes): ``num_queries`` learned queries attend (multi-head,
``heads``; 0 = the model's head count) over the LayerNorm'd patch features of one image; the queries' outputs
are averaged, normalised and classified by a linear layer. Trained with AdamW (``lr``, ``weight_decay``,
``batch_size``, ``epochs``; cosine learning-rate decay, ``warmup_epochs`` of linear warm-up), cross-entropy,
seeded; top-1/top-5 on the validation split. The frozen features are computed once per run (split over
data-parallel ranks and summed); the first rank of the group trains the probe and shares the metrics.

Metrics: ``top1``, ``top5``, ``train_loss`` (last epoch's mean), ``train_images``, ``val_images``,
``skipped_images``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_genlip.evaluation.base import EvalContext, EvalResult, need, topk_hits
from megatron_genlip.evaluation.labelled import LabelledEvaluator


class AttentivePooler(torch.nn.Module):
    def __init__(self, dim: int, heads: int, num_classes: int, num_queries: int = 1):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out_norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, d] -> logits [B, classes]
        kv = self.norm(x)
        out, _ = self.attn(self.query.expand(x.shape[0], -1, -1), kv, kv, need_weights=False)
        return self.head(self.out_norm(out.mean(1)))


def train_attentive_probe(xtr: torch.Tensor, ytr: torch.Tensor, num_classes: int, heads: int, *, epochs: int,
                          lr: float, weight_decay: float, batch_size: int, num_queries: int = 1,
                          warmup_epochs: float = 0.0, seed: int = 0, device="cpu") -> tuple[AttentivePooler, float]:
    """Train the pooler + classifier on features [n, N, d] / labels [n]; returns it and the last epoch's loss."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: the training run's CUDA streams stay
        torch.default_generator.manual_seed(seed)
        probe = AttentivePooler(xtr.shape[-1], heads, num_classes, num_queries).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    n = xtr.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total, warm = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    step, last = 0, float("nan")
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        losses = []
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            if step < warm:
                scale = (step + 1) / warm
            else:
                scale = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            loss = F.cross_entropy(probe(xtr[idx].to(device)), ytr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        last = sum(losses) / len(losses)
    probe.eval()
    return probe, last


class AttentiveProbe(LabelledEvaluator):
    type_name = "attentive_probe"
    OPTIONS = {**LabelledEvaluator.OPTIONS, "epochs": 20, "lr": 1e-3, "weight_decay": 0.05, "probe_batch_size": 64,
               "heads": 0, "num_queries": 1, "warmup_epochs": 0.0}
    metric_keys = ("top1", "top5")

    @classmethod
    def validate_options(cls, o, where):
        super().validate_options(o, where)
        need(o["epochs"] >= 1, f"{where}.options.epochs", ">= 1")
        need(o["lr"] > 0, f"{where}.options.lr", "> 0")
        need(o["weight_decay"] >= 0, f"{where}.options.weight_decay", ">= 0")
        need(o["probe_batch_size"] >= 1, f"{where}.options.probe_batch_size", ">= 1")
        need(o["heads"] >= 0, f"{where}.options.heads", ">= 0 (0 = model.num_attention_heads)")
        need(o["num_queries"] >= 1, f"{where}.options.num_queries", ">= 1")
        need(o["warmup_epochs"] >= 0, f"{where}.options.warmup_epochs", ">= 0")

    def run(self, model, ctx: EvalContext) -> EvalResult:
        if not self.prepared:
            self.prepare(ctx)
        with torch.no_grad():
            xtr, ytr, vtr = self.features(model, ctx, "train_split", pool="none")
            xva, yva, vva = self.features(model, ctx, "val_split", pool="none")
        skipped = int((~vtr).sum() + (~vva).sum())
        metrics = None
        if ctx.dp_rank == 0:
            o = self.options
            d = xtr.shape[-1]
            heads = o["heads"] or (model.cfg.num_attention_heads if hasattr(model, "cfg")
                                   else model.config.num_attention_heads)
            if d % heads:
                heads = 1
            with torch.enable_grad():
                probe, loss = train_attentive_probe(
                    xtr[vtr], ytr[vtr], len(self.classnames), heads, epochs=o["epochs"], lr=o["lr"],
                    weight_decay=o["weight_decay"], batch_size=o["probe_batch_size"], num_queries=o["num_queries"],
                    warmup_epochs=o["warmup_epochs"], seed=ctx.seed, device=ctx.device)
            with torch.no_grad():
                xv, yv = xva[vva], yva[vva]
                logits = torch.cat([probe(xv[s:s + 256].to(ctx.device)).cpu() for s in range(0, len(yv), 256)]) \
                    if len(yv) else torch.zeros(0, len(self.classnames))
                hits = topk_hits(logits, yv)
            metrics = {"top1": float(hits[1].float().mean()) if len(yv) else 0.0,
                       "top5": float(hits[5].float().mean()) if len(yv) else 0.0, "train_loss": loss,
                       "train_images": float(int(vtr.sum())), "val_images": float(len(yv)),
                       "skipped_images": float(skipped)}
        return EvalResult(ctx.agree(metrics))
