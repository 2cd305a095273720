"""``patch_readout``: the paper's patch-semantics readout (Fig. 6, GENLIP_SPEC.md §7.8): ``ln_post`` -> ``proj`` ->
LM head on each patch feature of an image (image tokens alone, full bidirectional attention), the ``top_k``
tokens per patch.

Data: labelled images (``val_split`` of an ImageFolder tree or labelled shards, as the probes read them);
``images`` of them drawn at random over the whole split with ``seed`` (null = the run's seed; ``base.sample_order``:
an ImageFolder split is stored class after class, so its first images would all be of the first class). Records
(for the contact sheet, which draws them over the image): per image its index, class name, grid and, per patch in
row-major order, the top tokens (decoded) and their ids and probabilities.
Metric: ``class_token_rate``, the fraction of patches whose top tokens include a token of the image's class name
(with or without a leading space), a rough number for "do patches speak their content"; ``images``.
"""

from __future__ import annotations

import torch

from megatron_genlip.evaluation.base import EvalContext, EvalResult, check_seed_option, need, sample_order
from megatron_genlip.evaluation.features import encode_images, readout_logits
from megatron_genlip.evaluation.labelled import DATA_OPTIONS, LabelledEvaluator


@torch.no_grad()
def patch_top_tokens(model, patches: torch.Tensor, grid: tuple[int, int], n_vocab: int, k: int = 5
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, N, k], probabilities [B, N, k]) of the top-k tokens per patch of B images."""
    h = encode_images(model, patches, grid)
    logits = readout_logits(model, h, n_vocab)
    probs = logits.softmax(-1)
    top = probs.topk(k, dim=-1)
    return top.indices.cpu(), top.values.cpu()


class PatchReadout(LabelledEvaluator):
    type_name = "patch_readout"
    OPTIONS = {**DATA_OPTIONS, "train_split": "", "images": 8, "top_k": 5, "seed": None}
    splits_needed = ("val_split",)
    metric_keys = ("class_token_rate",)

    @classmethod
    def validate_options(cls, o, where):
        super().validate_options(o, where)
        need(o["images"] >= 1, f"{where}.options.images", ">= 1")
        need(o["top_k"] >= 1, f"{where}.options.top_k", ">= 1")
        check_seed_option(o, where)

    @torch.no_grad()
    def run(self, model, ctx: EvalContext) -> EvalResult:
        if not self.prepared:
            self.prepare(ctx)
        tok = self.tokenizer or ctx.tokenizer
        split, idx = self.split("val_split")
        chosen = sorted(sample_order(len(idx), self.options["images"],
                                     ctx.seed if self.options["seed"] is None else self.options["seed"]))
        records, hits, count = [], 0, 0
        was_training = model.training
        model.eval()
        for r in (chosen[j] for j in ctx.mine(len(chosen))):
            p = split.patches(int(idx[r]), self.pre, self.options["cache_images"])
            if p is None:
                continue
            label = int(split.labels[idx[r]])
            name = self.classnames[label]
            ids, probs = patch_top_tokens(model, torch.from_numpy(p)[None], self.pre.grid, tok.n_vocab,
                                          self.options["top_k"])
            name_ids = set(tok.encode(name)) | set(tok.encode(" " + name))
            patch_ids = ids[0].tolist()
            hits += sum(bool(name_ids & set(row)) for row in patch_ids)
            count += len(patch_ids)
            records.append({"index": int(idx[r]), "class": name, "label": label, "grid": list(self.pre.grid),
                            "top_ids": patch_ids, "top_probs": [[round(float(v), 5) for v in row] for row in probs[0]],
                            "top_tokens": [[tok.decode([t]) for t in row] for row in patch_ids]})
        model.train(was_training)
        totals = ctx.all_reduce(torch.tensor([float(hits), float(count), float(len(records))], dtype=torch.float64))
        every = sorted((x for part in ctx.all_gather_object(records) for x in part), key=lambda x: x["index"])
        return EvalResult({"class_token_rate": float(totals[0]) / max(1.0, float(totals[1])),
                           "images": float(totals[2])}, every)
