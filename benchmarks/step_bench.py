#!/usr/bin/env python
"""Our training step (DeepSpeed engine, 1 rank, TP = PP = 1, megatron-core layers, packed prefix-LM batch)
vs a plain-PyTorch loop over the same model, weights and batch (benchmarks/plain_genlip.py: SDPA, torch
AdamW), measured side by side in one process as PERFORMANCE.md §4.2 prescribes: one thread, process CPU
time, 2 warm-up steps, N interleaved ABBA pairs, median and IQR of the per-pair ratios. Also prints the
CPU-MFU of both: ideal model FLOPs / CPU time / the GEMM rate measured in this process.

    python benchmarks/step_bench.py              # h=256, L=4, V=8192, 4096-token batch, 10 pairs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_genlip.config import ModelConfig
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import assemble_sample
from megatron_genlip.hf.keys import to_hf
from megatron_genlip.model.accounting import batch_flops


def make_batch(cfg: ModelConfig, tokens: int, seed: int = 0) -> dict:
    """Packed rows of stage-1-like samples: 196 image tokens + ~72 text tokens (6 prompt, rest labelled)."""
    g = torch.Generator().manual_seed(seed)
    samples, used = [], 0
    while True:
        n_txt = int(torch.randint(60, 90, (1,), generator=g))
        if used + 196 + n_txt > tokens:
            break
        ids = torch.randint(1, cfg.vocab_size, (n_txt,), generator=g).tolist()
        flags = [False] * 6 + [True] * (n_txt - 6)
        samples.append(assemble_sample(torch.randn(196, 3, 16, 16, generator=g), (14, 14), ids, flags))
        used += 196 + n_txt
    return collate_batch([samples], tokens)


def gemm_rate(h: int, rows: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(rows, h), torch.randn(h, 4 * h)
    a @ b
    t = time.process_time()
    for _ in range(reps):
        a @ b
    return 2 * rows * h * 4 * h * reps / (time.process_time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (PERFORMANCE.md §4.3: 256 or 384)")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the packed batch (one row)")
    ap.add_argument("--pairs", type=int, default=10, help="interleaved measurement pairs (ABBA)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import deepspeed

    from plain_genlip import PlainGenLIP
    from megatron_genlip.model.genlip import build_model
    from megatron_genlip import platform
    from megatron_genlip.training.distributed import init_distributed

    init_distributed(platform.initialize())  # on CPU: no compile, dynamo off
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 8 // 3 // 16 * 16,
                      num_attention_heads=args.hidden // 64, text_embed_dim=args.hidden, vocab_size=args.vocab,
                      mrope_section=[11, 11, 10], drop_path_rate=0.0)
    batch = make_batch(cfg, args.tokens)
    ours = build_model(cfg, seed=0)
    plain = PlainGenLIP(cfg)
    plain.load_hf(to_hf(ours.state_dict()))
    with torch.no_grad():
        a, b = float(ours(batch).loss), float(plain(batch))
    assert abs(a - b) <= 1e-5 * abs(b), f"the two models disagree: {a} vs {b}"

    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 1}, "steps_per_print": 2**31 - 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                        "weight_decay": 0.01, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=ours, model_parameters=ours.parameters(), config=ds_cfg)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                            foreach=True)

    def step_ours() -> float:
        t = time.process_time()
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        return time.process_time() - t

    def step_plain() -> float:
        t = time.process_time()
        loss = plain(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0, foreach=True)
        opt.step()
        return time.process_time() - t

    for _ in range(2):
        step_ours(), step_plain()
    ratios, t_ours, t_plain = [], [], []
    for i in range(args.pairs):
        if i % 2 == 0:
            a, b = step_ours(), step_plain()
        else:
            b, a = step_plain(), step_ours()
        t_ours.append(a)
        t_plain.append(b)
        ratios.append(a / b)
    q1, med, q3 = statistics.quantiles(ratios, n=4)[0], statistics.median(ratios), statistics.quantiles(ratios, n=4)[2]
    flops, samples = batch_flops(cfg, batch)
    rate = gemm_rate(args.hidden)
    print(f"model: L={args.layers} h={args.hidden} V={args.vocab}; batch {args.tokens} tokens, "
          f"{samples} samples; {flops / 1e9:.2f} model-GFLOP per step")
    print(f"GEMM rate in this process (2048 x {args.hidden} x {4 * args.hidden}, 1 thread): {rate / 1e9:.1f} GFLOP/s")
    for name, ts in (("ours (DeepSpeed engine)", t_ours), ("plain PyTorch (R0)", t_plain)):
        m = statistics.median(ts)
        print(f"{name:24s} {m:.3f} s/step CPU  {flops / m / 1e9:6.1f} model-GFLOP/s  CPU-MFU {100 * flops / m / rate:5.1f}%")
    print(f"ratio ours / plain: median {med:.3f}, IQR {q1:.3f}-{q3:.3f} over {args.pairs} interleaved pairs "
          f"(gate: upper quartile <= 1.10)")


if __name__ == "__main__":
    main()
