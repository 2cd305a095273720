"""Checkpoints of a training run: save, retention, which checkpoint to resume from, load.

Layout of ``CKPT_DIR`` (the format itself lives in :mod:`megatron_genlip.training.ckpt_format`)::

    iter_0000100/            engine.save_checkpoint(tag=...) files (model, ZeRO optimizer partitions, lr scheduler,
                             client_state) + rng_rank00000.pt ... (every rank's RNG states) + genlip_manifest.json
    latest                   "iter_0000100", written atomically after the manifest

A save is written into ``iter_N.partial/``; every rank hashes a share of the files (streamed sha256), rank 0
writes the manifest, renames the directory to ``iter_N`` (the checkpoint exists from here on), writes ``latest``
and applies retention. A save cut short leaves only a ``.partial`` directory, which is never resumed from and
is removed by the next save. A save that fails on any rank (disk full, quota, I/O error) fails on every rank
with one message; its partial directory is removed and ``latest`` still names the previous checkpoint.

Resuming (:func:`choose_resume`) is decided by rank 0 and broadcast, so all ranks load the same step: the
newest checkpoint that verifies (sizes always, checksums unless ``train.verify_checkpoint=false``; the ranks
share the reading), first in the output directory, then in ``train.load``. ``latest`` is only a hint. When
checkpoints exist but none verifies, the run refuses to start unless ``train.allow_fresh_start=true``.

Two other kinds of checkpoint load through :func:`load_checkpoint`:

* **universal** (``tools/reshard_checkpoint.py``, a DeepSpeed universal checkpoint plus ``genlip_universal.json``
  in the tag): loads at any TP/PP/DP layout with DeepSpeed's ``"checkpoint": {"load_universal": true}``;
* **weights-only** (``tools/convert_checkpoint.py --from-hf``): model weights only, fresh optimizer and
  schedule, step 0.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_genlip.parallel import comm
from megatron_genlip.training import ckpt_format as fmt
from megatron_genlip.training.errors import CheckpointSaveError, ResumeError

LOW_SPACE_BYTES = 64 << 20  # a write failure with less free space than this is reported as "no space left"
OWN_CHECKPOINTS = "the output directory"  # the first place a run resumes from; the second is "train.load"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------------
# collectives: rank 0 decides, every rank learns the decision


def broadcast(obj=None):
    """Rank 0's ``obj`` on every rank."""
    return comm.broadcast_object(obj, src=0)


def rank0_decides(fn):
    """Run ``fn`` on rank 0 alone and return its result on every rank; if it raises, every rank raises (rank 0
    its own exception with its traceback, the others a copy), so no rank waits for a decision that never comes.
    Without a process group (one process: tools, tests) the process is rank 0 and runs ``fn`` itself."""
    if not dist.is_initialized():
        return fn()
    outcome = None
    error = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - handed to the other ranks, re-raised here
            error = e
            outcome = ("error", e)
    try:
        kind, value = broadcast(outcome)
    except Exception:  # noqa: BLE001 - an exception that cannot be pickled
        kind, value = "error", RuntimeError("rank 0 failed; see its message")
    if error is not None:
        raise error
    if kind == "error":
        raise value
    return value


def _first_failure(failure: dict | None) -> dict | None:
    """Every rank's failure (None: none) gathered; the first one, identical on every rank."""
    failures = comm.all_gather_object(failure)
    return next((f for f in failures if f), None)


# --------------------------------------------------------------------------------------------------
# save


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int,
                    protect: tuple[str, ...] = ()) -> str:
    """Save on every rank: DeepSpeed's files and the RNG states into ``iter_N.partial``, then the manifest, the
    rename to ``iter_N``, ``latest`` and retention (which never deletes the tags in ``protect``). Raises
    CheckpointSaveError on every rank if any rank failed; the previous checkpoint and ``latest`` are untouched."""
    ckpt_dir = Path(ckpt_dir)
    tag = fmt.tag_for(step)
    partial = fmt.partial_name(tag)
    rank = dist.get_rank()
    failure = _attempt(lambda: _prepare(ckpt_dir, partial), ckpt_dir, tag) if rank == 0 else None
    if not _first_failure(failure):
        client_state = dict(client_state, universal_checkpoint_info=_universal_info(engine, client_state))
        failure = _write_files(engine, ckpt_dir, tag, partial, client_state)
    _abort_if_failed(_first_failure(failure), ckpt_dir, tag)
    entries, failure = _hash_my_share(ckpt_dir, tag)
    if rank == 0 and failure is None:
        failure = _attempt(lambda: _finish(ckpt_dir, tag, step, entries, keep_last, protect), ckpt_dir, tag)
    _abort_if_failed(_first_failure(failure), ckpt_dir, tag)
    return tag


def _prepare(ckpt_dir: Path, partial: str) -> None:
    """Rank 0, before anyone writes: ``.partial`` directories are saves that never finished (this run holds the
    output directory's lock, so nobody else writes them); they go, and the new one starts empty."""
    for leftover in fmt.list_partials(ckpt_dir):
        print(f"removing {ckpt_dir / leftover}: a save that did not finish", file=sys.stderr, flush=True)
        shutil.rmtree(ckpt_dir / leftover)
    (ckpt_dir / partial).mkdir(parents=True)


def _write_files(engine, ckpt_dir: Path, tag: str, partial: str, client_state: dict) -> dict | None:
    """DeepSpeed's files and this rank's RNG states, into the partial directory; this rank's failure, if any."""
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
    except Exception as e:  # noqa: BLE001 - reported on every rank by _abort_if_failed
        # DeepSpeed 0.19.8's save_checkpoint ends with a barrier that this rank skipped by raising from a write
        # (its only collectives before the writes are a barrier and the tag check); ranks whose writes
        # succeeded wait in it, so stand in for it before the failure is gathered
        try:
            comm.backend_barrier()
        except Exception:  # noqa: BLE001
            pass
        return _failure(e, ckpt_dir, tag)
    rng_file = ckpt_dir / partial / fmt.rng_name(dist.get_rank())
    return _attempt(lambda: torch.save(rng_state(), rng_file), ckpt_dir, tag)


def _hash_my_share(ckpt_dir: Path, tag: str) -> tuple[dict[str, dict], dict | None]:
    """This rank's share of the manifest: the files are split over the ranks that see them (each rank surely
    sees the files it wrote), each hashed once and fsynced, so the manifest never vouches for data still in a
    page cache. Rank 0 gets every rank's entries and the first failure; the others their own failure."""
    tag_dir = ckpt_dir / fmt.partial_name(tag)
    listings = comm.all_gather_object(fmt.list_files(tag_dir))
    rank = dist.get_rank()
    seen_by: dict[str, list[int]] = {}
    for r, files in enumerate(listings):
        for rel in files:
            seen_by.setdefault(rel, []).append(r)
    mine = [rel for i, (rel, ranks) in enumerate(sorted(seen_by.items())) if ranks[i % len(ranks)] == rank]
    entries: dict[str, dict] = {}
    failure = _attempt(lambda: entries.update({rel: fmt.hash_file(tag_dir / rel, fsync=True) for rel in mine}),
                       ckpt_dir, tag)
    gathered = comm.gather_object((entries, failure), dst=0)
    if rank != 0:
        return {}, failure
    return {k: v for part, _ in gathered for k, v in part.items()}, next((f for _, f in gathered if f), None)


def _finish(ckpt_dir: Path, tag: str, step: int, entries: dict, keep_last: int, protect: tuple[str, ...]) -> None:
    """Rank 0: the manifest, the rename that makes the checkpoint exist, ``latest``, retention. A tag directory of
    the same step already there was passed over at resume (it did not verify): the new save replaces it."""
    fmt.publish(ckpt_dir, tag, entries, log=lambda text: print(text, file=sys.stderr, flush=True), iteration=step,
                world_size=dist.get_world_size())
    prune(ckpt_dir, keep_last, protect=(tag, *protect))


def _attempt(fn, ckpt_dir: Path, tag: str) -> dict | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported on every rank by _abort_if_failed
        return _failure(e, ckpt_dir, tag)
    return None


def _failure(exc: BaseException, ckpt_dir: Path, tag: str) -> dict:
    """What went wrong on this rank, in words every rank can print."""
    kind = _space_problem(exc, ckpt_dir)
    return {"rank": dist.get_rank(), "kind": kind, "mount": str(mount_point(ckpt_dir)),
            "error": f"{type(exc).__name__}: {exc}".strip()[:500]}


def _space_problem(exc: BaseException, path: Path) -> str | None:
    """"space" or "quota" when the exception (or one it came from) is ENOSPC/EDQUOT, or when a write failed
    with almost no space left (torch reports a full disk as ``basic_ios::clear: iostream error`` or
    ``PytorchStreamWriter failed writing file``, without an errno)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None)
        text = str(e)
        if code == errno.ENOSPC or "No space left" in text:
            return "space"
        if code == errno.EDQUOT or "quota exceeded" in text.lower():
            return "quota"
        e = e.__cause__ or e.__context__
    try:
        return "space" if shutil.disk_usage(path).free < LOW_SPACE_BYTES else None
    except OSError:
        return None


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem holding ``path`` (what a user frees space on)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    dev = p.stat().st_dev
    while p != p.parent and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def _abort_if_failed(failure: dict | None, ckpt_dir: Path, tag: str) -> None:
    """Every rank: if some rank failed, rank 0 removes the partial save and every rank raises the same error."""
    if failure is None:
        return
    previous = fmt.read_latest(ckpt_dir).tag
    if dist.get_rank() == 0:
        shutil.rmtree(ckpt_dir / fmt.partial_name(tag), ignore_errors=True)
    comm.barrier()
    intact = (f"the previous checkpoint {previous} is intact" if previous
              else "no earlier checkpoint exists")
    if failure["kind"] == "space":
        message = (f"no space left on {failure['mount']} while saving {tag}; {intact} (free space on "
                   f"{failure['mount']}, then restart: the run resumes from {previous or 'scratch'})")
    elif failure["kind"] == "quota":
        message = (f"disk quota exceeded on {failure['mount']} while saving {tag}; {intact} (raise the quota or "
                   "free space, then restart)")
    else:
        message = f"saving {tag} failed on rank {failure['rank']} ({failure['error']}); {intact}"
    raise CheckpointSaveError(message)


def _universal_info(engine, client_state: dict) -> dict:
    """``universal_checkpoint_info`` with the tensor-parallel split of every parameter of every rank (under
    PP each rank only holds its stage, and ds_to_universal reads the info of one file)."""
    from megatron_genlip.parallel.sharding import universal_checkpoint_info

    names = comm.all_gather_object([n for n, p in engine.module.named_parameters() if p.requires_grad])
    num_layers = client_state["genlip"]["config"]["model"]["num_layers"]
    return universal_checkpoint_info([n for rank_names in names for n in rank_names], num_layers)


# --------------------------------------------------------------------------------------------------
# retention


def prune(ckpt_dir: str | Path, keep_last: int, protect: tuple[str, ...] = ()) -> list[str]:
    """Keep the newest ``keep_last`` complete checkpoints (manifest present, every file of the listed size) and
    delete every tag older than the oldest of them, except those in ``protect``. Incomplete or corrupt tags
    newer than that are left alone, so a damaged newest checkpoint never causes the deletion of the last good
    one; ``keep_last`` <= 0 keeps everything. Returns the deleted tags."""
    if keep_last <= 0:
        return []
    ckpt_dir = Path(ckpt_dir)
    tags = fmt.list_tags(ckpt_dir)
    complete = [t for t in tags if fmt.check_tag(ckpt_dir, t, checksums=False).status == "verified"]
    if not complete:
        return []
    cutoff = fmt.step_of(complete[-keep_last:][0])
    deleted = [t for t in tags if fmt.step_of(t) < cutoff and t not in protect]
    for t in deleted:
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)
    return deleted


# --------------------------------------------------------------------------------------------------
# which checkpoint to resume from


@dataclass
class Resume:
    """Where a run starts: a checkpoint (``tag`` set) or scratch, and what was noticed on the way."""

    directory: Path | None = None
    tag: str | None = None
    source: str = ""  # OWN_CHECKPOINTS | "train.load"
    state: dict = field(default_factory=dict)  # the trainer state saved with it (or the weights-only marker)
    manifest: dict | None = None
    notes: list[str] = field(default_factory=list)  # why newer checkpoints were passed over, what `latest` said

    @property
    def tag_dir(self) -> Path:
        return self.directory / self.tag

    @property
    def universal(self) -> bool:
        return self.tag is not None and is_universal(self.tag_dir)


def resume_sources(cfg) -> list[tuple[Path, str]]:
    """Where a run looks for a checkpoint, in order: the output directory's, then ``train.load``."""
    sources = [(Path(cfg.train.output_dir) / "checkpoints", OWN_CHECKPOINTS)]
    if cfg.train.load:
        sources.append((Path(cfg.train.load), "train.load"))
    return sources


def choose_resume(cfg) -> Resume:
    """Collective: the checkpoint every rank resumes from. Rank 0 walks the candidates newest first; every
    rank verifies a share of each candidate's files; rank 0 decides and broadcasts."""
    checksums = cfg.train.verify_checkpoint
    if dist.get_rank() != 0:
        while (request := broadcast()) is not None:
            _check_my_share(*request)
        return rank0_decides(lambda: None)

    def decide() -> Resume:
        try:
            return _decide(cfg, checksums)
        finally:
            broadcast(None)  # ends the other ranks' verification loop

    return rank0_decides(decide)


def _check_with_all_ranks(tag_dir: Path, files: dict, checksums: bool) -> tuple[list, list]:
    """Rank 0's file checker: every rank checks a share of the files."""
    broadcast((tag_dir, files, checksums))
    return _check_my_share(tag_dir, files, checksums)


def _check_my_share(tag_dir: Path, files: dict, checksums: bool) -> tuple[list, list]:
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {rel: e for i, (rel, e) in enumerate(sorted(files.items())) if i % world == rank}
    result = fmt.check_files(tag_dir, mine, checksums)
    gathered = comm.gather_object(result, dst=0)
    if rank != 0:
        return [], []
    return [p for g in gathered for p in g[0]], [w for g in gathered for w in g[1]]


def _decide(cfg, checksums: bool) -> Resume:
    """Rank 0: the first source with a usable checkpoint; a source whose checkpoints are all unusable stops
    the run unless ``train.allow_fresh_start``."""
    notes: list[str] = []
    for directory, what in resume_sources(cfg):
        if what == "train.load" and not directory.is_dir():
            raise ResumeError(f"train.load={directory} does not exist (a checkpoint directory holding iter_* "
                              "folders, e.g. written by tools/convert_checkpoint.py --from-hf)")
        choice = fmt.choose(directory, checksums, _check_with_all_ranks if dist.get_world_size() > 1
                            else fmt.check_files)
        if choice.verdict is not None:
            notes += [f"{directory}: {n}" for n in choice.notes] + choice.verdict.warnings
            state = _read_state_or_fail(directory / choice.tag)
            return Resume(directory, choice.tag, what, state, choice.verdict.manifest, notes)
        if choice.tags or (directory / fmt.LATEST).exists():
            found = ", ".join(choice.tags) or "no iter_* folder"
            if not cfg.train.allow_fresh_start:
                raise ResumeError(f"no checkpoint in {directory} ({what}) can be resumed from ({found}):"
                                  f"{choice.explain()}\nRestore or move away the damaged checkpoints, or set "
                                  "train.allow_fresh_start=true to start without them")
            notes.append(f"{directory}: no usable checkpoint ({found}); train.allow_fresh_start=true: going on "
                         f"without it{choice.explain()}")
    return Resume(notes=notes)


def _read_state_or_fail(tag_dir: Path) -> dict:
    try:
        state = read_trainer_state(tag_dir)
    except Exception as e:  # noqa: BLE001 - only possible for an unverified (legacy) checkpoint
        raise ResumeError(f"cannot read the trainer state of {tag_dir} ({type(e).__name__}: {e}); move it away to "
                          "resume from an older checkpoint") from None
    if not state:
        raise ResumeError(f"{fmt.model_states_path(tag_dir)} holds no megatron-genlip trainer state")
    return state


def read_trainer_state(tag_dir: str | Path) -> dict:
    """The trainer state (client_state["genlip"]) of a checkpoint without loading it into an engine
    (memory-mapped: the model weights in the same file are not read); {} if there is none. For a weights-only
    checkpoint of tools/convert_checkpoint.py, its marker (``weights_only: true``)."""
    import json

    marker = Path(tag_dir) / fmt.WEIGHTS_ONLY_MARKER
    if marker.is_file():
        return dict(json.loads(marker.read_text()), weights_only=True)
    state = torch.load(fmt.model_states_path(tag_dir), map_location="cpu", weights_only=False, mmap=True)
    return state.get("genlip") or {}


def is_universal(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / fmt.UNIVERSAL_MARKER).is_file()


def resumes_from_universal(cfg) -> bool:
    """Whether ``latest`` of the first source with one names a universal checkpoint: the cheap guess of a dry
    run (a training run decides with :func:`choose_resume`)."""
    for directory, _ in resume_sources(cfg):
        tag = fmt.read_latest(directory).tag
        if tag is not None:
            return is_universal(directory / tag)
    return False


# --------------------------------------------------------------------------------------------------
# load


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, weights_only: bool = False,
                    manifest: dict | None = None) -> dict:
    """Load model, optimizer and scheduler state; restore this rank's RNG; return the client state.

    ``weights_only``: only the model weights of a DeepSpeed checkpoint marked weights-only (its module files);
    optimizer, lr schedule and RNG start fresh. (Full weights written by tools/convert_checkpoint.py, with its
    marker file, load through ``hf.convert.load_weights_only``.) A universal checkpoint needs an engine
    configured with ``load_universal`` (DeepSpeed then restores weights and optimizer state from its ``zero/``
    folder). ``manifest``: the verified manifest, against which this rank's RNG file is checked before it is read.
    """
    tag_dir = Path(ckpt_dir) / tag
    with te_extra_state_loadable():
        if weights_only:
            path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True,
                                                        load_optimizer_states=False, load_lr_scheduler_states=False)
        else:
            path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    place_optimizer_steps(getattr(engine, "basic_optimizer", None))
    if not weights_only and not is_universal(tag_dir):  # resharded checkpoints carry no RNG states (by design)
        _restore_rng(tag_dir, manifest)
    return client_state or {}


def place_optimizer_steps(optimizer) -> int:
    """Put each parameter's Adam ``step`` where torch's fused (or capturable) AdamW keeps it: a float32 tensor on
    the parameter's device. torch's own ``load_state_dict`` does this, but DeepSpeed's universal-checkpoint load
    assigns the step it read from the file (a CPU tensor, ``base_optimizer.py``: ``state[hp_param]['step'] =
    steps[0]``) directly, and the fused CUDA kernel reads it through a device pointer. Other optimizers keep their
    CPU step. Returns how many steps were moved."""
    moved = 0
    for group in getattr(optimizer, "param_groups", []):
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "step" not in state:
                continue
            step = state["step"]
            if not torch.is_tensor(step) or step.device != p.device or step.dtype != torch.float32:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
                moved += 1
    return moved


TE_UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


@contextlib.contextmanager
def te_extra_state_loadable():
    """Let Transformer Engine load its delayed-scaling FP8 state while DeepSpeed loads a checkpoint.

    TE (>= 2.18, ``transformer_engine/pytorch/_extra_state.py``) refuses to unpickle a module's pickled
    ``_extra_state`` unless ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1``, so resuming a ``model.fp8=delayed`` run would
    fail in ``set_extra_state``. It adds no trust: DeepSpeed has already unpickled the same model-state file
    (``torch.load(weights_only=False)``) to hand TE those bytes. Set for the load only, then restored."""
    before = os.environ.get(TE_UNSAFE_PICKLE_ENV)
    os.environ[TE_UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TE_UNSAFE_PICKLE_ENV, None)
        else:
            os.environ[TE_UNSAFE_PICKLE_ENV] = before


def _restore_rng(tag_dir: Path, manifest: dict | None) -> None:
    """This rank's RNG states, if its file is there and intact; else a warning (the run goes on, but this rank's
    random streams, e.g. DropPath's, restart instead of continuing, so it is not bitwise an uninterrupted run)."""
    rank = dist.get_rank()
    name = fmt.rng_name(rank)
    entry = (manifest or {}).get("files", {}).get(name)
    problem = fmt.check_file(tag_dir, name, entry, checksums=True) if entry else (
        None if (tag_dir / name).is_file() else f"{name} is missing")
    if problem is None:
        try:
            set_rng_state(torch.load(tag_dir / name, weights_only=False))
            return
        except Exception as e:  # noqa: BLE001 - an unverified (legacy) file
            problem = f"{name} cannot be read ({type(e).__name__})"
    print(f"warning: [rank {rank}] {tag_dir}: {problem}: this rank's random states are not restored (its random "
          "streams, e.g. DropPath's, restart from the seed); training goes on, not bitwise identical to an "
          "uninterrupted run", file=sys.stderr, flush=True)
