"""One writer per output directory: an exclusive ``flock`` on ``OUTPUT_DIR/.genlip.lock``, held by rank 0.

Two runs started on the same output directory would both read its checkpoints and both write into it; the
second one fails at start-up instead, naming the holder (host, pid, start time). The kernel releases a flock
when its holder dies however it dies (kill -9 included), so a stale lock file never blocks a restart: only
its content (the last holder) stays behind. Needs a filesystem with working ``flock`` for the output directory
(local disks, NFSv4, GPFS; Lustre mounted with ``-o flock``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from megatron_genlip.training.errors import OutputDirBusy, RunAborted

LOCK_FILE = ".genlip.lock"


class OutputDirUnusable(RunAborted):
    """The output directory (or its lock file) cannot be created or written: read-only, not a folder, ..."""

    exit_code = 2


class RunLock:
    """The lock of one output directory; :meth:`acquire` raises OutputDirBusy if another process holds it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        where = self.path.parent
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputDirUnusable(f"train.output_dir {where} cannot be created ({e.strerror or e}"
                                    f"{': ' + e.filename if getattr(e, 'filename', None) else ''}): choose a writable "
                                    "folder for checkpoints and logs") from None
        if self.path.is_dir():
            raise OutputDirUnusable(f"the lock file {self.path} of train.output_dir is a folder: remove it (rmdir "
                                    f"{self.path}) and start again; it must be a file")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputDirUnusable(f"train.output_dir {where} is not writable: cannot create its lock file "
                                    f"{self.path} ({e.strerror or e}); choose a writable folder for checkpoints "
                                    "and logs") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirBusy(f"output directory {self.path.parent} is in use by another run "
                                f"({describe_holder(self.path)}; lock file {self.path}): two runs there would "
                                "resume from and write into the same checkpoints. Wait for it to end or stop it, "
                                "or choose another train.output_dir") from None
        os.set_inheritable(fd, False)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None


def describe_holder(path: str | Path) -> str:
    """"host H, pid P, started T" from a lock file (the holder writes it right after locking)."""
    try:
        h = json.loads(Path(path).read_text())
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its name yet"


def lock_output_dir(output_dir: str | Path) -> RunLock | None:
    """Collective: rank 0 takes the lock of the run's output directory (and keeps it until it exits); every
    rank raises OutputDirBusy if it is held elsewhere."""
    from megatron_genlip.training.checkpoint import rank0_decides

    lock = RunLock(output_dir)
    taken = rank0_decides(lambda: lock.acquire() is lock)
    return lock if taken and lock._fd is not None else None
