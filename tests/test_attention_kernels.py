"""FlexAttention with the prefix-LM BlockMask against the dense SDPA reference (GENLIP_SPEC.md §2.7), fp32 CPU.

On CPU flex_attention runs eagerly (materialised scores, no tile skipping), so the tile structure of the
BlockMask is checked separately against the dense mask.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from conftest import random_image, small_model_config
from megatron_genlip.batch import KIND_IMAGE, KIND_PAD, KIND_TEXT
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import build_sample
from megatron_genlip.inference.generate import generate_caption, image_features
from megatron_genlip.model.attention import BLOCK_SIZE, FlexAttention, SdpaAttention, flex_block_mask
from megatron_genlip.model.genlip import build_model
from megatron_genlip.model.masks import sdpa_mask
from megatron_genlip.model.spec import get_layer_spec
from megatron_genlip.model.stages import BlockStage
from megatron_genlip.parallel import state

TOL = 1e-5  # relative (max abs error / max abs reference), fp32

# samples as (image grid, text tokens); rows are padded to the given length
STAGE1 = ([((7, 7), 20), ((7, 7), 31), ((7, 7), 12), ((7, 7), 25), ((7, 7), 18)],
          [((7, 7), 40), ((7, 7), 9), ((7, 7), 27)])
STAGE2 = ([((4, 9), 30), ((12, 5), 14), ((16, 16), 41)],
          [((6, 6), 7), ((3, 13), 60), ((9, 4), 22), ((2, 2), 5)])


def packed_rows(rows, length):
    """sample_ids / token_kinds [B, length] for rows of (grid, n_text) samples, padding at the end."""
    sample_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    kinds = torch.full((len(rows), length), KIND_PAD, dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for s, ((gh, gw), n_text) in enumerate(row):
            n_img = gh * gw
            sample_ids[b, pos:pos + n_img + n_text] = s
            kinds[b, pos:pos + n_img] = KIND_IMAGE
            kinds[b, pos + n_img:pos + n_img + n_text] = KIND_TEXT
            pos += n_img + n_text
        assert pos <= length
    return sample_ids, kinds


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_kernel(kernel, mask, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = kernel(q, k, v, mask)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("rows, length", [(STAGE1, 430), (STAGE2, 700)], ids=["stage1-square", "stage2-mixed"])
def test_flex_equals_dense_reference_outputs_and_grads(rows, length):
    sample_ids, kinds = packed_rows(rows, length)
    assert (sample_ids < 0).any(), "the rows must contain padding"
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(len(rows), 3, length, 16, generator=g) for _ in range(4))
    ref = run_kernel(SdpaAttention(), sdpa_mask(sample_ids, kinds), q, k, v, grad_out)
    flex = FlexAttention()
    got = run_kernel(flex, flex.build_mask(sample_ids, kinds), q, k, v, grad_out)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all(), f"{name}: non-finite values (padding rows must not give NaN)"
        err = rel_err(a, b)
        assert err <= TOL, f"{name}: flex vs dense relative error {err:.2e} > {TOL:.0e}"


@pytest.mark.parametrize("rows, length", [(STAGE1, 430), (STAGE2, 700)], ids=["stage1-square", "stage2-mixed"])
def test_block_mask_tiles_follow_the_dense_mask(rows, length):
    """Non-empty tiles = tiles with an allowed entry; 'full' tiles (mask_mod skipped on GPU) = all allowed."""
    sample_ids, kinds = packed_rows(rows, length)
    bm = flex_block_mask(sample_ids, kinds)
    n = -(-length // BLOCK_SIZE)
    dense = torch.zeros(len(rows), n * BLOCK_SIZE, n * BLOCK_SIZE, dtype=torch.bool)
    dense[:, :length, :length] = sdpa_mask(sample_ids, kinds)[:, 0]
    tiles = dense.view(len(rows), n, BLOCK_SIZE, n, BLOCK_SIZE)
    any_allowed, all_allowed = tiles.any(4).any(2), tiles.all(4).all(2)
    assert torch.equal(bm.to_dense()[:, 0].bool(), any_allowed)
    full = torch.zeros_like(any_allowed)
    for b in range(len(rows)):
        for i in range(n):
            full[b, i, bm.full_kv_indices[b, 0, i, :bm.full_kv_num_blocks[b, 0, i]]] = True
    assert torch.equal(full, all_allowed)
    assert not any_allowed.all(), "cross-sample tiles must be skipped"


def test_broken_masks_are_detected():
    """The comparison above can fail: masks that break §2.7 give errors far above the tolerance."""
    sample_ids, kinds = packed_rows(STAGE1, 430)
    B, L = sample_ids.shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, 3, L, 16, generator=g) for _ in range(3))
    ref = SdpaAttention()(q, k, v, sdpa_mask(sample_ids, kinds))
    real = sample_ids >= 0

    def causal_in_sample(b, h, qi, ki):  # forgets the bidirectional image prefix
        return ((sample_ids[b, qi] == sample_ids[b, ki]) & (qi >= ki)) | (qi == ki)

    def prefix_lm_across_samples(b, h, qi, ki):  # forgets the sample boundaries
        return (qi >= ki) | ((kinds[b, qi] == KIND_IMAGE) & (kinds[b, ki] == KIND_IMAGE))

    for name, mask_mod in (("causal-only", causal_in_sample), ("no sample boundaries", prefix_lm_across_samples)):
        broken = FlexAttention()(q, k, v, create_block_mask(mask_mod, B, None, L, L, device="cpu"))
        err = rel_err(broken.transpose(1, 2)[real], ref.transpose(1, 2)[real])  # real (non-padding) queries
        assert err > 100 * TOL, f"{name} mask not detected: relative error {err:.2e}"


@pytest.fixture(scope="module")
def packed_batch(qwen_tokenizer):
    caps = ["a red circle at the top left.", "two blue squares.", "a small green triangle in the center.",
            "three yellow stars in a row.", "one big square."]
    grids = [(3, 4), (2, 2), (4, 3), (5, 5), (2, 6)]
    samples = [build_sample(qwen_tokenizer, random_image(g, i), g, c) for i, (g, c) in enumerate(zip(grids, caps))]
    return collate_batch([samples[:2], samples[2:]], 150)


def test_model_forward_backward_flex_equals_sdpa(packed_batch):
    results = {}
    for attention in ("sdpa", "flex"):
        model = build_model(small_model_config(attention=attention), seed=0).train()
        assert get_layer_spec(model.cfg).attention.name == attention
        out = model(packed_batch)
        out.loss.backward()
        results[attention] = out, {n: p.grad for n, p in model.named_parameters()}
    (ref, ref_grads), (got, got_grads) = results["sdpa"], results["flex"]
    err = rel_err(got.token_losses.detach(), ref.token_losses.detach())
    assert err <= TOL, f"token losses: flex vs sdpa relative error {err:.2e} > {TOL:.0e}"
    errors = {n: rel_err(got_grads[n], g) for n, g in ref_grads.items()}
    assert max(errors.values()) <= TOL, f"gradients flex vs sdpa above {TOL:.0e}: " + str(
        {n: f"{e:.1e}" for n, e in errors.items() if e > TOL})


def test_pipeline_block_stage_builds_the_kernel_mask(packed_batch):
    """BlockStage (pipeline parallel) builds its own mask from the ids it receives: flex == sdpa."""
    b = packed_batch
    x = torch.randn(b["input_ids"].shape[1], b["input_ids"].shape[0], 48, generator=torch.Generator().manual_seed(2))
    outs = {}
    for attention in ("sdpa", "flex"):
        stage = BlockStage(small_model_config(attention=attention), state.tensor_parallel_group(), 0, 0).eval()
        outs[attention] = stage((x, b["positions"], b["sample_ids"], b["token_kinds"], b["labels"]))[0]
    err = rel_err(outs["flex"], outs["sdpa"])
    assert err <= TOL, f"BlockStage flex vs sdpa relative error {err:.2e} > {TOL:.0e}"


def test_fp8_region_is_entered_in_training_only(qwen_tokenizer, packed_batch):
    """model.fp8 with Transformer Engine: the blocks run inside the spec's FP8 region in training, and outside
    it in evaluation, feature extraction and decoding (TE's FP8 GEMMs need a multiple of 8 rows; a decoding step
    has one row per caption). The local backend has no region, so a recording one stands in for TE's here."""
    import contextlib

    model = build_model(small_model_config(), seed=0)
    entered = []

    @contextlib.contextmanager
    def region():
        entered.append("region")
        yield

    model.fp8_region = region
    model.train()(packed_batch).loss.backward()
    assert entered == ["region"]  # one region around the block loop
    entered.clear()
    model.eval()
    img = random_image((3, 4), 9)
    generate_caption(model, qwen_tokenizer, img, (3, 4), max_new_tokens=3, use_cache=True)
    image_features(model, img, (3, 4))
    with torch.no_grad():
        model(packed_batch)
    assert entered == []
    # a pipeline stage's block opens its own region, under the same rule
    b = packed_batch
    stage = BlockStage(small_model_config(), state.tensor_parallel_group(), 0, 0)
    stage.fp8_region = region
    x = torch.randn(b["input_ids"].shape[1], b["input_ids"].shape[0], 48)
    inputs = (x, b["positions"], b["sample_ids"], b["token_kinds"], b["labels"])
    stage.eval()(inputs)
    assert entered == []
    stage.train()(inputs)
    assert entered == ["region"]


def test_generation_and_features_work_with_flex(qwen_tokenizer):
    """Cached decoding hands dense masks to the flex kernel (SDPA fallback); recomputation uses BlockMasks."""
    img = random_image((3, 4), 9)
    sdpa_model = build_model(small_model_config(), seed=0).eval()
    flex_model = build_model(small_model_config(attention="flex"), seed=0).eval()
    ref = generate_caption(sdpa_model, qwen_tokenizer, img, (3, 4), max_new_tokens=6)
    assert generate_caption(flex_model, qwen_tokenizer, img, (3, 4), max_new_tokens=6, use_cache=True) == ref
    assert generate_caption(flex_model, qwen_tokenizer, img, (3, 4), max_new_tokens=6, use_cache=False) == ref
    err = rel_err(image_features(flex_model, img, (3, 4)), image_features(sdpa_model, img, (3, 4)))
    assert err <= TOL, f"image features flex vs sdpa relative error {err:.2e}"
