"""model.attention=varlen: the prefix-LM rule as two FlashAttention-2 variable-length calls (issue #23).

On CPU each call runs as SDPA with the dense block-diagonal mask of the SAME ``cu_seqlens`` the CUDA kernel gets,
so these tests check the decomposition (segments, which call each token takes its output from, the layout check)
exactly; the CUDA call itself (``torch.nn.attention.varlen.varlen_attn``) runs here on meta tensors through its
fake kernel (arguments, shapes, autograd wiring) and on a GPU in the CUDA-only test and ``benchmarks/gpu_run.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.varlen  # noqa: F401  (registers torch.ops.torch_attn)

from conftest import small_model_config
from megatron_genlip.batch import KIND_IMAGE, KIND_PAD, KIND_TEXT
from megatron_genlip.model import recompute
from megatron_genlip.model.attention import (FlexAttention, SdpaAttention, VarlenAttention, VarlenLayoutError,
                                             VarlenMask, varlen_mask)
from megatron_genlip.model.genlip import build_model
from megatron_genlip.model.masks import sdpa_mask
from test_attention_kernels import STAGE1, STAGE2, packed_batch, packed_rows, rel_err  # noqa: F401 (fixture)

TOL64 = 1e-12  # float64: the decomposition is exact, only summation order differs
TOL = 1e-5  # fp32 model, relative


def rows_from(samples_per_row, length):
    """sample_ids / token_kinds of rows given as lists of (image tokens, text tokens), padding at the end."""
    sid = torch.full((len(samples_per_row), length), -1)
    kinds = torch.full((len(samples_per_row), length), KIND_PAD)
    for b, row in enumerate(samples_per_row):
        pos = 0
        for s, (p, c) in enumerate(row):
            sid[b, pos:pos + p + c] = s
            kinds[b, pos:pos + p] = KIND_IMAGE
            kinds[b, pos + p:pos + p + c] = KIND_TEXT
            pos += p + c
    return sid, kinds


def test_segments_of_a_hand_packed_batch():
    # row 0: (5 img, 3 txt), (4, 6), 2 padding; row 1: (3 img, 0 txt), (0 img, 4 txt), (6, 3), 4 padding
    sid, kinds = rows_from([[(5, 3), (4, 6)], [(3, 0), (0, 4), (6, 3)]], 20)
    m = varlen_mask(sid, kinds)
    # query segments of both calls = runs of one kind inside a sample (a padding run is one), each text run followed
    # by an empty gap segment
    q = [0, 5, 8, 8, 12, 18, 18, 20, 23, 27, 27, 33, 36, 36]
    # call A's key segment of each: the run itself for image and padding runs, empty for a text run (text queries
    # take call B's output), the text run's keys for its gap (the segments must cover every key)
    ka = [0, 5, 5, 8, 12, 12, 18, 20, 23, 23, 27, 33, 33, 36]
    # call B's: empty for an image run (its queries see nothing there), the sample up to the run's end for a text
    # run, empty for a gap, the run itself for padding; the image-only sample (20-23) keeps its own keys (its image
    # queries take call A's output anyway)
    kb = [0, 0, 8, 8, 8, 18, 18, 20, 23, 27, 27, 27, 36, 36]
    assert m.segments == len(q)
    assert m.cu_q.dtype == m.cu_ka.dtype == m.cu_kb.dtype == torch.int32
    assert m.cu_q.tolist() == q + [40] * (64 + 1 - len(q)), "power-of-two capacity, zero-length tail segments"
    assert m.cu_ka.tolist() == ka + [40] * (64 + 1 - len(ka))
    assert m.cu_kb.tolist() == kb + [40] * (64 + 1 - len(kb))
    lengths = [torch.diff(cu)[:m.segments].tolist() for cu in (m.cu_q, m.cu_ka, m.cu_kb)]
    # (queries, call-A keys, call-B keys) per segment: no call computes a tile whose output the other call's
    # tokens take, except the image-only sample's own keys in call B
    assert list(zip(*lengths)) == [(5, 5, 0), (3, 0, 8), (0, 3, 0), (4, 4, 0), (6, 0, 10), (0, 6, 0), (2, 2, 2),
                                   (3, 3, 3), (4, 0, 4), (0, 4, 0), (6, 6, 0), (3, 0, 9), (0, 3, 0), (4, 4, 4)]
    assert (m.max_q, m.max_kb) == (128, 128), "longest run (6) and sample (10): at least 128"
    take_a = (kinds == KIND_IMAGE) | (sid < 0)
    assert torch.equal(m.take_a.view(2, 20), take_a)


def test_capacity_and_longest_segment_buckets():
    sid, kinds = rows_from([[(200, 130)] * 3, [(150, 20)] * 2], 1024)
    m = varlen_mask(sid, kinds)
    # row 1's 684-token padding tail is cut into 128-token segments: it sets neither longest segment
    assert m.segments == 3 * 3 + 1 + 2 * 3 + 6, "image, text and gap segments per sample, padding chunks"
    pad = m.cu_q[m.segments - 6:m.segments + 1].tolist()
    assert pad == [1024 + 340 + 128 * i for i in range(6)] + [2048] and m.cu_kb[m.segments - 6:m.segments].tolist() \
        == pad[:-1], "each padding chunk is its own key segment in call B"
    assert m.cu_q.numel() == m.cu_ka.numel() == m.cu_kb.numel() == 64 + 1
    assert (m.max_q, m.max_kb) == (256, 512), "200-token images and 330-token samples, to powers of two"
    sid, kinds = rows_from([[(200, 130)] * 3] * 2 + [[(150, 20)] * 6] * 30, 1024)
    m = varlen_mask(sid, kinds)
    assert m.segments == 2 * 10 + 30 * 19
    assert m.cu_q.numel() == 1024 + 1, "590 segments, at least one per 64 tokens (512) -> 1024"
    assert (m.max_q, m.max_kb) == (256, 512)


def test_stage1_micro_batches_give_one_compiled_shape():
    """A new capacity or longest segment recompiles every compiled block: the recipe's stage-1 micro-batches (4 rows
    x 16,384 tokens of ~270-token samples, the cost model's packing) must all give the same three numbers."""
    from megatron_genlip.training.cost import stage1_batch

    shapes = set()
    for seed in range(6):
        b = stage1_batch(rows=4, seq_length=16384, vocab_size=64, buffer_size=1024, seed=seed)
        m = varlen_mask(b["sample_ids"], b["token_kinds"])
        shapes.add((m.cu_q.numel(), m.max_q, m.max_kb))
    assert shapes == {(1024 + 1, 256, 512)}, shapes


# image-only and text-only samples, a one-token caption, a row without padding
EDGES = ([((3, 3), 0), ((0, 0), 5), ((2, 2), 7)], [((4, 4), 1), ((1, 2), 14)])


@pytest.mark.parametrize("rows, length", [(STAGE1, 430), (STAGE2, 700), (EDGES, 33)],
                         ids=["stage1-square", "stage2-mixed", "edge-samples"])
def test_varlen_equals_dense_reference_on_real_tokens(rows, length):
    """Outputs and q/k/v gradients of every non-padding token equal the dense §2.7 mask's (float64)."""
    sid, kinds = packed_rows(rows, length)
    real = (sid >= 0)[:, None, :, None]
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(len(rows), 3, length, 16, generator=g, dtype=torch.float64) for _ in range(4))
    grad_out = grad_out * real  # padding carries no loss
    results = []
    for kernel, mask in ((SdpaAttention(), sdpa_mask(sid, kinds)), (VarlenAttention(), varlen_mask(sid, kinds))):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = kernel(*leaves, mask)
        out.backward(grad_out)
        assert torch.isfinite(out).all(), f"{kernel}: non-finite outputs (padding must not give NaN)"
        results.append([out * real] + [t.grad * real for t in leaves])
    for name, ref, got in zip(("output", "dq", "dk", "dv"), *results):
        err = rel_err(got, ref)
        assert err <= TOL64, f"{name}: varlen vs dense relative error {err:.2e} > {TOL64:.0e}"


def test_a_wrong_decomposition_is_detected():
    """The comparison above can fail: text taking call A's output (bidirectional text) is far off."""
    sid, kinds = packed_rows(STAGE1, 430)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(STAGE1), 3, 430, 16, generator=g, dtype=torch.float64) for _ in range(3))
    real = (sid >= 0)[:, None, :, None]
    ref = SdpaAttention()(q, k, v, sdpa_mask(sid, kinds)) * real
    good = varlen_mask(sid, kinds)
    assert rel_err(VarlenAttention()(q, k, v, good) * real, ref) <= TOL64
    wrong = VarlenMask(**{**good.__dict__, "take_a": torch.ones_like(good.take_a)})
    assert rel_err(VarlenAttention()(q, k, v, wrong) * real, ref) > 1e-2


def test_an_image_after_text_is_refused_naming_the_token():
    sid, kinds = rows_from([[(4, 3), (5, 2)]], 16)
    kinds[0, 5] = KIND_IMAGE  # an image token inside the first sample's text
    with pytest.raises(VarlenLayoutError, match=r"row 0, position 5 is an image token after text.*attention=flex"):
        varlen_mask(sid, kinds)


def test_the_cuda_call_on_meta_tensors():
    """The CUDA branch (torch's varlen_attn custom op, its fake kernel on meta): shapes and the backward op."""
    sid, kinds = packed_rows(STAGE1, 430)
    mask = varlen_mask(sid, kinds)
    meta = VarlenMask(**{**mask.__dict__, "cu_q": mask.cu_q.to("meta"), "cu_ka": mask.cu_ka.to("meta"),
                         "cu_kb": mask.cu_kb.to("meta"), "take_a": mask.take_a.to("meta")})
    q, k, v = (torch.empty(len(STAGE1), 3, 430, 72, device="meta", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    seen, causal = [], []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            if func is torch.ops.torch_attn._varlen_attn.default:  # (q, k, v, cu_q, cu_k, max_q, max_k, is_causal..)
                causal.append((args[3] is meta.cu_q, args[4] is (meta.cu_ka if not args[7] else meta.cu_kb),
                               (args[5], args[6]), args[7]))
            return func(*args, **(kwargs or {}))

    with Record():
        out = VarlenAttention()(q, k, v, meta)
        out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
    assert sum("torch_attn._varlen_attn.default" in s for s in seen) == 2, seen
    assert sum("_varlen_attn_backward" in s for s in seen) == 2
    # call A bidirectional, call B causal; both take the same query segments, each its own key segments
    assert causal == [(True, True, (mask.max_q, mask.max_q), False), (True, True, (mask.max_q, mask.max_kb), True)]
    assert torch.ops.torch_attn._varlen_attn.default in recompute.saved_ops(), "selective checkpointing keeps it"
    # and a compiled FlexAttention called from an eager block (tests/compile_cases.py counts its runs)
    assert torch.ops.higher_order.inductor_compiled_code in recompute.saved_ops()


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_model_with_varlen_equals_sdpa(packed_batch, checkpointing):
    """The tiny model: token losses and every parameter gradient equal the dense reference's (fp32)."""
    results = {}
    for attention in ("sdpa", "varlen"):
        model = build_model(small_model_config(attention=attention), seed=0).train()
        model.activation_checkpointing = checkpointing
        out = model(packed_batch)
        out.loss.backward()
        results[attention] = out, {n: p.grad for n, p in model.named_parameters()}
    (ref, ref_grads), (got, got_grads) = results["sdpa"], results["varlen"]
    err = rel_err(got.token_losses.detach(), ref.token_losses.detach())
    assert err <= TOL, f"token losses: varlen vs sdpa relative error {err:.2e} > {TOL:.0e}"
    errors = {n: rel_err(got_grads[n], g) for n, g in ref_grads.items()}
    assert max(errors.values()) <= TOL, {n: f"{e:.1e}" for n, e in errors.items() if e > TOL}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention-2 needs CUDA")
def test_varlen_equals_flex_on_cuda():
    sid, kinds = (t.cuda() for t in packed_rows(STAGE2, 700))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(len(STAGE2), 4, 700, 72, generator=g, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
    real = (sid >= 0)[:, None, :, None]
    grad_out = grad_out * real
    results = []
    for kernel in (FlexAttention(), VarlenAttention()):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = kernel(*leaves, kernel.build_mask(sid, kinds))
        out.backward(grad_out)
        results.append([(out * real).float()] + [(t.grad * real).float() for t in leaves])
    for name, ref, got in zip(("output", "dq", "dk", "dv"), *results):
        err = rel_err(got, ref)
        assert err <= 2e-2, f"{name}: varlen vs flex (bf16) relative error {err:.2e}"


def test_pipeline_block_stage_with_varlen(packed_batch):
    """BlockStage (pipeline parallel) builds its own varlen segments from the ids it receives: = sdpa (real tokens)."""
    from megatron_genlip.model.stages import BlockStage
    from megatron_genlip.parallel import state

    b = packed_batch
    x = torch.randn(b["input_ids"].shape[1], b["input_ids"].shape[0], 48, generator=torch.Generator().manual_seed(2))
    outs = {}
    for attention in ("sdpa", "varlen"):
        stage = BlockStage(small_model_config(attention=attention), state.tensor_parallel_group(), 0, 0).eval()
        outs[attention] = stage((x, b["positions"], b["sample_ids"], b["token_kinds"], b["labels"]))[0]
    real = (b["sample_ids"] >= 0).t()[:, :, None]  # [L, B, 1]
    err = rel_err(outs["varlen"] * real, outs["sdpa"] * real)
    assert err <= TOL, f"BlockStage varlen vs sdpa relative error {err:.2e} > {TOL:.0e}"
