"""Shared part of the evaluators on labelled images (linear_probe, attentive_probe, zero_shot, patch_readout):
the data options, opening the splits once, and frozen features split over data-parallel ranks and reduced."""

from __future__ import annotations

import numpy as np
import torch

from megatron_genlip.config import ConfigError
from megatron_genlip.evaluation.base import EvalContext, Evaluator, need
from megatron_genlip.evaluation.data import LabelledImages, Preprocess, open_labelled
from megatron_genlip.evaluation.features import encode_images

DATA_OPTIONS = {
    "format": "auto",  # auto | imagefolder | wds
    "classnames": "",  # class names file ("" = ROOT/classnames.txt when present)
    "class_key": "cls",  # wds: json key of the class when there is no 'cls' member
    "train_split": "train",
    "val_split": "val",
    "image_size": 0,  # 0 = data.image_size
    "max_per_class": 0,  # at most this many images per class and split (the first ones; 0 = all)
    "batch_size": 32,  # images per forward
    "cache_images": True,  # keep each rank's decoded images in memory between runs (false: decode every run)
}


def subsample(split: LabelledImages, max_per_class: int) -> np.ndarray:
    """Indices of the first ``max_per_class`` images of every class (all when 0)."""
    if max_per_class <= 0:
        return np.arange(len(split))
    keep, seen = [], {}
    for i, y in enumerate(split.labels.tolist()):
        if seen.get(y, 0) < max_per_class:
            keep.append(i)
            seen[y] = seen.get(y, 0) + 1
    return np.asarray(keep, dtype=np.int64)


class LabelledEvaluator(Evaluator):
    OPTIONS = dict(DATA_OPTIONS)
    splits_needed = ("train_split", "val_split")

    def __init__(self, spec, cfg, tokenizer=None):
        super().__init__(spec, cfg, tokenizer)
        self.splits: dict[str, LabelledImages] | None = None
        self.index: dict[str, np.ndarray] = {}
        self.pre = Preprocess(self.options["image_size"] or cfg.data.image_size, cfg.model.patch_size,
                              tuple(cfg.data.background))

    @classmethod
    def validate_options(cls, o, where):
        need(o["format"] in ("auto", "imagefolder", "wds"), f"{where}.options.format", "auto, imagefolder or wds")
        need(o["image_size"] >= 0, f"{where}.options.image_size", ">= 0 (0 = data.image_size)")
        need(o["max_per_class"] >= 0, f"{where}.options.max_per_class", ">= 0 (0 = all)")
        need(o["batch_size"] >= 1, f"{where}.options.batch_size", ">= 1")

    def prepare(self, ctx: EvalContext) -> None:
        if self.splits is None:
            if not self.spec.data:
                raise ConfigError(f"evaluation.{self.name}.data: the {self.type_name} evaluator needs data (an "
                                  "ImageFolder root or a folder of labelled shards)")
            if self.pre.image_size % self.pre.patch_size:
                raise ConfigError(f"evaluation.{self.name}.options.image_size: {self.pre.image_size} is not a "
                                  f"multiple of model.patch_size {self.pre.patch_size}")
            names = [self.options[k] for k in self.splits_needed]
            self.splits = open_labelled(self.spec.data, names, self.options["format"],
                                        self.options["classnames"] or None, self.options["class_key"])
            self.index = {s: subsample(self.splits[s], self.options["max_per_class"]) for s in names}
        self.prepared = True

    def split(self, key: str) -> tuple[LabelledImages, np.ndarray]:
        name = self.options[key]
        return self.splits[name], self.index[name]

    @property
    def classnames(self) -> list[str]:
        return next(iter(self.splits.values())).classnames

    @torch.no_grad()
    def features(self, model, ctx: EvalContext, key: str, pool: str = "mean"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features [n, d] or [n, N, d] float32 on the CPU, labels [n], valid [n] bool) of one split's selected
        images; every rank encodes its share, the shares are summed over the data-parallel group. Unreadable
        images are not valid (callers drop and count them)."""
        split, idx = self.split(key)
        n = len(idx)
        grid = self.pre.grid
        d = model.cfg.hidden_size if hasattr(model, "cfg") else model.config.hidden_size
        shape = (n, d) if pool == "mean" else (n, grid[0] * grid[1], d)
        feats = torch.zeros(shape, dtype=torch.float32, device=ctx.device)
        valid = torch.zeros(n, dtype=torch.float32, device=ctx.device)
        mine = list(ctx.mine(n))
        was_training = model.training
        model.eval()
        bs = self.options["batch_size"]
        for s in range(0, len(mine), bs):
            rows, pats = [], []
            for r in mine[s:s + bs]:
                p = split.patches(int(idx[r]), self.pre, self.options["cache_images"])
                if p is not None:
                    rows.append(r)
                    pats.append(torch.from_numpy(p))
            if rows:
                h = encode_images(model, torch.stack(pats), grid).float()
                feats[rows] = h.mean(1) if pool == "mean" else h
                valid[rows] = 1.0
            ctx.tick(f"{self.name}:{self.options[key]}", min(len(mine), s + bs), len(mine))
        model.train(was_training)
        ctx.all_reduce(feats)
        ctx.all_reduce(valid)
        return feats.cpu(), torch.from_numpy(split.labels[idx]), valid.cpu() > 0.5
