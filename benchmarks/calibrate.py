#!/usr/bin/env python
"""The cost model's two deciding efficiencies measured on this GPU, and its prediction beside the measured step.

`benchmarks/cost_model.py` rests on judged efficiencies; its ideal-fusion floor shows that issue #23's BF16 targets
then hinge on eta_gemm (the share of the BF16 peak the block GEMMs reach) and, less, on eta_hbm. On a GPU this
script measures both and prices the step again with them:

1. **GEMMs, counted from the model's code.** The step is traced as the config runs it on CUDA
   (``cost.CostModel``: the real model at full size on the meta device). Every GEMM of one transformer block
   (forward, backward, recomputation: ``mm``/``addmm``/``bmm``/``baddbmm`` with the traced shapes, strides and
   dtypes, so transposed operands stay transposed) is replayed on the device and timed (CUDA events, after
   warm-up). eta_gemm = the block's GEMM FLOPs / (their summed time x the BF16 peak), each distinct GEMM weighted
   by how often the block runs it. FP8 GEMMs (``_scaled_mm``) are not replayed (reported as skipped).
2. **Memory bandwidth.** A compiled pointwise kernel over the block's activations ([tokens, hidden], reads 3
   tensors, writes 1: what an inductor island does) and an eager ``add``: bytes / time / the card's HBM bandwidth.
   The compiled figure is the prediction's eta_hbm: an upper bound for the real islands (row reductions and
   strided permutes run slower).
3. **Prediction beside measurement.** ``cost.CostModel.predict`` at the judged efficiencies and at the measured
   ones (and the ideal-fusion floor at the measured ones), at the rows and checkpointing of the step that
   ``gpu_bench.py`` measured for the same model (its "step" record in --results), beside that step's time.

Every result is appended to --results (JSON lines) as soon as it exists. Attention (eta_varlen) is not calibrated
here: gpu_bench.py's kernel phase times the attention kernels.

    python benchmarks/calibrate.py --results OUT/results.jsonl          # on the GPU, ~30 s per model
    python benchmarks/calibrate.py --dry-run                            # CPU, tiny shapes, timings meaningless
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megatron_genlip import platform  # noqa: E402
from megatron_genlip.config import load_config  # noqa: E402
from megatron_genlip.training import cost  # noqa: E402

MODELS = {"So16": "examples/configs/stage1-So16.yaml", "g16": "examples/configs/stage1-g16.yaml"}
# HBM bandwidth by device name, most specific first (NVIDIA datasheets; H100 SXM: PERFORMANCE.md §1.1). Only the
# product eta_hbm x bandwidth enters the prediction, so an unknown card takes the H100 SXM figure and the measured
# eta is relative to it.
HBM_BYTES_PER_S = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12))
GEMM_ARITY = {"mm": 2, "addmm": 3, "bmm": 2, "baddbmm": 3}  # tensor operands, in aten's positional order
DRY_RUN_SEQ_LENGTH = 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="So16,g16", help="comma list of So16, g16 (default %(default)s)")
    p.add_argument("--results", default=None,
                   help="JSON-lines file: the measured step is read from it (gpu_bench.py's 'step' records) and "
                        "every result appended to it (default: none, print only)")
    p.add_argument("--rows", type=int, default=0,
                   help="packed rows per micro-batch to price and replay (default 0: those of the measured step, "
                        "else train.micro_batch_size)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per kernel (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes (gpu_bench.py's dry-run models, 1024-token rows): every code path, "
                        "timings meaningless")
    return p


# ------------------------------------------------------------------------------------------------------------------
# measuring


def device_numbers(device: torch.device) -> dict:
    """Peak BF16 FLOP/s and HBM bytes/s of the device (what eta is relative to) and where they come from."""
    from gpu_bench import BF16_PEAK_TFLOPS

    a = cost.Assumptions()
    name = platform.current().device_name if device.type == "cuda" else ""
    peak = next((v * 1e12 for k, v in BF16_PEAK_TFLOPS.items() if k in name), a.peak_bf16)
    hbm = next((v for k, v in HBM_BYTES_PER_S if k in name), a.hbm_bytes_per_s)
    return {"device": name or "cpu", "peak_bf16": peak, "hbm_bytes_per_s": hbm}


def seconds_per_call(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Mean seconds of one call of ``fn`` over ``reps`` back-to-back calls, after ``warmup`` (CUDA events on a
    GPU: device time, the host's launches overlapped)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def operand(view: tuple, device: torch.device) -> torch.Tensor:
    """A tensor with a traced view's shape, strides and dtype (stride-0 broadcasts and transposes kept), random
    values."""
    _offset, shape, stride, dtype = view
    dtype = getattr(torch, dtype.replace("torch.", ""))
    span = 1 + sum((s - 1) * st for s, st in zip(shape, stride) if s > 0)
    base = torch.randn(span, device=device, dtype=torch.float32).to(dtype)
    return base.as_strided(shape, stride)


def block_gemms(trace: cost.Trace, region: str = "block.1") -> tuple[list[dict], float]:
    """The distinct GEMMs one block runs (op, operand views, constants) with how often and their FLOPs, and the
    FLOPs of the block's GEMMs that are not replayed (FP8 ``_scaled_mm``, unusual arguments)."""
    groups: dict[tuple, dict] = {}
    skipped = 0.0
    for op in trace.ops:
        if op.kind != "gemm" or op.region != region:
            continue
        if op.name not in GEMM_ARITY or len(op.reads) != GEMM_ARITY[op.name] or op.const != "[]":
            skipped += op.flops
            continue
        views = tuple((0, r.view[1], r.view[2], r.view[3]) for r in op.reads)
        g = groups.setdefault((op.name, views), {"op": op.name, "views": views, "flops": op.flops, "count": 0,
                                                 "phases": set(), "out_shape": op.writes[0].view[1]})
        g["count"] += 1
        g["phases"].add(op.phase)
    return list(groups.values()), skipped


def measure_gemms(trace: cost.Trace, device: torch.device, peak: float, reps: int, warmup: int) -> dict:
    gemms, skipped = block_gemms(trace)
    total_flops = total_s = 0.0
    rows = []
    for g in gemms:
        tensors = [operand(v, device) for v in g["views"]]
        fn = getattr(torch.ops.aten, g["op"]).default
        s = seconds_per_call(lambda: fn(*tensors), device, reps, warmup)
        del tensors
        total_flops += g["count"] * g["flops"]
        total_s += g["count"] * s
        rows.append({"op": g["op"], "shapes": [list(v[1]) for v in g["views"]],
                     "strides": [list(v[2]) for v in g["views"]], "dtype": g["views"][0][3], "count": g["count"],
                     "phases": sorted(g["phases"]), "tflops": g["flops"] / s / 1e12, "eta": g["flops"] / s / peak})
    if not rows:
        raise RuntimeError("the traced block runs no replayable GEMM")
    return {"eta_gemm": total_flops / total_s / peak, "block_gemm_seconds": total_s,
            "block_gemm_flops": total_flops, "skipped_flop_share": skipped / (skipped + total_flops),
            "gemms": rows}


def measure_hbm(tokens: int, width: int, device: torch.device, hbm: float, reps: int, warmup: int) -> dict:
    """eta_hbm of a compiled pointwise island (x * sigmoid(g) + r: 3 reads, 1 write) and of an eager add (2 reads,
    1 write) over [tokens, width] activations in bf16."""
    x, y, z = (torch.randn(tokens, width, device=device, dtype=torch.bfloat16) for _ in range(3))
    nbytes = x.numel() * x.element_size()
    island = torch.compile(lambda x, g, r: x * torch.sigmoid(g) + r, dynamic=False)
    compiled_s = seconds_per_call(lambda: island(x, y, z), device, reps, max(warmup, 1))
    eager_s = seconds_per_call(lambda: torch.add(x, y), device, reps, warmup)
    return {"eta_hbm": 4 * nbytes / compiled_s / hbm, "eta_hbm_eager_add": 3 * nbytes / eager_s / hbm,
            "hbm_tensor_bytes": nbytes}


# ------------------------------------------------------------------------------------------------------------------
# the prediction beside the measured step


def measured_step(results: str | None, model: str) -> dict | None:
    """gpu_bench.py's step of #23's design (variant "ours ...", not FP8, status ok) for ``model``, if recorded: its
    rows, checkpointing and kernel, and its time (``step_s``; absent in a dry run, which times nothing)."""
    if not results or not Path(results).is_file():
        return None
    steps = []
    for line in Path(results).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed writer
        if (r.get("kind") == "step" and r.get("model") == model and str(r.get("variant", "")).startswith("ours")
                and "fp8" not in r["variant"] and r.get("status") == "ok"):
            steps.append(r)
    return steps[-1] if steps else None


def summary_of(r: dict) -> dict:
    return {"step_s": r["step_seconds"], "mfu": r["mfu"],
            "components_s": {c["name"]: c["seconds"] for c in r["components"]}}


def calibrate(name: str, args, device: torch.device) -> dict:
    overrides = list(args.set)
    seq_length = None
    if args.dry_run:
        from gpu_bench import DRY_RUN_SHAPES

        overrides = DRY_RUN_SHAPES[name] + ["data.pack_buffer_size=32"] + overrides
        seq_length = DRY_RUN_SEQ_LENGTH
    cfg = load_config(ROOT / MODELS[name], overrides)
    step = measured_step(args.results, name)
    rows = args.rows or (step or {}).get("rows") or cfg.train.micro_batch_size
    design = cost.design_from_config(cfg, cuda=True)
    if step:  # price what gpu_bench ran: its checkpointing, its attention kernel
        ckpt = step.get("activation_checkpointing", design.checkpointing)
        design = dataclasses.replace(design, checkpointing={True: "full", False: "none", None: "none"}.get(ckpt, ckpt))
        if "(" in step["variant"]:
            design = dataclasses.replace(design, attention=step["variant"].split("(")[1].rstrip(")").strip())
    dev = device_numbers(device)
    judged = dataclasses.replace(cost.Assumptions(), peak_bf16=dev["peak_bf16"],
                                 hbm_bytes_per_s=dev["hbm_bytes_per_s"])
    model = cost.CostModel(cfg, rows=rows, seq_length=seq_length, assumptions=judged)
    trace = model.trace(design.checkpointing, design.loss_impl, design.fp8, design.fp8_shared_cast, design.attention)
    out = {"model": name, "rows": rows, "seq_length": model.seq_length, "num_layers": cfg.model.num_layers,
           "design": dataclasses.asdict(design), **dev}
    out.update(measure_gemms(trace, device, dev["peak_bf16"], args.reps, args.warmup))
    out.update(measure_hbm(rows * model.seq_length, cfg.model.hidden_size, device, dev["hbm_bytes_per_s"],
                           args.reps, args.warmup))
    measured = dataclasses.replace(judged, eta_gemm=out["eta_gemm"], eta_hbm=out["eta_hbm"])
    judged_step = model.predict(design)
    out["judged"] = summary_of(judged_step)
    out["block_elementwise_bytes"] = next(c["bytes"] for c in judged_step["components"]
                                          if c["name"].startswith("block element-wise"))
    out["calibrated"] = summary_of(model.predict(design, measured))
    if design.compiled:
        out["calibrated_floor"] = summary_of(model.predict(dataclasses.replace(design, fusion="floor"), measured))
    if step:
        out["measured"] = {"step_s": step.get("step_s"), "mfu": step.get("mfu"), "variant": step["variant"]}
        if step.get("step_s"):
            out["measured_over_calibrated"] = step["step_s"] / out["calibrated"]["step_s"]
    return out


def report(c: dict) -> list[str]:
    lines = [f"{c['model']} on {c['device']}: {c['rows']} x {c['seq_length']} tokens, design {c['design']}",
             f"  block GEMMs replayed: eta_gemm {c['eta_gemm']:.3f} (judged {cost.Assumptions().eta_gemm}), "
             f"{c['block_gemm_flops'] / c['block_gemm_seconds'] / 1e12:.0f} TFLOP/s over "
             f"{sum(g['count'] for g in c['gemms'])} GEMMs in {len(c['gemms'])} shapes"
             + (f" ({c['skipped_flop_share']:.0%} of the FLOPs not replayed)" if c["skipped_flop_share"] else "")]
    for g in sorted(c["gemms"], key=lambda g: -g["count"] * g["tflops"]):
        lines.append(f"    {g['op']} {' x '.join('x'.join(map(str, s)) for s in g['shapes'])} ({g['dtype']}, "
                     f"{'/'.join(g['phases'])}) x{g['count']}: {g['tflops']:.0f} TFLOP/s, eta {g['eta']:.2f}")
    lines.append(f"  HBM: compiled pointwise eta_hbm {c['eta_hbm']:.2f}, eager add {c['eta_hbm_eager_add']:.2f} "
                 f"(judged {cost.Assumptions().eta_hbm}; of {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s)")
    for key, label in (("judged", "predicted, judged efficiencies"), ("calibrated", "predicted, measured eta_gemm "
                       "and eta_hbm"), ("calibrated_floor", "  the same at the ideal-fusion floor")):
        if key in c:
            lines.append(f"  {label}: {c[key]['step_s']:.3f} s, MFU {c[key]['mfu']:.1%}")
    m = c.get("measured")
    if m and m.get("step_s"):
        lines.append(f"  measured by gpu_bench ({m['variant']}): {m['step_s']:.3f} s"
                     + (f", MFU {m['mfu']:.1%}" if m.get("mfu") else "")
                     + f"; measured / calibrated prediction {c['measured_over_calibrated']:.2f}")
    elif m:
        lines.append(f"  priced as gpu_bench ran it ({m['variant']}), which timed nothing (dry run)")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("calibrate: no CUDA device (use --dry-run to exercise the code on a CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    if args.dry_run:
        args.reps, args.warmup = min(args.reps, 2), min(args.warmup, 1)
    from gpu_bench import Results

    results = Results(args.results, "calibrate.py")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"calibrate: unknown model {name!r} ({', '.join(MODELS)})")
        t0 = time.monotonic()
        c = calibrate(name, args, device)
        c["seconds"] = round(time.monotonic() - t0, 1)
        results.add("calibration", **c)
        print("\n".join(report(c)) + f"\n  ({c['seconds']} s)", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
