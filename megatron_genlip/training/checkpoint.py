"""Checkpoints: DeepSpeed's engine checkpoint + trainer state, a ``latest`` pointer written last, retention.

Layout of ``CKPT_DIR``::

    iter_0000100/            engine.save_checkpoint(tag=...) files (model, ZeRO optimizer partitions,
                             lr scheduler, client_state) + rng_rank00000.pt ... (every rank's RNG states)
    latest                   "iter_0000100", written atomically after every rank finished the tag

``latest`` is DeepSpeed's own pointer name, so ``engine.load_checkpoint(CKPT_DIR)`` and DeepSpeed's
conversion tools (``zero_to_fp32``, ``ds_to_universal``) read these checkpoints as they are; the saved
``universal_checkpoint_info`` tells ``ds_to_universal`` how every parameter is split under tensor parallelism.

Two other kinds of checkpoint load through :func:`load_checkpoint`:

* **universal** (``tools/reshard_checkpoint.py``, a DeepSpeed universal checkpoint plus ``genlip_universal.json``
  in the tag): loads at any TP/PP/DP layout with DeepSpeed's ``"checkpoint": {"load_universal": true}``, which
  :func:`resumes_from_universal` tells the DeepSpeed config to set;
* **weights-only** (trainer state ``weights_only: true``, e.g. converted from Hugging Face): model weights only,
  fresh optimizer and schedule, step 0.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^iter_(\d{7,})$")
UNIVERSAL_MARKER = "genlip_universal.json"  # in the tag directory of a resharded (universal) checkpoint
WEIGHTS_ONLY_MARKER = "genlip_weights_only.json"  # tools/convert_checkpoint.py --from-hf (weights in safetensors)
# the file holding DeepSpeed's global state and our client state: ZeRO-0/1/2 (with or without PP), ZeRO-3
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


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
    client_state = dict(client_state, universal_checkpoint_info=_universal_info(engine, client_state))
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


def _universal_info(engine, client_state: dict) -> dict:
    """``universal_checkpoint_info`` with the tensor-parallel split of every parameter of every rank (under
    PP each rank only holds its stage, and ds_to_universal reads the info of one file)."""
    from megatron_genlip.parallel.sharding import universal_checkpoint_info

    names: list = [None] * dist.get_world_size()
    dist.all_gather_object(names, [n for n, p in engine.module.named_parameters() if p.requires_grad])
    num_layers = client_state["genlip"]["config"]["model"]["num_layers"]
    return universal_checkpoint_info([n for rank_names in names for n in rank_names], num_layers)


def model_states_file(ckpt_dir: str | Path, tag: str) -> Path:
    """The tag's file with DeepSpeed's global state and the client state (rank 0's; all ranks save the same)."""
    tag_dir = Path(ckpt_dir) / tag
    for name in MODEL_STATES_FILES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(f"checkpoint {tag_dir} has neither {' nor '.join(MODEL_STATES_FILES)}: not a complete "
                            "DeepSpeed checkpoint")


def read_trainer_state(ckpt_dir: str | Path, tag: str) -> dict:
    """The trainer state (client_state["genlip"]) of a checkpoint without loading it into an engine
    (memory-mapped: the model weights in the same file are not read); {} if there is none. For a weights-only
    checkpoint of tools/convert_checkpoint.py, its marker (``weights_only: true``)."""
    marker = Path(ckpt_dir) / tag / WEIGHTS_ONLY_MARKER
    if marker.is_file():
        return dict(json.loads(marker.read_text()), weights_only=True)
    state = torch.load(model_states_file(ckpt_dir, tag), map_location="cpu", weights_only=False, mmap=True)
    return state.get("genlip") or {}


def is_universal(ckpt_dir: str | Path, tag: str) -> bool:
    return (Path(ckpt_dir) / tag / UNIVERSAL_MARKER).is_file()


def resume_sources(cfg) -> list[tuple[Path, str]]:
    """Where a run looks for a checkpoint, in order: the output directory's, then ``train.load``."""
    sources = [(Path(cfg.train.output_dir) / "checkpoints", "the output directory")]
    if cfg.train.load:
        sources.append((Path(cfg.train.load), "train.load"))
    return sources


def find_resume(cfg) -> tuple[Path, str, str] | None:
    """(directory, tag, which source) of the checkpoint a run with this config resumes from, or None."""
    for directory, what in resume_sources(cfg):
        tag = latest_tag(directory)
        if tag is not None:
            return directory, tag, what
    return None


def resumes_from_universal(cfg) -> bool:
    """True if the run will resume from a universal (resharded) checkpoint: DeepSpeed must then be configured
    with ``"checkpoint": {"load_universal": true}`` before the engine is built."""
    found = find_resume(cfg)
    return found is not None and is_universal(found[0], found[1])


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, weights_only: bool = False, model_cfg=None) -> dict:
    """Load model, optimizer and scheduler state; restore this rank's RNG; return the client state.

    ``weights_only``: only the model weights (the optimizer's fp32 master weights are refreshed from them);
    optimizer, lr schedule and RNG start fresh. Full weights written by tools/convert_checkpoint.py (its marker
    file) are split for this rank's layout (needs ``model_cfg``); a DeepSpeed checkpoint marked weights-only
    loads its module files. A universal checkpoint needs an engine configured with ``load_universal``
    (DeepSpeed then restores weights and optimizer state from its ``zero/`` folder).
    """
    if weights_only and (Path(ckpt_dir) / tag / WEIGHTS_ONLY_MARKER).is_file():
        from megatron_genlip.hf.convert import load_weights_only

        load_weights_only(engine, Path(ckpt_dir) / tag, model_cfg)
        return {}
    if weights_only:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True,
                                                    load_optimizer_states=False, load_lr_scheduler_states=False)
    else:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"checkpoint {Path(ckpt_dir) / tag} could not be loaded")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file() and not weights_only:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
