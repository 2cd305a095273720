"""``linear_probe``: multinomial logistic regression on frozen, mean-pooled ``ln_post`` features.

Features: the ``ln_post`` output of the image tokens alone (full bidirectional attention, GENLIP_SPEC.md §6),
averaged over the image's patches (GenLIP has no [CLS]), standardised with the training split's mean and std.

Full mode (``shots: 0``): an L2-regularised multinomial logistic regression (scikit-learn) whose strength ``C`` is
chosen from ``C_grid`` on a held-out part of the training split (``holdout_fraction`` of each class, seeded),
refit on the whole training split with the chosen ``C``; top-1/top-5 on the validation split. The default grid
spans 1e-2..1e5 (standardised features: the old grid's top, 100, was the one chosen for the tiny main job's
random and trained encoders alike, so the grid did not reach the best strength).
Metrics: ``top1``, ``top5``, ``C``, ``holdout_top1``, ``converged`` (1 when the final fit converged),
``train_images``, ``val_images``, ``skipped_images``.

Solver (``solver: auto``): Newton's method with a Cholesky solve (``newton-cholesky``) when the problem is small
((features + 1) x classes <= :data:`NEWTON_MAX_PARAMS`, a Hessian of at most 32 MB): it converges in a few
iterations at any ``C``; else L-BFGS (``lbfgs``; ``max_iter``), which on correlated features converges slowly at
large ``C`` (at ``max_iter: 1000`` the tiny encoder's 128 features were fit only approximately for C >= 10, which
cost the trained encoder 3-6 points).

Few-shot mode (``shots: k``): ``k`` training images per class drawn with each of ``seeds`` seeds, the regression
with ``fewshot_C`` fit on them (cheap: k x classes examples), top-1/top-5 on the validation split per seed.
Metrics: ``top1_mean``, ``top1_std``, ``top5_mean``, ``top5_std``, ``shots``, ``seeds``.

Feature extraction is split over data-parallel ranks and summed; the held-out fits of the ``C`` grid are split over
the ranks too (every rank holds the same features); the first rank of the group fits the final probe and its
metrics are shared, so every rank returns the same numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from megatron_genlip.evaluation.base import EvalContext, EvalResult, need, require_module
from megatron_genlip.evaluation.labelled import LabelledEvaluator


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(0, keepdims=True)
    std = train.std(0, keepdims=True)
    std[std < 1e-6] = 1.0  # constant in training (e.g. a border pixel): centred only, never blown up
    return [(x - mean) / std for x in (train, *others)]


NEWTON_MAX_PARAMS = 2048  # solver "auto": Newton-Cholesky up to this many coefficients ((features + 1) x classes)
SOLVERS = ("auto", "newton-cholesky", "lbfgs")


def pick_solver(solver: str, features: int, classes: int) -> str:
    if solver != "auto":
        return solver
    return "newton-cholesky" if (features + 1) * max(classes, 1) <= NEWTON_MAX_PARAMS else "lbfgs"


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000, seed: int = 0, solver: str = "auto"):
    """A fitted multinomial logistic regression; ``clf.converged_`` says whether it stopped before ``max_iter``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed,
                             solver=pick_solver(solver, x.shape[1], len(np.unique(y))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    clf.converged_ = bool(np.max(clf.n_iter_) < max_iter)
    return clf


def class_scores(clf, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Decision scores [n, num_classes] (-inf for classes the fit never saw)."""
    s = clf.decision_function(x)
    if s.ndim == 1:  # two classes seen
        s = np.stack((-s, s), axis=1)
    out = np.full((x.shape[0], num_classes), -np.inf)
    out[:, clf.classes_] = s
    return out


def topk(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return 0.0
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(1).mean())


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: ``fraction`` of each class held out (at least one, when it has two or more)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        h = int(round(len(idx) * fraction))
        h = min(max(h, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held += idx[:h].tolist()
        fit += idx[h:].tolist()
    return np.asarray(sorted(fit)), np.asarray(sorted(held))


def holdout_accuracies(xtr, ytr, num_classes: int, c_values, fraction: float, seed: int, max_iter: int,
                       solver: str = "auto") -> dict[float, float]:
    """C -> top-1 on the held-out part of the (standardised) training split of a fit on the rest."""
    xtr = _standardize(xtr)[0]
    fit, held = holdout_split(ytr, fraction, seed)
    out = {}
    for c in c_values:
        clf = fit_logistic(xtr[fit], ytr[fit], c, max_iter, seed, solver)
        out[c] = topk(class_scores(clf, xtr[held], num_classes), ytr[held], 1)
    return out


def full_probe(xtr, ytr, xva, yva, num_classes: int, c_grid, fraction: float, seed: int, max_iter: int,
               solver: str = "auto", holdout: dict[float, float] | None = None) -> dict:
    """``holdout``: the grid's held-out accuracies when computed already (split over data-parallel ranks)."""
    best_c, best = c_grid[0], -1.0
    if len(c_grid) > 1 and len(holdout_split(ytr, fraction, seed)[1]):
        if holdout is None:
            holdout = holdout_accuracies(xtr, ytr, num_classes, c_grid, fraction, seed, max_iter, solver)
        for c in c_grid:  # the first of equally good strengths, in grid order
            if holdout[c] > best:
                best_c, best = c, holdout[c]
    xtr, xva = _standardize(xtr, xva)
    clf = fit_logistic(xtr, ytr, best_c, max_iter, seed, solver)
    s = class_scores(clf, xva, num_classes)
    return {"top1": topk(s, yva, 1), "top5": topk(s, yva, 5), "C": float(best_c), "holdout_top1": max(best, 0.0),
            "converged": float(clf.converged_)}


def fewshot_probe(xtr, ytr, xva, yva, num_classes: int, shots: int, seeds: int, C: float, max_iter: int,
                  seed: int, solver: str = "auto") -> dict:
    top1, top5 = [], []
    for s in range(seeds):
        rng = np.random.default_rng(seed * 1000 + s)
        pick = np.concatenate([rng.permutation(np.flatnonzero(ytr == c))[:shots] for c in np.unique(ytr)])
        a, b = _standardize(xtr[pick], xva)
        clf = fit_logistic(a, ytr[pick], C, max_iter, seed + s, solver)
        sc = class_scores(clf, b, num_classes)
        top1.append(topk(sc, yva, 1))
        top5.append(topk(sc, yva, 5))
    return {"top1_mean": float(np.mean(top1)), "top1_std": float(np.std(top1)), "top5_mean": float(np.mean(top5)),
            "top5_std": float(np.std(top5)), "shots": float(shots), "seeds": float(seeds)}


class LinearProbe(LabelledEvaluator):
    type_name = "linear_probe"
    OPTIONS = {**LabelledEvaluator.OPTIONS, "C_grid": [0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5],
               "holdout_fraction": 0.2, "max_iter": 1000, "solver": "auto", "shots": 0, "seeds": 3, "fewshot_C": 1.0}
    metric_keys = ("top1", "top5")

    def __init__(self, spec, cfg, tokenizer=None):
        super().__init__(spec, cfg, tokenizer)
        if self.options["shots"] > 0:  # few-shot mode reports means and spreads over its seeds
            self.metric_keys = ("top1_mean", "top5_mean", "top1_std", "top5_std")

    @classmethod
    def validate_options(cls, o, where):
        super().validate_options(o, where)
        grid = o["C_grid"]
        need(len(grid) >= 1 and all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in grid),
             f"{where}.options.C_grid", "a non-empty list of positive numbers (inverse L2 strengths)")
        need(0.0 < o["holdout_fraction"] < 1.0, f"{where}.options.holdout_fraction", "in (0, 1)")
        need(o["shots"] >= 0, f"{where}.options.shots", ">= 0 (0 = full training split)")
        need(o["seeds"] >= 1, f"{where}.options.seeds", ">= 1")
        need(o["fewshot_C"] > 0, f"{where}.options.fewshot_C", "> 0")
        need(o["max_iter"] >= 1, f"{where}.options.max_iter", ">= 1")
        need(o["solver"] in SOLVERS, f"{where}.options.solver", " or ".join(SOLVERS))

    def prepare(self, ctx: EvalContext) -> None:
        require_module("sklearn", "scikit-learn", f"evaluation.{self.name} (type linear_probe)")
        super().prepare(ctx)

    @torch.no_grad()
    def run(self, model, ctx: EvalContext) -> EvalResult:
        if not self.prepared:
            self.prepare(ctx)
        xtr, ytr, vtr = self.features(model, ctx, "train_split")
        xva, yva, vva = self.features(model, ctx, "val_split")
        skipped = int((~vtr).sum() + (~vva).sum())
        xtr, ytr = xtr[vtr].double().numpy(), ytr[vtr].numpy()
        xva, yva = xva[vva].double().numpy(), yva[vva].numpy()
        metrics = None
        o, k = self.options, len(self.classnames)
        grid = [float(c) for c in o["C_grid"]]
        holdout = None
        if o["shots"] == 0 and len(grid) > 1 and len(holdout_split(ytr, o["holdout_fraction"], ctx.seed)[1]):
            # the grid's held-out fits, split over the data-parallel ranks (every rank holds the same features)
            holdout = {}
            for part in ctx.all_gather_object(holdout_accuracies(
                    xtr, ytr, k, grid[ctx.dp_rank::ctx.dp_world], o["holdout_fraction"], ctx.seed, o["max_iter"],
                    o["solver"])):
                holdout.update(part)
        if ctx.dp_rank == 0:
            if o["shots"] > 0:
                metrics = fewshot_probe(xtr, ytr, xva, yva, k, o["shots"], o["seeds"], o["fewshot_C"], o["max_iter"],
                                        ctx.seed, o["solver"])
            else:
                metrics = full_probe(xtr, ytr, xva, yva, k, grid, o["holdout_fraction"], ctx.seed, o["max_iter"],
                                     o["solver"], holdout)
            metrics.update(train_images=float(len(ytr)), val_images=float(len(yva)), skipped_images=float(skipped))
        return EvalResult(ctx.agree(metrics))
