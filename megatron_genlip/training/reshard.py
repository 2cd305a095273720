"""Changing the parallel layout of a checkpoint (TP, PP, DP, ZeRO stage) through DeepSpeed universal checkpoints.

A DeepSpeed checkpoint loads only at the layout it was written at. :func:`reshard` turns it into a DeepSpeed
*universal* checkpoint: ``deepspeed.checkpoint.ds_to_universal`` gathers every parameter's ZeRO fragments
(all DP ranks, all pipeline stages) and merges its tensor-parallel shards into one full fp32 tensor with its
Adam ``exp_avg``/``exp_avg_sq`` and ``step`` (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``). How each
shard is merged comes from ``megatron_genlip.parallel.sharding.partition_dim`` (passed to DeepSpeed as its
``universal_checkpoint_info`` patterns). A trainer started with ``"checkpoint": {"load_universal": true}``
then slices each tensor for its own TP rank and ZeRO partition, at any TP/PP/DP and ZeRO-1/2 (ZeRO-3 at TP=1).

What this module adds around DeepSpeed's converter:

* parameter names: a pipeline checkpoint names parameters ``<layer index>.<name>``, a PP=1 one by the model's
  names; the ``zero/`` folders are renamed for the target layout;
* the trainer state (step, consumed samples, lr schedule, DeepSpeed's step counters) is carried over in one
  ``mp_rank_00_model_states.pt``, and ``genlip_universal.json`` marks the tag as universal so the trainer
  configures DeepSpeed to load it (``training.checkpoint.resumes_from_universal``);
* the target layout is checked against the model and batch before anything is written;
* the source is verified against its manifest (sizes and sha256) before it is read, and the result gets its own
  manifest before ``latest`` names it (``training/ckpt_format.py``);
* PP=1 sources keep the module in their model-state files, with megatron-core's ``_extra_state`` entries (None),
  which ds_to_universal cannot write: it reads a staged view of the source without them;
* Transformer Engine's FP8 scaling state (``model.fp8=delayed``: each module's amax history and scales, a
  non-empty ``_extra_state`` tensor) has no place in a universal checkpoint, which carries parameters and their
  optimizer state only: a source holding it is refused unless ``drop_fp8_history`` (``--drop-fp8-history``)
  accepts that the resharded run restarts every amax history as at step 0 (:func:`fp8_history`);
* :func:`layout_mismatch` is the start-up check that turns DeepSpeed's obscure failure on a layout change into
  an error that prints the command to run.

Not carried over: per-rank RNG states (DropPath streams restart from the seed; they cannot be mapped between
layouts). Sources must have a ZeRO optimizer state (stage 1, 2 or 3); targets use ZeRO stage 1 or 2, or 3 at TP=1
(:func:`universal_target_problem`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import torch

from megatron_genlip import compat
from megatron_genlip.config import Config, ConfigError, Layout, _from_dict, resolve_layout
from megatron_genlip.parallel import sharding
from megatron_genlip.training import checkpoint as ckpt
from megatron_genlip.training import ckpt_format as fmt

TOOL = "tools/reshard_checkpoint.py"


class ReshardError(RuntimeError):
    """A checkpoint that cannot be resharded as asked; the message names the file or setting."""


# --------------------------------------------------------------------------------------------------
# layouts


def checkpoint_layout(state: dict) -> dict | None:
    """{"tensor_parallel", "pipeline_parallel", "data_parallel", "zero_stage"} of a checkpoint's trainer state."""
    layout = state.get("layout")
    if not layout:
        return None
    zero = state.get("zero_stage", state.get("config", {}).get("parallel", {}).get("zero_stage"))
    return {"tensor_parallel": layout["tensor_parallel"], "pipeline_parallel": layout["pipeline_parallel"],
            "data_parallel": layout["data_parallel"], "zero_stage": zero}


def describe(layout: dict) -> str:
    return (f"TP={layout['tensor_parallel']} x PP={layout['pipeline_parallel']} x DP={layout['data_parallel']}, "
            f"ZeRO-{layout['zero_stage']}")


def run_layout(layout: Layout, zero_stage: int) -> dict:
    return {"tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel,
            "data_parallel": layout.data_parallel, "zero_stage": zero_stage}


def reshard_command(ckpt_dir: Path, tag: str, target: dict) -> tuple[str, Path]:
    """The command that converts ``ckpt_dir/tag`` for ``target``, and the directory it writes."""
    tp, pp, dp = target["tensor_parallel"], target["pipeline_parallel"], target["data_parallel"]
    save = Path(f"{Path(ckpt_dir)}-tp{tp}pp{pp}dp{dp}")
    step = fmt.step_of(tag)
    it = f" --iteration {step}" if step is not None else ""
    q = shlex.quote
    return f"python {TOOL} --load {q(str(ckpt_dir))}{it} --save {q(str(save))} --tp {tp} --pp {pp} --dp {dp}", save


def layout_mismatch(state: dict, current: dict, ckpt_dir: Path, tag: str) -> str | None:
    """None if a plain checkpoint with trainer state ``state`` loads at ``current``; else the error message,
    naming both layouts and the exact conversion command."""
    saved = checkpoint_layout(state)  # None for weights-only checkpoints: they load at any layout
    if saved is None or saved == current:
        return None
    tp_pp = ("tensor_parallel", "pipeline_parallel")
    if saved["zero_stage"] == current["zero_stage"] == 0 and all(saved[k] == current[k] for k in tp_pp):
        return None  # ZeRO-0 keeps whole optimizer states per model-parallel rank: DeepSpeed loads them at any DP
    if saved["zero_stage"] == 0:
        return (f"checkpoint {Path(ckpt_dir) / tag} was written at {describe(saved)} but this run is "
                f"{describe(current)}. A ZeRO-0 checkpoint loads at another data-parallel size with ZeRO-0 and the "
                "same TP and PP; resharding needs ZeRO optimizer partitions, so other changes are not possible for it "
                "(tools/convert_checkpoint.py --load/--from-hf carries the weights over with a fresh optimizer)")
    command, save = reshard_command(ckpt_dir, tag, current)
    return (f"checkpoint {Path(ckpt_dir) / tag} was written at {describe(saved)} but this run is "
            f"{describe(current)}; DeepSpeed loads a checkpoint only at the layout it was written at. "
            f"Convert it once (the result loads at any TP/PP/DP with ZeRO-1/2, and with ZeRO-3 at TP=1):\n"
            f"    {command}\n"
            f"then start this run with --set train.load={shlex.quote(str(save))} and a train.output_dir that holds no checkpoint "
            "(the output directory's own checkpoint is resumed first).")


def universal_target_problem(zero_stage: int, tensor_parallel: int) -> str | None:
    """Why a universal checkpoint cannot load into a run with this ZeRO stage and TP (None: it can)."""
    if zero_stage == 0:
        return ("a resharded (universal) checkpoint needs parallel.zero_stage >= 1: DeepSpeed restores weights and "
                "optimizer state from it only through its ZeRO optimizer")
    if zero_stage == 3 and tensor_parallel > 1:
        return ("a resharded (universal) checkpoint loads with parallel.zero_stage=3 only at "
                "parallel.tensor_parallel=1 (DeepSpeed's ZeRO-3 loader does not slice tensor-parallel shards); "
                "use zero_stage 1 or 2")
    return None


# --------------------------------------------------------------------------------------------------
# conversion


def _config(state: dict, where: Path) -> Config:
    try:
        return _from_dict(Config, state["config"])
    except (KeyError, ConfigError) as e:
        raise ReshardError(f"{where}: the saved trainer config cannot be read ({e})") from None


def _check_target(cfg: Config, tp: int, pp: int, dp: int | None) -> None:
    """The model and batch fields of the checkpoint's config must allow the target layout."""
    p = dataclasses.replace(cfg.parallel, tensor_parallel=tp, pipeline_parallel=pp, data_parallel=None,
                            zero_stage=min(cfg.parallel.zero_stage, 1) if pp > 1 else cfg.parallel.zero_stage,
                            sequence_parallel=False)
    try:
        resolve_layout(dataclasses.replace(cfg, parallel=p), tp * pp * (dp or 1))
    except ConfigError as e:
        raise ReshardError(f"target layout TP={tp} x PP={pp}" + (f" x DP={dp}" if dp else "") +
                           f" does not fit the checkpoint's model/batch: {e}") from None


def _model_state_files(src: Path) -> list[Path]:
    files = sorted(p for p in src.glob("*model_states.pt") if not p.name.startswith("layer_"))
    if not files:
        raise ReshardError(f"{src} holds no *model_states.pt file: not a DeepSpeed checkpoint")
    return files


def _source_param_shapes(src: Path) -> dict[str, list[torch.Size]]:
    """DeepSpeed parameter name -> its shard shape in each model-parallel file (TP ranks of its stage)."""
    shapes: dict[str, list] = {}
    for f in _model_state_files(src):
        groups = torch.load(f, map_location="cpu", weights_only=False, mmap=True).get("param_shapes") or []
        for group in groups:
            for name, shape in group.items():
                shapes.setdefault(name, []).append(torch.Size(shape))
    if not shapes:
        raise ReshardError(f"the model-state files of {src} list no parameter shapes")
    return shapes


def _module_entries(f: Path, state) -> dict | None:
    """The module state held by a model-state file: ``module`` of an ``mp_rank_*`` file (PP=1), the whole
    state dict of a pipeline ``layer_*`` file."""
    entries = state if f.name.startswith("layer_") else (state.get("module") if isinstance(state, dict) else None)
    return entries if isinstance(entries, dict) else None


def _extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


# the pickle keys of Transformer Engine's delayed-scaling state (transformer_engine/pytorch/_extra_state.py,
# _FLOAT8_DELAYED_SCALING_STATE_KEYS; module/base.py get_extra_state writes them only for that recipe)
DELAYED_SCALING_KEYS = {"scale_fwd", "amax_history_fwd", "scale_bwd", "amax_history_bwd"}


def _holds_delayed_scaling_state(payload: torch.Tensor) -> bool:
    """Whether a pickled ``_extra_state`` carries delayed scaling's amax history and scales, read from the pickle's
    opcodes without unpickling (as TE classifies it). TE < 2.18 also pickles ``{"recipe", "extra_fp8_variables"}``
    for stateless recipes (current scaling, MXFP8): no state to lose. A payload that does not parse counts as
    state (refused, never dropped silently)."""
    import pickletools

    try:
        for opcode, arg, _pos in pickletools.genops(payload.detach().cpu().numpy().tobytes()):
            if "STRING" in opcode.name or "UNICODE" in opcode.name:
                text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else arg
                if text in DELAYED_SCALING_KEYS:
                    return True
    except Exception:  # noqa: BLE001 - unreadable: treat as state
        return True
    return False


def fp8_history(src: Path) -> dict[str, list[str]]:
    """Module key -> the files holding its Transformer Engine delayed-scaling state (``model.fp8=delayed``: amax
    history and scales, a pickled ``_extra_state`` tensor) in a checkpoint's model-state and pipeline layer files
    (every TP rank's file, and every DP rank's under ZeRO-3, holds its own copy). TE writes an empty uint8 tensor
    (>= 2.18) or a stateless pickle (older) for current scaling and MXFP8, megatron-core's local layers None:
    none of these is state to lose."""
    found: dict[str, list[str]] = {}
    for f in sorted(src.glob("*model_states.pt")):
        entries = _module_entries(f, torch.load(f, map_location="cpu", weights_only=False, mmap=True)) or {}
        for k, v in entries.items():
            if _extra_state(k) and torch.is_tensor(v) and v.numel() and _holds_delayed_scaling_state(v):
                found.setdefault(k, []).append(f.name)
    return found


def _stage_source(src: Path, staging: Path) -> Path:
    """A view of ``src`` that ds_to_universal can read: its files linked as they are, except model-state files
    whose ``module`` holds non-tensor entries (megatron-core's ``_extra_state``, None for local layers) or any
    ``_extra_state``, copied without them. ds_to_universal 0.19.8 writes every module entry it finds no ZeRO
    fragment for as ``tensor.float()``, which fails on None and would turn TE's pickled FP8 state into a float
    "parameter" folder (PP=1 sources keep the module in these files; PP>1 ones do not)."""
    staging.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        state = torch.load(f, map_location="cpu", weights_only=False, mmap=True) if f.name.endswith(
            "model_states.pt") and not f.name.startswith("layer_") else None
        module = state.get("module") if isinstance(state, dict) else None
        if isinstance(module, dict) and any(not torch.is_tensor(v) or _extra_state(k) for k, v in module.items()):
            state["module"] = {k: v for k, v in module.items() if torch.is_tensor(v) and not _extra_state(k)}
            torch.save(state, staging / f.name)
        else:
            (staging / f.name).symlink_to(f.resolve())
    return staging


def _convert(src: Path, out: Path, info: dict, workers: int) -> None:
    """deepspeed.checkpoint.ds_to_universal with our ``universal_checkpoint_info`` (checkpoints written before
    it was saved, or by another tool, get it too: ``compat.ds_to_universal`` injects it)."""
    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    compat.ds_to_universal(args, info)


def _normalise(out: Path, shapes: dict[str, list], src_tp: int, num_layers: int, states: dict) -> None:
    """One universal format for every source and target ZeRO stage.

    ds_to_universal writes ZeRO-3 sources differently (flat tensors, no ``step.pt``, an ``optimizer_state.pt``
    without ``ds_version``/``clip_grad``), which the ZeRO-1/2 loader cannot read. Every parameter file becomes
    ``{"param": full tensor, "cat_dim": split dim}`` with a ``step.pt``, and ``optimizer_state.pt`` carries what
    both the ZeRO-1/2 loader (global state, param groups) and the ZeRO-3 loader (``optimizer_state_dict``:
    step and param groups) read.
    """
    from deepspeed.checkpoint.constants import (CAT_DIM, CLIP_GRAD, DS_VERSION, OPTIMIZER_STATE_DICT, PARAM,
                                                PARAM_GROUPS)

    zero = out / "zero"
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    zero3 = OPTIMIZER_STATE_DICT in optim  # the converter's ZeRO-3 path copies the whole optimizer state
    if zero3:
        inner = optim[OPTIMIZER_STATE_DICT]
        step = inner["state"][0]["step"]
        optim = {k: optim[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow", "zero_stage") if k in optim}
        optim.update({CLIP_GRAD: float(states["ds_config"].get("gradient_clipping", 0.0)),
                      DS_VERSION: states["ds_version"], PARAM_GROUPS: inner["param_groups"]})
    else:
        step = torch.load(zero / next(iter(shapes)) / "step.pt", map_location="cpu", weights_only=False)
    optim[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": optim[PARAM_GROUPS]}
    torch.save(optim, zero / "optimizer_state.pt")
    if not zero3:
        return
    for ds_name, shard_shapes in shapes.items():
        folder = zero / ds_name
        full, dim = _full_shape(ds_name, shard_shapes, src_tp, num_layers)
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            f = folder / f"{state}.pt"
            t = torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None
            if torch.is_tensor(t):
                torch.save({PARAM: t.reshape(full), CAT_DIM: 0 if dim is None else dim}, f)
        if (folder / "fp32.pt").is_file():
            torch.save(step, folder / "step.pt")


def _full_shape(ds_name: str, shard_shapes: list, src_tp: int, num_layers: int) -> tuple[list[int], int | None]:
    """The unsharded shape of a parameter from its TP rank-0 shard shape, and its partition dim."""
    dim = sharding.partition_dim(sharding.model_name(ds_name, num_layers))
    full = list(shard_shapes[0])
    if dim is not None:
        full[dim] *= src_tp
    return full, dim


def _rename_for_target(zero: Path, num_layers: int, pipelined: bool) -> int:
    """zero/<name> folders: source naming -> the target's (PipelineModule names under PP, model names else)."""
    renamed = 0
    for d in sorted(p for p in zero.iterdir() if p.is_dir()):
        name = sharding.model_name(d.name, num_layers)
        target = sharding.pipeline_name(name, num_layers) if pipelined else name
        if target != d.name:
            d.rename(zero / target)
            renamed += 1
    return renamed


def _verify(zero: Path, shapes: dict[str, list], src_tp: int, tp: int, num_layers: int, pipelined: bool) -> int:
    """Every parameter has full fp32 weights and Adam moments of the full (unsharded) shape, recorded with the
    dimension DeepSpeed will slice for the target TP, divisible by it."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    for ds_name, shard_shapes in shapes.items():
        name = sharding.model_name(ds_name, num_layers)
        folder = zero / (sharding.pipeline_name(name, num_layers) if pipelined else name)
        full, dim = _full_shape(ds_name, shard_shapes, src_tp, num_layers)
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            f = folder / f"{state}.pt"
            if not f.is_file():
                raise ReshardError(f"conversion wrote no {f} (parameter {name})")
            d = torch.load(f, map_location="cpu", weights_only=False, mmap=True)  # shapes only: no data read
            if list(d[PARAM].shape) != full:
                raise ReshardError(f"{f}: full shape {tuple(d[PARAM].shape)} but {name} should be {tuple(full)} "
                                   f"(shard {tuple(shard_shapes[0])} x TP={src_tp} along dim {dim})")
            if dim is not None and (d.get(CAT_DIM, 0) != dim or full[dim] % tp):
                raise ReshardError(f"{f}: split along dim {d.get(CAT_DIM, 0)} of {tuple(full)} for TP={tp}, "
                                   f"expected dim {dim} divisible by {tp}")
        if not (folder / "step.pt").is_file():
            raise ReshardError(f"conversion wrote no {folder / 'step.pt'} (Adam step of {name})")
    return len(shapes)


def reshard(load: str | Path, save: str | Path, tp: int, pp: int, dp: int | None = None,
            iteration: int | None = None, workers: int = 1, log=print, drop_fp8_history: bool = False) -> Path:
    """Convert ``load``'s checkpoint (``latest`` or ``iter_<iteration>``) into a universal checkpoint in ``save``
    (same tag, ``latest`` written last) that the trainer resumes at TP=tp x PP=pp (x DP=dp if given).
    ``drop_fp8_history``: convert a source holding Transformer Engine's FP8 scaling state (:func:`fp8_history`)
    without it; refused otherwise."""
    start = time.perf_counter()
    load, save = Path(load), Path(save)
    if not load.is_dir():
        raise ReshardError(f"--load {load}: no such directory")
    try:  # the source is verified (sizes and sha256) before it is read
        tag = fmt.resolve(load, iteration, log=log).tag
    except fmt.CheckpointFormatError as e:
        raise ReshardError(str(e)) from None
    src = load / tag
    if ckpt.is_universal(src):
        raise ReshardError(f"{src} is already a universal checkpoint ({fmt.UNIVERSAL_MARKER}): it loads at any "
                           "layout as it is")
    try:
        state = ckpt.read_trainer_state(src)
    except Exception as e:  # noqa: BLE001 - only an unverified (legacy) checkpoint gets here damaged
        raise ReshardError(f"cannot read the trainer state of {src} ({type(e).__name__}: {e})") from None
    if state.get("weights_only"):
        raise ReshardError(f"{src} is a weights-only checkpoint: it has no optimizer state to convert, and the "
                           "trainer starts from its weights (step 0) as it is")
    states_file = fmt.model_states_path(src)
    if not state:
        raise ReshardError(f"{states_file} holds no megatron-genlip trainer state (client_state['genlip'])")
    source = checkpoint_layout(state)
    if source is None or source["zero_stage"] is None:
        raise ReshardError(f"{states_file}: the trainer state records no parallel layout")
    if not list(src.glob("*_optim_states.pt")):
        raise ReshardError(f"{src} holds no *_optim_states.pt: ZeRO stage {source['zero_stage']} checkpoints keep a "
                           "plain optimizer state that DeepSpeed's universal conversion does not read; train with "
                           "parallel.zero_stage >= 1 to reshard")
    cfg = _config(state, states_file)
    _check_target(cfg, tp, pp, dp)
    out = save / tag
    if out.exists():
        raise ReshardError(f"{out} already exists; choose another --save or remove it")
    history = fp8_history(src)
    if history and not drop_fp8_history:
        key, files = next(iter(history.items()))
        raise ReshardError(
            f"{src} holds Transformer Engine FP8 scaling state (model.fp8=delayed: amax history and scales) in "
            f"{len(history)} module(s), e.g. {key} in {files[0]}. A universal checkpoint carries parameters and "
            "optimizer state only, so the resharded run would restart every amax history as at step 0 (the first "
            "steps quantize with fresh scales). Pass --drop-fp8-history to accept that, or resume at the source "
            f"layout ({describe(source)}) to keep it")
    num_layers = cfg.model.num_layers
    target = {"tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp}
    log(f"resharding {src} (step {state.get('iteration')}, {describe(source)}) -> {out} "
        f"(TP={tp} x PP={pp} x DP={dp or 'any'})")

    if history:
        log(f"dropping the FP8 scaling state of {len(history)} module(s) (--drop-fp8-history): the resumed run "
            "restarts its amax histories")
    shapes = _source_param_shapes(src)
    info = sharding.universal_checkpoint_info(shapes, num_layers)
    log(f"[1/4] {len(shapes)} parameters; tensor-parallel split by name: {len(info['tp_replicated_parameter_patterns'])}"
        f" replicated, {len(info['parameter_with_row_parallelism_patterns'])} row-parallel (dim 1), the rest dim 0")
    save.mkdir(parents=True, exist_ok=True)
    work = save / fmt.partial_name(tag)  # renamed to `out` once complete: a conversion cut short never looks done
    shutil.rmtree(work, ignore_errors=True)
    try:
        log("[2/4] DeepSpeed ds_to_universal: gathering ZeRO fragments, merging TP shards")
        staged = _stage_source(src, save / f".staging-{tag}-{os.getpid()}")
        try:
            _convert(staged, work, info, workers)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        states = torch.load(states_file, map_location="cpu", weights_only=False, mmap=True)  # module dropped below
        _normalise(work, shapes, source["tensor_parallel"], num_layers, states)
        zero = work / "zero"
        renamed = _rename_for_target(zero, num_layers, pipelined=pp > 1)
        n = _verify(zero, shapes, source["tensor_parallel"], tp, num_layers, pipelined=pp > 1)
        log(f"[3/4] verified {n} parameters (full fp32 weights, exp_avg, exp_avg_sq, step); renamed {renamed} for "
            f"{'the pipeline' if pp > 1 else 'PP=1'} naming")
        _write_states(work, states, state, src, source, target, fp8_history_dropped=len(history))
        fmt.publish(save, tag, iteration=state.get("iteration"), resharded_from=str(src))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"[4/4] wrote {out} and {save / 'latest'} in {time.perf_counter() - start:.1f}s; resume with "
        f"--set train.load={save} --set parallel.tensor_parallel={tp} --set parallel.pipeline_parallel={pp} "
        f"(parallel.zero_stage 1 or 2{', or 3' if tp == 1 else ''})")
    return out


def _write_states(out: Path, states: dict, state: dict, src: Path, source: dict, target: dict,
                 fp8_history_dropped: int = 0) -> None:
    """One model-states file with DeepSpeed's counters, the lr schedule and the trainer state (every target rank
    reads it; weights come from zero/), the same under the ZeRO-3 file name, and the universal marker (with the
    number of modules whose FP8 scaling state was dropped)."""
    for f in out.glob("*model_states.pt"):  # ds_to_universal's copies of every source rank's file
        f.unlink()
    states["module"] = None  # weights are in zero/ (DeepSpeed does not read the module in universal mode)
    states["mp_world_size"] = 1  # DeepSpeed checks the number of mp_rank files against it
    states["genlip"] = dict(state, resharded={"from": str(src), "source_layout": source, "target_layout": target})
    for name in fmt.MODEL_STATES_FILES:
        torch.save(states, out / name)
    marker = {"format": "deepspeed-universal", "iteration": state.get("iteration"), "source": str(src),
              "source_layout": source, "target_layout": target, "fp8_history_dropped": fp8_history_dropped}
    (out / fmt.UNIVERSAL_MARKER).write_text(json.dumps(marker, indent=1))
