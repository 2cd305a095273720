"""Writing files that many processes on many machines may write at once, and that a kill may cut short.

* :func:`temp_name`: a temporary name beside the target that no other host or process uses;
* :func:`replace_atomically`: write a temporary, flush it to disk, rename it over the target (readers see the
  old file or the new one, never half of one);
* :func:`remove_dead_temporaries`: temporaries that processes of this host left behind when they were killed;
* :func:`exclusive_lock`: ``flock`` on a lock file (released when the holder exits or dies), with a lock-file
  fallback for filesystems mounted without flock support (Lustre ``noflock``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import socket
import time
from pathlib import Path

TEMP_MARK = ".tmp-"


def temp_name(path: str | Path) -> str:
    """A temporary name beside ``path`` unique to this host and process."""
    return f"{path}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}"


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def replace_atomically(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers, and a restart after a kill, see the old content or the new, never
    a part: a temporary unique to this host and process (:func:`temp_name`), flushed to disk, renamed over the
    target, then the directory flushed; the temporary is removed when writing fails (disk full). The one writer of
    small files: pack index, dataset manifests, checkpoint manifests and ``latest``, ``best.json``, contact sheets."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    fsync_dir(Path(path).parent)


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the filesystem allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(pattern: str) -> list[str]:
    """Delete files matching ``pattern`` that are temporaries of this host's dead processes; returns them.
    Other hosts' temporaries are left alone (their writers may be alive)."""
    host = socket.gethostname()
    removed = []
    for path in glob.glob(pattern):
        tail = path.rsplit(TEMP_MARK, 1)[-1]
        owner, _, rest = tail.rpartition("-")
        pid = rest.split(".", 1)[0]
        if owner == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: str | Path, poll: float = 1.0):
    """Hold an exclusive lock on ``path`` for the ``with`` block (blocking until it is free).

    ``flock`` where the filesystem supports it (released by the kernel when the holder dies); otherwise a lock
    file created with O_EXCL holding host and pid, taken over when its holder on this host is dead."""
    path = str(path)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                raise
        else:
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            return
    marker = path + ".held"
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError, ValueError):
                host, pid = Path(marker).read_text().split()
                if host == socket.gethostname() and not _pid_alive(int(pid)):
                    os.remove(marker)  # its holder died on this host
                    continue
            time.sleep(poll)
            continue
        os.write(fd, me.encode())
        os.close(fd)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
