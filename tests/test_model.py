"""GenLIP model behaviour against GENLIP_SPEC.md §2 (fp32, CPU). Tolerances are stated per test."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_image, small_model_config
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import build_sample
from megatron_genlip.hf.keys import from_hf, to_hf
from megatron_genlip.inference.generate import generate_caption, image_features
from megatron_genlip.model.genlip import build_model
from megatron_genlip.model.layers import GatedSelfAttention
from megatron_genlip.model.masks import prefix_lm_mask, sdpa_mask
from megatron_genlip.model.spec import LOCAL_SPEC, parallel_config
from megatron_genlip.parallel import state
from reference_genlip import reference_logits, reference_mask

CAPTIONS = ["a red circle at the top left.", "two blue squares, one on the left and one on the right.",
            "a small green triangle in the center of the image."]


def make_samples(tok, grids=((3, 4), (2, 2), (4, 3)), captions=CAPTIONS):
    return [build_sample(tok, random_image(g, i), g, c) for i, (g, c) in enumerate(zip(grids, captions))]


@pytest.fixture(scope="module")
def model():
    return build_model(small_model_config(), seed=0).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_mask_rule_matches_loop_reference(qwen_tokenizer):
    samples = make_samples(qwen_tokenizer)
    b = collate_batch([samples], sum(len(s) for s in samples) + 5)
    fast = prefix_lm_mask(b["sample_ids"], b["token_kinds"])[0]
    slow = reference_mask(b["sample_ids"][0].tolist(), b["token_kinds"][0].tolist())
    assert torch.equal(fast, slow)
    # padding sees nothing and is seen by nobody; sdpa's variant only adds the padding diagonal
    pad = b["sample_ids"][0] < 0
    assert not fast[pad].any() and not fast[:, pad].any()
    diff = sdpa_mask(b["sample_ids"], b["token_kinds"])[0, 0] ^ fast
    assert torch.equal(diff, torch.diag(pad))


def test_trainer_logits_equal_independent_reference(model, qwen_tokenizer):
    """Whole forward vs the loop-based spec implementation on §6 keys: rel err <= 1e-5 (fp32)."""
    samples = make_samples(qwen_tokenizer)
    b = collate_batch([samples], sum(len(s) for s in samples) + 7)
    with torch.no_grad():
        ours = model.logits(b)[0]
    hf = to_hf(model.state_dict())
    row = {k: v[0] for k, v in b.items() if k != "patches"} | {"patches": b["patches"]}
    ref = reference_logits(hf, model.cfg, row)
    real = b["sample_ids"][0] >= 0
    assert rel_err(ours[real], ref[real]) <= 1e-5


def test_hf_key_round_trip(model):
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf = to_hf(sd)
    assert hf["visual.layers.0.self_attn.q_proj.weight"].shape == (96, 48)  # [2d, d]: query rows, then gate
    assert torch.equal(hf["visual.layers.0.self_attn.q_proj.weight"][:48], sd["layers.0.self_attn.q.weight"])
    assert torch.equal(hf["visual.layers.0.self_attn.q_proj.weight"][48:], sd["layers.0.self_attn.gate.weight"])
    back = from_hf(hf)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_zero_gate_is_half_of_ungated():
    """Gate weights and bias 0 -> sigmoid = 0.5 everywhere: gated output = 0.5 x ungated (rel err <= 1e-6)."""
    state.ensure_initialized()
    torch.manual_seed(0)
    cfg = small_model_config()
    pc = parallel_config(cfg)
    gated = GatedSelfAttention(cfg, LOCAL_SPEC, pc, state.tensor_parallel_group(), 0)
    plain = GatedSelfAttention(small_model_config(gated_attention=False), LOCAL_SPEC, pc,
                               state.tensor_parallel_group(), 0)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if ".gate." not in k and
                           not k.startswith("gate.")}, strict=True)
    with torch.no_grad():
        gated.gate.weight.zero_()
        gated.gate.bias.zero_()
    L, B = 10, 2
    x = torch.randn(L, B, cfg.hidden_size)
    cos, sin = torch.ones(B, L, cfg.head_dim), torch.zeros(B, L, cfg.head_dim)
    mask = torch.ones(1, 1, L, L, dtype=torch.bool)
    # compare before the (linear, biased) output projection: o(0.5 a) = 0.5 o(a) + 0.5 b
    with torch.no_grad():
        diff = gated(x, cos, sin, mask) - gated.o.bias
        ref = 0.5 * (plain(x, cos, sin, mask) - plain.o.bias)
    assert rel_err(diff, ref) <= 1e-6


def test_image_outputs_do_not_depend_on_text(model, qwen_tokenizer):
    a = build_sample(qwen_tokenizer, random_image((3, 3), 1), (3, 3), "a red circle.")
    b = build_sample(qwen_tokenizer, random_image((3, 3), 1), (3, 3), "three yellow stars in a row at the bottom.")
    with torch.no_grad():
        ha = model.final_hidden(collate_batch([[a]], 64))[0, :9]
        hb = model.final_hidden(collate_batch([[b]], 64))[0, :9]
    assert torch.equal(ha, hb)


def test_earlier_text_does_not_depend_on_later_text(model, qwen_tokenizer):
    img = random_image((2, 3), 5)
    a = build_sample(qwen_tokenizer, img, (2, 3), "a red circle on the left and a blue square.")
    b = build_sample(qwen_tokenizer, img, (2, 3), "a red circle on the left and two green stars.")
    common = next(i for i in range(len(a)) if a.input_ids[i] != b.input_ids[i])
    assert common > 6 + 8  # image + prompt + a shared caption prefix
    with torch.no_grad():
        ha = model.final_hidden(collate_batch([[a]], 64))[0, :common]
        hb = model.final_hidden(collate_batch([[b]], 64))[0, :common]
        assert not torch.equal(model.final_hidden(collate_batch([[a]], 64))[0, common],
                               model.final_hidden(collate_batch([[b]], 64))[0, common])
    assert torch.equal(ha, hb)


def test_packed_sample_loss_equals_loss_alone(model, qwen_tokenizer):
    """Each sample's loss inside a packed row equals its loss run alone: rel err <= 1e-6."""
    samples = make_samples(qwen_tokenizer)
    packed = collate_batch([samples], 200)
    with torch.no_grad():
        out = model(packed)
        for i, s in enumerate(samples):
            alone = model(collate_batch([[s]], len(s)))
            in_row = out.token_losses[out.token_sample_ids == i].mean()
            assert rel_err(in_row, alone.loss) <= 1e-6
            assert (out.token_sample_ids == i).sum() == alone.num_tokens
    # token mean over the micro-batch (§2.9)
    assert math.isclose(float(out.loss), float(out.token_losses.mean()), rel_tol=1e-7)


def test_labelled_positions_and_cross_sample_pairs(model, qwen_tokenizer):
    samples = make_samples(qwen_tokenizer)
    packed = collate_batch([samples], 200)
    out = model(packed)
    caption_tokens = [len(qwen_tokenizer.encode(c)) + 2 for c in CAPTIONS]  # caption + <|im_end|> + "\n"
    assert out.num_tokens == sum(caption_tokens)
    # the last token of sample k never predicts the first token of sample k+1 (an image slot)
    ends = torch.cumsum(torch.tensor([len(s) for s in samples]), 0) - 1
    targets_at_end = packed["labels"][0, ends[:-1] + 1]
    assert (targets_at_end == -100).all()
    assert (out.token_sample_ids >= 0).all()


def test_padding_and_image_slots_have_no_label(qwen_tokenizer):
    s = build_sample(qwen_tokenizer, random_image((2, 2), 0), (2, 2), "a red circle.")
    prompt = len(qwen_tokenizer.encode("Describe the image in detail."))
    assert (s.labels[: 4 + prompt] == -100).all()
    cap = qwen_tokenizer.encode("a red circle.")
    assert s.labels[4 + prompt:].tolist() == cap + [151645, 198]
    assert s.input_ids[:4].tolist() == [0] * 4


def test_init_statistics():
    """§2.10: xavier on q/k/v/o (q_proj fan_out 2d), N(0, 0.02) on SwiGLU, text modules; stds within 3%."""
    d, f = 256, 704
    m = build_model(small_model_config(hidden_size=d, ffn_hidden_size=f, text_embed_dim=192, num_layers=1,
                                       vocab_size=4096), seed=0)
    blk = m.layers[0]
    checks = {
        blk.self_attn.q.weight: math.sqrt(2 / (3 * d)), blk.self_attn.gate.weight: math.sqrt(2 / (3 * d)),
        blk.self_attn.k.weight: math.sqrt(1 / d), blk.self_attn.o.weight: math.sqrt(1 / d),
        blk.mlp.fc1.weight: 0.02, blk.mlp.gate_fc.weight: 0.02, blk.mlp.fc2.weight: 0.02,
        m.embeddings.weight: 0.02, m.lm_head.weight: 0.02, m.in_proj.weight: 0.02, m.proj.weight: 0.02,
        m.vision_embeddings.patch_embedding.weight: 0.02,
    }
    for p, std in checks.items():
        p = p.detach()
        assert abs(float(p.std()) / std - 1) < 0.03, (p.shape, float(p.std()), std)
        assert abs(float(p.mean())) < 0.1 * std
    assert float(blk.self_attn.q.weight.abs().max()) <= math.sqrt(6 / (3 * d))  # uniform bound of xavier
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0 or "layer_norm" in name or "ln_post" in name, name
    assert torch.all(blk.layer_scale1.lambda1 == 0.1) and torch.all(blk.layer_scale2.lambda1 == 0.1)
    assert torch.all(blk.layer_norm1.weight == 1) and torch.all(blk.layer_norm1.bias == 0)


def test_same_seed_same_weights():
    a = build_model(small_model_config(), seed=3).state_dict()
    b = build_model(small_model_config(), seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("_extra_state"))


def test_kv_cache_generation_equals_recomputation(model, qwen_tokenizer):
    img = random_image((3, 4), 9)
    cached = generate_caption(model, qwen_tokenizer, img, (3, 4), max_new_tokens=12, use_cache=True)
    full = generate_caption(model, qwen_tokenizer, img, (3, 4), max_new_tokens=12, use_cache=False)
    assert len(cached) == 12 and cached == full


def test_image_features_are_ln_post_of_image_only_run(model, qwen_tokenizer):
    img = random_image((3, 3), 4)
    feats = image_features(model, img, (3, 3))
    assert feats.shape == (9, 48)
    # image tokens see only image tokens, so the packed training run gives the same ln_post output
    s = build_sample(qwen_tokenizer, img, (3, 3), "a red circle.")
    with torch.no_grad():
        h = model.final_hidden(collate_batch([[s]], 40))[0, :9]
    assert rel_err(feats, h) <= 1e-6


def test_drop_path_drops_whole_rows():
    m = build_model(small_model_config(drop_path_rate=0.5), seed=0).train()
    dp = m.layers[0].drop_path
    x = torch.ones(7, 64, 4)  # [L, B, d]
    torch.manual_seed(1)
    y = dp(x)
    per_row = y[:, :, 0].T  # [B, L]
    assert set(per_row.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_row == per_row[:, :1])  # a row is kept or dropped as a whole
    assert 10 < int((per_row[:, 0] == 0).sum()) < 54
    assert torch.equal(dp.eval()(x), x)
