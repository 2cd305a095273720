"""The evaluations of a run on its best metric, the best one and its checkpoint, and the notes they call for.

``train.best_metric`` names the metric (``EVALUATOR/METRIC``; default: the first validation_loss evaluator's
validation loss) and ``train.best_mode`` whether lower or higher is better. Every evaluation is recorded as (step,
value, checkpoint tag of that step or None) in ``CKPT_DIR/best.json``, rewritten atomically by rank 0 after each
evaluation, with the best evaluation at its top for people and tools. A resumed run reads it back, keeping the
evaluations up to the step it resumed from (the later ones are repeated by the resumed run) and forgetting tags that
no longer exist.

With ``train.keep_best`` the trainer saves a checkpoint at every evaluation that sets a new best (unless one
was just saved at that step) and protects it from ``train.keep_last`` retention until a better one replaces it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_genlip.config import Config, ConfigError
from megatron_genlip.data.files import replace_atomically
from megatron_genlip.training import ckpt_format as fmt

BEST_FILE = "best.json"
RISING_EVALS = 2  # the note on overfitting: the metric got worse at each of this many evaluations in a row
VAL_LOSS = "val_loss"  # the history's key for the default metric (the first validation_loss evaluator's loss)


def resolve_metric(cfg: Config, evaluators: list) -> tuple[str | None, str, str]:
    """(history key, mode, full name ``EVALUATOR/METRIC``) of ``train.best_metric`` among ``evaluators``; key None
    when nothing is to be followed (no validation_loss evaluator and no best_metric). Raises ConfigError naming the
    field when the metric does not exist or ``train.keep_best`` has nothing to follow."""
    t = cfg.train
    names = ", ".join(f"{e.name} ({e.type_name}: {', '.join(e.metric_keys) or '-'})" for e in evaluators) or "none"
    if not t.best_metric:
        ev = next((e for e in evaluators if e.type_name == "validation_loss"), None)
        if ev is None:
            if t.keep_best:
                raise ConfigError(f"train.keep_best: no validation_loss evaluator, so train.best_metric must name "
                                  f"the metric to follow as EVALUATOR/METRIC (evaluators: {names})")
            return None, "min", ""
        return VAL_LOSS, t.best_mode or "min", f"{ev.name}/val_loss"
    name, _, key = t.best_metric.partition("/")
    ev = next((e for e in evaluators if e.name == name), None)
    if ev is None or not key or (ev.metric_keys and key not in ev.metric_keys):
        raise ConfigError(f"train.best_metric: {t.best_metric!r} is not EVALUATOR/METRIC of this run's evaluators "
                          f"({names})")
    mode = t.best_mode or ("min" if "loss" in key else "max")
    return t.best_metric, mode, t.best_metric


class EvalHistory:
    """Evaluations of one run: dicts with ``step``, the metric (under ``key``) and ``checkpoint`` (a tag or None)."""

    def __init__(self, evals: list[dict] | None = None, key: str = VAL_LOSS, mode: str = "min"):
        self.evals = list(evals or [])
        self.key, self.mode = key, mode

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def add(self, step: int, value: float, checkpoint: str | None) -> None:
        self.evals.append({"step": int(step), self.key: float(value), "checkpoint": checkpoint})

    def best(self) -> dict | None:
        """The evaluation of the best finite value (the earliest on ties); None before any."""
        best = None
        for e in self.evals:
            if math.isfinite(e[self.key]) and (best is None or self._better(e[self.key], best[self.key])):
                best = e
        return best

    def best_checkpointed(self) -> dict | None:
        """The best evaluation among those with a checkpoint."""
        return EvalHistory([e for e in self.evals if e["checkpoint"]], self.key, self.mode).best()

    def is_new_best(self, value: float) -> bool:
        best = self.best()
        return math.isfinite(value) and (best is None or self._better(value, best[self.key]))

    def _what(self) -> str:
        return "validation loss" if self.key == VAL_LOSS else self.key

    def rising(self, n: int = RISING_EVALS) -> tuple[float, float] | None:
        """(value before the worsening, last value) when each of the last ``n`` evaluations was worse than the one
        before it; else None."""
        values = [e[self.key] for e in self.evals[-(n + 1):]]
        if len(values) < n + 1 or not all(math.isfinite(x) for x in values):
            return None
        if all(self._better(a, b) for a, b in zip(values, values[1:])):
            return values[0], values[-1]
        return None

    def rising_note(self, keep_best: bool, n: int = RISING_EVALS) -> str | None:
        """"validation loss rose for the last 2 evaluations (5.13 -> 8.83): overfitting? best checkpoint: ...";
        None when it did not."""
        rose = self.rising(n)
        if rose is None:
            return None
        verb = "rose" if self.mode == "min" else "fell"
        note = f"{self._what()} {verb} for the last {n} evaluations ({rose[0]:.4g} -> {rose[1]:.4g}): overfitting? "
        best = self.best()
        kept = self.best_checkpointed() if keep_best else None
        if kept is not None:
            return note + f"best checkpoint: {kept['checkpoint']} ({self._what()} {kept[self.key]:.4g})"
        return note + (f"best {self._what()} {best[self.key]:.4g} at step {best['step']} (train.keep_best=true "
                       "keeps the checkpoint of the best evaluation)")

    def first_is_best_note(self) -> str | None:
        """When the run's best evaluation is its first of several: the best checkpoint lies before the second
        evaluation, and only more frequent evaluations can find it."""
        best = self.best()
        if best is None or len(self.evals) < 2 or best is not self.evals[0]:
            return None
        return (f"the best {self._what()} ({best[self.key]:.4g}) was the first evaluation, at step {best['step']}: "
                f"evaluate more often (a smaller train.eval_interval) to find a better checkpoint before it got worse")

    # ---------------------------------------------------------------------------------------------
    # the file

    def save(self, ckpt_dir: str | Path, keep_best: bool) -> None:
        """``ckpt_dir/best.json``, replaced atomically: ``metric`` and ``mode`` followed, ``best_checkpoint`` the
        checkpoint ``train.keep_best`` keeps (None without it), ``best`` the best evaluation, ``evaluations`` all
        of them (their checkpoints as saved: retention may have deleted them since, unless kept)."""
        kept = self.best_checkpointed() if keep_best else None
        doc = {"metric": self.key, "mode": self.mode, "best_checkpoint": kept["checkpoint"] if kept else None,
               "best": self.best(), "evaluations": self.evals}
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        replace_atomically(Path(ckpt_dir) / BEST_FILE, json.dumps(doc, indent=1))

    @classmethod
    def load(cls, ckpt_dir: str | Path, up_to_step: int, key: str = VAL_LOSS, mode: str = "min") -> "EvalHistory":
        """The evaluations of ``ckpt_dir/best.json`` up to ``up_to_step`` on the metric ``key``, their tags kept
        only while the checkpoint exists; an empty history when the file is absent, unreadable or followed
        another metric."""
        ckpt_dir = Path(ckpt_dir)
        try:
            doc = json.loads((ckpt_dir / BEST_FILE).read_text())
            if doc.get("metric", VAL_LOSS) != key:
                return cls(key=key, mode=mode)
            evals = [{"step": int(e["step"]), key: float(e[key]), "checkpoint": e.get("checkpoint")}
                     for e in doc["evaluations"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(key=key, mode=mode)
        existing = set(fmt.list_tags(ckpt_dir))
        return cls([dict(e, checkpoint=e["checkpoint"] if e["checkpoint"] in existing else None)
                    for e in evals if e["step"] <= up_to_step], key, mode)
