"""The pack index: which samples form each packed row of each epoch, built ahead and memory-mapped.

An epoch is a pseudo-random permutation of the samples ("arrival order") cut into fixed chunks of
``chunk_size`` arrivals; each chunk is packed on its own by buffered first-fit (the official GenLIP rule,
:func:`pack_arrivals`), so chunks are built in parallel processes (or on several machines) and the result
does not depend on how many there were. The permutation is a keyed Feistel bijection on the sample index
(:func:`shuffle_positions`): any chunk computes its own arrivals without the whole permutation in memory.

Files of one epoch ``e`` in ``DIR`` (``DIR`` = the cache directory / the settings key)::

    epoch0003.order.npy   [N] uint32 (int64 above 2**32 samples): sample ids grouped by row, rows in order
    epoch0003.rows.npy    [R+1] int64: row r holds order[rows[r]:rows[r+1]]
    epoch0003.json        rows, samples, tokens, per-chunk sha256 of ``order`` and of the chunk's slice of ``rows``;
                          written last (the commit point)

Every byte of an epoch is checked before it is used, at a cost that does not grow per step: the first time a
process reads a row of chunk ``c``, that chunk's slice of ``order`` and of ``rows`` is hashed and compared with
the metadata (one 4 MiB sha256 per 2**20 samples, remembered per process). A mismatch stops the reader with a
:class:`PackIndexDamaged` naming the file; it also leaves ``epoch0003.damaged`` (tied to the damaged files'
identity), so the next start-up rebuilds the epoch (or, with ``build=False``, says so) instead of trusting it.

Readers open the arrays with ``mmap_mode="r"`` and map a global row to (epoch, row) by ``searchsorted`` on
the small table of rows per epoch, so a row lookup costs the same at epoch 0 and epoch 7 and no process
holds an epoch in private memory. Training never packs inside a DataLoader worker: missing epochs are built
once, under a file lock, by one process before training starts (:func:`ensure_epochs`), or ahead of time by
``tools/build_pack_index.py``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megatron_genlip.data.files import (
    TEMP_MARK, exclusive_lock, fsync_file, remove_dead_temporaries, replace_atomically, temp_name,
)

PACK_VERSION = 2
CHUNK_SIZE = 1 << 20  # arrivals packed independently; part of the key (changing it changes the rows)
FEISTEL_ROUNDS = 6
OPEN_EPOCHS = 4  # epochs kept open (memory-mapped) per process
LOG_SLOW_EPOCH_S = 10.0  # an epoch build taking this long gets its own log line
BUILD_COMMAND = "python tools/build_pack_index.py --config CONFIG --epochs N"


class MissingEpochError(RuntimeError):
    """A row beyond the epochs whose pack index has been built (or a pack index that cannot be used)."""

    def __init__(self, *args):
        super().__init__(*(worker_message(a) if isinstance(a, str) else a for a in args))


class PackIndexDamaged(MissingEpochError):
    """An epoch's stored bytes do not match the checksums its metadata recorded when it was built."""


class LengthsDamaged(MissingEpochError):
    """A lengths file that the pack index would be built from does not match the lengths its parts recorded."""


def array_sha256(arr: np.ndarray):
    """sha256 of an array's bytes, read in place (a memory map is hashed from the page cache, not copied); an empty
    array (a part whose shard yielded no sample) hashes as no bytes, as the builder recorded it."""
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(arr.reshape(-1).view(np.uint8) if arr.size else b"")


def worker_message(text: str) -> str:
    """The original message of an exception that a DataLoader worker raised. PyTorch re-raises it in the trainer
    as ``Caught X in DataLoader worker process N.\nOriginal Traceback ...\nmodule.X: <message>``: the traceback
    belongs to the worker; the message says which file is wrong. Other text is returned as it is."""
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    where = text.split("\n", 1)[0].split(" in ", 1)[-1].rstrip(".")
    lines = text.rstrip("\n").split("\n")
    for k in range(len(lines) - 1, 0, -1):  # the exception line "module.Class: message" (the message may span lines)
        name, sep, first = lines[k].partition(": ")
        if sep and " " not in name and name.rsplit(".", 1)[-1].endswith(("Error", "Damaged", "Mismatch")):
            return "\n".join([first] + lines[k + 1:]) + f" (in {where})"
    return text


# -------------------------------------------------------------------------------------------------
# the shuffle: a keyed bijection of [0, n), computed for any slice of positions


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing bijection of uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    """A balanced Feistel network on ``2 * half_bits``-bit integers: a permutation of [0, 4**half_bits)."""
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << shift) | right


def shuffle_keys(seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x9E3779B9]).bit_generator.random_raw(FEISTEL_ROUNDS).astype(np.uint64)


def shuffle_positions(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Sample ids at arrival ``positions`` of epoch ``epoch``: a pseudo-random permutation of [0, n).

    The Feistel network permutes [0, 4**h) with 4**h >= n; values that land outside [0, n) are encrypted
    again (cycle walking), which keeps the map a bijection of [0, n)."""
    half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    keys = shuffle_keys(seed, epoch)
    out = _feistel(np.asarray(positions, dtype=np.uint64), half_bits, keys)
    todo = np.flatnonzero(out >= n)
    while len(todo):
        out[todo] = _feistel(out[todo], half_bits, keys)
        todo = todo[out[todo] >= n]
    return out.astype(np.int64)


# -------------------------------------------------------------------------------------------------
# packing one chunk


def pack_arrivals(lengths: np.ndarray, seq_length: int, buffer_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Buffered first-fit: a buffer of ``buffer_size`` samples in arrival order is refilled after each row;
    a row takes, scanning the buffer in order, every sample that still fits.

    Returns ``(order, row_sizes)``: arrival positions grouped by row (each row in arrival order) and the
    number of samples per row. Vectorised, O(row) per row instead of O(buffer): the buffer is the window
    ``[front, nxt)`` of the arrivals with taken samples marked dead (they mostly leave from the front); the
    samples at its head that fit as a whole are one cumulative sum over the few that can share a row, and
    only when the remaining room could still hold a sample is the rest of the buffer searched.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and int(lengths.max()) > seq_length:
        raise ValueError(f"a sample of {int(lengths.max())} tokens is longer than data.seq_length ({seq_length}): "
                         f"raise data.seq_length to at least {int(lengths.max())}, or rebuild the dataset with a "
                         "smaller data.max_sample_length")
    order = np.empty(n, dtype=np.int64)
    row_sizes: list[int] = []
    alive = np.ones(n, dtype=bool)  # not packed yet
    shortest = int(lengths.min()) if n else 1
    width0 = seq_length // max(shortest, 1) + 2  # samples that can share a row, plus the first misfit
    front = nxt = out = buffered = 0
    while out < n:
        take = min(buffer_size - buffered, n - nxt)
        nxt += take
        buffered += take
        front += int(np.argmax(alive[front:nxt]))  # the oldest sample still in the buffer
        width = width0
        while True:  # cumulative tokens of the live samples at the head (dead ones count 0)
            stop = min(front + width, nxt)
            live = alive[front:stop]
            cum = np.cumsum(np.where(live, lengths[front:stop], 0))
            if cum[-1] > seq_length or stop == nxt:
                break
            width *= 2
        head = int(np.searchsorted(cum, seq_length, side="right"))  # >= 1: a sample never exceeds a row
        picked = front + np.flatnonzero(live[:head])
        room = seq_length - int(cum[head - 1])
        after = front + head + 1  # past the first sample that did not fit
        if room >= shortest and after < nxt:
            tail = []
            cand = after + np.flatnonzero(alive[after:nxt] & (lengths[after:nxt] <= room))
            while len(cand):
                j = int(cand[0])
                tail.append(j)
                room -= int(lengths[j])
                cand = cand[1:]
                cand = cand[lengths[cand] <= room]
            if tail:
                picked = np.concatenate((picked, np.asarray(tail, dtype=np.int64)))
        order[out:out + len(picked)] = picked
        out += len(picked)
        row_sizes.append(len(picked))
        alive[picked] = False
        buffered -= len(picked)
    return order, np.asarray(row_sizes, dtype=np.int64)


# -------------------------------------------------------------------------------------------------
# building epochs


@dataclass(frozen=True)
class PackSettings:
    """Everything the rows depend on; its hash names the index directory."""

    data_fingerprint: str
    num_samples: int
    seq_length: int
    buffer_size: int
    seed: int
    chunk_size: int = CHUNK_SIZE
    version: int = PACK_VERSION

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def order_dtype(num_samples: int) -> np.dtype:
    return np.dtype(np.uint32) if num_samples < 2**32 else np.dtype(np.int64)


class LengthSource:
    """Tokens per sample in global sample order, from one or more ``[n, 3]`` lengths files (gh, gw, text
    tokens) concatenated; picklable (workers reopen the memory maps)."""

    def __init__(self, files: list[str], sizes: list[int], checks: list[tuple[int, int, bytes, str]] | None = None):
        """``checks``: (first sample, end, sha256 digest prefix, part) of each part's rows, in global sample order
        (:meth:`verify`); None: nothing to check against (a dataset built before they were recorded)."""
        self.files = list(files)
        self.starts = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
        self.checks = checks
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"files": self.files, "starts": self.starts, "checks": None, "_maps": None}

    def verify(self) -> None:
        """Every part's rows of the lengths files against the lengths that part was built with (one sequential
        pass, done once per epoch build, before packing trusts them)."""
        if not self.checks:
            return
        if self._maps is None:
            self._maps = [np.load(f, mmap_mode="r") for f in self.files]
        for lo, hi, digest, part in self.checks:
            if lo == hi:  # a part without samples has no rows to check
                continue
            s = int(np.searchsorted(self.starts, lo, side="right")) - 1
            rows = self._maps[s][lo - self.starts[s]:hi - self.starts[s]]
            if array_sha256(rows).digest()[:len(digest)] != digest:
                raise LengthsDamaged(f"lengths file {self.files[s]}: rows {lo - self.starts[s]}..{hi - self.starts[s]} "
                                     f"(part {part}) do not match the lengths that part was built with: the file was "
                                     "damaged or replaced; rerun tools/preprocess_data.py --finalize with the same "
                                     "arguments (no pack index is built from it)")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def columns(self, ids: np.ndarray) -> np.ndarray:
        """(gh, gw, text tokens) of samples ``ids``: [len(ids), 3] int64."""
        if self._maps is None:
            self._maps = [np.load(f, mmap_mode="r") for f in self.files]
        ids = np.asarray(ids, dtype=np.int64)
        src = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty((len(ids), 3), dtype=np.int64)
        for s in np.unique(src):
            sel = src == s
            out[sel] = self._maps[s][ids[sel] - self.starts[s]]
        return out

    def tokens(self, ids: np.ndarray) -> np.ndarray:
        """Total tokens (gh * gw + text) of samples ``ids`` (int64)."""
        rows = self.columns(ids)
        return rows[:, 0] * rows[:, 1] + rows[:, 2]


def _epoch_paths(directory: Path, epoch: int) -> dict[str, Path]:
    stem = directory / f"epoch{epoch:04d}"
    return {"order": Path(f"{stem}.order.npy"), "rows": Path(f"{stem}.rows.npy"), "meta": Path(f"{stem}.json")}


def _file_states(directory: Path, epoch: int) -> dict:
    """Size and modification time of an epoch's files: a stamp is valid while they stay the same."""
    out = {}
    for name, path in _epoch_paths(directory, epoch).items():
        st = path.stat()
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def _stamp_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch{epoch:04d}.verified"


def _stamp_verified(directory: Path, epoch: int) -> None:
    try:
        replace_atomically(_stamp_path(directory, epoch), json.dumps(_file_states(directory, epoch)))
    except OSError:
        pass  # a read-only folder: the start-up check is redone next time; reads check every chunk anyway


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _damage_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch{epoch:04d}.damaged"


def _mark_damaged(directory: Path, epoch: int, problem: str) -> None:
    """Remember, beside the files, that this very version of the epoch's files is damaged (best effort)."""
    paths = _epoch_paths(directory, epoch)
    try:
        mark = {"problem": problem, "order": _identity(paths["order"]), "rows": _identity(paths["rows"])}
        replace_atomically(_damage_path(directory, epoch), json.dumps(mark))
    except OSError:
        pass  # read-only or vanished: the error raised names the file all the same


def _marked_damaged(directory: Path, epoch: int) -> str | None:
    """The problem recorded for the epoch's current files, or None (no mark, or the files changed since)."""
    try:
        mark = json.loads(_damage_path(directory, epoch).read_text())
        paths = _epoch_paths(directory, epoch)
        if mark["order"] == _identity(paths["order"]) and mark["rows"] == _identity(paths["rows"]):
            return str(mark["problem"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def writable(directory: Path) -> bool:
    """Whether this process can create files in ``directory`` (a read-only mount or folder: no)."""
    return os.access(directory, os.W_OK | os.X_OK)


def _stamp_valid(directory: Path, epoch: int) -> bool:
    try:
        return json.loads(_stamp_path(directory, epoch).read_text()) == _file_states(directory, epoch)
    except (OSError, ValueError):
        return False


def _pack_chunk(task: tuple) -> tuple[int, int, int, str, str]:
    """Worker: pack chunk ``c`` of an epoch into its slice of the (preallocated) order file, and the chunk's row
    boundaries into a file of its own (``rows_path``: raw int64, every boundary but the last); the parent
    gathers those in order. Returns (chunk, rows, tokens, sha256 of the order slice, sha256 of the chunk's
    boundaries including the last: its slice of the row table)."""
    settings, source, epoch, c, order_path, rows_path = task
    start = c * settings.chunk_size
    stop = min(start + settings.chunk_size, settings.num_samples)
    ids = shuffle_positions(np.arange(start, stop), settings.num_samples, settings.seed, epoch)
    tokens = source.tokens(ids)
    arrival, row_sizes = pack_arrivals(tokens, settings.seq_length, settings.buffer_size)
    out = np.load(order_path, mmap_mode="r+")
    chunk = ids[arrival].astype(out.dtype)
    out[start:stop] = chunk
    out.flush()
    del out
    bounds = np.empty(len(row_sizes) + 1, dtype=np.int64)
    bounds[0] = start
    np.cumsum(row_sizes, out=bounds[1:])
    bounds[1:] += start
    with open(rows_path, "wb") as f:
        f.write(memoryview(bounds[:-1]).cast("B"))
    return (c, len(row_sizes), int(tokens.sum()), hashlib.sha256(chunk.tobytes()).hexdigest(),
            hashlib.sha256(bounds.tobytes()).hexdigest())


_shared: list = []  # the pool of the outermost active shared_pool(): [workers, Pool or None, its processes]


def _new_pool(processes: int):
    """A pool of ``processes`` spawned workers (spawn: safe beside threads, CUDA and open memory maps)."""
    return mp.get_context("spawn").Pool(processes)


class shared_pool:  # noqa: N801 (used as a context manager, like open())
    """One process pool for every epoch built inside ``with shared_pool(workers):`` (:func:`build_epoch` with
    ``workers > 1``), started when first needed, instead of one pool (and one start-up of every worker) per
    epoch. It grows (a new pool) only when an epoch has more chunks than the pool has processes and fewer than
    ``workers``. Nested uses share the outer pool."""

    def __init__(self, workers: int):
        self.workers = workers
        self._owner = False

    def __enter__(self):
        if not _shared:
            _shared.append([self.workers, None, 0])
            self._owner = True
        return self

    def __exit__(self, *exc):
        if self._owner:
            _, pool, _ = _shared.pop()
            if pool is not None:
                pool.terminate() if exc[0] is not None else pool.close()
                pool.join()
        return False


def _pool_for(workers: int, chunks: int):
    """(pool, close it after the epoch?) for an epoch of ``chunks`` chunks built with ``workers`` processes."""
    want = min(workers, chunks)
    if not _shared:
        return _new_pool(want), True
    slot = _shared[-1]
    want = min(max(workers, slot[0]), chunks)
    if slot[1] is None or slot[2] < want:
        if slot[1] is not None:
            slot[1].close()
            slot[1].join()
        slot[1], slot[2] = _new_pool(want), want
    return slot[1], False


def _npy_header(dtype, length: int) -> bytes:
    """The .npy header np.save writes for a 1-D array of ``length`` items of ``dtype``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)})
    return buf.getvalue()


def build_epoch(directory: Path, settings: PackSettings, source: LengthSource, epoch: int, workers: int = 1,
                progress=None) -> dict:
    """Pack one epoch into ``directory`` (chunks in ``workers`` processes: the pool of an active
    :class:`shared_pool`, else one for this epoch); returns its metadata.

    What this process holds does not grow with the number of samples: workers write the order file in place
    and each chunk's row boundaries to a temporary of their own; this process keeps a few numbers per chunk
    and then streams the chunks' boundaries, in order, into the row table (one chunk in memory at a time)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = _epoch_paths(directory, epoch)
    n, size = settings.num_samples, settings.chunk_size
    chunks = (n + size - 1) // size
    source.verify()
    tmp_order = temp_name(paths["order"])
    tmp_rows = temp_name(paths["rows"])
    chunk_file = lambda c: f"{tmp_rows}.c{c:06d}"  # noqa: E731 (a temporary of this process: see temp_name)
    np.lib.format.open_memmap(tmp_order, mode="w+", dtype=order_dtype(n), shape=(n,)).flush()
    tasks = ((settings, source, epoch, c, str(tmp_order), chunk_file(c)) for c in range(chunks))
    results: list = [None] * chunks  # per chunk: (rows, tokens, order sha256, rows sha256)
    start = time.perf_counter()
    try:
        if workers > 1 and chunks > 1:
            pool, own = _pool_for(workers, chunks)
            try:
                for res in pool.imap_unordered(_pack_chunk, tasks):
                    results[res[0]] = res[1:]
                    progress is not None and progress(1)
            except BaseException:
                if own:
                    pool.terminate()
                raise
            finally:
                if own:
                    pool.close()
                    pool.join()
        else:
            for task in tasks:
                res = _pack_chunk(task)
                results[res[0]] = res[1:]
                progress is not None and progress(1)
        total = sum(r[0] for r in results)
        whole = hashlib.sha256()
        with open(tmp_rows, "wb") as f:
            f.write(_npy_header(np.int64, total + 1))
            for c in range(chunks):
                with open(chunk_file(c), "rb") as part:
                    piece = part.read()
                if len(piece) != 8 * results[c][0]:
                    raise OSError(f"{chunk_file(c)}: {len(piece)} bytes, {8 * results[c][0]} expected")
                f.write(piece)
                whole.update(piece)
                os.remove(chunk_file(c))
            last = np.asarray([n], dtype=np.int64).tobytes()
            f.write(last)
            whole.update(last)
    except BaseException:
        for c in range(chunks):
            with contextlib.suppress(FileNotFoundError):
                os.remove(chunk_file(c))
        raise
    meta = {"epoch": epoch, "rows": int(total), "samples": n, "tokens": sum(r[1] for r in results),
            "chunk_sha256": [r[2] for r in results], "rows_sha256": whole.hexdigest(),
            "chunk_rows": [int(r[0]) for r in results],
            "chunk_rows_sha256": [r[3] for r in results],
            "settings": asdict(settings), "seconds": round(time.perf_counter() - start, 3)}
    del results
    for tmp in (tmp_order, tmp_rows):
        fsync_file(tmp)
    os.replace(tmp_order, paths["order"])
    os.replace(tmp_rows, paths["rows"])
    replace_atomically(paths["meta"], json.dumps(meta, indent=1))  # the commit point of the epoch
    _damage_path(directory, epoch).unlink(missing_ok=True)
    _stamp_verified(directory, epoch)  # written by this process from these very arrays
    return meta


# -------------------------------------------------------------------------------------------------
# reading


class PackIndex:
    """Global row -> sample ids, over the epochs built so far in ``directory``."""

    def __init__(self, directory: str | Path, settings: PackSettings):
        self.directory = Path(directory)
        self.settings = settings
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._checked: dict[int, set[int]] = {}  # epoch -> chunks whose bytes this process has verified
        self._chunk_rows: dict[int, np.ndarray] = {}  # epoch -> first row of each chunk
        self.epoch_meta: list[dict] = []
        self.refresh()

    def __getstate__(self) -> dict:  # DataLoader workers reopen their own memory maps and verify what they read
        return dict(self.__dict__, _open={}, _checked={}, _chunk_rows={})

    def refresh(self) -> None:
        """Extend the table of rows per epoch with the epochs committed since the last call (stops at the first
        gap). Only new epochs are read: an epoch, once committed, has fixed rows (a rebuild of a damaged one
        reproduces them), so building E epochs one by one reads E metadata files, not E^2/2."""
        while (meta := self._read_meta(len(self.epoch_meta))) is not None:
            self.epoch_meta.append(meta)
        self.row_starts = np.zeros(len(self.epoch_meta) + 1, dtype=np.int64)
        np.cumsum([m["rows"] for m in self.epoch_meta], out=self.row_starts[1:])

    def _read_meta(self, epoch: int, marked: bool = False) -> dict | None:
        """An epoch's metadata if it is committed for these settings (``marked``: also when a reader found its
        files damaged), else None."""
        paths = _epoch_paths(self.directory, epoch)
        try:
            meta = json.loads(paths["meta"].read_text())
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if meta.get("settings") != asdict(self.settings) or not all(p.is_file() for p in paths.values()):
            return None
        if not marked and _damage_path(self.directory, epoch).exists() and _marked_damaged(self.directory, epoch):
            return None  # found damaged by a reader: to be rebuilt
        return meta

    def built(self, epoch: int) -> bool:
        """Whether ``epoch`` is committed (also when an earlier epoch is still missing)."""
        return self._read_meta(epoch) is not None

    @property
    def epochs(self) -> int:
        return len(self.epoch_meta)

    @property
    def total_rows(self) -> int:
        return int(self.row_starts[-1])

    def rows_in_epoch(self, epoch: int) -> int:
        self._need(epoch)
        return self.epoch_meta[epoch]["rows"]

    def efficiency(self, epoch: int = 0) -> float:
        self._need(epoch)
        m = self.epoch_meta[epoch]
        return m["tokens"] / (m["rows"] * self.settings.seq_length)

    def _need(self, epoch: int) -> None:
        if epoch >= self.epochs:
            self.refresh()
        if epoch >= self.epochs:
            raise MissingEpochError(
                f"the pack index in {self.directory} has {self.epochs} epoch(s); epoch {epoch} is needed. Build it "
                f"ahead with `{BUILD_COMMAND}` (N > {epoch}) or let the trainer build it "
                "(data.build_missing_pack_index=true)")

    def locate(self, global_row: int) -> tuple[int, int]:
        """Global row -> (epoch, row within the epoch): one binary search over the epochs."""
        if global_row >= self.total_rows:
            self.refresh()
        epoch = int(np.searchsorted(self.row_starts, global_row, side="right")) - 1
        self._need(epoch)
        return epoch, int(global_row - self.row_starts[epoch])

    def _arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._open.get(epoch)
        if arrays is None:
            arrays = self._map(epoch, self.epoch_meta[epoch])
            if len(self._open) >= OPEN_EPOCHS:
                self._open.pop(next(iter(self._open)))
            self._open[epoch] = arrays
            self._checked[epoch] = set()  # a new map may be of other files (a rebuild): verify again
        return arrays

    def _map(self, epoch: int, meta: dict) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps of one epoch's (order, rows) arrays, checked against its metadata's sizes."""
        paths = _epoch_paths(self.directory, epoch)
        try:
            arrays = (np.load(paths["order"], mmap_mode="r"), np.load(paths["rows"], mmap_mode="r"))
        except (ValueError, OSError) as e:
            raise MissingEpochError(f"pack index file of epoch {epoch} in {self.directory} is unreadable "
                                    f"({e}); delete {paths['meta']} and rebuild it with `{BUILD_COMMAND}`") from e
        if arrays[0].shape != (meta["samples"],) or arrays[1].shape != (meta["rows"] + 1,):
            raise MissingEpochError(f"pack index files of epoch {epoch} in {self.directory} do not match "
                                    f"{paths['meta']}; delete it and rebuild with `{BUILD_COMMAND}`")
        return arrays

    def row_samples(self, global_row: int) -> np.ndarray:
        epoch, r = self.locate(global_row)
        order, rows = self._arrays(epoch)
        self._check_row(epoch, r, order, rows)
        return np.asarray(order[rows[r]:rows[r + 1]], dtype=np.int64)

    def _check_row(self, epoch: int, r: int, order: np.ndarray, rows: np.ndarray) -> None:
        """The chunk holding row ``r`` verified against the metadata's checksums, once per process and map."""
        meta = self.epoch_meta[epoch]
        checked = self._checked.setdefault(epoch, set())
        if "chunk_rows" not in meta:  # an epoch built before per-chunk row checksums: the whole row table, once
            if -1 not in checked:
                if array_sha256(rows).hexdigest() != meta["rows_sha256"]:
                    self._damaged(epoch, "rows", "the row table does not match its checksum")
                checked.add(-1)
            c = int(rows[r]) // self.settings.chunk_size
        else:
            starts = self._chunk_rows.get(epoch)
            if starts is None:
                starts = self._chunk_rows[epoch] = np.cumsum([0] + meta["chunk_rows"], dtype=np.int64)
            c = int(np.searchsorted(starts, r, side="right")) - 1
        if c in checked:
            return
        size = self.settings.chunk_size
        if array_sha256(order[c * size:(c + 1) * size]).hexdigest() \
                != meta["chunk_sha256"][c]:
            self._damaged(epoch, "order", f"chunk {c} (samples {c * size:,}..) does not match its checksum")
        if "chunk_rows" in meta:
            lo, hi = int(starts[c]), int(starts[c + 1])
            if array_sha256(rows[lo:hi + 1]).hexdigest() != meta["chunk_rows_sha256"][c]:
                self._damaged(epoch, "rows", f"rows {lo:,}..{hi:,} (chunk {c}) do not match their checksum")
        checked.add(c)

    def _damaged(self, epoch: int, which: str, problem: str):
        paths = _epoch_paths(self.directory, epoch)
        _mark_damaged(self.directory, epoch, f"{paths[which].name}: {problem}")
        self._open.pop(epoch, None)
        raise PackIndexDamaged(
            f"pack index file {paths[which]} is damaged: {problem} recorded in {paths['meta'].name} when it was "
            f"built. Nothing was read from it; restarting rebuilds epoch {epoch} "
            f"(data.build_missing_pack_index=true), or rebuild it ahead with `{BUILD_COMMAND}`")

    def verify(self, epoch: int) -> list[str]:
        """Recompute the checksums of one epoch (committed; earlier epochs need not be, e.g. when machines build
        different epochs); returns the problems found (empty: intact). Reads the files afresh, never a cached map."""
        meta = self._read_meta(epoch, marked=True)
        if meta is None:
            raise MissingEpochError(f"the pack index in {self.directory} lacks epoch {epoch}: build it with "
                                    f"`{BUILD_COMMAND}` (N > {epoch})")
        order, rows = self._map(epoch, meta)
        problems = []
        size = self.settings.chunk_size
        for c, want in enumerate(meta["chunk_sha256"]):
            got = array_sha256(order[c * size:(c + 1) * size]).hexdigest()
            if got != want:
                problems.append(f"epoch {epoch} chunk {c}: checksum mismatch")
        if "chunk_rows" in meta:
            starts = np.cumsum([0] + meta["chunk_rows"], dtype=np.int64)
            for c, want in enumerate(meta["chunk_rows_sha256"]):
                piece = np.ascontiguousarray(rows[int(starts[c]):int(starts[c + 1]) + 1])
                if array_sha256(piece).hexdigest() != want:
                    problems.append(f"epoch {epoch} rows of chunk {c}: checksum mismatch")
        if array_sha256(rows).hexdigest() != meta["rows_sha256"]:
            problems.append(f"epoch {epoch} row table: checksum mismatch")
        return problems

    def damage_mark(self, epoch: int) -> str | None:
        """What a reader found wrong with epoch ``epoch``'s current files (:meth:`row_samples`), or None."""
        return _marked_damaged(self.directory, epoch)


def ensure_epoch(directory: Path, settings: PackSettings, source: LengthSource, epoch: int, *, build: bool = True,
                 workers: int = 1, log=print, index: PackIndex | None = None, clean: bool = True) -> dict | None:
    """Epoch ``epoch`` built and verified, under that epoch's lock (other epochs can be built at the same time,
    e.g. by several machines). Whoever takes the lock first removes what killed builders of this host left,
    builds the epoch if it is missing, or checks its checksums once if nobody has since its files last changed
    (a damaged epoch is rebuilt, or is an error with ``build=False``); the others then find it done.
    Returns the metadata of an epoch this call built, else None; logs builds that take a while.
    ``index``: an open index of ``directory`` to extend (:func:`ensure_epochs`), ``clean=False``: the caller has
    already removed dead temporaries (both keep a loop over E epochs O(E), not O(E^2))."""
    _make_directory(directory)
    lock = directory / f"epoch{epoch:04d}.lock"
    if writable(directory):
        try:
            return _ensure_locked(directory, settings, source, epoch, lock, build, workers, log, index, clean)
        except OSError as e:  # os.access said yes, yet the lock file cannot be made (root squash, ACLs)
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or e.filename != str(lock):
                raise
    # built ahead into a folder this run may only read: no lock, no stamp, no mark
    if index is None:
        index = PackIndex(directory, settings)
    if index.built(epoch):
        return None  # every chunk is verified when a reader first touches it
    mark = _marked_damaged(directory, epoch)
    raise MissingEpochError(
        f"pack index epoch {epoch} in {directory} is {'damaged (' + mark + ')' if mark else 'not built'} and "
        f"that folder is not writable: build it there ahead with `{BUILD_COMMAND}` (N > {epoch}), or set "
        "data.pack_index_dir to a writable folder")


def _ensure_locked(directory: Path, settings: PackSettings, source: LengthSource, epoch: int, lock: Path,
                   build: bool, workers: int, log, index: PackIndex | None, clean: bool) -> dict | None:
    with exclusive_lock(lock):
        if clean:
            remove_dead_temporaries(str(directory / f"epoch{epoch:04d}.*{TEMP_MARK}*"))
        if index is None:
            index = PackIndex(directory, settings)
        else:
            index.refresh()  # epochs committed by others since (verify needs epochs up to this one)
        mark = _marked_damaged(directory, epoch)
        if index.built(epoch):
            if _stamp_valid(directory, epoch):
                return None
            problems = index.verify(epoch)
            if not problems:
                _stamp_verified(directory, epoch)
                return None
            if not build:
                raise MissingEpochError(f"pack index epoch {epoch} in {directory} is damaged ({'; '.join(problems)}): "
                                        f"rebuild it with `{BUILD_COMMAND}`")
            log(f"pack index epoch {epoch} in {directory} is damaged ({'; '.join(problems)}): rebuilding it")
            index._open.pop(epoch, None)  # no map of the damaged files survives the rebuild
            for path in _epoch_paths(directory, epoch).values():
                path.unlink(missing_ok=True)
        elif mark is not None:  # a reader found the files damaged after they were built
            if not build:
                raise MissingEpochError(f"pack index epoch {epoch} in {directory} is damaged ({mark}): rebuild it "
                                        f"with `{BUILD_COMMAND}`")
            log(f"pack index epoch {epoch} in {directory} is damaged ({mark}): rebuilding it")
            index._open.pop(epoch, None)
            for path in _epoch_paths(directory, epoch).values():
                path.unlink(missing_ok=True)
        elif not build:
            raise MissingEpochError(f"the pack index in {directory} lacks epoch {epoch}: build it ahead with "
                                    f"`{BUILD_COMMAND}` (N > {epoch}) or let the trainer build it "
                                    "(data.build_missing_pack_index=true)")
        meta = build_epoch(directory, settings, source, epoch, workers)
        if meta["seconds"] >= LOG_SLOW_EPOCH_S:
            log(f"built pack index epoch {epoch}: {meta['rows']:,} rows of {settings.seq_length} tokens from "
                f"{meta['samples']:,} samples, efficiency {_efficiency(meta, settings):.2f}% ({meta['seconds']:.1f} s)")
        return meta


def _make_directory(directory: Path) -> None:
    """The index folder, created if missing; a clear error when a file is in its place or it cannot be made."""
    for up in (directory, *directory.parents):
        if up.exists():
            if not up.is_dir():
                raise NotADirectoryError(f"pack index folder {directory}: {up} is a file, not a folder (set "
                                         "data.pack_index_dir to a folder, or leave it unset)")
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MissingEpochError(f"cannot create the pack index folder {directory} ({e.strerror}): build the pack "
                                f"index ahead with `{BUILD_COMMAND}` where it can be written, or set "
                                "data.pack_index_dir to a writable folder") from None


def _efficiency(meta: dict, settings: PackSettings) -> float:
    return 100 * meta["tokens"] / (meta["rows"] * settings.seq_length)


def ensure_epochs(directory: str | Path, settings: PackSettings, source: LengthSource, *, epochs: int = 0,
                  rows: int = 0, build: bool = True, workers: int = 1, log=print) -> PackIndex:
    """A pack index covering at least ``epochs`` epochs and ``rows`` global rows, every epoch of it verified
    (:func:`ensure_epoch`); safe to call from every rank at once."""
    directory = Path(directory)
    _make_directory(directory)
    if writable(directory):
        remove_dead_temporaries(str(directory / f"epoch*.*{TEMP_MARK}*"))  # once, not per epoch (a listing)
    index = PackIndex(directory, settings)
    built = []
    e = 0
    with shared_pool(workers):  # one pool of workers for all the epochs built here (none if nothing is built)
        while e < epochs or index.row_starts[e] < rows:  # epoch e is read iff rows before it < rows
            meta = ensure_epoch(directory, settings, source, e, build=build, workers=workers, log=log, index=index,
                                clean=False)
            if meta is not None:
                built.append(meta)
            index.refresh()  # epochs 0..e are built now, so row_starts[e + 1] exists
            e += 1
    if built:
        eff = [_efficiency(m, settings) for m in built]
        log(f"built pack index epochs {built[0]['epoch']}..{built[-1]['epoch']} ({len(built)} epochs, "
            f"{sum(m['seconds'] for m in built):.1f} s): ~{built[0]['rows']:,} rows of {settings.seq_length} tokens "
            f"each, efficiency {min(eff):.2f}-{max(eff):.2f}%, in {directory}")
    return index
