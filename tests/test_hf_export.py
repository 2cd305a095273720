"""Hugging Face export and import (tools/convert_checkpoint.py, tools/caption.py).

Checkpoints are trained by the real trainer through the real launcher at TP=2 x PP=2 (4 ranks), DP=2 with
ZeRO-3 and TP=PP=DP=1. The exported folder runs with ``transformers`` alone (``trust_remote_code``), an
implementation that shares no code with the trainer, so agreement below checks the merge of TP/PP/ZeRO
shards, the §6 key mapping (q_proj = query rows + gate rows) and the model code at once.
Tolerances: fp32, relative 1e-5 (the two implementations differ only in summation order).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import run_ranks
from hf_cases import (COMMON, SPEC_BLOCK_KEYS, TOLERANCE, convert, hf_validation_loss, tiny_config,
                      tiny_packed_batch)
from megatron_genlip.config import load_config
from megatron_genlip.hf.convert import CheckpointError, load_hf_weights, read_checkpoint, resolve_tag
from trainer_harness import ROOT, build_test_dataset, env, run, train_log

CAPTION = ROOT / "tools" / "caption.py"
LAYOUTS = {
    "single": (1, []),
    "tp2pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    "dp2z3": (2, ["parallel.zero_stage=3"]),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{layout: run output dir} of three short fp32 runs on the same data, plus the dataset."""
    root = tmp_path_factory.mktemp("hf-export")
    data = build_test_dataset(root, 120, 24)
    runs = {}
    for name, (nproc, extra) in LAYOUTS.items():
        run(nproc, data, root / name, COMMON + extra, timeout=600)
        runs[name] = root / name
    return {"data": data, "runs": runs, "root": root}


def hf_model(folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()


def hf_logits(model, batch) -> torch.Tensor:
    from megatron_genlip.data.image_processing import normalize_pixels

    pixels = batch["patches"]  # the trainer's loader ships uint8; the HF model takes its processor's floats
    pixels = normalize_pixels(pixels) if pixels.dtype == torch.uint8 else pixels
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], pixel_values=pixels, position_ids=batch["positions"],
                     sample_ids=batch["sample_ids"], token_kinds=batch["token_kinds"]).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def trainer_model_logits(state: dict, batch) -> torch.Tensor:
    from megatron_genlip.model.genlip import build_model
    from megatron_genlip.parallel import state as pstate

    pstate.reinitialize(1)
    model = build_model(tiny_config().model, 1, seed=0).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    with torch.no_grad():
        return model.logits(batch)


def reference_weights(name: str, tag: Path) -> dict | None:
    """Weights read with DeepSpeed's own tools only (None for TP x PP: see the sharded 2-rank reference)."""
    if name == "single":
        return torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    if name == "dp2z3":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_export_logits_and_validation_loss_match_the_trainer(trained, name, tmp_path):
    ckpt = trained["runs"][name] / "checkpoints"
    out = tmp_path / "hf"
    convert("--load", str(ckpt), "--save", str(out), "--dtype", "fp32")
    model = hf_model(out)
    batch = tiny_packed_batch()
    got = hf_logits(model, batch)
    tag = resolve_tag(ckpt)
    ref_state = reference_weights(name, tag)
    if ref_state is not None:
        ref = trainer_model_logits(ref_state, batch)
    else:  # the checkpoint's own TP shards in a TP=2 trainer model on 2 ranks
        run_ranks(2, "hf_cases", "tp2_logits_from_shards", str(tag), str(tmp_path / "ref.pt"))
        ref = torch.load(tmp_path / "ref.pt")
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    assert err <= TOLERANCE, f"{name}: export vs trainer logits relative error {err:.2e} > {TOLERANCE}"

    # The trainer's own end-of-run validation loss (computed at the source layout by its engine) against
    # the export's loss on the same held-out rows.
    evals = train_log(trained["runs"][name], "eval")
    val = evals[max(evals)]["val_loss"]
    mine = hf_validation_loss(model, trained["data"]["val"])  # token-weighted under PP too (pipeline_token_loss)
    assert math.isclose(mine, val, rel_tol=TOLERANCE), f"{name}: export val loss {mine} vs trainer {val}"


@pytest.mark.slow
def test_round_trip_gives_identical_safetensors(trained, tmp_path):
    ckpt = trained["runs"]["tp2pp2"] / "checkpoints"
    for dtype in ("fp32", "bf16"):
        first, back, second = tmp_path / f"a-{dtype}", tmp_path / f"ck-{dtype}", tmp_path / f"b-{dtype}"
        convert("--load", str(ckpt), "--save", str(first), "--dtype", dtype)
        convert("--from-hf", str(first), "--save", str(back), "--tp", "2", "--pp", "2")
        convert("--load", str(back), "--save", str(second), "--dtype", dtype)
        a, b = (first / "model.safetensors").read_bytes(), (second / "model.safetensors").read_bytes()
        assert a == b, f"{dtype}: safetensors differ after checkpoint -> HF -> checkpoint -> HF"


@pytest.mark.slow
def test_sharded_export_has_an_index_and_loads(trained, tmp_path):
    ckpt = trained["runs"]["single"] / "checkpoints"
    out = tmp_path / "sharded"
    convert("--load", str(ckpt), "--save", str(out), "--dtype", "fp32", "--max-shard-size", "300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (out / "model.safetensors").exists()
    assert all(os.path.getsize(out / f) <= 300_000 + 200_000 for f in files)  # one tensor may exceed the limit
    single = tmp_path / "single"
    convert("--load", str(ckpt), "--save", str(single), "--dtype", "fp32")
    batch = tiny_packed_batch()
    assert torch.equal(hf_logits(hf_model(out), batch), hf_logits(hf_model(single), batch))


FRESH = r"""
import sys
sys.path.insert(0, {tools!r})
import caption
rc = caption.main(["--model", {model!r}, "--ids", "--max-new-tokens", "6", "--image", *{images!r}])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron_genlip", "megatron", "deepspeed"))
print("LEAKED", leaked)
sys.exit(rc)
"""


@pytest.mark.slow
def test_fresh_process_captions_equal_the_trainer(trained, tmp_path):
    """AutoModel + AutoTokenizer + the shipped image processor in a new process (no trainer modules)
    produce the same greedy token ids as the trainer's generate_caption on the same checkpoint."""
    from PIL import Image

    from megatron_genlip.data.image_processing import process_image
    from megatron_genlip.data.tokenizer import load_tokenizer
    from megatron_genlip.inference.generate import generate_caption

    ckpt = trained["runs"]["single"] / "checkpoints"
    out = tmp_path / "hf"
    convert("--load", str(ckpt), "--save", str(out), "--dtype", "fp32")
    images = []
    for i, color in enumerate([(200, 30, 30), (20, 160, 40), (30, 30, 220)]):
        img = Image.new("RGB", (64, 52), color)
        img.paste((250, 250, 250), (8 + 10 * i, 6, 30 + 10 * i, 30))
        images.append(str(tmp_path / f"img{i}.png"))
        img.save(images[-1])
    proc = subprocess.run([sys.executable, "-c", FRESH.format(tools=str(ROOT / "tools"), model=str(out),
                                                               images=images)],
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEAKED []" in proc.stdout, proc.stdout
    got = [json.loads(line.split("\t")[2]) for line in proc.stdout.splitlines() if line.startswith(str(tmp_path))]

    cfg = tiny_config()
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    from megatron_genlip.model.genlip import build_model
    from megatron_genlip.parallel import state as pstate

    pstate.reinitialize(1)
    model = build_model(cfg.model, 1, seed=0)
    model.load_state_dict(torch.load(resolve_tag(ckpt) / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    want = []
    for path in images:
        patches, grid = process_image(Image.open(path), stage=1, image_size=cfg.data.image_size,
                                      patch_size=cfg.model.patch_size)
        want.append(generate_caption(model, tok, patches, grid, cfg.tokenizer.prompt, max_new_tokens=6))
    assert got == want and len(got) == 3


@pytest.mark.slow
def test_vision_only_export_features_equal_the_trainer(trained, tmp_path):
    from transformers import AutoModel

    from megatron_genlip.inference.generate import image_features
    from megatron_genlip.model.genlip import build_model
    from megatron_genlip.parallel import state as pstate

    ckpt = trained["runs"]["single"] / "checkpoints"
    out = tmp_path / "enc"
    convert("--load", str(ckpt), "--save", str(out), "--dtype", "fp32", "--vision-only")
    weights, conf = load_hf_weights(out)
    assert conf["vision_only"] and conf["architectures"] == ["GenLIPVisionModel"]
    assert all(k.startswith(("vision_embeddings.", "visual.layers.", "ln_post.")) for k in weights)
    enc = AutoModel.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    assert type(enc).__name__ == "GenLIPVisionModel"

    pstate.reinitialize(1)
    model = build_model(tiny_config().model, 1, seed=0)
    model.load_state_dict(torch.load(resolve_tag(ckpt) / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    g = torch.Generator().manual_seed(3)
    grids = [(3, 3), (2, 4)]
    patches = [torch.rand(a * b, 3, 16, 16, generator=g) * 2 - 1 for a, b in grids]
    got = enc.get_image_features(torch.cat(patches), torch.tensor([[1, a, b] for a, b in grids]))
    want = torch.cat([image_features(model, p, grid) for p, grid in zip(patches, grids)])
    assert rel_err(got, want) <= TOLERANCE


def test_image_processor_equals_the_trainer_pipeline():
    from PIL import Image

    from megatron_genlip.data.image_processing import process_image
    from megatron_genlip.hf.image_processing_genlip import GenLIPImageProcessor

    g = torch.Generator().manual_seed(0)
    for w, h in [(1000, 300), (61, 47), (300, 300)]:
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        img = Image.fromarray(arr)
        for stage in (1, 2):
            ours = GenLIPImageProcessor(stage=stage, image_size=224)([img])
            ref, grid = process_image(img, stage=stage, image_size=224)
            assert torch.equal(ours["pixel_values"], ref) and ours["image_grid_thw"].tolist() == [[1, *grid]]


@pytest.mark.slow
def test_weights_only_checkpoint_starts_a_run_at_another_layout(trained, tmp_path):
    """HF -> checkpoint (--from-hf --tp 2) -> trainer at TP=2 with lr 1e-30 (no weight changes) for two
    steps: its validation loss equals the source run's final one, so every weight arrived (split over TP)."""
    src = trained["runs"]["single"]
    hf, ck = tmp_path / "hf", tmp_path / "ck"
    convert("--load", str(src / "checkpoints"), "--save", str(hf), "--dtype", "fp32")
    convert("--from-hf", str(hf), "--save", str(ck), "--tp", "2", "--pp", "1")
    out = tmp_path / "ft"
    proc = run(2, trained["data"], out, COMMON + ["parallel.tensor_parallel=2", "train.train_steps=2",
                                                  "train.warmup_steps=1", "train.lr=1e-30",
                                                  "train.min_lr=0", f"train.load={ck}"], timeout=600)
    assert "initialised from the weights of" in proc.stdout + proc.stderr
    ref = train_log(src, "eval")
    got = train_log(out, "eval")
    assert math.isclose(got[max(got)]["val_loss"], ref[max(ref)]["val_loss"], rel_tol=TOLERANCE), (got, ref)
    assert max(got) == 2  # counted from step 0: a fresh run


@pytest.mark.slow
def test_bad_inputs_name_the_file(trained, tmp_path):
    ckpt = trained["runs"]["single"] / "checkpoints"
    with pytest.raises(CheckpointError, match=r"iter_0000099 does not exist \(checkpoints in .*: iter_0000003\)"):
        read_checkpoint(ckpt, 99)
    bad = convert("--load", str(ckpt), "--iteration", "99", "--save", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "iter_0000099" in bad.stderr

    # a truncated trainer file
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    f = resolve_tag(broken) / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        read_checkpoint(broken)

    # a truncated safetensors shard and a config.json that does not match the weights
    hf = tmp_path / "hf"
    convert("--load", str(ckpt), "--save", str(hf), "--dtype", "fp32", "--max-shard-size", "300KB")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    t1 = tmp_path / "t1"
    shutil.copytree(hf, t1)
    (t1 / shard.name).write_bytes(shard.read_bytes()[:1000])
    res = convert("--from-hf", str(t1), "--save", str(tmp_path / "c1"), check=False)
    assert res.returncode == 2 and shard.name in res.stderr, res.stderr
    t2 = tmp_path / "t2"
    shutil.copytree(hf, t2)
    conf = json.loads((t2 / "config.json").read_text())
    conf["intermediate_size"] += 8
    (t2 / "config.json").write_text(json.dumps(conf))
    res = convert("--from-hf", str(t2), "--save", str(tmp_path / "c2"), check=False)
    assert res.returncode == 2 and "config.json" in res.stderr and "mlp.fc1.weight" in res.stderr, res.stderr
    res = convert("--from-hf", str(hf), "--save", str(tmp_path / "c3"), "--tp", "3", check=False)
    assert res.returncode == 2 and "parallel.tensor_parallel" in res.stderr, res.stderr


@pytest.mark.parametrize("config", ["So16", "g16", "L16"])
def test_keys_shapes_and_dtype_follow_the_spec_on_meta(config):
    from megatron_genlip.data.tokenizer import load_qwen_tokenizer
    from megatron_genlip.hf.convert import expected_shapes, hf_config
    from megatron_genlip.hf.keys import to_hf
    from megatron_genlip.hf.modeling_genlip import GenLIPConfig, GenLIPModel
    from megatron_genlip.model.accounting import build_meta_model

    m = load_config(ROOT / f"examples/configs/{config}.yaml").model
    d, f, e, V = m.hidden_size, m.ffn_hidden_size, m.text_embed_dim, m.vocab_size
    want = {"vision_embeddings.patch_embedding.weight": (d, 3, 16, 16), "vision_embeddings.patch_embedding.bias": (d,),
            "ln_post.weight": (d,), "ln_post.bias": (d,), "embeddings.weight": (V, e), "lm_head.weight": (V, e)}
    if e != d:
        want.update({"in_proj.weight": (d, e), "in_proj.bias": (d,), "proj.weight": (e, d), "proj.bias": (e,)})
    for i in range(m.num_layers):
        want.update({f"visual.layers.{i}.{k}": s(d, f) for k, s in SPEC_BLOCK_KEYS.items()})

    meta_state = build_meta_model(m).state_dict()
    trainer = {k: tuple(v.shape) for k, v in to_hf(meta_state).items()}
    assert trainer == want
    assert expected_shapes(m) == {k: tuple(v.shape) for k, v in meta_state.items() if not k.endswith("_extra_state")}
    conf = GenLIPConfig(**{k: v for k, v in hf_config(m, load_qwen_tokenizer(), False, "bf16").items()
                           if k not in ("auto_map", "architectures", "dtype", "model_type", "genlip_training")})
    with torch.device("meta"):
        model = GenLIPModel._from_config(conf, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
