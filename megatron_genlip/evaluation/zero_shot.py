"""``zero_shot``: classification by caption likelihood (CapPa-style scoring; EVALUATION.md §2).

Each class name goes into caption ``templates`` (``{}`` marks the name); a candidate caption is scored by the
model's log-likelihood of its supervised tokens after ``[image patches][prompt]``: the caption tokens then
``<|im_end|>`` ``\\n`` (exactly what the training loss covers, so the score is minus the sum of the trainer's token
losses for that sample; ``include_eos: false`` scores the caption tokens alone). A class's score averages its
templates (``length_normalize: true`` divides each log-likelihood by its token count first): ``average:
log_likelihood`` (the default) takes the mean of their log-likelihoods; ``average: probability`` the log of the mean
of their likelihoods, i.e. the likelihood of the class with the templates' other words marginalised (uniform over
the templates). The second is the one for templates that spell out mutually exclusive details of the image (the
main job's 24 templates name each background and colour: one of them describes a given image, and the mean of
log-likelihoods is dominated by the other 23, how the model continues a wrong description). Top-1/top-5 on the
validation split.

Efficiency: the ``[patches][prompt]`` prefix of ``image_batch`` images is run once (prefix-LM mask) into a KV
cache; the candidates are then scored together against it, ``candidate_rows`` (image, candidate) rows per
forward, each row attending the cached prefix of its image (no full forward per class). Log-likelihoods use the
trainer's own per-token cross-entropy (``model._token_losses``: the full padded vocabulary, vocab-parallel under
TP). Images are split over data-parallel ranks; hit counts are summed.

Metrics: ``top1``, ``top5``, ``images``, ``classes``, ``skipped_images``.
"""

from __future__ import annotations

import torch

from megatron_genlip.batch import KIND_IMAGE, KIND_TEXT
from megatron_genlip.data.sample import image_positions, text_positions
from megatron_genlip.evaluation.base import EvalContext, EvalResult, need
from megatron_genlip.evaluation.labelled import DATA_OPTIONS, LabelledEvaluator
from megatron_genlip.model.layers import KVCache
from megatron_genlip.model.masks import sdpa_mask

DEFAULT_TEMPLATES = ["a photo of a {}.", "an image of a {}.", "{}"]
AVERAGES = ("log_likelihood", "probability")


def class_scores(ll: torch.Tensor, average: str = "log_likelihood") -> torch.Tensor:
    """[images, classes] scores from log-likelihoods [images, classes, templates]: the mean over the templates of the
    log-likelihoods, or (``probability``) the log of the mean of the likelihoods (log-sum-exp, computed stably)."""
    if average == "log_likelihood":
        return ll.mean(-1)
    if average == "probability":
        return torch.logsumexp(ll, -1) - torch.log(torch.tensor(float(ll.shape[-1]), dtype=ll.dtype))
    raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


def candidate_ids(tokenizer, caption: str, include_eos: bool = True) -> list[int]:
    ids = tokenizer.encode(caption.strip())
    return ids + [tokenizer.eos_id, tokenizer.newline_id] if include_eos else ids


@torch.no_grad()
def score_candidates(model, tokenizer, patches: torch.Tensor, grid: tuple[int, int], prompt: str,
                     candidates: list[list[int]], candidate_rows: int = 256) -> torch.Tensor:
    """Log-likelihood [B, K] of each candidate token sequence after each image's ``[patches][prompt]``.

    patches [B, N, 3, p, p] (one grid). Sum over the candidate's tokens of log p(token | image, prompt, earlier
    tokens), each from the trainer's cross-entropy, so it equals minus the sum of the training loss's token
    losses for the sample [patches][prompt][candidate]."""
    if not hasattr(model, "_token_losses"):
        raise TypeError("zero-shot scoring needs the trainer's GenLIPModel (load an exported folder with "
                        "megatron_genlip.evaluation.loading.load_model)")
    device = next(model.parameters()).device
    B, N = patches.shape[:2]
    prompt_ids = tokenizer.encode(prompt.strip())
    P = len(prompt_ids)
    ids = torch.tensor([0] * N + prompt_ids, device=device).expand(B, -1)
    kinds = torch.tensor([KIND_IMAGE] * N + [KIND_TEXT] * P, device=device).expand(B, -1)
    positions = torch.cat((image_positions(*grid), text_positions(grid, P)), dim=1).to(device).expand(B, 3, -1)
    cache = KVCache(len(model.layers))
    x = model.embed(ids, kinds, patches.to(device).flatten(0, 1))
    h = model.encode(x, positions, sdpa_mask(torch.zeros_like(ids), kinds), cache)  # [Lp, B, d]
    h_last = h[-1]  # [B, d]: predicts each candidate's first token
    prefix = list(cache.layers)
    Lp = N + P
    start = max(grid) + P
    K = len(candidates)
    out = torch.empty(B, K, dtype=torch.float64)
    per_chunk = max(1, candidate_rows // B)
    for c0 in range(0, K, per_chunk):
        chunk = candidates[c0:c0 + per_chunk]
        kc, lc = len(chunk), max(len(c) for c in chunk)
        cand = torch.zeros(kc, lc, dtype=torch.long)
        valid = torch.zeros(kc, lc, dtype=torch.bool)
        for k, c in enumerate(chunk):
            cand[k, :len(c)] = torch.tensor(c)
            valid[k, :len(c)] = True
        R = B * kc  # row r = image (r // kc), candidate (r % kc)
        cand, valid = cand.to(device).repeat(B, 1), valid.to(device).repeat(B, 1)
        rows = KVCache(len(model.layers))
        rows.layers = [(k.repeat_interleave(kc, 0), v.repeat_interleave(kc, 0)) for k, v in prefix]
        pos = torch.arange(start, start + lc, device=device).expand(R, 3, lc)
        # every candidate slot sees its image's whole prefix and the earlier candidate slots (padding sits at
        # the end of a row, after every real slot, so the causal part never reaches it from a real slot)
        mask = torch.cat((torch.ones(lc, Lp, dtype=torch.bool, device=device),
                          torch.ones(lc, lc, dtype=torch.bool, device=device).tril()), dim=1)[None, None]
        hc = model.encode(model.embed(cand, torch.full_like(cand, KIND_TEXT), None), pos, mask, rows)  # [lc, R, d]
        hidden = torch.cat((h_last.repeat_interleave(kc, 0)[None], hc[:-1]), dim=0).transpose(0, 1)  # [R, lc, d]
        losses = model._token_losses(hidden[valid], cand[valid]).double()
        row_of = torch.arange(R, device=device)[:, None].expand(R, lc)[valid]
        sums = torch.zeros(R, dtype=torch.float64, device=device).index_add_(0, row_of, losses)
        out[:, c0:c0 + kc] = -sums.view(B, kc).cpu()
    return out


class ZeroShot(LabelledEvaluator):
    type_name = "zero_shot"
    OPTIONS = {**DATA_OPTIONS, "train_split": "", "templates": list(DEFAULT_TEMPLATES), "include_eos": True,
               "length_normalize": False, "average": "log_likelihood", "image_batch": 8, "candidate_rows": 256}
    splits_needed = ("val_split",)
    metric_keys = ("top1", "top5")

    @classmethod
    def validate_options(cls, o, where):
        super().validate_options(o, where)
        t = o["templates"]
        need(len(t) >= 1 and all(isinstance(s, str) and "{}" in s for s in t), f"{where}.options.templates",
             "a non-empty list of strings, each with '{}' where the class name goes")
        need(o["average"] in AVERAGES, f"{where}.options.average", " or ".join(AVERAGES))
        need(o["image_batch"] >= 1, f"{where}.options.image_batch", ">= 1")
        need(o["candidate_rows"] >= 1, f"{where}.options.candidate_rows", ">= 1")

    @torch.no_grad()
    def run(self, model, ctx: EvalContext) -> EvalResult:
        if not self.prepared:
            self.prepare(ctx)
        tok = self.tokenizer or ctx.tokenizer
        o = self.options
        names = self.classnames
        templates = o["templates"]
        cands = [candidate_ids(tok, t.replace("{}", name), o["include_eos"]) for name in names for t in templates]
        lengths = torch.tensor([len(c) for c in cands], dtype=torch.float64)
        split, idx = self.split("val_split")
        mine = list(ctx.mine(len(idx)))
        totals = torch.zeros(4, dtype=torch.float64)  # top1 hits, top5 hits, images, skipped
        was_training = model.training
        model.eval()
        for s in range(0, len(mine), o["image_batch"]):
            pats, labels = [], []
            for r in mine[s:s + o["image_batch"]]:
                p = split.patches(int(idx[r]), self.pre, o["cache_images"])
                if p is None:
                    totals[3] += 1
                    continue
                pats.append(torch.from_numpy(p))
                labels.append(int(split.labels[idx[r]]))
            if not pats:
                continue
            ll = score_candidates(model, tok, torch.stack(pats), self.pre.grid, ctx.prompt, cands, o["candidate_rows"])
            if o["length_normalize"]:
                ll = ll / lengths
            scores = class_scores(ll.view(len(pats), len(names), len(templates)), o["average"])
            k5 = min(5, len(names))
            top = scores.topk(k5, dim=-1).indices
            y = torch.tensor(labels)
            totals[0] += float((top[:, 0] == y).sum())
            totals[1] += float((top == y[:, None]).any(-1).sum())
            totals[2] += len(pats)
            ctx.tick(self.name, min(len(mine), s + o["image_batch"]), len(mine))
        model.train(was_training)
        ctx.all_reduce(totals)
        n = max(1.0, float(totals[2]))
        return EvalResult({"top1": float(totals[0]) / n, "top5": float(totals[1]) / n, "images": float(totals[2]),
                           "classes": float(len(names)), "skipped_images": float(totals[3])})
