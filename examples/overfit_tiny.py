#!/usr/bin/env python
"""A short model demo: the ``tiny`` GenLIP overfits a handful of synthetic captioned images on CPU, then
captions them greedily with the KV cache. It exercises the real model, tokenizer, image processing,
packing and loss (no DeepSpeed); the full trainer is ``examples/pretrain_genlip.sh``.

    python examples/overfit_tiny.py --samples 8 --steps 300
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from megatron_genlip.config import load_config
from megatron_genlip.data.image_processing import process_image
from megatron_genlip.data.pack_index import pack_arrivals
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import build_sample
from megatron_genlip.data.synthetic import make_scene, sample_rng
from megatron_genlip.data.tokenizer import load_tokenizer
from megatron_genlip.inference.generate import generate_caption
from megatron_genlip.model.genlip import build_model

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def overfit(num_samples: int = 8, steps: int = 300, lr: float = 3e-3, seed: int = 0, log_every: int = 50,
            verbose: bool = True) -> dict:
    """Train on ``num_samples`` fixed scenes; return losses, references and greedy captions."""
    cfg = load_config(TINY)
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    samples, captions = [], []
    for i in range(num_samples):
        img, caption, _ = make_scene(sample_rng(seed, "overfit", i))
        patches, grid = process_image(img, stage=1, image_size=cfg.data.image_size)
        samples.append(build_sample(tok, patches, grid, caption, cfg.tokenizer.prompt))
        captions.append(caption)
    order, sizes = pack_arrivals(np.array([len(s) for s in samples]), cfg.data.seq_length, len(samples))
    rows = [[samples[j] for j in row] for row in np.split(order, np.cumsum(sizes)[:-1])]
    batch = collate_batch(rows, cfg.data.seq_length)

    model = build_model(cfg.model, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = model(batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if verbose and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)")
    generated = [tok.decode(generate_caption(model, tok, s.patches, s.grid, cfg.tokenizer.prompt, 64))
                 for s in samples]
    return {"losses": losses, "references": captions, "generated": generated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8, help="number of fixed synthetic samples to memorise")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (AdamW, full batch)")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the model init")
    args = ap.parse_args()
    random.seed(args.seed)
    out = overfit(args.samples, args.steps, args.lr, args.seed)
    exact = sum(g == r for g, r in zip(out["generated"], out["references"]))
    for g, r in zip(out["generated"], out["references"]):
        print(f"{'OK ' if g == r else 'XX '} ref: {r}\n    gen: {g}")
    print(f"final loss {out['losses'][-1]:.4f}; exact captions {exact}/{len(out['references'])}")


if __name__ == "__main__":
    main()
