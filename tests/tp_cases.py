"""Bodies of the tensor-parallel tests; they run on every rank (see dist_harness.run_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from conftest import random_image, small_model_config
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import build_sample
from megatron_genlip.data.tokenizer import load_qwen_tokenizer
from megatron_genlip.model.genlip import build_model
from megatron_genlip.parallel import state


def packed_batch():
    tok = load_qwen_tokenizer()
    grids = [(3, 4), (2, 2), (4, 3), (2, 5)]
    caps = ["a red circle at the top left.", "two blue squares.", "a small green triangle in the center.",
            "three stars."]
    rows = [[build_sample(tok, random_image(g, i), g, c) for i, (g, c) in enumerate(zip(grids[:2], caps[:2]))],
            [build_sample(tok, random_image(g, 7 + i), g, c) for i, (g, c) in enumerate(zip(grids[2:], caps[2:]))]]
    return collate_batch(rows, 80)


def full_gradients(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, TP shards all-gathered along their partition dimension."""
    out = {}
    group = parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    for name, p in model.named_parameters():
        g = p.grad.detach()
        if getattr(p, "tensor_model_parallel", False) and world > 1:
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g
    return out


def tp2_matches_tp1(rank: int, world: int, result_file: str) -> None:
    cfg = small_model_config(vocab_size=151936, drop_path_rate=0.1)
    batch = packed_batch()
    results = {}
    for tp in (2, 1):
        state.reinitialize(tp)
        model = build_model(cfg, tp, seed=0).train()
        torch.manual_seed(5)  # the same DropPath rows on both TP ranks and in both layouts
        out = model(batch)
        out.loss.backward()
        results[tp] = (out.loss.detach(), out.token_losses.detach(), full_gradients(model))
    (l2, t2, g2), (l1, t1, g1) = results[2], results[1]
    errors = {"loss": float((l2 - l1).abs() / l1.abs())}
    errors["token_losses"] = float((t2 - t1).abs().max() / t1.abs().max())
    for name in g1:
        errors[name] = float((g2[name] - g1[name]).abs().max() / g1[name].abs().max().clamp_min(1e-30))
    if rank == 0:
        torch.save(errors, result_file)


def tp2_checkpointing_modes_match(rank: int, world: int, result_file: str) -> None:
    """TP=2 without sequence parallelism, DropPath on: selective and full checkpointing against no checkpointing
    (loss, token losses, every gathered gradient), relative errors to rank 0's file. Selective checkpointing saves
    the row-parallel matmul outputs that megatron-core then all-reduces in place (spec.RowLinear keeps a copy)."""
    from megatron_genlip.parallel import rng

    batch = packed_batch()
    state.reinitialize(2)
    results = {}
    for mode in ("none", "selective", "full"):
        model = build_model(small_model_config(drop_path_rate=0.3), 2, seed=0).train()
        model.activation_checkpointing = mode
        rng.model_parallel_seed(11, dp_rank=0)
        out = model(batch)
        out.loss.backward()
        results[mode] = (out.loss.detach(), out.token_losses.detach(), full_gradients(model))
    errors = {}
    l0, t0, g0 = results["none"]
    for mode in ("selective", "full"):
        loss, tok, grads = results[mode]
        errors[f"{mode}/loss"] = float((loss - l0).abs() / l0.abs())
        errors[f"{mode}/token_losses"] = float((tok - t0).abs().max() / t0.abs().max())
        errors[f"{mode}/grads"] = max(float((grads[n] - g0[n]).abs().max() / g0[n].abs().max().clamp_min(1e-30))
                                      for n in g0)
    if rank == 0:
        torch.save(errors, result_file)
