"""The evaluator registry (megatron_genlip/evaluation): config specs, data readers, each evaluator type on real
images (scikit-learn's digits), caption scores against pycocoevalcap, zero-shot scores against the trainer's
loss, batched captions against one-at-a-time captions, and data-parallel splitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_image
from eval_cases import (DIGIT_NAMES, digits, png_bytes, small_eval_config, write_captioned_shards,
                        write_digit_folder, write_digit_shards)
from megatron_genlip.config import ConfigError
from megatron_genlip.evaluation import (EVALUATOR_TYPES, EvalContext, EvalDataError, EvaluatorSpec, build_evaluator,
                                        check_layout, default_specs, extract_features, parse_specs)
from megatron_genlip.evaluation.base import sample_order as ev_sample
from megatron_genlip.evaluation.data import Preprocess, open_labelled
from megatron_genlip.evaluation.linear_probe import fewshot_probe, full_probe
from megatron_genlip.evaluation.scorers import bleu, caption_scores, cider_d, coco_tokenize
from megatron_genlip.evaluation.zero_shot import candidate_ids, score_candidates
from megatron_genlip.inference.generate import generate_caption, generate_captions
from megatron_genlip.model.genlip import build_model


# ----------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def digit_root(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"), per_class_train=20, per_class_val=6)


@pytest.fixture(scope="module")
def cfg():
    return small_eval_config()


@pytest.fixture(scope="module")
def model(cfg):
    return build_model(cfg.model, seed=0).eval()


def ctx_for(tokenizer, **kw) -> EvalContext:
    return EvalContext(device="cpu", tokenizer=tokenizer, prompt="Describe the image in detail.", seed=0, **kw)


def evaluator(cfg, tokenizer, type_, data=None, name=None, **options):
    spec = EvaluatorSpec.from_dict({"name": name or type_, "type": type_, "data": data, "options": options})
    return build_evaluator(spec, cfg, tokenizer)


# ----------------------------------------------------------------------------------------------------------
# specs


def test_spec_validation_names_the_field(cfg):
    spec = EvaluatorSpec.from_dict({"name": "fs", "type": "linear_probe", "interval": 50, "data": "/d",
                                    "options": {"shots": 5, "C_grid": [1, 10]}})
    assert (spec.interval, spec.options["shots"], spec.options["C_grid"]) == (50, 5, [1, 10])
    assert build_evaluator(spec, cfg).interval == 50
    assert build_evaluator(EvaluatorSpec.from_dict({"name": "v", "type": "validation_loss"}), cfg).interval == 100
    cases = [
        ({"name": "a", "type": "nope"}, "evaluation.a.type"),
        ({"name": "a", "type": "linear_probe", "options": {"shot": 5}}, "evaluation.a.options.shot"),
        ({"name": "a", "type": "linear_probe", "options": {"shots": "five"}}, "evaluation.a.options.shots"),
        ({"name": "a", "type": "linear_probe", "options": {"C_grid": [0]}}, "evaluation.a.options.C_grid"),
        ({"name": "a", "type": "zero_shot", "options": {"templates": ["no slot"]}}, "evaluation.a.options.templates"),
        ({"name": "a", "type": "captioning", "interval": -1}, "evaluation.a.interval"),
        ({"name": "a", "type": "captioning", "every": 3}, "evaluation.a.every"),
        ({"name": "a", "type": "captioning", "data": 3}, "evaluation.a.data"),
        ({"type": "captioning"}, ".name"),
    ]
    for entry, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            EvaluatorSpec.from_dict(entry)
    with pytest.raises(ConfigError, match=r"evaluation\.x\.name: used by two"):
        parse_specs([{"name": "x", "type": "captioning"}, {"name": "x", "type": "validation_loss"}])
    assert [s.name for s in parse_specs({"v": {"type": "validation_loss"}, "c": {"type": "captioning"}})] == ["v", "c"]


def test_pipeline_layout_names_the_evaluator(cfg):
    evs = [build_evaluator(s, cfg) for s in parse_specs([{"name": "val", "type": "validation_loss"},
                                                         {"name": "caps", "type": "captioning"}])]
    check_layout(evs[:1], pipeline_parallel=2)  # the validation loss runs through the pipeline engine
    with pytest.raises(ConfigError, match=r"evaluation\.caps \(type captioning\).*pipeline_parallel=2"):
        check_layout(evs, pipeline_parallel=2)
    check_layout(evs, pipeline_parallel=1)


def test_default_specs_are_todays_evaluation(cfg):
    assert default_specs(cfg) == []
    c = small_eval_config()
    c.data.valid_data = "/somewhere/val"
    assert [(s.name, s.type) for s in default_specs(c)] == [("val", "validation_loss"), ("captions", "captioning")]
    assert set(EVALUATOR_TYPES) == {"validation_loss", "captioning", "linear_probe", "attentive_probe", "zero_shot",
                                    "patch_readout"}


# ----------------------------------------------------------------------------------------------------------
# data readers


def test_imagefolder_reader(digit_root):
    splits = open_labelled(str(digit_root), ["train", "val"])
    tr, va = splits["train"], splits["val"]
    assert (len(tr), len(va)) == (200, 60)
    assert tr.classnames == DIGIT_NAMES
    assert sorted(set(tr.labels.tolist())) == list(range(10))
    p = tr.patches(0, Preprocess(32, 8))
    assert p.shape == (16, 3, 8, 8) and p.dtype == np.uint8


def test_imagefolder_errors(tmp_path):
    root = write_digit_folder(tmp_path / "d", per_class_train=2, per_class_val=1, classnames=False)
    assert open_labelled(str(root), ["train", "val"])["train"].classnames[0] == "0 zero"
    with pytest.raises(EvalDataError, match="does not exist"):
        open_labelled(str(tmp_path / "missing"), ["train", "val"])
    (root / "val" / "10_ten").mkdir()
    (root / "val" / "10_ten" / "a.png").write_bytes((root / "val" / "1_one").glob("*.png").__next__().read_bytes())
    with pytest.raises(EvalDataError, match=r"10_ten.*absent from the training split"):
        open_labelled(str(root), ["train", "val"])
    (root / "train" / "10_ten").mkdir()
    with pytest.raises(EvalDataError, match=r"train/10_ten holds no images"):
        open_labelled(str(root), ["train", "val"])
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(EvalDataError, match=r"empty/train holds no class folders"):
        open_labelled(str(empty), ["train", "val"])


def test_wds_readers(tmp_path):
    for use_json in (False, True):
        root = write_digit_shards(tmp_path / f"w{use_json}", per_class_train=3, per_class_val=2, use_json=use_json)
        splits = open_labelled(str(root), ["train", "val"], class_key="label")
        assert splits["train"].classnames == DIGIT_NAMES
        assert splits["train"].labels.tolist() == [c for c in range(10) for _ in range(3)]
        assert splits["val"].patches(5, Preprocess(32, 8)).shape == (16, 3, 8, 8)
    with pytest.raises(EvalDataError, match="no shards for split"):
        open_labelled(str(tmp_path / "wFalse"), ["test"], fmt="wds")


# ----------------------------------------------------------------------------------------------------------
# linear probe


def test_linear_probe_on_raw_pixels_reaches_high_accuracy():
    tr, trl, va, val = digits(40, 20)
    xtr = np.stack(tr).reshape(len(tr), -1).astype(np.float64)
    xva = np.stack(va).reshape(len(va), -1).astype(np.float64)
    full = full_probe(xtr, trl, xva, val, 10, [0.01, 0.1, 1.0], 0.2, seed=0, max_iter=500)
    assert full["top1"] >= 0.9 and full["top5"] >= 0.99 and full["C"] in (0.01, 0.1, 1.0)
    few = fewshot_probe(xtr, trl, xva, val, 10, shots=5, seeds=3, C=1.0, max_iter=500, seed=0)
    assert few["top1_mean"] >= 0.7 and few["top1_std"] >= 0.0 and few["shots"] == 5


def test_linear_probe_fits_converge_at_every_strength(model):
    """The probe's fits reach the optimum at every C of the default grid (1e-2..1e5). On frozen features that no
    linear map separates (a random encoder's features of 400 digits, 30% of the labels redrawn), Newton-Cholesky
    (solver auto, 49 x 10 coefficients) converges in a few iterations: the gradient of the L2-regularised loss
    vanishes (max <= 1e-3 of its value at W = 0; measured 6e-6..6e-4). L-BFGS, the former solver, stops at max_iter
    1000 for C = 1e4 with a gradient over 10x larger (measured 1.4e-2, 400x; its ConvergenceWarning was silenced:
    a probe whose best strength was large read a few points low)."""
    from megatron_genlip.evaluation.features import extract_features
    from megatron_genlip.evaluation.linear_probe import LinearProbe, _standardize, fit_logistic, pick_solver

    tr, trl, va, val = digits(40, 20)
    pre = Preprocess(32, 8)
    feats = extract_features(model, [torch.from_numpy(pre.patches(png_bytes(im), "digit")) for im in tr], (4, 4))
    x = _standardize(feats.double().numpy())[0]
    rng = np.random.default_rng(0)
    y = trl.copy()
    noisy = rng.random(len(y)) < 0.3
    y[noisy] = rng.integers(0, 10, int(noisy.sum()))
    assert LinearProbe.OPTIONS["C_grid"] == [0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
    assert pick_solver("auto", x.shape[1], 10) == "newton-cholesky" and pick_solver("auto", 768, 1000) == "lbfgs"

    def grad_ratio(clf, C):
        """max |gradient| of sum CE + |W|^2 / 2C at the fit, over its max at W = 0."""
        xb = np.hstack([x, np.ones((len(x), 1))])
        z = clf.decision_function(x)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        onehot = np.eye(10)[y]
        grad = xb.T @ (p - onehot) + np.vstack([clf.coef_.T, np.zeros((1, 10))]) / C
        return np.abs(grad).max() / np.abs(xb.T @ (0.1 - onehot)).max()

    for C in LinearProbe.OPTIONS["C_grid"]:
        clf = fit_logistic(x, y, C)
        assert clf.converged_ and np.max(clf.n_iter_) < 50 and grad_ratio(clf, C) <= 1e-3, (C, clf.n_iter_)
    short = fit_logistic(x, y, 1e4, max_iter=1000, solver="lbfgs")
    assert not short.converged_ and grad_ratio(short, 1e4) > max(1e-3, 10 * grad_ratio(fit_logistic(x, y, 1e4), 1e4))
    xtr = np.stack(tr).reshape(len(tr), -1).astype(np.float64)
    xva = np.stack(va).reshape(len(va), -1).astype(np.float64)
    full = full_probe(xtr, trl, xva, val, 10, LinearProbe.OPTIONS["C_grid"], 0.2, seed=0, max_iter=1000)
    assert full["converged"] == 1.0 and full["top1"] >= 0.9


def test_linear_probe_evaluator_beats_chance(cfg, model, digit_root, qwen_tokenizer):
    ev = evaluator(cfg, qwen_tokenizer, "linear_probe", str(digit_root), C_grid=[0.1, 1.0])
    ev.prepare(ctx_for(qwen_tokenizer))
    res = ev.run(model, ctx_for(qwen_tokenizer))
    m = res.metrics
    assert m["top1"] > 0.3 and m["top5"] >= m["top1"], m  # chance: 0.1
    assert (m["train_images"], m["val_images"], m["skipped_images"]) == (200, 60, 0)
    few = evaluator(cfg, qwen_tokenizer, "linear_probe", str(digit_root), shots=5, seeds=2)
    fm = few.run(model, ctx_for(qwen_tokenizer)).metrics
    assert fm["top1_mean"] > 0.2 and set(fm) >= {"top1_mean", "top1_std", "top5_mean", "shots"}


def test_unreadable_image_is_skipped_and_counted(cfg, model, tmp_path, qwen_tokenizer):
    root = write_digit_folder(tmp_path / "d", per_class_train=3, per_class_val=2)
    (root / "val" / "3_three" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    ev = evaluator(cfg, qwen_tokenizer, "linear_probe", str(root), shots=2, seeds=1)
    m = ev.run(model, ctx_for(qwen_tokenizer)).metrics
    assert m["skipped_images"] == 1 and m["val_images"] == 20


def test_extract_features_matches_image_features_and_hf_model(cfg, model, qwen_tokenizer):
    from megatron_genlip.hf.convert import hf_config
    from megatron_genlip.hf.keys import to_hf
    from megatron_genlip.hf.modeling_genlip import GenLIPConfig, GenLIPModel
    from megatron_genlip.inference.generate import image_features

    imgs = [random_image((4, 4), s, patch=8) for s in range(5)]
    feats = extract_features(model, imgs, (4, 4), pool="none", batch_size=2)
    for i in (0, 4):
        torch.testing.assert_close(feats[i], image_features(model, imgs[i], (4, 4)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extract_features(model, imgs, (4, 4)), feats.mean(1))
    conf = hf_config(cfg.model, qwen_tokenizer, False, "fp32", {}, 256)
    hf = GenLIPModel(GenLIPConfig(**conf)).eval()
    hf.load_state_dict(to_hf(model.state_dict()))
    torch.testing.assert_close(extract_features(hf, imgs, (4, 4), pool="none"), feats, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# attentive probe


def test_attentive_probe_beats_chance(cfg, model, digit_root, qwen_tokenizer):
    ev = evaluator(cfg, qwen_tokenizer, "attentive_probe", str(digit_root), epochs=30, lr=3e-3, probe_batch_size=32)
    m = ev.run(model, ctx_for(qwen_tokenizer)).metrics
    assert m["top1"] > 0.3 and m["top5"] >= m["top1"] and m["train_images"] == 200, m


# ----------------------------------------------------------------------------------------------------------
# zero-shot


def test_zero_shot_loglik_equals_trainer_token_losses(model, qwen_tokenizer):
    """The score of a candidate caption is minus the sum of the trainer's token losses of the sample
    [patches][prompt][caption][<|im_end|>][\\n] in a packed row (here the second sample of the row)."""
    from megatron_genlip.data.packing import collate_row, stack_rows
    from megatron_genlip.data.sample import build_sample

    prompt = "Describe the image in detail."
    img = [random_image((4, 4), 7 + s, patch=8) for s in range(2)]
    caps = ["a photo of a seven.", "the digit three, written by hand"]
    ll = score_candidates(model, qwen_tokenizer, torch.stack(img), (4, 4), prompt,
                          [candidate_ids(qwen_tokenizer, c) for c in caps], candidate_rows=3)
    for b in range(2):
        for k, cap in enumerate(caps):
            other = build_sample(qwen_tokenizer, img[1 - b], (4, 4), "something else entirely", prompt)
            mine = build_sample(qwen_tokenizer, img[b], (4, 4), cap, prompt)
            batch = stack_rows([collate_row([other, mine], 128)])
            with torch.no_grad():
                out = model(batch)
            want = -float(out.token_losses[out.token_sample_ids == 1].double().sum())
            assert ll[b, k].item() == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_zero_shot_evaluator(cfg, model, digit_root, qwen_tokenizer):
    ev = evaluator(cfg, qwen_tokenizer, "zero_shot", str(digit_root), templates=["the digit {}.", "{}"],
                   max_per_class=2)
    m = ev.run(model, ctx_for(qwen_tokenizer)).metrics
    assert m["images"] == 20 and m["classes"] == 10 and 0 <= m["top1"] <= m["top5"] <= 1


def test_zero_shot_template_averages(cfg, model, digit_root, qwen_tokenizer):
    """``average: log_likelihood`` scores a class by the mean of its templates' log-likelihoods, ``average:
    probability`` by the log of the mean of their likelihoods (the template wording marginalised); both from the
    same per-template scores (``score_candidates``), top-1 equal to a direct computation."""
    from megatron_genlip.evaluation.zero_shot import class_scores

    # one class whose first template fits the image (-1) and whose second does not (-50), one that is middling in
    # both: the probability average prefers the first, the mean of log-likelihoods the second
    ll = torch.tensor([[[-1.0, -50.0], [-10.0, -12.0]]], dtype=torch.float64)
    assert class_scores(ll, "probability").argmax(-1).item() == 0 and class_scores(ll).argmax(-1).item() == 1
    assert class_scores(ll, "probability")[0, 1].item() == pytest.approx(np.log((np.exp(-10) + np.exp(-12)) / 2))
    far = ll - 1e4  # log-likelihoods of long captions: no underflow
    assert torch.allclose(class_scores(far, "probability"), class_scores(ll, "probability") - 1e4)
    templates = ["the digit {}.", "a picture of {}", "{}"]
    split_scores = {}
    for average in ("log_likelihood", "probability"):
        ev = evaluator(cfg, qwen_tokenizer, "zero_shot", str(digit_root), templates=templates, max_per_class=1,
                       average=average)
        split_scores[average] = ev.run(model, ctx_for(qwen_tokenizer)).metrics["top1"]
    split, idx = ev.split("val_split")
    pats = torch.stack([torch.from_numpy(split.patches(int(i), ev.pre)) for i in idx])
    cands = [candidate_ids(qwen_tokenizer, t.replace("{}", n)) for n in DIGIT_NAMES for t in templates]
    raw = score_candidates(model, qwen_tokenizer, pats, ev.pre.grid, "Describe the image in detail.", cands)
    raw = raw.view(len(idx), 10, len(templates))
    y = torch.from_numpy(split.labels[idx])
    for average, top1 in split_scores.items():
        assert top1 == float((class_scores(raw, average).argmax(-1) == y).double().mean()), average
    with pytest.raises(ConfigError, match=r"evaluation\.zero_shot\.options\.average"):
        evaluator(cfg, qwen_tokenizer, "zero_shot", str(digit_root), average="max")


# ----------------------------------------------------------------------------------------------------------
# captioning


def test_batched_captions_equal_one_at_a_time(model, qwen_tokenizer):
    grids = [(3, 4)] * 5 + [(2, 3), (4, 4)]
    imgs = [random_image(g, s, patch=8) for s, g in enumerate(grids)]
    one = [generate_caption(model, qwen_tokenizer, im, g, max_new_tokens=6) for im, g in zip(imgs, grids)]
    assert generate_captions(model, qwen_tokenizer, imgs, grids, max_new_tokens=6, batch_size=4) == one
    assert generate_captions(model, qwen_tokenizer, imgs[:2], grids[:2], max_new_tokens=0) == [[], []]


def _coco(gts: dict, res: dict):
    """pycocoevalcap 1.2's own scores (a test dependency only): (cider, per-image cider, bleu1..4, per-image bleu)
    or, where its CIDEr raises (no reference of the set holds a word), cider None."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: v if isinstance(v, list) else [v] for k, v in res.items()}
    b, bi = Bleu(4).compute_score(gts, res, verbose=0)
    try:
        c, ci = Cider().compute_score(gts, res)
    except ValueError:  # max() of its empty document-frequency table
        c, ci = None, None
    return c, ci, b, bi


def _assert_equal_to_coco(gts: dict, res: dict, tol: float = 1e-9) -> None:
    c, ci, b, bi = _coco(gts, res)
    got_c, got_ci = cider_d(gts, res)
    got_b, got_bi = bleu(gts, res)
    assert len(got_b) == 4 and got_b == pytest.approx(b, abs=tol, rel=0), (gts, res)
    for k in range(4):
        assert got_bi[k] == pytest.approx(bi[k], abs=tol, rel=0), (k, gts, res)
    if c is None:  # pycocoevalcap cannot score it; ours: every image 0
        assert got_c == 0.0 and got_ci == [0.0] * len(gts)
    else:
        assert got_c == pytest.approx(float(c), abs=tol, rel=0), (gts, res)
        assert got_ci == pytest.approx(list(ci), abs=tol, rel=0), (gts, res)


def test_caption_scores_equal_pycocoevalcap():
    refs = {1: ["A man is riding a horse on the beach.", "A person rides a brown horse along the shore."],
            2: ["Two dogs play with a red ball in the grass.", "Dogs playing with a ball."],
            3: ["A plate of pasta with tomato sauce.", "Spaghetti on a white plate."],
            4: ["A red car parked next to a tree.", "The car is parked on the street."]}
    cands = {1: "a man riding a horse on a beach", 2: "two dogs playing with a ball", 3: "a plate of food",
             4: "a red car parked on the street."}
    got = caption_scores(refs, cands)
    gts = {k: [coco_tokenize(r) for r in v] for k, v in refs.items()}
    res = {k: [coco_tokenize(v)] for k, v in cands.items()}
    c, _, b, _ = _coco(gts, res)
    assert [got[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(b, abs=1e-9, rel=0)
    assert got["cider"] == pytest.approx(c, abs=1e-9, rel=0)
    _assert_equal_to_coco(gts, res)
    # pinned: these values were computed with pycocoevalcap 1.2 (PTB tokenisation reproduced by coco_tokenize)
    assert got["bleu4"] == pytest.approx(0.615569, abs=1e-6)
    assert got["cider"] == pytest.approx(3.551671, abs=1e-6)
    assert coco_tokenize("A man, riding -- a horse... (on the beach)!") == \
        "a man riding a horse -lrb- on the beach -rrb-"
    assert caption_scores({}, {}) == {"cider": 0.0, "bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0}
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({1: ["a"]}, {2: "a"})


def _random_caption(rng, vocab: list[str], raw: bool) -> str:
    """0..15 words of ``vocab`` (often 0 or 1); ``raw``: with capitals and punctuation, sometimes only punctuation
    (empty after coco_tokenize)."""
    length = rng.choice([0, 0, 1, 1, 2] + list(range(3, 16)))
    words = [rng.choice(vocab) for _ in range(length)]
    if not raw:
        return rng.choice([" ", "  "]).join(words) if rng.random() < 0.9 else "  "
    if rng.random() < 0.1:
        return rng.choice(["...", "!", " , . ", "-- ?", ""])
    words = [w.capitalize() if rng.random() < 0.2 else w for w in words]
    words = [w + rng.choice([",", ";", ""]) if rng.random() < 0.1 else w for w in words]
    return " ".join(words) + rng.choice([".", "!", "", ""])


def test_scorers_equal_pycocoevalcap_on_random_sets():
    """CIDEr-D (corpus and per image) and BLEU-1..4 (corpus and per image) equal pycocoevalcap 1.2's to 1e-9 on 300
    random caption sets: vocabularies of 2..40 words, 1..5 references per image, 0..15 words per caption (empty
    captions and references included), single-image sets, repeated captions; and through caption_scores on raw
    captions (capitals, punctuation, captions that are empty after tokenisation)."""
    import random

    rng = random.Random(1234)
    cases = 0
    for trial in range(300):
        vocab = [f"w{i}" for i in range(rng.choice([2, 5, 12, 40]))]
        raw = trial % 3 == 2
        images = rng.choice([1, 1, 2, 3, 7, 25])
        refs = {f"im{i}": [_random_caption(rng, vocab, raw) for _ in range(rng.randint(1, 5))] for i in range(images)}
        cands = {k: _random_caption(rng, vocab, raw) for k in refs}
        if rng.random() < 0.1:  # a candidate equal to one of its references
            k = rng.choice(list(refs))
            cands[k] = rng.choice(refs[k])
        if raw:
            got = caption_scores(refs, cands)
            gts = {k: [coco_tokenize(r) for r in v] for k, v in refs.items()}
            res = {k: [coco_tokenize(v)] for k, v in cands.items()}
            c, _, b, _ = _coco(gts, res)
            assert [got[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(b, abs=1e-9, rel=0)
            assert got["cider"] == pytest.approx(0.0 if c is None else c, abs=1e-9, rel=0)
        else:
            gts, res = refs, {k: [v] for k, v in cands.items()}
        _assert_equal_to_coco(gts, res)
        cases += 1
    assert cases == 300
    # the edge cases, once each: a single image (idf 0: CIDEr 0), only empty captions, every reference empty
    _assert_equal_to_coco({0: ["a b c", "a b"]}, {0: ["a b c"]})
    _assert_equal_to_coco({0: [""], 1: ["x y"]}, {0: [""], 1: [""]})
    _assert_equal_to_coco({0: ["", " "], 1: [""]}, {0: ["a"], 1: ["a b"]})
    assert cider_d({}, {}) == (0.0, [])


def test_caption_scores_need_no_pycocoevalcap(cfg, tmp_path, qwen_tokenizer, monkeypatch):
    """The evaluator scores without pycocoevalcap installed (it is a test dependency only): with it made
    unimportable, caption_scores still scores and the captioning evaluator prepares."""
    import sys

    for name in ("pycocoevalcap", "pycocoevalcap.bleu", "pycocoevalcap.bleu.bleu", "pycocoevalcap.cider",
                 "pycocoevalcap.cider.cider"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import pycocoevalcap.cider.cider  # noqa: F401
    got = caption_scores({1: ["a dog runs on grass"], 2: ["a red car"]}, {1: "a dog runs", 2: "a red car."})
    assert got["cider"] > 0 and 0 < got["bleu4"] <= 1
    shard, _ = write_captioned_shards(tmp_path / "caps" / "000000.tar", n=3)
    ev = evaluator(cfg, qwen_tokenizer, "captioning", str(shard))
    ev.prepare(ctx_for(qwen_tokenizer))
    assert ev.prepared


PTB_CASES = ["A man is riding a horse on the beach.", "A man's hat, isn't it? (yes) -- \"quoted\" 3.5 x 2",
             "A red square at the top-left; a blue circle.", "cats & dogs: 100% fun!", "e.g. a dog.",
             "The kids' toys and 'quoted' words...", "A woman in a [red] dress {x}", "Mr. Smith went to Washington.",
             "I cannot do it", "it is 5 p.m. now", "A cat sits on a mat. It is black.", "a large, red-and-white bus."]


def test_coco_tokenize_equals_ptb_tokenizer():
    """coco_tokenize reproduces pycocoevalcap's Java PTBTokenizer on these captions (skipped without Java)."""
    import shutil

    if shutil.which("java") is None:
        pytest.skip("no java: pycocoevalcap's PTBTokenizer cannot run")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(PTB_CASES)})
    assert [coco_tokenize(c) for c in PTB_CASES] == [ptb[i][0] for i in range(len(PTB_CASES))]


def test_captioning_evaluator_on_shards(cfg, model, tmp_path, qwen_tokenizer):
    shard, captions = write_captioned_shards(tmp_path / "caps" / "000000.tar", n=6)
    ev = evaluator(cfg, qwen_tokenizer, "captioning", str(shard), max_new_tokens=5, batch_size=4, records=3)
    res = ev.run(model, ctx_for(qwen_tokenizer))
    m = res.metrics
    assert (m["images"], m["skipped_images"]) == (5, 1)
    assert set(m) >= {"exact_match", "token_accuracy", "cider", "bleu4"}
    # the records: the first 3 readable images of the evaluator's seeded sample (all 6 here), in index order
    readable = [i for i in ev.sample(ctx_for(qwen_tokenizer)) if i != 5]
    shown = sorted(readable[:3])
    assert [r["index"] for r in res.records] == shown
    assert [r["reference"] for r in res.records] == [captions[i] for i in shown]
    imgs = [ev.data.get(i) for i in shown]
    want = [generate_caption(model, qwen_tokenizer, p, g, max_new_tokens=5) for p, g, _ in imgs]
    assert [r["generated"] for r in res.records] == [qwen_tokenizer.decode(w) for w in want]


def test_captioned_images_are_sampled_across_the_held_out_set(cfg, model, tmp_path, qwen_tokenizer):
    """A held-out set stored class after class (60 images, 6 digits, 10 each): the 8 captioned images and the
    contact sheet's 4 records are a seeded random sample of the whole set, not its first images (which would all
    be zeros): they span at least 4 of the 6 digits (the records at least 3); the same seed picks the same images
    (a second run, a new evaluator as after a resume, the run's seed as the default), another seed others."""
    from eval_cases import write_grouped_captioned_shards

    shard, captions = write_grouped_captioned_shards(tmp_path / "grouped" / "000000.tar", per_class=10, classes=6)
    digit = lambda i: captions[i].split()[-1]  # noqa: E731

    def run(seed=None, run_seed=0, ev=None):
        ev = ev or evaluator(cfg, qwen_tokenizer, "captioning", str(shard), images=8, records=4, max_new_tokens=1,
                             **({} if seed is None else {"seed": seed}))
        ctx = ctx_for(qwen_tokenizer)
        ctx.seed = run_seed
        res = ev.run(model, ctx)
        return ev, ev.sample(ctx), res

    ev, order, res = run(seed=3)
    scored, shown = sorted(order), [r["index"] for r in res.records]
    assert res.metrics["images"] == 8 and len(set(order)) == 8 and all(0 <= i < 60 for i in order)
    assert len({digit(i) for i in scored}) >= 4, scored  # first-N: 1 digit ("zero")
    assert shown == sorted(order[:4]) and set(shown) <= set(scored)
    assert len({digit(i) for i in shown}) >= 3, shown
    assert [r["reference"] for r in res.records] == [captions[i] for i in shown]
    assert max(scored) - min(scored) >= 30  # spread over the set, not a block
    # the same seed: the same images (the same evaluator again, a new one), the run's seed as the default
    assert run(ev=ev)[1] == order and run(seed=3)[1] == order
    assert [r["index"] for r in run(seed=3)[2].records] == shown
    assert run(run_seed=3)[1] == order and run(seed=None, run_seed=4)[1] != order
    assert run(seed=4)[1] != order
    # more images than the set holds: every image, once
    every = evaluator(cfg, qwen_tokenizer, "captioning", str(shard), images=100, records=60, max_new_tokens=1)
    assert [r["index"] for r in every.run(model, ctx_for(qwen_tokenizer)).records] == list(range(60))
    with pytest.raises(ConfigError, match=r"evaluation\.captioning\.options\.seed"):
        evaluator(cfg, qwen_tokenizer, "captioning", str(shard), seed=-1)


# ----------------------------------------------------------------------------------------------------------
# patch readout


def test_patch_readout_records(cfg, model, digit_root, qwen_tokenizer):
    from megatron_genlip.inference.generate import image_features

    ev = evaluator(cfg, qwen_tokenizer, "patch_readout", str(digit_root), images=2, top_k=5)
    res = ev.run(model, ctx_for(qwen_tokenizer))
    assert res.metrics["images"] == 2 and len(res.records) == 2
    rec = res.records[0]
    assert rec["grid"] == [4, 4] and len(rec["top_ids"]) == 16 and all(len(r) == 5 for r in rec["top_ids"])
    split, idx = ev.split("val_split")
    assert [r["index"] for r in res.records] == sorted(int(idx[i]) for i in ev_sample(len(idx), 2, 0))
    patches = torch.from_numpy(split.patches(rec["index"], ev.pre))
    feats = image_features(model, patches, (4, 4))
    want = model.head(feats).float()[:, :qwen_tokenizer.n_vocab].topk(5, dim=-1).indices
    assert rec["top_ids"] == want.tolist()
    assert rec["top_tokens"][0][0] == qwen_tokenizer.decode([want[0, 0]])


# ----------------------------------------------------------------------------------------------------------
# today's evaluation, ported: the same numbers as training/evaluate.py on an indexed held-out set


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    from eval_cases import build_val_dataset

    return build_val_dataset(tmp_path_factory.mktemp("val"), 24)


def test_validation_loss_and_captioning_match_todays_evaluation(val_data):
    from eval_cases import tiny_config

    from megatron_genlip.data.packed_dataset import open_rows
    from megatron_genlip.data.tokenizer import load_tokenizer
    from megatron_genlip.evaluation.validation_loss import tokenizer_fp
    from megatron_genlip.training.evaluate import caption_metrics, validation_loss

    prefix, shards = val_data
    cfg = tiny_config(prefix)
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    model = build_model(cfg.model, seed=3).eval()
    ctx = EvalContext(device="cpu", tokenizer=tok, prompt=cfg.tokenizer.prompt)
    val = build_evaluator(EvaluatorSpec("val", "validation_loss"), cfg, tok)
    val.prepare(ctx)
    got = val.run(model, ctx).metrics
    rows = open_rows(prefix, cfg.data, tokenizer_fp(cfg))
    rows.ensure(epochs=1, log=lambda *_: None)
    want = validation_loss(model, rows, cfg.train.eval_rows, 0, 1, "cpu")
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    assert got["val_token_accuracy"] == pytest.approx(want["val_token_accuracy"])
    assert got["val_tokens"] == want["val_tokens"]

    # the whole held-out set (24 images): the same totals and captions as today's evaluation
    whole = build_evaluator(EvaluatorSpec("captions", "captioning", options={"batch_size": 5, "images": 24,
                                                                           "records": 24}), cfg, tok)
    res_all = whole.run(model, ctx)
    want = caption_metrics(model, rows.dataset, tok, cfg.tokenizer.prompt, 24, 12, 0, 1, records=24)
    assert res_all.metrics["exact_match"] == pytest.approx(want["caption_exact_match"])
    assert res_all.metrics["token_accuracy"] == pytest.approx(want["caption_token_accuracy"])
    assert res_all.metrics["images"] == 24
    assert [(r["index"], r["reference"], r["generated"]) for r in res_all.records] == \
        [(r["index"], r["reference"], r["generated"]) for r in want["caption_records"]]
    by_index = {r["index"]: r for r in want["caption_records"]}
    # train.eval_captions (8) of them: the evaluator's seeded sample, each image captioned as today's code does
    caps = build_evaluator(EvaluatorSpec("captions", "captioning", options={"batch_size": 3}), cfg, tok)
    res = caps.run(model, ctx)
    chosen = sorted(caps.sample(ctx))
    assert res.metrics["images"] == 8 and len(chosen) == 8 and chosen != list(range(8))
    assert res.metrics["exact_match"] == pytest.approx(sum(by_index[i]["exact"] for i in chosen) / 8)
    assert res.metrics["token_accuracy"] == pytest.approx(sum(by_index[i]["token_accuracy"] for i in chosen) / 8)
    assert [(r["index"], r["reference"], r["generated"]) for r in res.records] == \
        [(i, by_index[i]["reference"], by_index[i]["generated"]) for i in chosen]
    # around the dataset the trainer already opened: the same
    from megatron_genlip.evaluation.data import CaptionedImages

    wrapped = build_evaluator(EvaluatorSpec("captions", "captioning", options={"batch_size": 8}), cfg, tok)
    wrapped.data = CaptionedImages.wrap(rows.dataset)
    assert wrapped.run(model, ctx).records == res.records
    # the same held-out images read from their webdataset shards (preprocessed here) give the same references
    from_shards = build_evaluator(EvaluatorSpec("c2", "captioning", data=shards[0], options={"images": 4}), cfg, tok)
    got = from_shards.run(model, ctx).records
    assert len(got) == 4 and [r["reference"] for r in got] == [by_index[r["index"]]["reference"] for r in got]


def test_validation_loss_under_pipeline_uses_the_engine_callable(val_data):
    from eval_cases import tiny_config

    prefix, _ = val_data
    cfg = tiny_config(prefix)
    seen = []

    def pipeline_loss(loader):
        batches = list(loader)
        seen.append(len(batches))
        return 1.25

    ev = build_evaluator(EvaluatorSpec("val", "validation_loss"), cfg)
    res = ev.run(None, EvalContext(pipeline_loss=pipeline_loss))
    # 4 rows in micro-batches of 2 (the tiny config's train.micro_batch_size)
    assert res.metrics["val_loss"] == 1.25 and seen == [2] and res.metrics["val_rows"] == 4


# ----------------------------------------------------------------------------------------------------------
# data-parallel split: two gloo ranks give the single process's numbers (DP=2, TP=2, ZeRO-3; PP=2: the validation
# loss, and a start-up error for the evaluators that need the whole model)

FEATURE_TOL = 1e-5  # fp32: max abs difference of mean-pooled ln_post features (values O(1))
LOGLIK_TOL = 1e-4  # fp32: max abs difference of a caption's log-likelihood (a sum over ~6 token losses of O(10))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp_worker", "tp_worker"])
def test_two_ranks_match_one(cfg, model, tmp_path, qwen_tokenizer, layout):
    """DP=2 (images split over the data-parallel group, reduced) and TP=2 (vocab-parallel head and loss, sharded
    heads) give the single process's metrics and records; features within 1e-5, zero-shot log-likelihoods within
    1e-4 with the same top-1 class per image."""
    from dist_harness import run_ranks
    from eval_cases import raw_scores, run_suite

    root = write_digit_folder(tmp_path / "digits", per_class_train=8, per_class_val=3)
    shard, _ = write_captioned_shards(tmp_path / "caps" / "000000.tar", n=7)
    one = run_suite(cfg, model, qwen_tokenizer, ctx_for(qwen_tokenizer), str(root), str(shard))
    one_raw = raw_scores(cfg, model, qwen_tokenizer, ctx_for(qwen_tokenizer), str(root))
    out = tmp_path / "dp.pt"
    run_ranks(2, "eval_cases", layout, str(root), str(shard), str(out))
    two = torch.load(out, weights_only=False)
    raw = two.pop("raw")
    assert bool(raw["valid"].all()) and raw["features"].shape == one_raw["features"].shape
    assert float((raw["features"] - one_raw["features"]).abs().max()) <= FEATURE_TOL
    assert float((raw["zero_shot_loglik"] - one_raw["zero_shot_loglik"]).abs().max()) <= LOGLIK_TOL
    assert torch.equal(raw["zero_shot_loglik"].argmax(-1), one_raw["zero_shot_loglik"].argmax(-1))
    for name in one:
        for k, v in one[name]["metrics"].items():
            tol = 1e-4 if layout == "dp_worker" or k != "train_loss" else 1e-3
            assert two[name]["metrics"][k] == pytest.approx(v, rel=tol, abs=tol), (name, k)
        if name in ("caps", "read"):
            assert [r.get("generated", r.get("top_ids")) for r in two[name]["records"]] == \
                [r.get("generated", r.get("top_ids")) for r in one[name]["records"]]


@pytest.mark.slow
def test_zero3_matches_one_rank(cfg, model, tmp_path, qwen_tokenizer):
    """DP=2 x ZeRO-3 (each rank holds half of every parameter): the trainer's own evaluation path
    (``Trainer.evaluate``, which gathers the partitioned parameters into a full copy, ``Trainer._eval_model``)
    around a real DeepSpeed ZeRO-3 engine gives one rank's numbers: features within 1e-5, zero-shot
    log-likelihoods within 1e-4 and the same top-1 class per image, every evaluator's metrics within 1e-4
    (the attentive probe's training loss 1e-3), the same captions."""
    from dist_harness import run_ranks
    from eval_cases import FEATURE_IMAGES, raw_scores, run_suite

    root = write_digit_folder(tmp_path / "digits", per_class_train=8, per_class_val=3)
    shard, _ = write_captioned_shards(tmp_path / "caps" / "000000.tar", n=7)
    ctx = ctx_for(qwen_tokenizer)
    one = run_suite(cfg, model, qwen_tokenizer, ctx, str(root), str(shard))
    one_raw = raw_scores(cfg, model, qwen_tokenizer, ctx, str(root))
    out = tmp_path / "z3.pt"
    run_ranks(2, "eval_cases", "zero3_worker", str(root), str(shard), str(out))
    two = torch.load(out, weights_only=False)
    assert two["dp_world"] == 2
    raw = two["raw"]
    assert raw["features"].shape == one_raw["features"].shape == (FEATURE_IMAGES, cfg.model.hidden_size)
    assert bool(raw["valid"].all()) and float(one_raw["features"].abs().max()) > 0.1
    assert float((raw["features"] - one_raw["features"]).abs().max()) <= FEATURE_TOL
    assert float((raw["zero_shot_loglik"] - one_raw["zero_shot_loglik"]).abs().max()) <= LOGLIK_TOL
    assert torch.equal(raw["zero_shot_loglik"].argmax(-1), one_raw["zero_shot_loglik"].argmax(-1))
    record = two["record"]
    for name in one:
        for k, v in one[name]["metrics"].items():
            tol = 1e-3 if k == "train_loss" else 1e-4
            assert record[f"{name}/{k}"] == pytest.approx(v, rel=tol, abs=tol), (name, k)
    for k in ("top1", "top5"):  # counts of whole images: identical, not merely close
        assert record[f"zs/{k}"] == one["zs"]["metrics"][k] and record[f"lin/{k}"] == one["lin"]["metrics"][k]
    assert [(e["index"], e["generated"]) for e in record["caption_examples"]] == \
        [(r["index"], r["generated"]) for r in one["caps"]["records"][:4]]


@pytest.fixture(scope="module")
def val_rows_data(tmp_path_factory):
    """60 held-out scenes: 11 packed rows of the tiny config (at least the 8 the pipeline test reads)."""
    from eval_cases import build_val_dataset

    return build_val_dataset(tmp_path_factory.mktemp("val60"), 60)


@pytest.mark.slow
def test_pipeline_validation_loss_matches_one_rank(val_rows_data, tmp_path):
    """PP=2: the validation loss through the trainer's pipeline engine (``Trainer.evaluate`` -> the pipeline
    schedule) equals one rank's token-mean loss over the same 8 held-out rows (rel 1e-5, fp32), not the mean of
    the 4 micro-batches' own means (which weighs a micro-batch with few caption tokens like one with many)."""
    from dist_harness import run_ranks
    from eval_cases import pp_config

    from megatron_genlip.data.tokenizer import load_tokenizer

    prefix, _ = val_rows_data
    cfg = pp_config(prefix)
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    model = build_model(cfg.model, seed=0).eval()
    ctx = EvalContext(device="cpu", tokenizer=tok, prompt=cfg.tokenizer.prompt)
    val = build_evaluator(EvaluatorSpec("val", "validation_loss"), cfg, tok)
    one = val.run(model, ctx).metrics
    assert val.rows.rows_in_epoch(0) >= 8
    means = []  # each micro-batch's own token mean: what averaging the pipeline's outputs would report
    with torch.no_grad():
        for s in range(0, 8, 2):
            batch = {k: v for k, v in val.rows.batch(list(range(s, s + 2))).items() if k != "row_index"}
            means.append(float(model(batch).loss))
    out = tmp_path / "pp.pt"
    run_ranks(2, "eval_cases", "pp_worker", prefix, str(out))
    got = torch.load(out, weights_only=False)["record"]
    assert got["val/val_rows"] == 8 and one["val_tokens"] > 0
    assert got["val/val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert got["val_loss"] == got["val/val_loss"]  # the historical name, as the summary reads it
    unweighted = sum(means) / len(means)
    assert abs(unweighted - one["val_loss"]) > 1e-4  # the two differ on this set: the comparison can tell


def test_pipeline_start_up_names_the_evaluator_it_cannot_run(val_data, qwen_tokenizer):
    """``Trainer._build_evaluators`` at parallel.pipeline_parallel=2: every evaluator that needs the whole model on
    one rank stops the start-up with a ConfigError naming it; validation_loss alone is accepted; the default list
    leaves captions out, saying so."""
    from eval_cases import build_trainer_evaluators, suite_entries, tiny_config

    from megatron_genlip.data.packed_dataset import open_rows
    from megatron_genlip.evaluation.validation_loss import tokenizer_fp

    prefix, _ = val_data
    cfg = tiny_config(prefix)
    for entry in suite_entries("/digits", prefix):
        cfg.evaluation = [{"name": "val", "type": "validation_loss"}, entry]
        with pytest.raises(ConfigError, match=rf"evaluation\.{entry['name']} \(type {entry['type']}\) needs the "
                                              r"whole model.*pipeline_parallel=2"):
            build_trainer_evaluators(cfg, qwen_tokenizer, pipeline_parallel=2)
        assert build_trainer_evaluators(cfg, qwen_tokenizer, pipeline_parallel=1).evaluators[1].name == entry["name"]
    cfg.evaluation = [{"name": "val", "type": "validation_loss"}]
    assert [e.name for e in build_trainer_evaluators(cfg, qwen_tokenizer, 2).evaluators] == ["val"]
    cfg.evaluation = None
    rows = open_rows(prefix, cfg.data, tokenizer_fp(cfg))
    stub = build_trainer_evaluators(cfg, qwen_tokenizer, 2, valid_rows=rows)
    assert [e.name for e in stub.evaluators] == ["val"] and "captions" in stub.eval_note
    assert stub.evaluators[0].rows is rows


# ----------------------------------------------------------------------------------------------------------
# tools/evaluate.py on an exported folder


def test_evaluate_cli_on_exported_folder(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    from eval_cases import tiny_config

    from megatron_genlip.data.tokenizer import load_tokenizer
    from megatron_genlip.hf.convert import write_hf_folder

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import evaluate as cli

    cfg = tiny_config(None)
    model = build_model(cfg.model, seed=5).eval()
    folder = write_hf_folder({k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
                             {"config": cfg.to_dict(), "iteration": 7}, tmp_path / "hf", dtype="fp32")
    root = write_digit_folder(tmp_path / "digits", per_class_train=4, per_class_val=2, size=48)
    out = tmp_path / "report.json"
    assert cli.main(["--model", str(folder), "--task", "linear_probe:fewshot", "--task", "patch_readout",
                     "--dataset", str(root), "--option", "fewshot.shots=2", "--option", "patch_readout.images=2",
                     "--output", str(out), "--records", "--progress", "never"]) == 0
    report = json.loads(out.read_text())
    assert report["model"]["step"] == 7 and len(report["model"]["config_hash"]) == 16
    assert set(report["tasks"]) == {"fewshot", "patch_readout"}
    assert report["tasks"]["fewshot"]["metrics"]["shots"] == 2
    assert "fewshot" in capsys.readouterr().out
    # the same numbers as the trainer's model itself
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    ev = evaluator(cfg, tok, "patch_readout", str(root), images=2)
    direct = ev.run(model, ctx_for(tok))
    assert report["tasks"]["patch_readout"]["records"][0]["top_ids"] == direct.records[0]["top_ids"]
    # bad input: one message, exit status 2
    assert cli.main(["--model", str(folder), "--task", "linear_probe", "--dataset", str(tmp_path / "nope"),
                     "--progress", "never"]) == 2
    assert "does not exist" in capsys.readouterr().err
