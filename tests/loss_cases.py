"""Rank bodies of the chunked-loss tests (see dist_harness.run_ranks)."""

from __future__ import annotations

import torch

from conftest import small_model_config
from megatron_genlip.model.genlip import build_model
from megatron_genlip.parallel import state
from tp_cases import full_gradients, packed_batch


def tp2_chunked_matches_tp1_plain(rank: int, world: int, chunk: int, result_file: str, impl: str = "reference") -> None:
    """TP=2 with the chunked vocab-parallel loss (``model.loss_impl`` = ``impl``) vs TP=1 with the one-pass reference
    loss: relative errors to rank 0's file."""
    batch = packed_batch()
    results = {}
    for tp, chunk_size, loss_impl in ((2, chunk, impl), (1, 0, "reference")):
        state.reinitialize(tp)
        model = build_model(small_model_config(loss_chunk_size=chunk_size, loss_impl=loss_impl), tp, seed=0).train()
        out = model(batch)
        out.loss.backward()
        results[tp] = (out.loss.detach(), out.token_losses.detach(), full_gradients(model))
    (l2, t2, g2), (l1, t1, g1) = results[2], results[1]
    errors = {"loss": float((l2 - l1).abs() / l1.abs()),
              "token_losses": float((t2 - t1).abs().max() / t1.abs().max()),
              "num_tokens": float(t2.numel() != t1.numel())}
    for name in g1:
        errors[name] = float((g2[name] - g1[name]).abs().max() / g1[name].abs().max().clamp_min(1e-30))
    if rank == 0:
        torch.save(errors, result_file)
