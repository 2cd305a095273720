"""Stop signals and the launcher's death.

SIGTERM and SIGUSR1 (SLURM's ``--signal``, preemption) are honoured in every phase:

* during start-up (config, lock, checkpoint choice, data, engine) there is nothing to save: the process exits
  at once with status 128 + the signal number, as if the signal had killed it (a start-up stuck in a loop
  still ends);
* from the first step on they make the trainer save a checkpoint at the end of the current step and exit 0;
* after training (evaluation, summary) they are harmless.

A rank also stops when its launcher dies (:func:`watch_launcher`): ``kill -9`` of the ``deepspeed`` launcher
cannot be forwarded to the ranks, which would otherwise train on to the end, beside any restarted run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_GRACE_S = 20.0  # after the launcher died: time to finish the step and save before a hard exit
LAUNCHER_POLL_S = 0.5
ORPHAN_EXIT_CODE = 1


class StopBeforeTraining(BaseException):
    """A stop signal during start-up. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    in the libraries running at start-up swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return (f"{signal.Signals(self.signum).name} during start-up: exiting before the first step (nothing to "
                "save; the checkpoints on disk are unchanged)")


def _startup_handler(signum, _frame) -> None:
    raise StopBeforeTraining(signum)


def install_early_stop_handlers() -> None:
    """Called first thing at start-up: a SIGTERM/SIGUSR1 before training ends the process at once."""
    for s in STOP_SIGNALS:
        signal.signal(s, _startup_handler)


def install_stop_handlers(trainer) -> None:
    """From here on a stop signal asks the trainer to checkpoint at the end of the current step. The
    handlers stay installed until the process exits, so a late signal is harmless too."""

    def handler(_signum, _frame) -> None:
        trainer.stop_requested = True

    for s in STOP_SIGNALS:
        signal.signal(s, handler)


# --------------------------------------------------------------------------------------------------
# dying with the launcher


def started_by_launcher() -> bool:
    """The deepspeed launcher and torchrun set LOCAL_RANK, srun sets SLURM_PROCID; a plain process has neither."""
    return any(k in os.environ for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"))


def launcher_processes() -> list:
    """The processes whose death ends this rank: its parent (deepspeed's per-node ``launch``, torchrun,
    slurmstepd) and, under the ``deepspeed`` runner, the runner above ``launch`` as well (``kill -9`` of the
    runner leaves ``launch`` and its ranks running)."""
    import psutil

    parent = psutil.Process().parent()
    if parent is None:
        return []
    watched = [parent]
    if "deepspeed.launcher.launch" in _command(parent):
        runner = parent.parent()
        if runner is not None and _is_deepspeed_runner(runner):
            watched.append(runner)
    return watched


def _command(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _is_deepspeed_runner(process) -> bool:
    import psutil

    try:
        args = process.cmdline()
    except psutil.Error:
        return False
    return "deepspeed.launcher.runner" in " ".join(args) or any(os.path.basename(a) == "deepspeed" for a in args[:2])


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_launcher(grace: float = LAUNCHER_GRACE_S, poll: float = LAUNCHER_POLL_S) -> list[int]:
    """Start a daemon thread that, once a launcher process is gone, sends this process SIGTERM (a checkpoint at
    the end of the step, or an immediate exit during start-up) and exits hard ``grace`` seconds later if the
    process is still there. Returns the watched pids (none for a process started without a launcher)."""
    if not started_by_launcher():
        return []
    watched = launcher_processes()
    if not watched:
        return []

    def watch() -> None:
        while all(_alive(p) for p in watched):
            time.sleep(poll)
        dead = next(p for p in watched if not _alive(p))
        rank = os.environ.get("RANK", "?")
        print(f"[rank {rank}] the launcher (pid {dead.pid}) is gone: stopping, with a checkpoint at the end of the "
              f"step if training; exiting in at most {grace:.0f} s", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        print(f"[rank {rank}] still running {grace:.0f} s after the launcher died: exiting now", file=sys.stderr,
              flush=True)
        os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return [p.pid for p in watched]
