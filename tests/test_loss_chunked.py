"""Chunked LM-head loss (model.loss_chunk_size): same loss and gradients as the one-pass loss, without ever
keeping the [N_lab, V] logits for backward. fp32 CPU; tolerances are stated in the assertions."""

from __future__ import annotations

import pytest
import torch

from conftest import small_model_config
from dist_harness import run_ranks
from megatron_genlip.model.genlip import build_model
from tp_cases import packed_batch

# relative errors (max abs error / max abs reference)
TOL_LOSS = 1e-6  # loss and per-token losses, fp32 (the chunks compute the same rows: measured 0)
TOL_GRAD = 1e-5  # gradients, fp32: BLAS sums the LM-head dgrad over V=151936 in another order when a chunk
                 # has few rows (measured up to 3.6e-6); in float64 the same comparison gives ~1e-15
TOL_FP64 = 1e-12  # everything, float64 model (megatron's cross-entropy itself runs in fp32 on both paths)
TOL_TP = 1e-5  # TP=2 vs TP=1, fp32 (the tensor-parallel tests' tolerance)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def batch():
    return packed_batch()


@pytest.fixture(scope="module")
def model():
    return build_model(small_model_config(), seed=0).train()


def loss_and_grads(model, batch, chunk: int):
    model.loss_chunk_size = chunk
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_loss_equals_one_pass(batch, dtype):
    model = build_model(small_model_config(), seed=0).train().to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    tol_loss, tol_grad = (TOL_LOSS, TOL_GRAD) if dtype == torch.float32 else (TOL_FP64, TOL_FP64)
    ref, ref_grads = loss_and_grads(model, batch, 0)
    n_lab = ref.num_tokens
    assert n_lab % 7 and n_lab > 16, f"want a chunk size that does not divide N_lab={n_lab}"
    for chunk in (7, 16, n_lab - 1, n_lab + 5):
        got, grads = loss_and_grads(model, batch, chunk)
        assert torch.equal(got.token_rows, ref.token_rows) and torch.equal(got.token_sample_ids, ref.token_sample_ids)
        err = rel_err(got.token_losses, ref.token_losses)
        assert err <= tol_loss, f"{dtype} chunk {chunk}: token losses relative error {err:.2e} > {tol_loss:.0e}"
        err = rel_err(got.loss, ref.loss)
        assert err <= tol_loss, f"{dtype} chunk {chunk}: loss relative error {err:.2e} > {tol_loss:.0e}"
        errors = {n: rel_err(grads[n], g) for n, g in ref_grads.items()}
        assert max(errors.values()) <= tol_grad, f"{dtype} chunk {chunk}: gradients above {tol_grad:.0e}: " + str(
            {n: f"{e:.1e}" for n, e in errors.items() if e > tol_grad})


def saved_logit_rows(model, batch, chunk: int) -> tuple[int, int]:
    """Total rows of vocab-wide ([..., V]) tensors autograd keeps for backward after the forward, and N_lab.

    Chunks recomputed in backward keep nothing (the checkpoint saves only its inputs, through its own hooks)."""
    vocab = model.cfg.vocab_size
    rows = 0

    def pack(t):
        nonlocal rows
        if t.dim() >= 1 and t.shape[-1] == vocab and not isinstance(t, torch.nn.Parameter):
            rows += t.numel() // vocab
        return t

    model.loss_chunk_size = chunk
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    out.loss.backward()
    return rows, out.num_tokens


def test_chunked_loss_keeps_no_full_logits(model, batch):
    plain, n_lab = saved_logit_rows(model, batch, 0)
    chunked, _ = saved_logit_rows(model, batch, 7)
    assert plain >= n_lab, f"the one-pass loss keeps [N_lab={n_lab}, V] logits (saw {plain} rows)"
    assert chunked <= 7, f"chunk 7 kept {chunked} rows of vocab-wide tensors for backward (at most 7 allowed)"


@pytest.mark.slow
def test_tp2_chunked_matches_tp1(tmp_path):
    out = tmp_path / "errors.pt"
    run_ranks(2, "loss_cases", "tp2_chunked_matches_tp1_plain", 5, str(out))
    errors = torch.load(out)
    assert errors.pop("num_tokens") == 0.0
    assert len(errors) > 20  # loss, token losses and every parameter
    bad = {k: v for k, v in errors.items() if not v <= TOL_TP}
    assert not bad, f"TP=2 chunked vs TP=1 relative errors above {TOL_TP:.0e}: {bad}"
