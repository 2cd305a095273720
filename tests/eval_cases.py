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
    if rank == 0:
        torch_save(results, out_file)


def run_suite(cfg, model, tok, ctx, digit_root: str, caption_shard: str) -> dict:
    from megatron_genlip.evaluation import EvaluatorSpec, build_evaluator

    entries = [
        {"name": "lin", "type": "linear_probe", "data": digit_root, "options": {"C_grid": [1.0], "max_per_class": 6}},
        {"name": "few", "type": "linear_probe", "data": digit_root, "options": {"shots": 2, "seeds": 2}},
        {"name": "att", "type": "attentive_probe", "data": digit_root,
         "options": {"epochs": 3, "max_per_class": 6, "probe_batch_size": 16}},
        {"name": "zs", "type": "zero_shot", "data": digit_root, "options": {"max_per_class": 1, "templates": ["{}"]}},
        {"name": "read", "type": "patch_readout", "data": digit_root, "options": {"images": 3}},
        {"name": "caps", "type": "captioning", "data": caption_shard, "options": {"max_new_tokens": 4, "records": 8}},
    ]
    out = {}
    for e in entries:
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
    results = run_suite(cfg, model, tok, EvalContext(device="cpu", tokenizer=tok, seed=0), digit_root, caption_shard)
    if rank == 0:
        torch_save(results, out_file)
