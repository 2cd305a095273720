"""The validation losses of a run, its best one and its checkpoint, and the overfitting note.

Every evaluation is recorded as (step, validation loss, checkpoint tag of that step or None) in
``CKPT_DIR/best.json``, rewritten atomically by rank 0 after each evaluation, with the best evaluation at its
top for people and tools. A resumed run reads it back, keeping the evaluations up to the step it resumed from
(the later ones are repeated by the resumed run) and forgetting tags that no longer exist.

With ``train.keep_best`` the trainer saves a checkpoint at every evaluation that sets a new best (unless one
was just saved at that step) and protects it from ``train.keep_last`` retention until a better one replaces it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_genlip.data.files import replace_atomically
from megatron_genlip.training import ckpt_format as fmt

BEST_FILE = "best.json"
RISING_EVALS = 3  # the note on overfitting: the validation loss rose at each of this many evaluations in a row


class EvalHistory:
    """Evaluations of one run: dicts with ``step``, ``val_loss`` and ``checkpoint`` (a tag or None)."""

    def __init__(self, evals: list[dict] | None = None):
        self.evals = list(evals or [])

    def add(self, step: int, val_loss: float, checkpoint: str | None) -> None:
        self.evals.append({"step": int(step), "val_loss": float(val_loss), "checkpoint": checkpoint})

    def best(self) -> dict | None:
        """The evaluation of the lowest finite loss (the earliest on ties); None before any."""
        finite = [e for e in self.evals if math.isfinite(e["val_loss"])]
        return min(finite, key=lambda e: e["val_loss"]) if finite else None

    def best_checkpointed(self) -> dict | None:
        """The evaluation of the lowest finite loss among those with a checkpoint."""
        return EvalHistory([e for e in self.evals if e["checkpoint"]]).best()

    def is_new_best(self, val_loss: float) -> bool:
        best = self.best()
        return math.isfinite(val_loss) and (best is None or val_loss < best["val_loss"])

    def rising(self, n: int = RISING_EVALS) -> tuple[float, float] | None:
        """(loss before the rise, last loss) when each of the last ``n`` evaluations had a higher validation loss
        than the one before it; else None."""
        losses = [e["val_loss"] for e in self.evals[-(n + 1):]]
        if len(losses) < n + 1 or not all(math.isfinite(x) for x in losses):
            return None
        if all(b > a for a, b in zip(losses, losses[1:])):
            return losses[0], losses[-1]
        return None

    def rising_note(self, keep_best: bool, n: int = RISING_EVALS) -> str | None:
        """"validation loss rose for the last 3 evaluations (5.13 -> 8.83): overfitting? best checkpoint: ...";
        None when it did not."""
        rose = self.rising(n)
        if rose is None:
            return None
        note = f"validation loss rose for the last {n} evaluations ({rose[0]:.4g} -> {rose[1]:.4g}): overfitting? "
        best = self.best()
        kept = self.best_checkpointed() if keep_best else None
        if kept is not None:
            return note + f"best checkpoint: {kept['checkpoint']} (validation loss {kept['val_loss']:.4g})"
        return note + (f"best validation loss {best['val_loss']:.4g} at step {best['step']} (train.keep_best=true "
                       "keeps the checkpoint of the best evaluation)")

    # ---------------------------------------------------------------------------------------------
    # the file

    def save(self, ckpt_dir: str | Path, keep_best: bool) -> None:
        """``ckpt_dir/best.json``, replaced atomically: ``best_checkpoint`` is the checkpoint ``train.keep_best``
        keeps (None without it), ``best`` the best evaluation, ``evaluations`` all of them (their checkpoints
        as saved: retention may have deleted them since, unless kept)."""
        kept = self.best_checkpointed() if keep_best else None
        doc = {"best_checkpoint": kept["checkpoint"] if kept else None, "best": self.best(), "evaluations": self.evals}
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        replace_atomically(Path(ckpt_dir) / BEST_FILE, json.dumps(doc, indent=1))

    @classmethod
    def load(cls, ckpt_dir: str | Path, up_to_step: int) -> "EvalHistory":
        """The evaluations of ``ckpt_dir/best.json`` up to ``up_to_step``, their tags kept only while the
        checkpoint exists; an empty history when the file is absent or unreadable."""
        ckpt_dir = Path(ckpt_dir)
        try:
            evals = json.loads((ckpt_dir / BEST_FILE).read_text())["evaluations"]
            evals = [{"step": int(e["step"]), "val_loss": float(e["val_loss"]), "checkpoint": e.get("checkpoint")}
                     for e in evals]
        except (OSError, ValueError, KeyError, TypeError):
            return cls()
        existing = set(fmt.list_tags(ckpt_dir))
        return cls([dict(e, checkpoint=e["checkpoint"] if e["checkpoint"] in existing else None)
                    for e in evals if e["step"] <= up_to_step])
