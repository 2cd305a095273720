#!/usr/bin/env python
"""Cost model of one training step on one H100 (issue #23): executed vs credited FLOPs, element-wise memory traffic,
predicted time and MFU per component, for the design before the issue and after it, and FP8's speed-up on g/16.

Counted from the model's own code (megatron_genlip/training/cost.py has the method and every assumption): the real
GenLIPModel runs one forward and backward at the recipe's size (16 rows x 16,384 tokens) on the meta device under
a TorchDispatchMode that records every aten op; attention is counted from the packed rows' FlexAttention tiles.

    python benchmarks/cost_model.py                         # So/16 and g/16 stage 1, before/after + ladder + FP8
    python benchmarks/cost_model.py --config examples/configs/stage1-So16.yaml --designs before,after
    python benchmarks/cost_model.py --eta-hbm 0.85 --hbm-tbps 4.8      # H200 bandwidth, better kernels
    python benchmarks/cost_model.py --json /tmp/cost.json              # everything as JSON too

Designs: before = full recompute, eager blocks, the chunked checkpointed fp32 loss (model.loss_impl=reference),
128-token BlockMask tiles (main @ b2d56cb); after = selective checkpointing, compiled blocks, the fused loss, the
tuned BlockMask tile; the ladder adds each option alone to "before". Runs in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_genlip.training import cost  # noqa: E402

CONFIGS = ["examples/configs/stage1-So16.yaml", "examples/configs/stage1-g16.yaml"]
TARGETS = {"So16": 0.45, "g16": 0.50}  # issue #23: predicted MFU after the issue
FP8_TARGET = 1.20  # issue #23: FP8 speed-up on g/16
FP8_CONFIGS = ("g16",)


def build_parser() -> argparse.ArgumentParser:
    a = cost.Assumptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None,
                   help=f"config file (repeatable; default: {' and '.join(CONFIGS)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override as the trainer takes it (repeatable), e.g. model.loss_chunk_size=4096")
    p.add_argument("--rows", type=int, default=None, help="packed rows per GPU and optimizer step, priced as one micro-batch (default: global_batch_size / "
                        "parallel.data_parallel when the config sets it, else train.micro_batch_size); the recipe's "
                        "split into micro-batches is priced too")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per row (default: data.seq_length)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic stage-1 batch (default %(default)s)")
    p.add_argument("--designs", default="before,after,ladder",
                   help="comma list of before, after, ladder (each option alone on top of before) "
                        "(default %(default)s)")
    p.add_argument("--fp8", default="torchao-tensorwise",
                   help="FP8 recipe compared with bf16 on --fp8-configs ('none' to skip; default %(default)s)")
    p.add_argument("--fp8-configs", default=",".join(FP8_CONFIGS),
                   help="configs (by name: So16, g16) that get the FP8 comparison (default %(default)s)")
    p.add_argument("--flex-blocks", default=",".join(map(str, cost.FLEX_BLOCKS)),
                   help="BlockMask sizes in the tile table and the 'tuned' choice (default %(default)s)")
    g = p.add_argument_group("assumptions (megatron_genlip/training/cost.py Assumptions: source of each default)")
    g.add_argument("--peak-tflops", type=float, default=a.peak_bf16 / 1e12,
                   help="BF16 dense peak, also the MFU denominator (default %(default)s)")
    g.add_argument("--peak-fp8-tflops", type=float, default=a.peak_fp8 / 1e12, help="FP8 dense peak (default %(default)s)")
    g.add_argument("--hbm-tbps", type=float, default=a.hbm_bytes_per_s / 1e12,
                   help="HBM bandwidth in TB/s (H100 3.35, H200 4.8; default %(default)s)")
    g.add_argument("--eta-gemm", type=float, default=a.eta_gemm, help="BF16 GEMM efficiency (default %(default)s)")
    g.add_argument("--eta-gemm-fp8", type=float, default=a.eta_gemm_fp8,
                   help="FP8 GEMM efficiency of the FP8 peak (default %(default)s)")
    g.add_argument("--eta-flex", type=float, default=a.eta_flex,
                   help="FlexAttention efficiency on executed tile FLOPs (default %(default)s)")
    g.add_argument("--eta-varlen", type=float, default=a.eta_varlen,
                   help="FlashAttention-2 varlen efficiency on executed tile FLOPs (default %(default)s)")
    g.add_argument("--flex-partial-overhead", type=float, default=a.flex_partial_overhead,
                   help="extra time of a partially masked tile (default %(default)s)")
    g.add_argument("--eta-hbm", type=float, default=a.eta_hbm,
                   help="element-wise kernels' share of HBM bandwidth (default %(default)s)")
    g.add_argument("--kernel-gap-us", type=float, default=a.kernel_gap_s * 1e6,
                   help="GPU-side gap per kernel in microseconds (default %(default)s)")
    g.add_argument("--optimizer-bytes-per-param", type=float, default=a.optimizer_bytes_per_param,
                   help="bytes the ZeRO-1 AdamW step moves per parameter at DP=1 (default %(default)s)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--ops", action="store_true",
                   help="print the recorded ops of one block (forward/backward) for each traced design")
    return p


def assumptions_from(args) -> cost.Assumptions:
    return cost.Assumptions(peak_bf16=args.peak_tflops * 1e12, peak_fp8=args.peak_fp8_tflops * 1e12,
                            hbm_bytes_per_s=args.hbm_tbps * 1e12, eta_gemm=args.eta_gemm,
                            eta_gemm_fp8=args.eta_gemm_fp8, eta_flex=args.eta_flex, eta_varlen=args.eta_varlen,
                            flex_partial_overhead=args.flex_partial_overhead, eta_hbm=args.eta_hbm,
                            kernel_gap_s=args.kernel_gap_us * 1e-6,
                            optimizer_bytes_per_param=args.optimizer_bytes_per_param)


def config_name(path: str) -> str:
    stem = Path(path).stem
    return stem.split("-", 1)[1] if "-" in stem else stem


def designs_for(names: list[str]) -> list[cost.Design]:
    out: list[cost.Design] = []
    for n in names:
        if n == "before":
            out.append(cost.BEFORE)
        elif n == "after":
            out.append(cost.AFTER)
        elif n == "ladder":
            out.extend(cost.ladder())
        else:
            raise SystemExit(f"unknown design {n!r} (before, after, ladder)")
    seen, unique = set(), []
    for d in out:
        if d.name not in seen:
            seen.add(d.name)
            unique.append(d)
    return unique


def tflop(x: float) -> str:
    return f"{x / 1e12:,.1f}"


def component_table(r: dict) -> list[str]:
    tokens = r["tokens"]
    lines = ["| component | executed TFLOP | credited TFLOP | element-wise GB (KB/token) | kernels | predicted s "
             "| share | rests on |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in r["components"]:
        ex = c["executed_flops"] + c["executed_fp8_flops"]
        exs = tflop(ex) + (f" (FP8 {tflop(c['executed_fp8_flops'])})" if c["executed_fp8_flops"] else "")
        gb = f"{c['bytes'] / 1e9:,.0f} ({c['bytes'] / tokens / 1e3:,.1f})" if c["bytes"] else "-"
        lines.append(f"| {c['name']} | {exs if ex else '-'} | {tflop(c['credited_flops']) if c['credited_flops'] else '-'}"
                     f" | {gb} | {c['kernels']:,} | {c['seconds']:.3f} | {c['seconds'] / r['step_seconds']:.0%} "
                     f"| {c['rests_on']} |")
    lines.append(f"| **step** | {tflop(r['executed_flops'])} | {tflop(r['credited_flops'])} | | | "
                 f"**{r['step_seconds']:.2f}** | | **MFU {r['mfu']:.1%}**, {r['tokens_per_s']:,.0f} tokens/s |")
    return lines


def block_notes(r: dict) -> str:
    ew = next(c for c in r["components"] if c["name"].startswith("block element-wise"))
    att = next(c for c in r["components"] if c["name"].startswith("attention"))
    d = ew["detail"]
    a = att["detail"]
    if a["block"][0] == "varlen":
        kernel = (f"varlen FA2 ({a['note']}), {a['segments']} segments per call (runs and text-run gaps), "
                  f"{a['tiles_per_row']:.0f} forward tiles per row ({a['partial_share']:.0%} masked), computed / "
                  f"exact-mask entries {a['computed_over_allowed']:.2f}")
    else:
        kernel = (f"BlockMask {a['block'][0]}, {a['tiles_per_row']:.0f} computed tiles per row "
                  f"({a['partial_share']:.0%} partial)")
    return (f"per block and token: forward {d['fwd_bytes_per_token'] / 1e3:.1f} KB in {d['fwd_kernels_per_block']} "
            f"kernels ({d['fwd_ops_per_block']} ops), backward (recomputation included) "
            f"{d['bwd_bytes_per_token'] / 1e3:.1f} KB in {d['bwd_kernels_per_block']} kernels "
            f"({d['bwd_ops_per_block']} ops); attention: {kernel}, head dim {a['head_dim']} computed as "
            f"{a['head_dim_rounded']}, {a['forward_passes']} forward + {a['backward_passes']} backward pass(es) per "
            f"layer; host synchronisations in the step: {r['host_syncs']}")


def attention_label(att: dict) -> str:
    b = att["detail"]["block"][0]
    return "varlen (FA2)" if b == "varlen" else f"flex {b}"


def needed(r: dict, target: float, a: cost.Assumptions) -> list[str]:
    """For each efficiency alone: the value that would bring this design to ``target`` MFU (others fixed)."""
    t_target = r["credited_flops"] / (target * a.peak_bf16)
    comps = r["components"]
    out = []

    def solve(label, share_fn, current):
        part = sum(share_fn(c) for c in comps)  # seconds of the part that scales with 1/eta
        rest = r["step_seconds"] - part
        if part <= 0:
            return
        value = current * part / (t_target - rest) if t_target > rest else float("inf")
        if value > 1:
            out.append(f"{label}: no value <= 1 reaches it alone (now {current})")
        else:
            out.append(f"{label} >= {value:.2f} (now {current})")

    gemm = lambda c: (c["executed_flops"] / (a.peak_bf16 * a.eta_gemm) if "GEMM" in c["name"] or "LM head" in c["name"]
                      or "embeddings" in c["name"] else 0.0) + c["executed_fp8_flops"] / (a.peak_fp8 * a.eta_gemm_fp8)
    hbm = lambda c: c["bytes"] / (a.hbm_bytes_per_s * a.eta_hbm)
    flex = lambda c: c["seconds"] if c["name"].startswith("attention") else 0.0
    solve("eta_gemm", gemm, a.eta_gemm)
    solve("eta_hbm", hbm, a.eta_hbm)
    if r["design"].get("attention") == "varlen":
        solve("eta_varlen", flex, a.eta_varlen)
    else:
        solve("eta_flex", flex, a.eta_flex)
    return out


def headroom(model: cost.CostModel, r: dict, a: cost.Assumptions) -> list[tuple[str, tuple[float, float]]]:
    """What the remaining big costs of a design are worth, each alone: a fused cross-entropy kernel (online softmax
    over the bf16 logits: read twice, the bf16 gradient written once, 6 B per logit instead of the eager fp32 passes),
    attention at the true head dim (72/96 instead of the kernels' 128), the H200's HBM (4.8 TB/s), no separate
    token-dimension reductions... as predicted step time and MFU."""
    comps = {c["name"].split(" (")[0]: c for c in r["components"]}
    t = r["step_seconds"]
    out = []
    head = comps["LM head + loss"]
    ce_bytes = head["detail"].get("logits_elements", 0) * 6
    hbm = a.hbm_bytes_per_s * a.eta_hbm
    if ce_bytes:
        out.append(("fused CE kernel (6 B per logit)", t - (head["bytes"] - ce_bytes) / hbm))
    att = comps["attention"]
    d = att["detail"]
    if d["head_dim"] != d["head_dim_rounded"]:
        out.append((f"attention at head dim {d['head_dim']} (not {d['head_dim_rounded']})",
                    t - att["seconds"] * (1 - d["head_dim"] / d["head_dim_rounded"])))
    h200 = model.predict(cost.Design(**r["design"]), dataclasses.replace(a, hbm_bytes_per_s=4.8e12))
    out.append(("H200 (HBM 4.8 TB/s)", h200["step_seconds"]))
    return [(label, (s, r["credited_flops"] / (s * a.peak_bf16))) for label, s in out]


def memory_gib(cfg, rows: int, checkpointing: str) -> float | None:
    """GPU peak of the layout from training/memory.py (the --dry-run plan: recipe DP, ZeRO stage), GiB."""
    try:
        from megatron_genlip.training import memory

        return memory.estimate_memory(cfg, None, rows, checkpointing).total_bytes / 2 ** 30
    except Exception:  # noqa: BLE001 - a plan that cannot be made is reported as unknown
        return None


def with_attention(cfg, attention: str):
    """``cfg`` with model.attention as a design runs it (the memory plan depends on the kernel)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))


def fitting_rows(cfg, rows: int, checkpointing: str, gpu_gib: float = 80.0) -> int | None:
    """The most rows dividing ``rows`` whose plan fits ``gpu_gib`` (gradient accumulation makes up the rest)."""
    for r in range(rows, 0, -1):
        if rows % r == 0:
            m = memory_gib(cfg, r, checkpointing)
            if m is not None and m <= gpu_gib:
                return r
    return None


def accumulated(cfg, args, a: cost.Assumptions, design: cost.Design, rows: int, total_rows: int) -> dict:
    """``design`` run as total_rows / rows micro-batches of ``rows`` with one optimizer step: per micro-batch costs
    times the accumulation count, the optimizer once."""
    m = cost.CostModel(cfg, rows, args.seq_length, args.seed, a)
    r = m.predict(design)
    k = total_rows // rows
    opt = sum(c["seconds"] for c in r["components"] if c["name"].startswith("optimizer"))
    t = k * (r["step_seconds"] - opt) + opt
    credited = k * r["credited_flops"]
    return {"rows": rows, "accumulation": k, "step_seconds": t, "mfu": credited / (t * a.peak_bf16),
            "memory_gib": memory_gib(cfg, rows, design.checkpointing)}


# the ideal-fusion floor of AFTER's ops (cost.element_traffic): a lower bound on its element-wise time
FLOOR = dataclasses.replace(cost.AFTER, name="after, ideal-fusion floor", fusion="floor")


def per_block_kb(r: dict) -> float:
    d = next(c for c in r["components"] if c["name"].startswith("block element-wise"))["detail"]
    return (d["fwd_bytes_per_token"] + d["bwd_bytes_per_token"]) / 1e3


def floor_line(af: dict, fl: dict, target: float | None, a: cost.Assumptions) -> str:
    """AFTER against the ideal-fusion floor of its own ops: what no kernel fusion can beat, and what the target
    would still need there."""
    line = (f"ideal-fusion floor (same ops, each graph's element-wise work one kernel; a lower bound): "
            f"{per_block_kb(fl):.1f} KB per block and token (now {per_block_kb(af):.1f}), step "
            f"{fl['step_seconds']:.2f} s, MFU {fl['mfu']:.1%}")
    if target:
        if fl["mfu"] >= target:
            line += f"; target {target:.0%} not ruled out by the ops"
        else:
            eta = [n for n in needed(fl, target, a) if n.startswith("eta_gemm")]
            line += (f"; target {target:.0%} out of reach of any fusion of these ops at eta_gemm={a.eta_gemm}: at "
                     f"the floor {eta[0] if eta else 'eta_gemm: no value'}")
    return line


def sensitivity(model: cost.CostModel, design: cost.Design, a: cost.Assumptions) -> str:
    low = dataclasses.replace(a, eta_gemm=0.62, eta_hbm=0.65, eta_flex=0.22, eta_varlen=0.22,
                              flex_partial_overhead=0.20, eta_gemm_fp8=0.45)
    high = dataclasses.replace(a, eta_gemm=0.78, eta_hbm=0.88, eta_flex=0.38, eta_varlen=0.38,
                               flex_partial_overhead=0.10, eta_gemm_fp8=0.65)
    lo, hi = model.predict(design, low), model.predict(design, high)
    return (f"range (eta_gemm 0.62-0.78, eta_hbm 0.65-0.88, eta_flex/eta_varlen 0.22-0.38, partial overhead "
            f"0.20-0.10): "
            f"{lo['step_seconds']:.2f}-{hi['step_seconds']:.2f} s, MFU {lo['mfu']:.1%}-{hi['mfu']:.1%}")


def print_ops(trace: cost.Trace, title: str) -> None:
    print(f"\nops of block.1 ({title}):")
    for op in trace.ops:
        if op.region == "block.1" and op.kind not in ("view", "alloc"):
            shapes = " ".join("x".join(map(str, r.view[1])) + ":" + r.dtype for r in op.reads[:3])
            print(f"  {op.phase:3s} {op.kind:11s} {op.name:40s} {shapes}")


def run(args) -> dict:
    from megatron_genlip.config import load_config

    a = assumptions_from(args)
    blocks = tuple(int(b) for b in args.flex_blocks.split(",") if b)
    cost.FLEX_BLOCKS = blocks
    designs = designs_for([d.strip() for d in args.designs.split(",") if d.strip()])
    fp8_names = {n.strip() for n in args.fp8_configs.split(",") if n.strip()}
    report = {"assumptions": a.describe(), "sources": cost.ASSUMPTION_SOURCES, "configs": {}}
    print("# Cost model of one training step (issue #23)\n")
    print("Assumptions (megatron_genlip/training/cost.py; flags override):")
    for k, v in a.describe().items():
        print(f"  {k:28s} {v:<12g} {cost.ASSUMPTION_SOURCES[k]}")
    print(f"Options in this tree: selective checkpointing {'yes' if cost.has_option('selective') else 'NO'}, "
          f"fused loss {'yes' if cost.has_option('fused') else 'NO'}")
    for path in args.config or CONFIGS:
        t0 = time.time()
        cfg = load_config(ROOT / path if not Path(path).is_absolute() else path, args.set)
        name = config_name(path)
        model = cost.CostModel(cfg, args.rows, args.seq_length, args.seed, a)
        cr = model.credited
        print(f"\n## {name}: {path}\n")
        print(f"{model.rows} rows x {model.seq_length:,} tokens = {model.rows * model.seq_length:,} slots, "
              f"{cr['samples']} samples (stage-1 lengths: 196 image + 6 prompt + N(68, 20) caption tokens, packed by "
              f"data.packing.fill_row over a {getattr(cfg.data, 'pack_buffer_size', 4096)}-sample buffer); credited "
              f"{tflop(cr['total'])} TFLOP per micro-batch: blocks {cr['blocks'] / cr['total']:.1%}, attention "
              f"{cr['attention'] / cr['total']:.1%}, LM head {cr['head'] / cr['total']:.1%}, embeddings "
              f"{cr['embed'] / cr['total']:.1%}")
        # FlexAttention tiles
        print("\nFlexAttention tiles of these rows (head dim "
              f"{cfg.model.head_dim} computed as {cost.next_power_of_two(cfg.model.head_dim)}; executed = computed "
              f"tiles x {2 * (cost.FLEX_FWD_DOTS + cost.FLEX_BWD_DOTS)} x B^2 x D per head, forward + backward, no "
              "recomputation; credited 12 L h T^2 per sample):\n")
        print("| BlockMask | computed tiles per row | partial | computed / exact-mask entries | executed TFLOP | "
              "credited TFLOP | on H100 (torch 2.13 heuristics) |")
        print("|---|---:|---:|---:|---:|---:|---|")
        tiles = {}
        for b in blocks:
            tc = cost.tile_counts(model.batch["sample_ids"], model.batch["token_kinds"], b)
            comp = tc["partial"] + tc["full"]
            ex = (cfg.model.num_layers * cfg.model.num_attention_heads * tc["computed_entries"] * 2
                  * cost.next_power_of_two(cfg.model.head_dim) * (cost.FLEX_FWD_DOTS + cost.FLEX_BWD_DOTS))
            tiles[b] = dict(tc, executed_flops=ex)
            print(f"| {b} | {comp / tc['rows']:.0f} | {tc['partial'] / max(comp, 1):.0%} | "
                  f"{tc['computed_entries'] / tc['allowed_entries']:.2f} | {tflop(ex)} | {tflop(cr['attention'])} | "
                  f"{cost.flex_block_note(b)} |")
        results = {}
        for d in designs:
            try:
                results[d.name] = model.predict(d)
            except cost.OptionUnavailable as e:
                print(f"\n{d.name}: not available ({e})")
        fp8 = {}
        if args.fp8 != "none" and name in fp8_names:
            for d in (cost.BEFORE, cost.AFTER):
                fd = dataclasses.replace(d, name=f"{d.name} + FP8", fp8=args.fp8)
                try:
                    fp8[fd.name] = model.predict(fd)
                    results.setdefault(d.name, model.predict(d))
                except cost.OptionUnavailable as e:
                    print(f"\n{fd.name}: not available ({e})")
        for key in ("before", "after"):
            if key in results:
                r = results[key]
                print(f"\n### {name} {key}: {r['design']}\n")
                print("\n".join(component_table(r)))
                print(f"\n{block_notes(r)}")
                # the FP8 comparison may have priced before/after without --designs naming them
                design = next((d for d in designs if d.name == key), {"before": cost.BEFORE, "after": cost.AFTER}[key])
                print(sensitivity(model, design, a))
        if "before" in results and "after" in results:
            target = TARGETS.get(name)
            b, af = results["before"], results["after"]
            print(f"\n{name}: before {b['step_seconds']:.2f} s / MFU {b['mfu']:.1%} -> after {af['step_seconds']:.2f} s"
                  f" / MFU {af['mfu']:.1%} ({b['step_seconds'] / af['step_seconds']:.2f}x)")
            mem = memory_gib(cfg, model.rows, cost.AFTER.checkpointing)
            if mem is not None and mem > 80:
                fit = fitting_rows(cfg, model.rows, cost.AFTER.checkpointing)
                line = (f"memory: {cost.AFTER.checkpointing} checkpointing at {model.rows} rows needs {mem:.0f} GiB "
                        "(training/memory.py) > 80 GB")
                if fit:
                    acc = accumulated(cfg, args, a, cost.AFTER, fit, model.rows)
                    af["fitting_layout"] = acc
                    line += (f"; it fits at {fit} rows ({acc['memory_gib']:.0f} GiB): {acc['accumulation']} x {fit} "
                             f"rows with gradient accumulation = {acc['step_seconds']:.2f} s per {model.rows} rows, "
                             f"MFU {acc['mfu']:.1%}")
                print(line)
            if target:
                verdict = "met" if af["mfu"] >= target else "NOT met"
                print(f"target {target:.0%}: {verdict} under these assumptions; each alone would need: "
                      + "; ".join(needed(af, target, a)))
        if "after" in results:
            fl = model.predict(FLOOR)
            results["after, ideal-fusion floor"] = fl
            print(floor_line(results["after"], fl, TARGETS.get(name), a))
            print(f"\nBeyond this issue ({name} after; each alone, from the counted quantities):\n")
            print("| change | step s | MFU |")
            print("|---|---:|---:|")
            for label, r in headroom(model, results["after"], a):
                print(f"| {label} | {r[0]:.2f} | {r[1]:.1%} |")
        order = [d.name for d in cost.ladder()]
        ladder = sorted((d for d in designs if d.name in results),
                        key=lambda d: order.index(d.name) if d.name in order else len(order))
        if len(ladder) > 2:
            print(f"\nWhat each option buys ({name}; each alone on top of 'before', then together):\n")
            print(f"| design | checkpointing | blocks | loss | attention | step s | MFU | vs before | GiB at {model.rows} "
                  "rows |")
            print("|---|---|---|---|---|---:|---:|---:|---:|")
            base = results.get("before")
            for d in ladder:
                r = results[d.name]
                att = next(c for c in r["components"] if c["name"].startswith("attention"))
                print(f"| {d.name} | {d.checkpointing} | {'compiled' if d.compiled else 'eager'} | {d.loss_impl} | "
                      f"{attention_label(att)} | {r['step_seconds']:.2f} | {r['mfu']:.1%} | "
                      f"{base['step_seconds'] / r['step_seconds'] if base else 0:.2f}x | "
                      f"{memory_gib(with_attention(cfg, d.attention), model.rows, d.checkpointing) or 0:.0f} |")
        if fp8:
            print(f"\n### {name} FP8 ({args.fp8})\n")
            for key, r in fp8.items():
                print(f"\n{key}:\n")
                print("\n".join(component_table(r)))
                print(f"\n{block_notes(r)}")
            for key in ("before", "after"):
                fk = f"{key} + FP8"
                if fk in fp8 and key in results:
                    sp = results[key]["step_seconds"] / fp8[fk]["step_seconds"]
                    line = (f"FP8 speed-up {key}: {results[key]['step_seconds']:.2f} s -> {fp8[fk]['step_seconds']:.2f} s"
                            f" = {sp:.2f}x (BF16-normalised MFU {fp8[fk]['mfu']:.1%})")
                    if key == "after":
                        line += f"; target {FP8_TARGET:.2f}x: {'met' if sp >= FP8_TARGET else 'NOT met'}"
                        f8 = fp8[fk]
                        g8 = sum(c["executed_fp8_flops"] for c in f8["components"]) / (a.peak_fp8 * a.eta_gemm_fp8)
                        cut = f8["step_seconds"] - results[key]["step_seconds"] / FP8_TARGET
                        if sp < FP8_TARGET and 0 < cut < g8:
                            line += (f" (it would need eta_gemm_fp8 >= {a.eta_gemm_fp8 * g8 / (g8 - cut):.2f}, "
                                     f"or {cut:.2f} s less cast traffic)")
                    print(line)
            if "after + FP8" in fp8 and "after, ideal-fusion floor" in results:
                fd = dataclasses.replace(FLOOR, name="after + FP8, ideal-fusion floor", fp8=args.fp8)
                f8fl, bffl = model.predict(fd), results["after, ideal-fusion floor"]
                fp8[fd.name] = f8fl
                sp = bffl["step_seconds"] / f8fl["step_seconds"]
                print(f"FP8 ({args.fp8}) at its ideal-fusion floor: {f8fl['step_seconds']:.2f} s, "
                      f"{results['after']['step_seconds'] / f8fl['step_seconds']:.2f}x our bf16 step "
                      f"({sp:.2f}x the bf16 floor): the floor casts each value in the one element-wise pass over "
                      "it, which needs the scale before the data (delayed scaling, as Transformer Engine's fused "
                      "LayerNormLinear/LayerNormMLP), not after a global amax as dynamic scaling does")
            if "after + FP8" in fp8:
                af, f8 = results["after"], fp8["after + FP8"]
                gem = [c for c in af["components"] if c["name"] == "block GEMMs"][0]["seconds"]
                gem8 = [c for c in f8["components"] if c["name"] == "block GEMMs"][0]["seconds"]
                ew = [c for c in af["components"] if c["name"].startswith("block element-wise")][0]["seconds"]
                ew8 = [c for c in f8["components"] if c["name"].startswith("block element-wise")][0]["seconds"]
                print(f"  block GEMMs {gem:.2f} -> {gem8:.2f} s (eta_gemm_fp8={a.eta_gemm_fp8}); casts add "
                      f"{ew8 - ew:.2f} s of element-wise traffic (compiled: one amax + cast per distinct GEMM input "
                      "after CSE, the backward's casts and transposed copies)")
        if args.ops:
            for key, tr in model._traces.items():
                print_ops(tr, " / ".join(key))
        report["configs"][name] = {"path": path, "rows": model.rows, "seq_length": model.seq_length,
                                   "credited": cr, "tiles": {str(k): v for k, v in tiles.items()},
                                   "designs": results, "fp8": fp8, "seconds_to_compute": time.time() - t0}
        print(f"\n({name}: {time.time() - t0:.1f} s on this CPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
