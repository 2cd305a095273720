"""The LM-head loss: the reference path chunked (model.loss_chunk_size) gives the same loss and gradients as in one
pass, without keeping the [N_lab, V] logits for backward; the fused path (model.loss_impl=fused,
model/fused_loss.py) equals the reference path, keeps no vocabulary-wide tensor at all and is vocab-parallel under
TP. CPU; tolerances are stated beside the constants."""

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
# fused vs reference, bf16 model: both round the logits' gradient to bf16 before the head's two GEMMs; the fused path
# sums the weight gradient over chunks in fp32 (the reference in one bf16 GEMM), so they differ by bf16 rounding
TOL_BF16 = 2e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def batch():
    return packed_batch()


@pytest.fixture(scope="module")
def model():
    return build_model(small_model_config(), seed=0).train()


def loss_and_grads(model, batch, chunk: int, impl: str = "reference"):
    model.loss_chunk_size, model.loss_impl = chunk, impl
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


def saved_logit_rows(model, batch, chunk: int, impl: str = "reference") -> tuple[int, int]:
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
    model.loss_impl = impl
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_loss_equals_reference(batch, dtype):
    """model.loss_impl=fused against the reference one-pass loss: loss, per-token losses, every gradient, for
    chunks that do and do not divide N_lab and for no chunking."""
    model = build_model(small_model_config(), seed=0).train().to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    tol_loss, tol_grad = (TOL_LOSS, TOL_GRAD) if dtype == torch.float32 else (TOL_FP64, TOL_FP64)
    ref, ref_grads = loss_and_grads(model, batch, 0, "reference")
    n_lab = ref.num_tokens
    for chunk in (0, 7, n_lab - 1, n_lab + 5):
        got, grads = loss_and_grads(model, batch, chunk, "fused")
        assert torch.equal(got.token_rows, ref.token_rows) and torch.equal(got.token_sample_ids, ref.token_sample_ids)
        assert not got.token_losses.requires_grad
        for name, a, b in (("token losses", got.token_losses, ref.token_losses), ("loss", got.loss, ref.loss)):
            err = rel_err(a, b)
            assert err <= tol_loss, f"{dtype} chunk {chunk}: {name} relative error {err:.2e} > {tol_loss:.0e}"
        errors = {n: rel_err(grads[n], g) for n, g in ref_grads.items()}
        assert max(errors.values()) <= tol_grad, f"{dtype} chunk {chunk}: gradients above {tol_grad:.0e}: " + str(
            {n: f"{e:.1e}" for n, e in errors.items() if e > tol_grad})


def test_fused_loss_bf16_and_a_scaled_backward(batch):
    """bf16 model: fused vs reference within bf16 rounding; backward of 3 x loss (a loss scale) gives 3 x the
    gradients (the precomputed gradients are scaled by the incoming one)."""
    model = build_model(small_model_config(), seed=0).train().to(torch.bfloat16)
    ref, ref_grads = loss_and_grads(model, batch, 0, "reference")
    got, grads = loss_and_grads(model, batch, 16, "fused")
    assert rel_err(got.loss.float(), ref.loss.float()) <= TOL_BF16
    errors = {n: rel_err(grads[n].float(), g.float()) for n, g in ref_grads.items()}
    assert max(errors.values()) <= TOL_BF16, {n: f"{e:.1e}" for n, e in errors.items() if e > TOL_BF16}
    model.zero_grad(set_to_none=True)
    (4 * model(batch).loss).backward()  # a power of two: exact in bf16
    assert all(torch.equal(p.grad, 4 * grads[n]) for n, p in model.named_parameters())


def test_fused_loss_keeps_no_vocabulary_wide_tensor(model, batch):
    rows, n_lab = saved_logit_rows(model, batch, 0, "fused")
    assert n_lab > 16 and rows == 0, f"the fused loss kept {rows} rows of [.., V] tensors for backward"


def test_fused_loss_without_labelled_positions(model, batch):
    """A micro-batch without any label: loss 0, and backward gives zero gradients (not an error, not NaN)."""
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    for impl in ("reference", "fused"):
        model.loss_chunk_size, model.loss_impl = 0, impl
        model.zero_grad(set_to_none=True)
        out = model(empty)
        out.loss.backward()
        assert out.num_tokens == 0 and float(out.loss) == 0.0
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(torch.count_nonzero(g) == 0 for g in grads)
        assert impl == "reference" or len(grads) == len(list(model.parameters()))  # the head got its zero gradient


@pytest.mark.slow
def test_tp2_fused_matches_tp1_reference(tmp_path):
    """The fused loss's vocabulary-parallel reductions (max, sum of exponentials, target logit, hidden gradient)."""
    out = tmp_path / "errors.pt"
    run_ranks(2, "loss_cases", "tp2_chunked_matches_tp1_plain", 5, str(out), "fused")
    errors = torch.load(out)
    assert errors.pop("num_tokens") == 0.0
    assert len(errors) > 20
    bad = {k: v for k, v in errors.items() if not v <= TOL_TP}
    assert not bad, f"TP=2 fused vs TP=1 reference relative errors above {TOL_TP:.0e}: {bad}"


def test_fused_loss_without_autograd_computes_only_the_losses(model, batch):
    """Under torch.no_grad (evaluation) the fused head computes the per-token losses alone (no gradient GEMMs or
    buffers), equal to the training forward's."""
    from megatron_genlip.model import fused_loss

    model.loss_chunk_size, model.loss_impl = 7, "fused"
    with_grad = model(batch)
    calls = []
    original = fused_loss._FusedLinearCrossEntropy.apply
    fused_loss._FusedLinearCrossEntropy.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            without = model(batch)
    finally:
        fused_loss._FusedLinearCrossEntropy.apply = original
    assert calls == [] and torch.equal(without.token_losses, with_grad.token_losses.detach())
    assert torch.equal(without.loss, with_grad.loss.detach())
