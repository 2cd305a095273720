"""Stop signals: SIGTERM and SIGUSR1 (SLURM's ``--signal``, preemption) make the trainer save a checkpoint at
the end of the current step and exit cleanly. Handlers are installed first thing at start-up and stay
until the process exits, so a signal during start-up or after training is never fatal."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PENDING_STOP = False  # a stop signal that arrived before the trainer existed


def _early_stop_handler(_signum, _frame) -> None:
    global _PENDING_STOP
    _PENDING_STOP = True


def install_early_stop_handlers() -> None:
    """Called first thing at start-up: a SIGTERM/SIGUSR1 during start-up is remembered, not fatal."""
    for s in STOP_SIGNALS:
        signal.signal(s, _early_stop_handler)


def install_stop_handlers(trainer) -> None:
    """From here on a stop signal asks the trainer to checkpoint at the end of the current step. The
    handlers stay installed until the process exits, so a late signal is harmless too."""
    trainer.stop_requested = trainer.stop_requested or _PENDING_STOP

    def handler(_signum, _frame) -> None:
        trainer.stop_requested = True

    for s in STOP_SIGNALS:
        signal.signal(s, handler)


