#!/usr/bin/env python
"""GPU fast-path benchmark (one GPU): training-step throughput, then the attention kernels.

(a) Training steps of the So16 and g16 configs (examples/configs) on 16384-token packed rows of stage-1-like
    samples (196 image + 60..89 text tokens): tokens/s, samples/s, TFLOP/s and MFU from the ideal FLOP count of
    megatron_genlip.model.accounting (LM head on labelled positions only), peak memory against the memory
    estimate (megatron_genlip.training.memory), host synchronisations per step, for
      ours bf16   model.attention=flex, chunked LM-head loss on labelled positions
      ours fp8    the same with model.fp8 (TE recipe with --backend te, else torchao float8)
      baseline    official-style: dense SDPA mask and the LM head on ALL positions (OOM is reported)
    Rows per step come from the memory estimate (--rows 0): as many as fit in --gpu-gib without activation
    checkpointing (at most --max-rows), else with it; the estimate is the trainer's less its fp32 master weights
    and half its Adam state (bf16 here), plus the all-position logits when the baseline runs alone (gpu_run.py
    gives it a phase of its own). Warm-up steps, then the median of timed steps
    (torch.cuda.synchronize around each); one more, untimed step under torch.cuda.set_sync_debug_mode("warn")
    counts the host synchronisations. A plain single-GPU step: model(batch).loss.backward() and torch AdamW on the
    parameters (bf16 parameters, no fp32 master copy, no DeepSpeed engine). MFU divides by the bf16 dense peak
    also for FP8 rows (PERFORMANCE.md §5).
(b) Kernels: FlexAttention with the prefix-LM BlockMask (and Transformer Engine's DotProductAttention with an
    arbitrary mask, when TE imports) against the dense SDPA reference (fp32) on packed prefix-LM rows, with q, k, v
    in the model's own memory layout: captured from the model's first attention layer (the [L, B, h*hd]
    projections viewed and permuted to [B, h, L, hd], RoPE applied), the output's gradient arriving through the
    layer's own permute back to [L, B, h*hd]. Relative errors (max|err| / max|ref|) of the output and of the
    gradients w.r.t. q, k, v; tolerance 3e-2 in bf16, 1e-5 in fp32 (dry run); forward+backward time.

Every measurement is appended to --results (JSON lines, flushed and fsynced) as soon as it exists.

    python benchmarks/gpu_bench.py                 # on an H100/H200, < 8 minutes (see --max-seconds)
    python benchmarks/gpu_bench.py --dry-run       # CPU, tiny shapes, every code path except the timing
    python benchmarks/gpu_bench.py --plan-trainer examples/configs/stage1-So16.yaml --set KEY=VALUE ...
                                                   # the trainer's rows and checkpointing from the estimate (JSON)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_genlip import platform  # noqa: E402
from megatron_genlip.batch import IGNORE_INDEX  # noqa: E402
from megatron_genlip.config import ConfigError, load_config  # noqa: E402
from megatron_genlip.data.packing import collate_batch  # noqa: E402
from megatron_genlip.data.sample import assemble_sample  # noqa: E402
from megatron_genlip.model.accounting import batch_flops  # noqa: E402
from megatron_genlip.model.attention import FlexAttention, SdpaAttention, VarlenAttention  # noqa: E402
from megatron_genlip.model import recompute  # noqa: E402
from megatron_genlip.model.genlip import build_model  # noqa: E402
from megatron_genlip.model.masks import sdpa_mask  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 per GPU (PERFORMANCE.md §1.1)
DRY_RUN_SHAPES = {"So16": ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
                           "model.num_attention_heads=4", "model.text_embed_dim=64", "model.vocab_size=4096",
                           "model.mrope_section=[3,3,2]"],
                  "g16": ["model.num_layers=2", "model.hidden_size=96", "model.ffn_hidden_size=256",
                          "model.num_attention_heads=4", "model.text_embed_dim=64", "model.vocab_size=4096",
                          "model.mrope_section=[4,4,4]"]}
VARIANTS = ("bf16", "pre23", "fp8", "baseline")
CHECKPOINTING_ORDER = ("none", "selective", "full")  # fastest first: the plan takes the first that fits
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # max|err| / max|ref| against fp32 dense SDPA
SYNC_MESSAGE = "called a synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") warns


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="run every code path on CPU with tiny shapes (fp32, 1100-token rows, loss chunks of 64, "
                        "1 step per variant) and print the same report without timings; imports nothing from "
                        "Transformer Engine; the synchronisation counter sees one stand-in warning per step")
    p.add_argument("--models", default="So16,g16",
                   help="comma-separated model configs: names in examples/configs or YAML paths "
                        "(default %(default)s)")
    p.add_argument("--parts", default="steps,kernels",
                   help="what to run, in this order: steps (training steps), kernels (flex vs dense parity and "
                        "speed) (default %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="training-step variants: bf16 (ours), fp8 (ours with model.fp8), baseline "
                        "(default %(default)s)")
    p.add_argument("--results", default=None,
                   help="JSON-lines file each measurement is appended to (flushed, fsynced) as soon as it "
                        "exists; none when unset (default %(default)s)")
    p.add_argument("--seq-length", type=int, default=16384, help="packed row length in tokens (default %(default)s)")
    p.add_argument("--rows", type=int, default=0,
                   help="packed rows per training step (micro-batch); 0 = from the memory estimate "
                        "(default %(default)s)")
    p.add_argument("--max-rows", type=int, default=2,
                   help="most rows per step that --rows 0 picks (default %(default)s)")
    p.add_argument("--gpu-gib", type=float, default=70.0,
                   help="GPU memory the estimate of a step must stay under (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per variant before timing (default %(default)s)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps per variant; the median is reported (default %(default)s)")
    p.add_argument("--max-seconds", type=float, default=420.0,
                   help="wall-clock budget of the whole run; variants that would start later are reported as "
                        "skipped and timed loops stop early (default %(default)s)")
    p.add_argument("--attention", default="varlen", choices=("flex", "sdpa", "varlen"),
                   help="model.attention of the 'ours' rows, the recipes' kernel by default; the pre-#23 rows run "
                        "flex, the kernel before issue #23 (default %(default)s)")
    p.add_argument("--loss-chunk-size", type=int, default=8192,
                   help="model.loss_chunk_size of the 'ours' rows; 0 = one pass (default %(default)s)")
    p.add_argument("--backend", default="local", choices=("local", "te"),
                   help="model.backend of the 'ours' rows; te needs CUDA and Transformer Engine (default %(default)s)")
    p.add_argument("--fp8", default="auto",
                   help="model.fp8 of the 'ours fp8' row: auto (current with --backend te, torchao-tensorwise "
                        "otherwise), none (no FP8 row), delayed, current, mxfp8, torchao-tensorwise, torchao-rowwise "
                        "(default %(default)s)")
    p.add_argument("--no-baseline", action="store_true", help="skip the official-style baseline rows")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="bf16 dense peak per GPU for MFU; 0 = detect H100/H200 (989), else the config's "
                        "train.peak_tflops (default %(default)s)")
    p.add_argument("--kernel-seq-length", type=int, default=8192,
                   help="row length of the kernel comparison (the dense reference is O(L^2)) (default %(default)s)")
    p.add_argument("--kernel-rows", type=int, default=2, help="rows in the kernel comparison (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed (default %(default)s)")
    p.add_argument("--plan-trainer", default=None, metavar="CONFIG",
                   help="print the trainer's plan for CONFIG (with --set) as one 'PLAN {json}' line and exit: "
                        "rows and activation checkpointing from the memory estimate (at most --max-rows rows, "
                        "under --gpu-gib), the estimate, and the train.* fields this trainer has "
                        "(default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for --plan-trainer, repeatable (default %(default)s)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.dry_run:  # rows of ~4 samples; a loss chunk smaller than the labelled positions
        args.seq_length, args.rows, args.warmup, args.steps = 1100, 2, 0, 1
        args.kernel_seq_length, args.loss_chunk_size = 700, 64
    return args


# --------------------------------------------------------------------------------------------------
# results, synchronisations, memory estimate


class Results:
    """Appends one JSON record per measurement to a JSON-lines file, flushed and fsynced at once, so that a run
    killed later still leaves every earlier record (``path`` None: records are only printed)."""

    def __init__(self, path: str | None, source: str):
        self.path, self.source = path, source

    def add(self, kind: str, **fields) -> dict:
        record = {"kind": kind, "source": self.source, "time": round(time.time(), 3), **fields}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return record


class SyncCounter:
    """Host synchronisations inside a block: under ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising
    CUDA call warns; the warnings are recorded and counted, with the places they came from. Sync debug mode is
    CUDA-only: without CUDA, :meth:`standin` emits the same warning where a step synchronises (the dry run), so
    the counting itself is exercised."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.active = False
        self.count = 0
        self.sites: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def counting(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")
            self.active = True
            try:
                yield self
            finally:
                self.active = False
                if self.cuda:
                    torch.cuda.set_sync_debug_mode(0)
                syncs = [w for w in caught if SYNC_MESSAGE in str(w.message)]
                self.count = len(syncs)
                self.sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)

    def standin(self) -> None:
        if self.active and not self.cuda:
            warnings.warn(f"{SYNC_MESSAGE} (stand-in: no CUDA here)", UserWarning, stacklevel=2)


def memory_module():
    """``megatron_genlip.training.memory`` (imported lazily), or None and why not."""
    try:
        from megatron_genlip.training import memory
    except ImportError as e:
        return None, f"no memory estimate ({e})"
    return memory, ""


def bench_step_bytes(plan, cfg, all_positions: bool) -> int:
    """GPU peak of this script's plain step from the trainer's estimate ``plan``: without the trainer's fp32 master
    weights and with bf16 instead of fp32 Adam state (torch AdamW on bf16 parameters); the official-style baseline
    adds its all-position logits (bf16 logits, their fp32 copy, the fp32 log-softmax saved for backward and its
    fp32 gradient: 14 bytes per position and vocabulary entry), which our loss never builds."""
    c = plan.components
    total = plan.total_bytes - c.get("master_weights", 0) - c.get("optimizer_states", 0) // 2
    if all_positions:
        total += 14 * plan.micro_batch_size * (cfg.data.seq_length - 1) * cfg.model.vocab_size
    return total


def plan_rows(cfg, requested: int, max_rows: int, gpu_gib: float, all_positions: bool = False) -> dict:
    """Rows per step and activation checkpointing for this script's step of ``cfg``: ``requested`` rows as given,
    else as many as fit under ``gpu_gib`` by the memory estimate (:func:`bench_step_bytes`) without activation
    checkpointing (at most ``max_rows``), else with selective checkpointing, else with full; the estimate of that
    choice. Without the estimate (module missing): 1 row, no checkpointing, said in ``estimate``."""
    memory, why = memory_module()
    if memory is None:
        return {"rows": requested or 1, "activation_checkpointing": "none", "estimate": why}
    for ckpt in CHECKPOINTING_ORDER:
        for rows in [requested] if requested else range(max_rows, 0, -1):
            plan = memory.estimate_memory(cfg, world_size=1, micro_batch_size=rows, activation_checkpointing=ckpt)
            need = bench_step_bytes(plan, cfg, all_positions)
            if requested or need <= gpu_gib * 2**30:
                return {"rows": rows, "activation_checkpointing": ckpt, "estimate_gib": need / 2**30,
                        "trainer_estimate_gib": plan.total_bytes / 2**30,
                        "estimate_components_gib": {k: round(v / 2**30, 3) for k, v in plan.components.items()},
                        "estimate": "megatron_genlip.training.memory, less the trainer's fp32 master weights and "
                                    "half its Adam state" + (", plus all-position logits" if all_positions else "")}
    return {"rows": 0, "activation_checkpointing": "full",
            "estimate": f"not even one row fits under {gpu_gib:g} GiB with activation checkpointing"}


def trainer_plan(config: str, overrides: list[str], max_rows: int, gpu_gib: float) -> dict:
    """The real trainer's runs on one GPU, most valuable first: without activation checkpointing at as many rows
    as the estimate fits (MFU = HFU), then with selective, then with full checkpointing; and the train.* fields
    this trainer knows."""
    cfg = load_config(config_path(config), overrides)
    out = {"train_fields": sorted(f.name for f in dataclasses.fields(cfg.train)), "runs": []}
    memory, why = memory_module()
    if memory is None:
        out["estimate"] = why
        out["runs"] = [{"activation_checkpointing": m, "rows": 1} for m in CHECKPOINTING_ORDER]
        return out
    for ckpt in CHECKPOINTING_ORDER:
        rows = min(max_rows, memory.max_micro_batch_size(cfg, world_size=1, gpu_gib=gpu_gib,
                                                         activation_checkpointing=ckpt))
        run = {"activation_checkpointing": ckpt, "rows": rows}
        if rows >= 1:
            plan = memory.estimate_memory(cfg, world_size=1, micro_batch_size=rows, activation_checkpointing=ckpt)
            run.update(estimate_gib=plan.total_bytes / 2**30,
                       estimate_components_gib={k: round(v / 2**30, 3) for k, v in plan.components.items()})
        out["runs"].append(run)
    out["runs"] = [r for r in out["runs"] if r["rows"] >= 1]
    out["estimate"] = "megatron_genlip.training.memory"
    return out


# --------------------------------------------------------------------------------------------------
# data


def packed_rows(vocab_size: int, seq_length: int, rows: int, seed: int, device, mixed_grids: bool = False) -> dict:
    """Packed rows of stage-1-like samples: 14x14 image + 60..89 text tokens (6 prompt, the rest labelled).
    ``mixed_grids``: rows after the first hold stage-2-like samples of 4..16 x 4..16 patches and 20..119 text
    tokens (the kernel comparison)."""
    g = torch.Generator().manual_seed(seed)
    all_rows = []
    for r in range(rows):
        samples, used = [], 0
        while True:
            gh, gw = torch.randint(4, 17, (2,), generator=g).tolist() if mixed_grids and r > 0 else (14, 14)
            n_txt = int(torch.randint(20, 120, (1,), generator=g)) if mixed_grids and r > 0 else \
                int(torch.randint(60, 90, (1,), generator=g))
            if used + gh * gw + n_txt > seq_length:
                break
            ids = torch.randint(1, vocab_size, (n_txt,), generator=g).tolist()
            samples.append(assemble_sample(torch.randn(gh * gw, 3, 16, 16, generator=g), (gh, gw), ids,
                                           [False] * 6 + [True] * (n_txt - 6)))
            used += gh * gw + n_txt
        all_rows.append(samples)
    batch = collate_batch(all_rows, seq_length)
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def config_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix in (".yaml", ".yml") else ROOT / "examples" / "configs" / f"{name}.yaml"


# --------------------------------------------------------------------------------------------------
# (a) training steps


def all_positions_loss(model, batch) -> torch.Tensor:
    """Official-style loss: the LM head on every position, then the mean over labelled targets."""
    h = model.final_hidden(batch)[:, :-1]
    logits = model.head(h).float()
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def variants(args, dry_run: bool):
    """(label, config overrides, official-style loss, compiled blocks, activation checkpointing) of each requested
    variant; checkpointing None: the plan's (the fastest mode that fits).

      ours       the step of issue #23: compiled blocks (where the platform compiles: CUDA), the fused LM-head loss,
                 selective checkpointing when nothing less fits
      pre-#23    the step before it, measured side by side: eager blocks, the reference (chunked, recomputed)
                 loss, full activation checkpointing, FlexAttention
      fp8        ours with model.fp8
      baseline   official-style: dense SDPA mask and the LM head on ALL positions"""
    fp8 = args.fp8
    if fp8 == "auto":
        fp8 = "current" if args.backend == "te" else "torchao-tensorwise"
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"gpu_bench: unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    dtype = "float32" if dry_run else "bfloat16"
    ours = [f"model.attention={args.attention}", f"model.loss_chunk_size={args.loss_chunk_size}",
            f"model.backend={args.backend}", f"model.params_dtype={dtype}", "model.drop_path_rate=0.0"]
    name = "fp32" if dry_run else "bf16"
    out = []
    if "bf16" in wanted:
        out.append((f"ours {name} ({args.attention})", ours + ["model.loss_impl=fused"], False, True, None))
    if "pre23" in wanted:
        pre = [o for o in ours if not o.startswith("model.attention=")] + ["model.attention=flex"]
        out.append((f"pre-#23 {name} (flex)", pre + ["model.loss_impl=reference"], False, False, "full"))
    if "fp8" in wanted and fp8 != "none":
        out.append((f"ours fp8 ({fp8})", ours + [f"model.fp8={fp8}", "train.precision=bf16"], False, True, None))
    if "baseline" in wanted and not args.no_baseline:
        out.append(("baseline", ["model.attention=sdpa", "model.loss_chunk_size=0", "model.backend=local",
                                 "model.loss_impl=reference", f"model.params_dtype={dtype}",
                                 "model.drop_path_rate=0.0"], True, False, None))
    return out


def accepted_checkpointing(path, overrides: list[str], planned: str):
    """(mode, config) for a variant: ``planned`` or, if the trainer's config refuses it for these overrides, the
    first slower (smaller) mode after it that it accepts (model.backend=te refuses selective: full); a variant
    the trainer refuses in every such mode (model.fp8=delayed with checkpointing) raises the ConfigError of
    ``planned``, and its row says so instead of timing a combination the trainer would not run."""
    first = None
    for mode in CHECKPOINTING_ORDER[CHECKPOINTING_ORDER.index(planned):]:
        try:
            return mode, load_config(path, overrides + [f"train.activation_checkpointing={mode}"])
        except ConfigError as e:
            first = first or e
    raise first


def run_variant(args, cfg, batch, device, all_positions: bool, deadline: float, peak: float,
                activation_checkpointing: str = "none", compiled: bool = False) -> dict:
    row = {}
    torch.manual_seed(args.seed)
    model = build_model(cfg.model, seed=args.seed).to(device).train()
    model.activation_checkpointing = activation_checkpointing
    if compiled and platform.current().compile:  # the trainer's per-block compilation (CUDA)
        for block in recompute.blocks_of(model):
            recompute.compile_block(block)
        row["compiled_blocks"] = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=platform.current().fused_adamw and device.type == "cuda")
    syncs = SyncCounter(device.type == "cuda")

    def step():
        loss = all_positions_loss(model, batch) if all_positions else model(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        syncs.standin()  # CPU only: where the step would synchronise (the trainer reads the loss)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row["loss"] = float(step())
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
        if time.monotonic() > deadline:
            break
    with syncs.counting():  # one more step, untimed: sync debug mode must not slow the timed ones
        step()
    _sync(device)
    row.update(syncs_per_step=syncs.count, sync_sites=dict(syncs.sites.most_common(8)))
    flops, samples = batch_flops(cfg.model, batch)
    row["flops"] = flops
    if device.type == "cuda":
        t = statistics.median(times)
        tokens = batch["input_ids"].numel()
        row.update(step_s=t, tokens_s=tokens / t, samples_s=samples / t, tflops=flops / t / 1e12,
                   mfu=flops / t / 1e12 / peak, mem_gb=torch.cuda.max_memory_allocated() / 2**30, timed=len(times))
    del model, opt
    return row


def detect_peak(args, cfg, device: torch.device) -> tuple[float, str]:
    if args.peak_tflops > 0:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = platform.current().device_name
        for key, peak in BF16_PEAK_TFLOPS.items():
            if key in name:
                return peak, f"{name}: {key} bf16 dense"
        return cfg.train.peak_tflops, f"{name}: unknown GPU, train.peak_tflops"
    return cfg.train.peak_tflops, "no GPU: train.peak_tflops"


def fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def step_rows(args, models, device, cuda, deadline, results: Results) -> list[dict]:
    rows = []
    for m in models:
        shapes = DRY_RUN_SHAPES.get(m, []) if args.dry_run else []
        base = load_config(config_path(m), shapes)
        peak, peak_src = detect_peak(args, base, device)
        # the baseline alone (its own phase in gpu_run.py) is sized for its all-position logits
        alone = variants(args, args.dry_run)
        all_positions = len(alone) == 1 and alone[0][2]
        sizing = load_config(config_path(m), shapes + alone[0][1]) if all_positions else base
        plan = plan_rows(sizing, args.rows, args.max_rows, args.gpu_gib, all_positions)
        if plan["rows"] < 1:
            rows.append(dict(model=m, variant="all", status=f"skipped: {plan['estimate']}"))
            results.add("step", **rows[-1])
            print(f"{m}: skipped, {plan['estimate']}", flush=True)
            continue
        batch = packed_rows(base.model.vocab_size, args.seq_length, plan["rows"], args.seed, device)
        efficiency = float((batch["sample_ids"] >= 0).float().mean())
        est = f"estimate {plan['estimate_gib']:.1f} GiB" if "estimate_gib" in plan else plan["estimate"]
        print(f"{m}: {plan['rows']} x {args.seq_length}-token rows ({est}; activation checkpointing "
              f"{plan['activation_checkpointing']}), packing {efficiency:.1%}, "
              f"MFU peak {peak:g} TFLOP/s ({peak_src})", flush=True)
        for label, overrides, all_positions, compiled, ckpt in variants(args, args.dry_run):
            ckpt = ckpt or plan["activation_checkpointing"]
            row = {"model": m, "variant": label, "rows": plan["rows"], "seq_length": args.seq_length,
                   "activation_checkpointing": ckpt, "packing": efficiency,
                   **{k: v for k, v in plan.items() if k.startswith("estimate")}}
            if time.monotonic() > deadline:
                row["status"] = "skipped (--max-seconds)"
            else:
                try:
                    ckpt, cfg = accepted_checkpointing(config_path(m), shapes + overrides, ckpt)
                    row["activation_checkpointing"] = ckpt
                    row.update(run_variant(args, cfg, batch, device, all_positions, deadline, peak, ckpt, compiled),
                               status="ok")
                except ConfigError as e:
                    row["status"] = f"skipped: {str(e).splitlines()[0]}"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "OOM"
                except Exception as e:  # noqa: BLE001 - reported in the table; the other variants still run
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            if "mem_gb" in row and "estimate_gib" in row:
                row["peak_over_estimate"] = row["mem_gb"] / row["estimate_gib"]
            results.add("step", **row)
            numbers = (f", {row['tokens_s']:.0f} tokens/s, {row['samples_s']:.1f} samples/s, {row['tflops']:.1f} "
                       f"TFLOP/s, MFU {row['mfu']:.1%}, peak {row['mem_gb']:.1f} GiB" if "mfu" in row else "")
            syncs = f", {row['syncs_per_step']} syncs/step" if "syncs_per_step" in row else ""
            print(f"  {label}: {row['status']}" + (f", first loss {row['loss']:.4f}" if "loss" in row else "")
                  + numbers + syncs, flush=True)
            rows.append(row)
        fp8 = next((r for r in rows if r["model"] == m and "fp8" in r["variant"] and "step_s" in r), None)
        bf16 = next((r for r in rows if r["model"] == m and r["variant"].startswith("ours")
                     and "fp8" not in r["variant"] and "step_s" in r), None)
        before = next((r for r in rows if r["model"] == m and r["variant"].startswith("pre-#23") and "step_s" in r),
                      None)
        if before and bf16:
            ratio = before["step_s"] / bf16["step_s"]
            results.add("design_ratio", model=m, before_step_s=before["step_s"], after_step_s=bf16["step_s"],
                        before_mfu=before.get("mfu"), after_mfu=bf16.get("mfu"), speedup=ratio)
            print(f"{m}: the #23 step is {ratio:.2f}x the speed of the step before it ({bf16['step_s']:.3f} vs "
                  f"{before['step_s']:.3f} s/step; MFU {bf16.get('mfu', 0):.1%} vs {before.get('mfu', 0):.1%})",
                  flush=True)
        if fp8 and bf16:
            ratio = bf16["step_s"] / fp8["step_s"]
            results.add("fp8_ratio", model=m, fp8=fp8["variant"], bf16_step_s=bf16["step_s"],
                        fp8_step_s=fp8["step_s"], speedup=ratio)
            print(f"{m}: {fp8['variant']} is {ratio:.2f}x the speed of bf16 ({fp8['step_s']:.3f} vs "
                  f"{bf16['step_s']:.3f} s/step)", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# (b) kernels in the model's layout


class _Captured(Exception):
    pass


class _CaptureKernel:
    """Stands in for the first layer's attention kernel: keeps the q, k, v the layer hands it, then stops."""

    name = "capture"

    def build_mask(self, sample_ids, token_kinds):
        return None

    def __call__(self, q, k, v, mask):
        self.qkv = (q.detach(), k.detach(), v.detach())
        raise _Captured


def model_qkv(cfg, batch, device, dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v exactly as the model's first attention layer passes them to its kernel (values, shapes and memory
    layout: GatedSelfAttention._heads views [L, B, h*hd] as [L, B, h, hd] and permutes to [B, h, L, hd]; RoPE on
    q and k), from a one-layer model of ``cfg``'s width."""
    model = build_model(cfg.model, seed=seed).to(device, dtype)
    capture = _CaptureKernel()
    model.layers[0].self_attn.kernel = capture
    with torch.no_grad():
        try:
            model(batch)
        except _Captured:
            pass
    del model
    return capture.qkv


def _fwd_bwd(fn, q, k, v, grad_out):
    """Output and gradients of q, k, v; the leaves keep q, k, v's strides (clone preserves a dense layout) and the
    output's gradient arrives as in the layer: through out.permute(2, 0, 1, 3).flatten(2) -> [L, B, h*hd]."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.permute(2, 0, 1, 3).flatten(2).backward(grad_out)
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _time_ms(fn, q, k, v, grad_out, device, reps=5):
    if device.type != "cuda":
        return None
    _fwd_bwd(fn, q, k, v, grad_out)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        _fwd_bwd(fn, q, k, v, grad_out)
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def te_attention(heads: int, head_dim: int, device: torch.device):
    """TE DotProductAttention with an arbitrary mask as fn(q, k, v, dense_mask) on [B, h, L, hd], or None."""
    if device.type != "cuda":
        return None
    try:
        import transformer_engine.pytorch as te
    except Exception:  # noqa: BLE001 - TE raises ImportError, RuntimeError or OSError when unusable
        return None
    dpa = te.DotProductAttention(heads, head_dim, attn_mask_type="arbitrary", qkv_format="bshd")

    def fn(q, k, v, mask):  # TE: True = masked out; bshd in, [B, L, h*hd] out
        out = dpa(*(t.transpose(1, 2).contiguous() for t in (q, k, v)), attention_mask=~mask)
        return out.view(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)

    return fn


def kernel_report(args, model: str, device, dtype, results: Results) -> list[str]:
    shapes = DRY_RUN_SHAPES.get(model, []) if args.dry_run else []
    cfg = load_config(config_path(model), shapes + ["model.num_layers=1", "model.drop_path_rate=0.0"])
    L, B = args.kernel_seq_length, args.kernel_rows
    heads, head_dim = cfg.model.num_attention_heads, cfg.model.head_dim
    # the fp32 dense reference at its worst (SDPA's math kernel): scores, probabilities and both their gradients,
    # [B, h, L, L] fp32 each; rows are shortened until that stays under --gpu-gib
    while 16 * B * heads * L * L > args.gpu_gib * 2**30 and L > 1024:
        L //= 2
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batch = packed_rows(cfg.model.vocab_size, L, B, args.seed + 1, device, mixed_grids=True)
    q, k, v = model_qkv(cfg, batch, device, dtype, args.seed)
    layout = {n: list(t.stride()) for n, t in zip("qkv", (q, k, v))}
    contiguous = {n: t.is_contiguous() for n, t in zip("qkv", (q, k, v))}
    g = torch.Generator().manual_seed(args.seed + 2)
    grad_out = torch.randn(L, B, heads * head_dim, generator=g).to(device, dtype)  # the layer's [L, B, h*hd]
    dense = sdpa_mask(batch["sample_ids"], batch["token_kinds"])
    ref_fn = SdpaAttention()
    # the fp32 reference: .float() keeps each tensor's strides, so it runs in the same layout
    ref = _fwd_bwd(lambda *t: ref_fn(*t, dense), q.float(), k.float(), v.float(), grad_out.float())
    tol = KERNEL_TOLERANCE[dtype]
    lines = [f"kernels ({model}): {B} packed prefix-LM rows x {L} tokens, {heads} heads x {head_dim}, {dtype}, q/k/v "
             f"in the model's layout (strides {layout}, contiguous {contiguous}); reference = dense SDPA in fp32; "
             f"relative error = max|err| / max|ref| (pass <= {tol:.0e})"]
    own_mask = lambda kern: kern.build_mask(batch["sample_ids"], batch["token_kinds"])  # noqa: E731
    candidates = [("flex", FlexAttention(), own_mask), ("varlen", VarlenAttention(), own_mask)]
    # compared on real (non-padding) tokens: padding outputs carry no label and varlen gives them other values
    real = (batch["sample_ids"] >= 0)[:, None, :, None]
    te_fn = te_attention(heads, head_dim, device)
    if te_fn is not None:
        candidates.append(("te-arbitrary", te_fn, lambda kern: dense))
    else:
        lines.append("  te-arbitrary: skipped (Transformer Engine needs CUDA and an importable TE)")
    ref_ms = _time_ms(lambda *t: ref_fn(*t, dense), q, k, v, grad_out, device)
    for name, kern, mask_of in candidates:
        mask = mask_of(kern)
        fn = lambda *t, kern=kern, mask=mask: kern(*t, mask)  # noqa: E731
        record = dict(model=model, kernel=name, rows=B, seq_length=L, heads=heads, head_dim=head_dim,
                      dtype=str(dtype), layout=layout, contiguous=contiguous, tolerance=tol,
                      dense_reference_worst_gib=16 * B * heads * L * L / 2**30)
        try:
            got = _fwd_bwd(fn, q, k, v, grad_out)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run is reported, the benchmark goes on
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results.add("kernel", **record, status=f"error: {why}", passed=False)
            lines.append(f"  {name}: FAIL ({why})")
            continue
        errs = [float(((a - r) * real).abs().max() / (r * real).abs().max()) for a, r in zip(got, ref)]
        finite = all(bool(torch.isfinite(a).all()) for a in got)
        ok = finite and max(errs) <= tol
        ms = _time_ms(fn, q, k, v, grad_out, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        results.add("kernel", **record, status="ok", passed=ok, finite=finite,
                    **dict(zip(("err_out", "err_dq", "err_dk", "err_dv"), errs)), ms=ms, dense_ms=ref_ms, peak_gib=peak)
        timing = f"  fwd+bwd {ms:.2f} ms vs dense {ref_ms:.2f} ms" if ms is not None else "  (not timed: dry run)"
        lines.append(f"  {name}: out {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}  dv {errs[3]:.1e}  "
                     f"finite {finite}  {'PASS' if ok else 'FAIL'}{timing}")
    del q, k, v, ref, dense
    return lines


# --------------------------------------------------------------------------------------------------


def print_table(args, rows, start):
    for r in rows:
        ref = next((b for b in rows if b["model"] == r["model"] and b["variant"] == "baseline"), None)
        if ref is not None and "samples_s" in r and "samples_s" in ref:
            r["vs_base"] = r["samples_s"] / ref["samples_s"]
    header = (f"{'model':<6} {'variant':<32} {'rows':>4} {'ckpt':>9} {'TF/step':>8} {'tokens/s':>10} {'samples/s':>10} "
              f"{'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>7} {'est GiB':>7} {'syncs':>5} {'x base':>7}  status")
    timing = "dry run: not timed" if args.dry_run else f"median of timed steps after {args.warmup} warm-up"
    print(f"\nsummary ({timing}; tokens/s counts row slots; TF/step, TFLOP/s and MFU from ideal FLOPs, LM head "
          f"on labelled positions; est GiB = the trainer's memory estimate; syncs = host synchronisations of one "
          f"step; x base = samples/s over the baseline's; transformer_engine imported: "
          f"{'transformer_engine' in sys.modules}; {time.monotonic() - start:.0f} s)")
    print(header)
    print("-" * len(header))
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        tf_step = f"{r['flops'] / 1e12:8.4f}" if "flops" in r else "-"
        print(f"{r['model']:<6} {r['variant']:<32} {r.get('rows', '-'):>4} {r.get('activation_checkpointing', '-'):>9} "
              f"{tf_step:>8} "
              f"{fmt(r, 'tokens_s', '10.0f'):>10} {fmt(r, 'samples_s', '10.1f'):>10} {fmt(r, 'tflops', '8.1f'):>8} "
              f"{mfu:>6} {fmt(r, 'mem_gb', '7.1f'):>7} {fmt(r, 'estimate_gib', '7.1f'):>7} "
              f"{fmt(r, 'syncs_per_step', '5d'):>5} {fmt(r, 'vs_base', '7.2f'):>7}  {r['status']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan_trainer:
        print("PLAN " + json.dumps(trainer_plan(args.plan_trainer, args.overrides, args.max_rows, args.gpu_gib)),
              flush=True)
        return 0
    start = time.monotonic()
    deadline = start + args.max_seconds
    here = platform.initialize()  # the decision: compiled FlexAttention on CUDA, nothing compiled on CPU
    cuda = here.cuda and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.dry_run:
        print("gpu_bench: no CUDA device; use --dry-run to check the code paths on CPU", file=sys.stderr)
        return 2
    results = Results(args.results, "gpu_bench")
    where = "DRY RUN on CPU (tiny shapes, fp32, nothing timed)" if args.dry_run else here.device_name
    print(f"gpu_bench: {where}; torch {torch.__version__}; plain single-GPU steps with torch AdamW "
          "(no DeepSpeed engine)")
    print(here.describe(), flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - {"steps", "kernels"}:
        raise SystemExit(f"gpu_bench: unknown --parts {sorted(set(parts) - {'steps', 'kernels'})}")

    rows = []
    for part in parts:
        if part == "steps":
            rows = step_rows(args, models, device, cuda, deadline, results)
            # same weights and batch: ours and the baseline compute the same first loss
            for m in models:
                got = {r["variant"]: r["loss"] for r in rows if r["model"] == m and "loss" in r}
                if "baseline" in got and len(got) > 1:
                    ours_label = next(k for k in got if k != "baseline")
                    diff = abs(got[ours_label] - got["baseline"]) / abs(got["baseline"])
                    results.add("loss_parity", model=m, variant=ours_label, relative_difference=diff)
                    print(f"{m}: first-step loss {ours_label} vs baseline: relative difference {diff:.1e}")
        else:
            for m in models:
                if time.monotonic() > deadline:
                    results.add("kernel", model=m, kernel="flex", status="skipped (--max-seconds)")
                    print(f"kernels ({m}): skipped (--max-seconds)", flush=True)
                    continue
                for line in kernel_report(args, m, device, torch.float32 if args.dry_run else torch.bfloat16,
                                          results):
                    print(line, flush=True)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    if rows:
        print_table(args, rows, start)  # printed last
    return 0


if __name__ == "__main__":
    sys.exit(main())
