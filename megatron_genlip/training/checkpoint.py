"""Checkpoints: DeepSpeed's engine checkpoint + trainer state, a ``latest`` pointer written last, retention.

Layout of ``CKPT_DIR``::

    iter_0000100/            engine.save_checkpoint(tag=...) files (model, ZeRO optimizer partitions,
                             lr scheduler, client_state) + rng_rank00000.pt ... (every rank's RNG states)
    latest                   "iter_0000100", written atomically after every rank finished the tag

``latest`` is DeepSpeed's own pointer name, so ``engine.load_checkpoint(CKPT_DIR)`` and DeepSpeed's
conversion tools (``zero_to_fp32``, ``ds_to_universal``) read these checkpoints as they are.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^iter_(\d{7,})$")


def tag_for(step: int) -> str:
    return f"iter_{step:07d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag named by ``latest`` if that checkpoint exists, else None."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


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


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int) -> str:
    """Save on every rank; the tag becomes ``latest`` only once all ranks are done."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    rank = dist.get_rank()
    client_state = dict(client_state, universal_checkpoint_info={"universal_checkpoint_version": 0.4})
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / f"latest.tmp{os.getpid()}"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` iter_* checkpoints (never the one ``latest`` names)."""
    current = latest_tag(ckpt_dir)
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=lambda p: p.name)
    for old in tags[:-keep_last] if keep_last > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str) -> dict:
    """Load model, optimizer and scheduler state; restore this rank's RNG; return the client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"checkpoint {Path(ckpt_dir) / tag} could not be loaded")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
