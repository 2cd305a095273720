"""Helpers for tests/test_evaluation.py: real images (scikit-learn's digits, inside its wheel) written as an
ImageFolder tree and as labelled webdataset shards, captioned shards, and small configs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits(per_class_train: int = 30, per_class_val: int = 10):
    """(train images, train labels, val images, val labels): 8x8 uint8 grey digits (0..255), each class's images
    in a fixed shuffled order (seed 0): the first ones for training, the next ones for validation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    tr, trl, va, val = [], [], [], []
    for c in range(10):
        idx = np.random.default_rng(c).permutation(np.flatnonzero(d.target == c))
        tr += list(imgs[idx[:per_class_train]])
        trl += [c] * per_class_train
        va += list(imgs[idx[per_class_train:per_class_train + per_class_val]])
        val += [c] * per_class_val
    return tr, np.array(trl), va, np.array(val)


def png_bytes(img8: np.ndarray, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img8, "L").resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def write_digit_folder(root: Path, per_class_train: int = 30, per_class_val: int = 10, size: int = 32,
                       classnames: bool = True) -> Path:
    tr, trl, va, val = digits(per_class_train, per_class_val)
    for split, imgs, labels in (("train", tr, trl), ("val", va, val)):
        for i, (img, y) in enumerate(zip(imgs, labels)):
            d = root / split / f"{y}_{DIGIT_NAMES[y]}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.png").write_bytes(png_bytes(img, size))
    if classnames:
        (root / "classnames.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_digit_shards(root: Path, per_class_train: int = 10, per_class_val: int = 4, size: int = 32,
                       use_json: bool = False) -> Path:
    """ROOT/train/000000.tar, ROOT/val/000000.tar with png + cls (or json {"label": name}) and classnames.txt."""
    tr, trl, va, val = digits(per_class_train, per_class_val)
    for split, imgs, labels in (("train", tr, trl), ("val", va, val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / split / "000000.tar", "w") as tar:
            for i, (img, y) in enumerate(zip(imgs, labels)):
                _add(tar, f"s{i:05d}.png", png_bytes(img, size))
                if use_json:
                    _add(tar, f"s{i:05d}.json", json.dumps({"label": DIGIT_NAMES[y]}).encode())
                else:
                    _add(tar, f"s{i:05d}.cls", str(int(y)).encode())
    (root / "classnames.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    return root


def write_captioned_shards(path: Path, n: int = 6, size: int = 32) -> tuple[Path, list[str]]:
    """One captioned shard of digit images: png + json {"caption": "the digit <name>"}; one unreadable image."""
    tr, trl, _, _ = digits(1, 0)
    captions = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            y = int(trl[i % 10])
            cap = f"the digit {DIGIT_NAMES[y]}."
            captions.append(cap)
            _add(tar, f"c{i:04d}.png", png_bytes(tr[i % 10], size) if i != n - 1 else b"not an image")
            _add(tar, f"c{i:04d}.json", json.dumps({"caption": cap}).encode())
    return path, captions


def write_grouped_captioned_shards(path: Path, per_class: int = 10, classes: int = 6, size: int = 32
                                   ) -> tuple[Path, list[str]]:
    """One captioned shard of digit images stored class after class (keys in folder order, as a held-out set
    made from an ImageFolder tree is): sample ``i`` shows digit ``i // per_class``, caption "the digit <name>."."""
    tr, trl, _, _ = digits(per_class, 0)
    captions = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(per_class * classes):
            cap = f"the digit {DIGIT_NAMES[int(trl[i])]}."
            captions.append(cap)
            _add(tar, f"{DIGIT_NAMES[int(trl[i])]}/{i:04d}.png", png_bytes(tr[i], size))
            _add(tar, f"{DIGIT_NAMES[int(trl[i])]}/{i:04d}.json", json.dumps({"caption": cap}).encode())
    return path, captions


def small_eval_config(image_size: int = 32, patch_size: int = 8, **model_kw):
    """A Config around conftest's small model (Qwen vocabulary) for images of ``image_size`` px."""
    from conftest import small_model_config

    from megatron_genlip.config import Config

    cfg = Config(model=small_model_config(patch_size=patch_size, **model_kw))
    cfg.data.image_size = image_size
    cfg.train.eval_interval = 100
    return cfg


def build_val_dataset(tmp: Path, n: int = 24) -> tuple[str, list[str]]:
    """Synthetic held-out shards (seed 11) indexed with the tiny config: (prefix, shard paths)."""
    from trainer_harness import TINY

    from megatron_genlip.config import load_config
    from megatron_genlip.data.builder import build_indexed_dataset
    from megatron_genlip.data.synthetic import write_shards

    cfg = load_config(TINY)
    shards = write_shards(str(tmp / "shards"), "val", n, 100, seed=11)
    build_indexed_dataset(shards, str(tmp / "val"), cfg, progress=False)
    return str(tmp / "val"), shards


def tiny_config(valid: str):
    from trainer_harness import TINY

    from megatron_genlip.config import load_config

    cfg = load_config(TINY)
    cfg.data.valid_data = valid
    cfg.data.train_data = None
    cfg.train.eval_rows = 4
    cfg.train.eval_captions = 8
    cfg.train.max_new_tokens = 12
    return cfg


def dp_worker(rank: int, world: int, digit_root: str, caption_shard: str, out_file: str) -> None:
    """On each of ``world`` gloo ranks: run the evaluators on the data-parallel group; rank 0 saves the results."""
    from megatron.core import parallel_state

    from megatron_genlip.data.tokenizer import load_qwen_tokenizer
    from megatron_genlip.evaluation import EvalContext
    from megatron_genlip.model.genlip import build_model

    cfg = small_eval_config()
    model = build_model(cfg.model, seed=0).eval()
    tok = load_qwen_tokenizer()
    ctx = EvalContext(device="cpu", dp_rank=parallel_state.get_data_parallel_rank(),
                      dp_world=parallel_state.get_data_parallel_world_size(),
                      dp_group=parallel_state.get_data_parallel_group(), tokenizer=tok, seed=0)
    results = run_suite(cfg, model, tok, ctx, digit_root, caption_shard)
    results["raw"] = raw_scores(cfg, model, tok, ctx, digit_root)
    if rank == 0:
        torch_save(results, out_file)


def suite_entries(digit_root: str, caption_shard: str) -> list[dict]:
    return [
        {"name": "lin", "type": "linear_probe", "data": digit_root,
         "options": {"C_grid": [0.1, 1.0, 10.0], "max_per_class": 6}},
        {"name": "few", "type": "linear_probe", "data": digit_root, "options": {"shots": 2, "seeds": 2}},
        {"name": "att", "type": "attentive_probe", "data": digit_root,
         "options": {"epochs": 3, "max_per_class": 6, "probe_batch_size": 16}},
        {"name": "zs", "type": "zero_shot", "data": digit_root, "options": {"max_per_class": 1, "templates": ["{}"]}},
        {"name": "read", "type": "patch_readout", "data": digit_root, "options": {"images": 3}},
        {"name": "caps", "type": "captioning", "data": caption_shard, "options": {"max_new_tokens": 4, "records": 8}},
    ]


def run_suite(cfg, model, tok, ctx, digit_root: str, caption_shard: str) -> dict:
    from megatron_genlip.evaluation import EvaluatorSpec, build_evaluator

    out = {}
    for e in suite_entries(digit_root, caption_shard):
        ev = build_evaluator(EvaluatorSpec.from_dict(e), cfg, tok)
        ev.prepare(ctx)
        res = ev.run(model, ctx)
        out[e["name"]] = {"metrics": res.metrics, "records": res.records}
    return out


def torch_save(obj, path: str) -> None:
    import torch

    torch.save(obj, path)


def tp_worker(rank: int, world: int, digit_root: str, caption_shard: str, out_file: str) -> None:
    """Tensor parallelism over all ``world`` ranks (one data-parallel rank): rank 0 saves the results."""
    from megatron_genlip.data.tokenizer import load_qwen_tokenizer
    from megatron_genlip.evaluation import EvalContext
    from megatron_genlip.model.genlip import build_model

    cfg = small_eval_config()
    model = build_model(cfg.model, world, seed=0).eval()
    tok = load_qwen_tokenizer()
    ctx = EvalContext(device="cpu", tokenizer=tok, seed=0)
    results = run_suite(cfg, model, tok, ctx, digit_root, caption_shard)
    results["raw"] = raw_scores(cfg, model, tok, ctx, digit_root)
    if rank == 0:
        torch_save(results, out_file)


# ----------------------------------------------------------------------------------------------------------
# the trainer's own evaluation path (Trainer.evaluate / _eval_model / _eval_context) around a real DeepSpeed engine


class QuietLog:
    """A RunLogger stand-in for ``Trainer.evaluate``: not rank 0's (no contact sheet), keeps the records."""

    enabled = False
    tb = None

    def __init__(self):
        self.lines, self.records = [], []

    def print(self, line: str) -> None:
        self.lines.append(line)

    def record(self, kind: str, step: int, values: dict) -> None:
        self.records.append((kind, step, values))


def trainer_stub(cfg, engine, tokenizer, pipelined: bool):
    """An object that runs ``Trainer.evaluate`` and the helpers it calls (the trainer's own functions) on ``engine``
    and ``cfg``, without data loaders, checkpoints or an output directory."""
    from megatron.core import parallel_state

    from megatron_genlip.training.trainer import Trainer

    class Stub:
        evaluate = Trainer.evaluate
        _eval_model = Trainer._eval_model
        _eval_context = Trainer._eval_context
        _pipeline_loss = Trainer._pipeline_loss

    stub = Stub()
    stub.cfg, stub.engine, stub.tokenizer, stub.pipelined = cfg, engine, tokenizer, pipelined
    stub.device, stub.iteration, stub.out = torch_device("cpu"), 0, Path("/nonexistent-eval-out")
    stub.dp_rank = parallel_state.get_data_parallel_rank()
    stub.dp_world = parallel_state.get_data_parallel_world_size()
    return stub


def torch_device(name: str):
    import torch

    return torch.device(name)


def engine_for(cfg, model, world: int, mpu=None):
    """``deepspeed.initialize`` with the trainer's own DeepSpeed config for ``cfg`` at this world size."""
    import deepspeed

    from megatron_genlip import platform
    from megatron_genlip.config import resolve_layout
    from megatron_genlip.training.ds_config import deepspeed_config

    ds = deepspeed_config(cfg, resolve_layout(cfg, world), platform.initialize(), load_universal=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad], config=ds, mpu=mpu)
    return engine


FEATURE_IMAGES = 12  # validation images whose features and zero-shot log-likelihoods are compared raw


def raw_scores(cfg, model, tok, ctx, digit_root: str) -> dict:
    """Mean-pooled ln_post features of the first validation images (split over the data-parallel ranks and reduced,
    as the probes extract them) and the zero-shot log-likelihoods [images, classes] of the first 4 of them."""
    import torch

    from megatron_genlip.evaluation import EvaluatorSpec, build_evaluator
    from megatron_genlip.evaluation.zero_shot import candidate_ids, score_candidates

    lin = build_evaluator(EvaluatorSpec.from_dict({"name": "f", "type": "linear_probe", "data": digit_root,
                                                   "options": {"max_per_class": 2, "batch_size": 5}}), cfg, tok)
    lin.prepare(ctx)
    feats, labels, valid = lin.features(model, ctx, "val_split")
    split, idx = lin.split("val_split")
    pats = torch.stack([torch.from_numpy(split.patches(int(i), lin.pre)) for i in idx[:4]])
    cands = [candidate_ids(tok, f"the digit {n}.") for n in lin.classnames]
    ll = score_candidates(model, tok, pats, lin.pre.grid, ctx.prompt, cands, candidate_rows=16)
    return {"features": feats[:FEATURE_IMAGES], "valid": valid, "zero_shot_loglik": ll}


def zero3_worker(rank: int, world: int, digit_root: str, caption_shard: str, out_file: str) -> None:
    """DP=2 x ZeRO-3 (parameters partitioned over the ranks): the trainer's DeepSpeed engine; every evaluator runs
    through ``Trainer.evaluate`` (which gathers the parameters into a full copy, ``Trainer._eval_model``) and the
    raw features / zero-shot scores on that copy; rank 0 saves the results."""
    import deepspeed

    from megatron_genlip.data.tokenizer import load_qwen_tokenizer
    from megatron_genlip.evaluation import EvaluatorSpec, build_evaluator
    from megatron_genlip.model.genlip import build_model

    deepspeed.init_distributed(verbose=False)
    cfg = small_eval_config()
    cfg.parallel.zero_stage, cfg.train.precision, cfg.train.seed = 3, "fp32", 0
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, world
    tok = load_qwen_tokenizer()
    engine = engine_for(cfg, build_model(cfg.model, 1, seed=0), world)
    assert all(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 did not partition the parameters"
    stub = trainer_stub(cfg, engine, tok, pipelined=False)
    evaluators = [build_evaluator(EvaluatorSpec.from_dict(e), cfg, tok) for e in suite_entries(digit_root,
                                                                                               caption_shard)]
    ctx = stub._eval_context()
    for ev in evaluators:
        ev.prepare(ctx)
    record = stub.evaluate(QuietLog(), evaluators)
    raw = raw_scores(cfg, stub._eval_model(), tok, ctx, digit_root)
    if rank == 0:
        torch_save({"record": record, "raw": raw, "dp_world": ctx.dp_world}, out_file)


def pp_worker(rank: int, world: int, val_prefix: str, out_file: str) -> None:
    """PP=``world`` (one data-parallel rank): the trainer's pipeline engine; the validation loss through
    ``Trainer.evaluate`` (the pipeline schedule); rank 0 saves the logged record."""
    import deepspeed

    from megatron_genlip.data.tokenizer import load_tokenizer
    from megatron_genlip.evaluation import EvaluatorSpec, build_evaluator
    from megatron_genlip.model.stages import build_pipeline
    from megatron_genlip.parallel import state

    deepspeed.init_distributed(verbose=False)
    cfg = pp_config(val_prefix)
    cfg.parallel.pipeline_parallel = world
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    state.reinitialize(1, world)
    engine = engine_for(cfg, build_pipeline(cfg.model, 1, world, seed=0), world)
    stub = trainer_stub(cfg, engine, tok, pipelined=True)
    val = build_evaluator(EvaluatorSpec("val", "validation_loss"), cfg, tok)
    val.prepare(stub._eval_context())
    record = stub.evaluate(QuietLog(), [val])
    if rank == 0:
        torch_save({"record": record, "dp_world": stub.dp_world}, out_file)


def pp_config(val_prefix: str):
    """The tiny config on the held-out rows of ``val_prefix``: 8 rows in micro-batches of 2, fp32, seed 0; weights
    drawn with std 0.1 (not 0.02), so the token losses differ as a trained model's do (at the usual init every token
    costs ~ln(vocab) and any weighting of the micro-batches gives the same mean)."""
    cfg = tiny_config(val_prefix)
    cfg.model.init_std = 0.1
    cfg.train.eval_rows, cfg.train.micro_batch_size, cfg.train.global_batch_size = 8, 2, 2
    cfg.train.precision, cfg.train.seed, cfg.parallel.zero_stage = "fp32", 0, 1
    return cfg


def build_trainer_evaluators(cfg, tokenizer, pipeline_parallel: int, valid_rows=None):
    """``Trainer._build_evaluators`` on a stand-in: the run's evaluators, checked against the layout."""
    from types import SimpleNamespace

    from megatron_genlip.training.trainer import Trainer

    stub = SimpleNamespace(cfg=cfg, tokenizer=tokenizer, layout=SimpleNamespace(pipeline_parallel=pipeline_parallel),
                           valid_rows=valid_rows, valid=None if valid_rows is None else valid_rows.dataset)
    Trainer._build_evaluators(stub)
    return stub
