#!/usr/bin/env python
"""GPU fast-path benchmark (one GPU): attention kernels, then steady-state training-step throughput.

(a) Kernels: FlexAttention with the prefix-LM BlockMask (and Transformer Engine's DotProductAttention with an
    arbitrary mask, when TE imports) against the dense SDPA reference on fresh random packed rows: relative
    errors of the output and of the gradients w.r.t. q, k, v, and the forward+backward time.
(b) Training steps of the So16 and g16 configs (examples/configs) on 16384-token packed rows of stage-1-like
    samples (196 image + 60..89 text tokens): tokens/s, samples/s, TFLOP/s and MFU from the ideal FLOP count of
    megatron_genlip.model.accounting (LM head on labelled positions only), peak memory, for
      ours bf16   model.attention=flex, chunked LM-head loss on labelled positions
      ours fp8    the same with model.fp8 (TE recipe with --backend te, else torchao float8)
      baseline    official-style: dense SDPA mask and the LM head on ALL positions (OOM is reported)
    Warm-up steps, then the median of timed steps (torch.cuda.synchronize around each). A plain single-GPU
    step: model(batch).loss.backward() and torch AdamW on the parameters (bf16 parameters, no fp32 master
    copy, no DeepSpeed engine). MFU divides by the bf16 dense peak also for FP8 rows (PERFORMANCE.md §5).

    python benchmarks/gpu_bench.py                 # on an H100/H200, < 8 minutes (see --max-seconds)
    python benchmarks/gpu_bench.py --dry-run       # CPU, tiny shapes, every code path except the timing
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_genlip import platform  # noqa: E402
from megatron_genlip.batch import IGNORE_INDEX, KIND_IMAGE, KIND_TEXT  # noqa: E402
from megatron_genlip.config import ConfigError, load_config  # noqa: E402
from megatron_genlip.data.packing import collate_batch  # noqa: E402
from megatron_genlip.data.sample import assemble_sample  # noqa: E402
from megatron_genlip.model.accounting import batch_flops  # noqa: E402
from megatron_genlip.model.attention import FlexAttention, SdpaAttention  # noqa: E402
from megatron_genlip.model.genlip import build_model  # noqa: E402
from megatron_genlip.model.masks import sdpa_mask  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 per GPU (PERFORMANCE.md §1.1)
DRY_RUN_SHAPES = {"So16": ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
                           "model.num_attention_heads=4", "model.text_embed_dim=64", "model.vocab_size=4096",
                           "model.mrope_section=[3,3,2]"],
                  "g16": ["model.num_layers=2", "model.hidden_size=96", "model.ffn_hidden_size=256",
                          "model.num_attention_heads=4", "model.text_embed_dim=64", "model.vocab_size=4096",
                          "model.mrope_section=[4,4,4]"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="run every code path on CPU with tiny shapes (fp32, 1100-token rows, loss chunks of 64, "
                        "1 step per variant) "
                        "and print the same report without timings; imports nothing from Transformer Engine")
    p.add_argument("--models", default="So16,g16",
                   help="comma-separated model configs: names in examples/configs or YAML paths "
                        "(default %(default)s)")
    p.add_argument("--seq-length", type=int, default=16384, help="packed row length in tokens (default %(default)s)")
    p.add_argument("--rows", type=int, default=1,
                   help="packed rows per training step (micro-batch) (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per variant before timing (default %(default)s)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps per variant; the median is reported (default %(default)s)")
    p.add_argument("--max-seconds", type=float, default=420.0,
                   help="wall-clock budget of the whole run; variants that would start later are reported as "
                        "skipped and timed loops stop early (default %(default)s)")
    p.add_argument("--attention", default="flex", choices=("flex", "sdpa"),
                   help="model.attention of the 'ours' rows (default %(default)s)")
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
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.dry_run:  # rows of ~4 samples; a loss chunk smaller than the labelled positions
        args.seq_length, args.rows, args.warmup, args.steps = 1100, 2, 0, 1
        args.kernel_seq_length, args.loss_chunk_size = 700, 64
    return args


# --------------------------------------------------------------------------------------------------
# data


def packed_rows(vocab_size: int, seq_length: int, rows: int, seed: int, device) -> dict:
    """Packed rows of stage-1-like samples: 14x14 image + 60..89 text tokens (6 prompt, the rest labelled)."""
    g = torch.Generator().manual_seed(seed)
    all_rows = []
    for _ in range(rows):
        samples, used = [], 0
        while True:
            n_txt = int(torch.randint(60, 90, (1,), generator=g))
            if used + 196 + n_txt > seq_length:
                break
            ids = torch.randint(1, vocab_size, (n_txt,), generator=g).tolist()
            samples.append(assemble_sample(torch.randn(196, 3, 16, 16, generator=g), (14, 14), ids,
                                           [False] * 6 + [True] * (n_txt - 6)))
            used += 196 + n_txt
        all_rows.append(samples)
    batch = collate_batch(all_rows, seq_length)
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# (a) kernels


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
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


def kernel_report(args, device, dtype, heads: int, head_dim: int) -> list[str]:
    L, B = args.kernel_seq_length, args.kernel_rows
    g = torch.Generator().manual_seed(args.seed + 1)
    # fresh random packed rows: stage-1 samples in row 0, stage-2-like mixed grids in the others, padded ends
    sample_ids = torch.full((B, L), -1, dtype=torch.long)
    kinds = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        pos, s = 0, 0
        while True:
            gh, gw = (14, 14) if b == 0 else torch.randint(4, 17, (2,), generator=g).tolist()
            n_img = gh * gw
            n_txt = int(torch.randint(20, 120, (1,), generator=g))
            if pos + n_img + n_txt > L - 7:
                break
            sample_ids[b, pos:pos + n_img + n_txt] = s
            kinds[b, pos:pos + n_img] = KIND_IMAGE
            kinds[b, pos + n_img:pos + n_img + n_txt] = KIND_TEXT
            pos, s = pos + n_img + n_txt, s + 1
    sample_ids, kinds = sample_ids.to(device), kinds.to(device)
    q, k, v, grad_out = (torch.randn(B, heads, L, head_dim, generator=g).to(device, dtype) for _ in range(4))
    dense = sdpa_mask(sample_ids, kinds)
    ref_fn = SdpaAttention()
    ref = _fwd_bwd(lambda *t: ref_fn(*(x.float() for x in t), dense), q, k, v, grad_out.float())  # fp32 reference
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    lines = [f"kernels: {B} rows x {L} tokens, {heads} heads x {head_dim}, {dtype}, reference = dense SDPA in "
             f"fp32; relative error = max|err| / max|ref| (pass <= {tol:.0e})"]
    candidates = [("flex", FlexAttention(), lambda kern: kern.build_mask(sample_ids, kinds))]
    te_fn = te_attention(heads, head_dim, device)
    if te_fn is not None:
        candidates.append(("te-arbitrary", te_fn, lambda kern: dense))
    else:
        lines.append("  te-arbitrary: skipped (Transformer Engine needs CUDA and an importable TE)")
    ref_ms = _time_ms(lambda *t: ref_fn(*t, dense), q, k, v, grad_out, device)
    for name, kern, mask_of in candidates:
        mask = mask_of(kern)
        fn = lambda *t, kern=kern, mask=mask: kern(*t, mask)  # noqa: E731
        try:
            got = _fwd_bwd(fn, q, k, v, grad_out)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run is reported, the benchmark goes on
            lines.append(f"  {name}: FAIL ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        errs = [float((a - r).abs().max() / r.abs().max()) for a, r in zip(got, ref)]
        finite = all(bool(torch.isfinite(a).all()) for a in got)
        ok = finite and max(errs) <= tol
        ms = _time_ms(fn, q, k, v, grad_out, device)
        timing = f"  fwd+bwd {ms:.2f} ms vs dense {ref_ms:.2f} ms" if ms is not None else "  (not timed: dry run)"
        lines.append(f"  {name}: out {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}  dv {errs[3]:.1e}  "
                     f"finite {finite}  {'PASS' if ok else 'FAIL'}{timing}")
    return lines


# --------------------------------------------------------------------------------------------------
# (b) training steps


def all_positions_loss(model, batch) -> torch.Tensor:
    """Official-style loss: the LM head on every position, then the mean over labelled targets."""
    h = model.final_hidden(batch)[:, :-1]
    logits = model.head(h).float()
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def config_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix in (".yaml", ".yml") else ROOT / "examples" / "configs" / f"{name}.yaml"


def variants(args, dry_run: bool):
    fp8 = args.fp8
    if fp8 == "auto":
        fp8 = "current" if args.backend == "te" else "torchao-tensorwise"
    dtype = "float32" if dry_run else "bfloat16"
    ours = [f"model.attention={args.attention}", f"model.loss_chunk_size={args.loss_chunk_size}",
            f"model.backend={args.backend}", f"model.params_dtype={dtype}", "model.drop_path_rate=0.0"]
    out = [(f"ours {'fp32' if dry_run else 'bf16'} ({args.attention})", ours, False)]
    if fp8 != "none":
        out.append((f"ours fp8 ({fp8})", ours + [f"model.fp8={fp8}", "train.precision=bf16"], False))
    if not args.no_baseline:
        out.append(("baseline", ["model.attention=sdpa", "model.loss_chunk_size=0", "model.backend=local",
                                 f"model.params_dtype={dtype}", "model.drop_path_rate=0.0"], True))
    return out


def run_variant(args, cfg, batch, device, all_positions: bool, deadline: float, peak: float) -> dict:
    row = {}
    torch.manual_seed(args.seed)
    model = build_model(cfg.model, seed=args.seed).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=platform.current().fused_adamw and device.type == "cuda")

    def step():
        loss = all_positions_loss(model, batch) if all_positions else model(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
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
    flops, samples = batch_flops(cfg.model, batch)
    row["flops"] = flops
    if device.type == "cuda":
        t = statistics.median(times)
        tokens = batch["input_ids"].numel()
        row.update(step_s=t, tokens_s=tokens / t, samples_s=samples / t, tflops=flops / t / 1e12,
                   mfu=flops / t / 1e12 / peak, mem_gb=torch.cuda.max_memory_allocated() / 2**30, timed=len(times))
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


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.max_seconds
    here = platform.initialize()  # the decision: compiled FlexAttention on CUDA, nothing compiled on CPU
    cuda = here.cuda and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.dry_run:
        print("gpu_bench: no CUDA device; use --dry-run to check the code paths on CPU", file=sys.stderr)
        return 2
    where = "DRY RUN on CPU (tiny shapes, fp32, nothing timed)" if args.dry_run else here.device_name
    print(f"gpu_bench: {where}; torch {torch.__version__}; plain single-GPU steps with torch AdamW "
          "(no DeepSpeed engine)")
    print(here.describe(), flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cfgs = {m: load_config(config_path(m), DRY_RUN_SHAPES.get(m, []) if args.dry_run else []) for m in models}
    first = cfgs[models[0]].model

    # (a) kernels
    for line in kernel_report(args, device, torch.float32 if args.dry_run else torch.bfloat16,
                              first.num_attention_heads, first.head_dim):
        print(line, flush=True)

    # (b) training steps
    rows = []
    for m in models:
        base = cfgs[m]
        peak, peak_src = detect_peak(args, base, device)
        batch = packed_rows(base.model.vocab_size, args.seq_length, args.rows, args.seed, device)
        efficiency = float((batch["sample_ids"] >= 0).float().mean())
        print(f"{m}: {args.rows} x {args.seq_length}-token rows, packing {efficiency:.1%}, "
              f"MFU peak {peak:g} TFLOP/s ({peak_src})", flush=True)
        for label, overrides, all_positions in variants(args, args.dry_run):
            row = {"model": m, "variant": label}
            if time.monotonic() > deadline:
                row["status"] = "skipped (--max-seconds)"
            else:
                try:
                    cfg = load_config(config_path(m), (DRY_RUN_SHAPES.get(m, []) if args.dry_run else []) + overrides)
                    row.update(run_variant(args, cfg, batch, device, all_positions, deadline, peak), status="ok")
                except ConfigError as e:
                    row["status"] = f"skipped: {str(e).splitlines()[0]}"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "OOM"
                except Exception as e:  # noqa: BLE001 - reported in the table; the other variants still run
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            numbers = (f", {row['tokens_s']:.0f} tokens/s, {row['samples_s']:.1f} samples/s, {row['tflops']:.1f} "
                       f"TFLOP/s, MFU {row['mfu']:.1%}, peak {row['mem_gb']:.1f} GB" if "mfu" in row else "")
            print(f"  {label}: {row['status']}" + (f", first loss {row['loss']:.4f}" if "loss" in row else "") + numbers,
                  flush=True)
            rows.append(row)

    # same weights and batch: ours and the baseline compute the same first loss
    for m in models:
        got = {r["variant"]: r["loss"] for r in rows if r["model"] == m and "loss" in r}
        if "baseline" in got and len(got) > 1:
            ours_label = next(k for k in got if k != "baseline")
            diff = abs(got[ours_label] - got["baseline"]) / abs(got["baseline"])
            print(f"{m}: first-step loss {ours_label} vs baseline: relative difference {diff:.1e}")

    # baseline ratio and the table (printed last)
    for r in rows:
        ref = next((b for b in rows if b["model"] == r["model"] and b["variant"] == "baseline"), None)
        if ref is not None and "samples_s" in r and "samples_s" in ref:
            r["vs_base"] = r["samples_s"] / ref["samples_s"]
    header = (f"{'model':<6} {'variant':<32} {'TF/step':>8} {'tokens/s':>10} {'samples/s':>10} {'TFLOP/s':>8} "
              f"{'MFU':>6} {'mem GB':>7} {'x base':>7}  status")
    timing = "dry run: not timed" if args.dry_run else f"median of timed steps after {args.warmup} warm-up"
    print(f"\nsummary ({timing}; tokens/s counts row slots; TF/step, TFLOP/s and MFU from ideal FLOPs, LM head "
          f"on labelled positions; x base = samples/s over the baseline's; transformer_engine imported: "
          f"{'transformer_engine' in sys.modules}; {time.monotonic() - start:.0f} s)")
    print(header)
    print("-" * len(header))
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        tf_step = f"{r['flops'] / 1e12:8.4f}" if "flops" in r else "-"
        print(f"{r['model']:<6} {r['variant']:<32} {tf_step:>8} {fmt(r, 'tokens_s', '10.0f'):>10} "
              f"{fmt(r, 'samples_s', '10.1f'):>10} "
              f"{fmt(r, 'tflops', '8.1f'):>8} {mfu:>6} {fmt(r, 'mem_gb', '7.1f'):>7} {fmt(r, 'vs_base', '7.2f'):>7}  "
              f"{r['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
