"""Why a run stops early, as exceptions the entry point turns into one clear message and an exit status.

Every rank raises the same exception (the decisions behind them are collective), so the entry point prints it
once, without a traceback: the message already says what happened, which file or setting, and what to do.
"""

from __future__ import annotations


class RunAborted(RuntimeError):
    """The run cannot go on. ``exit_code``: the process's exit status; ``per_rank``: the message differs per
    rank (every rank prints its own)."""

    exit_code = 1
    per_rank = False


class OutputDirBusy(RunAborted):
    """Another live run holds the output directory's lock."""

    exit_code = 2


class ResumeError(RunAborted):
    """Checkpoints exist but none can be resumed from (and ``train.allow_fresh_start`` is off)."""

    exit_code = 2


class CheckpointSaveError(RunAborted):
    """Saving a checkpoint failed on some rank (disk full, quota, I/O error); the previous one is intact."""


class NonFiniteError(RunAborted):
    """A non-finite loss or gradient norm under ``train.nan_policy=stop``."""

    per_rank = True  # names this rank's packed rows


class TooManySkips(RunAborted):
    """``train.max_consecutive_skips`` steps in a row were skipped: the run diverged or its data is bad."""

    exit_code = 3


class BadBatch(RunAborted):
    """The first micro-batch a run (or an evaluation) reads breaks the packed-batch contract (batch.PackedBatch):
    the data or the loader is wrong, and every step after it would train on it."""

    exit_code = 2
    per_rank = True


def check_batch(batch: dict, what: str, seq_length: int | None = None, patch_size: int | None = None) -> None:
    """Check one micro-batch (on the host) against the packed-batch contract (``batch.PackedBatch``); a broken
    one stops the run naming every broken rule."""
    from megatron_genlip.batch import BatchError, PackedBatch

    try:
        PackedBatch(seq_length=seq_length, patch_size=patch_size).validate(batch)
    except BatchError as e:
        raise BadBatch(f"{what} breaks the packed-batch contract: {e}. The dataset or its pack index is wrong: "
                       "check the pack index with tools/build_pack_index.py --verify, or rebuild the dataset") from None
