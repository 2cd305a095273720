"""``captioning``: greedy captions of held-out captioned images, batched, scored against their references.

Data (``data``; default ``data.valid_data``): an indexed dataset (our ``GenLIPIndexedDataset``: prefix, glob, .txt
list) or captioned webdataset shards (image + json ``caption`` / txt; a folder of .tar, a glob or a brace pattern),
preprocessed like training stage 1. Decoding as GENLIP_SPEC.md §7.8: greedy, stop at ``<|im_end|>``, at most
``max_new_tokens`` (0 = ``train.max_new_tokens``), the config's prompt (``tokenizer.prompt``), ``batch_size``
images per forward (``inference.generate.generate_captions``, the same tokens as one image at a time).
Options: ``images`` (N images; 0 = ``train.eval_captions``), ``seed`` (which N: a random sample of the whole
held-out set drawn with this seed, ``base.sample_order``; null = the run's seed, ``train.seed`` in the trainer,
``--seed`` in ``tools/evaluate.py``; the same images at every evaluation and after a resume: held-out sets stored
in key order, one category after another, are not shown as their first category alone), ``records`` (per-image
records returned for the contact sheet: the first ``records`` images of the same sample, so a random sample of
the whole set too, in index order), ``image_size`` (shards only; 0 = ``data.image_size``).

Metrics: ``exact_match`` (generated ids == reference ids), ``token_accuracy`` (position-wise agreement over the
longer of the two), ``cider`` (CIDEr-D) and ``bleu4`` (our CIDEr-D / BLEU-4, equal to pycocoevalcap 1.2's, over the
whole set, lower-cased and punctuation-stripped as COCO does), ``images``, ``skipped_images`` (unreadable,
counted). Records: index, reference, generated, exact, token_accuracy.
"""

from __future__ import annotations

import torch

from megatron_genlip.config import ConfigError
from megatron_genlip.evaluation.base import EvalContext, EvalResult, Evaluator, check_seed_option, need, sample_order
from megatron_genlip.evaluation.data import CaptionedImages, Preprocess
from megatron_genlip.evaluation.scorers import caption_scores
from megatron_genlip.inference.generate import generate_captions


def caption_token_accuracy(generated: list[int], reference: list[int]) -> float:
    longest = max(len(generated), len(reference))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(generated, reference)) / longest


class Captioning(Evaluator):
    type_name = "captioning"
    OPTIONS = {"images": 0, "max_new_tokens": 0, "batch_size": 32, "records": 16, "image_size": 0, "seed": None}
    metric_keys = ("exact_match", "token_accuracy", "cider", "bleu4")

    def __init__(self, spec, cfg, tokenizer=None):
        super().__init__(spec, cfg, tokenizer)
        self.num_images = self.options["images"] or cfg.train.eval_captions
        self.max_new_tokens = self.options["max_new_tokens"] or cfg.train.max_new_tokens
        self.data: CaptionedImages | None = None
        self._cache: dict[int, tuple | None] = {}

    @classmethod
    def validate_options(cls, o, where):
        for k in ("images", "max_new_tokens", "records", "image_size"):
            need(o[k] >= 0, f"{where}.options.{k}", ">= 0")
        need(o["batch_size"] >= 1, f"{where}.options.batch_size", ">= 1")
        check_seed_option(o, where)

    def prepare(self, ctx: EvalContext) -> None:
        if self.data is None:
            from megatron_genlip.evaluation.validation_loss import tokenizer_fp

            spec = self.spec.data or self.cfg.data.valid_data
            if not spec:
                raise ConfigError(f"evaluation.{self.name}.data: not set and data.valid_data is empty")
            pre = Preprocess(self.options["image_size"] or self.cfg.data.image_size, self.cfg.model.patch_size,
                             tuple(self.cfg.data.background))
            self.data = CaptionedImages(spec, self.cfg, self.tokenizer or ctx.tokenizer, tokenizer_fp(self.cfg), pre)
        self.prepared = True

    def _item(self, i: int):
        if i not in self._cache:
            self._cache[i] = self.data.get(i)
        return self._cache[i]

    @torch.no_grad()
    def run(self, model, ctx: EvalContext) -> EvalResult:
        if not self.prepared:
            self.prepare(ctx)
        tok = self.tokenizer or ctx.tokenizer
        order = self.sample(ctx)
        chosen = sorted(order)
        items = [(chosen[j], self._item(chosen[j])) for j in ctx.mine(len(chosen))]
        good = [(i, it) for i, it in items if it is not None]
        skipped = len(items) - len(good)
        gen = generate_captions(model, tok, [it[0] for _, it in good], [it[1] for _, it in good], ctx.prompt,
                                self.max_new_tokens, self.options["batch_size"],
                                progress=lambda d, t: ctx.tick(self.name, d, t))
        rows = []
        for (i, (_, _, ref)), g in zip(good, gen):
            rows.append({"index": i, "reference": tok.decode(ref), "generated": tok.decode(g), "exact": g == ref,
                         "token_accuracy": caption_token_accuracy(g, ref)})
        totals = torch.tensor([float(skipped)], dtype=torch.float64)
        ctx.all_reduce(totals)
        every = sorted((r for part in ctx.all_gather_object(rows) for r in part), key=lambda r: r["index"])
        count = len(every)
        metrics = {"exact_match": sum(r["exact"] for r in every) / max(1, count),
                   "token_accuracy": sum(r["token_accuracy"] for r in every) / max(1, count),
                   "images": float(count), "skipped_images": float(totals[0])}
        scores = caption_scores({r["index"]: [r["reference"]] for r in every},
                                {r["index"]: r["generated"] for r in every})
        metrics.update(cider=scores["cider"], bleu4=scores["bleu4"])
        by_index = {r["index"]: r for r in every}
        shown = [by_index[i] for i in order if i in by_index][:self.options["records"]]
        return EvalResult(metrics, sorted(shown, key=lambda r: r["index"]))

    def sample(self, ctx: EvalContext) -> list[int]:
        """The held-out images this evaluator captions, in draw order (``sample_order``: a seeded random sample of
        the whole set; the contact sheet's records are its first ``records``)."""
        seed = ctx.seed if self.options["seed"] is None else self.options["seed"]
        return sample_order(len(self.data), self.num_images, seed)
