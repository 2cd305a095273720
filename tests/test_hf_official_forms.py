"""Folders in the forms the official GenLIP code writes, and what a conversion must never do silently.

``hf_cases.official_save_pretrained`` gives the config.json the official trainer writes through
``GenLIPConfig.save_pretrained`` (every attribute of the official class: the published fields plus
``initializer_factor``, ``lm_head_hdsz``, ``num_key_value_heads``, ``rms_norm_eps``, ``layer_norm_eps``,
``temporal_patch_size``, ``use_cache``, ``transformers_version``, and ``rope_scaling`` as its ``__init__``
rewrites it); ``hf_cases.official_state_keys`` the keys the official model holds (LayerScale only for
``ls_init_value > 1e-6``). Covered here:

* such folders import; a field of them that would change the model (``num_key_value_heads`` other than the
  heads) is refused, naming it;
* LayerScale at or below the official threshold: refused on import (the official model has none), exported
  with a config the official class builds LayerScale from, keeping the trained gamma;
* fields the trainer does not use survive a round trip as they were (g/16's ``num_patches``, L/16's
  ``architectures``, the official class's extra fields);
* non-finite weights are refused, naming the tensor, with nothing written;
* ``--save`` never writes into a run's output directory, its checkpoints directory or a checkpoint tag, even
  with ``--overwrite``.

Folders are small (width 96, one layer), so every case takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_cases import OFFICIAL_SAVE_ADDS, convert, official_save_pretrained, official_state_keys, tiny_config
from official_configs import official_shapes, published

from megatron_genlip.config import ConfigError
from megatron_genlip.hf.configuration_genlip import GenLIPConfig, unsupported_fields
from megatron_genlip.hf.convert import (CheckpointError, expected_shapes, load_hf_weights, read_checkpoint,
                                        write_hf_folder)
from megatron_genlip.hf.official_config import from_official
from megatron_genlip.training.ckpt_format import WEIGHTS_ONLY_MARKER

# what an export writes differently from an official save_pretrained config.json, on purpose: rope_scaling in the
# published form ({"type": "mrope", ...}; the official __init__ reads both alike) and no transformers_version
REWRITTEN = {"rope_scaling", "transformers_version"}


def small(name: str, **changes) -> dict:
    """A published config (hand-written schema) at a width that converts in milliseconds; head dim 96 keeps every
    published section valid, text_embed_dim differs from the width where the published one does."""
    sizes = dict(num_hidden_layers=1, hidden_size=96, num_attention_heads=1, intermediate_size=256,
                 text_embed_dim=96 if name == "So16" else 64, vocab_size=256)
    return published(name, **{**sizes, **changes})


def saved(name: str, **changes) -> dict:
    """The same model as the official trainer's save_pretrained writes it."""
    return official_save_pretrained(small(name, **changes))


def write_saved_folder(folder: Path, conf: dict, seed: int = 0, layer_scale: bool | None = None,
                       poison: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """config.json + model.safetensors as the official class saves them: the keys of its state dict (LayerScale
    only above its threshold, or as ``layer_scale`` says), bf16. ``poison``: {tensor: value} planted in one
    element of those tensors."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    keys = official_state_keys(conf)
    if layer_scale is not None:
        keys = {k for k in official_shapes(conf) if layer_scale or ".layer_scale" not in k}
    weights = {}
    for k, shape in sorted(official_shapes(conf).items()):
        if k in keys:
            base = 0.1 if "lambda1" in k else 1.0 if ("norm" in k and k.endswith("weight")) else 0.0
            weights[k] = (base + 0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    for k, value in (poison or {}).items():
        weights[k].view(-1)[3] = value
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return weights


class StubTokenizer:
    """The ids an export of an imported official folder asks the (default Qwen) tokenizer for; loading and
    rebuilding the real one takes most of a minute and has nothing to do with what is tested here."""
    n_vocab, eos_id = 151665, 151645
    IDS = {"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655}

    def token_id(self, text: str) -> int:
        return self.IDS[text]


@pytest.fixture
def quick_export(monkeypatch):
    import megatron_genlip.data.tokenizer as tokenizer_module
    import megatron_genlip.hf.convert as convert_module

    real_load, real_write = tokenizer_module.load_tokenizer, convert_module._write_tokenizer
    monkeypatch.setattr(tokenizer_module, "load_tokenizer",
                        lambda kind, path=None: StubTokenizer() if kind == "qwen" else real_load(kind, path))
    monkeypatch.setattr(convert_module, "_write_tokenizer",
                        lambda tok_cfg, out: None if tok_cfg.kind == "qwen" else real_write(tok_cfg, out))


def marker_model(ck: Path) -> dict:
    return json.loads((ck / "iter_0000000" / WEIGHTS_ONLY_MARKER).read_text())["config"]["model"]


# --------------------------------------------------------------------------------------------------
# 1. what the official class's save_pretrained writes


@pytest.mark.parametrize("name", ["L16", "So16", "g16"])
def test_official_save_pretrained_folder_imports(name, tmp_path):
    conf = saved(name)
    assert set(OFFICIAL_SAVE_ADDS) <= set(conf) and conf["rope_scaling"]["rope_type"] == "default"
    weights = write_saved_folder(tmp_path / "hf", conf)
    convert("--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"))
    m = marker_model(tmp_path / "ck")
    assert (m["hidden_size"], m["num_attention_heads"], m["layer_scale_init"], m["mrope_section"]) == \
        (96, 1, 0.1, conf["rope_scaling"]["mrope_section"])
    back, _ = read_checkpoint(tmp_path / "ck")
    assert back["layers.0.layer_scale1.lambda1"].equal(weights["visual.layers.0.layer_scale1.lambda1"].float())
    # our Hugging Face classes read it too (the shipped configuration_genlip and modeling_genlip)
    assert unsupported_fields(GenLIPConfig(**conf)) == []
    from megatron_genlip.hf.modeling_genlip import GenLIPModel

    model = GenLIPModel.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert set(model.state_dict()) == set(weights)
    assert model.visual.layers[0].layer_scale1.lambda1.equal(weights["visual.layers.0.layer_scale1.lambda1"].float())


@pytest.mark.parametrize("changes", [{"initializer_factor": 0.5}, {"lm_head_hdsz": 4096}, {"rms_norm_eps": 1e-6},
                                     {"num_key_value_heads": 1}, {"use_cache": False}])
def test_fields_without_effect_on_the_model_import_with_any_value(changes):
    """initializer_factor, lm_head_hdsz (the use_llm_head decoder's width) and rms_norm_eps are read by no layer of
    the official model; num_key_value_heads equal to the heads is plain multi-head attention."""
    assert from_official(saved("So16", **changes)).hidden_size == 96


@pytest.mark.parametrize("changes,message", [
    ({"num_key_value_heads": 2, "num_attention_heads": 4}, "num_key_value_heads=2"),
    ({"lm_head_hdsz": "1024"}, "lm_head_hdsz='1024'"),
    ({"rms_norm_eps": None}, "rms_norm_eps=None"),
])
def test_official_fields_that_would_change_the_model_are_refused_naming_them(changes, message, tmp_path):
    conf = saved("So16", **changes)
    with pytest.raises(ConfigError, match="^/x/config.json") as err:
        from_official(conf, "/x/config.json")
    assert message in str(err.value), str(err.value)
    write_saved_folder(tmp_path / "hf", conf)
    res = convert("--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"), check=False)
    assert res.returncode == 2 and message in res.stderr and not (tmp_path / "ck").exists(), res.stderr


def test_shipped_model_class_refuses_grouped_kv_heads():
    problems = unsupported_fields(GenLIPConfig(**saved("So16", num_attention_heads=4, num_key_value_heads=2)))
    assert any(p.startswith("num_key_value_heads=2") for p in problems), problems


# --------------------------------------------------------------------------------------------------
# 2. LayerScale at or below the official class's threshold (ls_init_value > 1e-6 builds it)


@pytest.mark.parametrize("ls", [1e-6, 5e-7, 0.0])
@pytest.mark.parametrize("with_gamma", [False, True], ids=["official-save", "gamma-in-file"])
def test_import_refuses_layer_scale_the_official_class_would_not_build(ls, with_gamma, tmp_path):
    """The official model of such a config.json has no LayerScale (its save holds no lambda1; a file that has them
    fails its strict load and loses them in a non-strict one): refused, naming the field, nothing written."""
    conf = saved("So16", ls_init_value=ls)
    weights = write_saved_folder(tmp_path / "hf", conf, layer_scale=with_gamma)
    assert any("lambda1" in k for k in weights) == with_gamma
    res = convert("--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"), check=False)
    assert res.returncode == 2 and f"ls_init_value={ls!r}" in res.stderr and "1e-6" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "ck").exists()
    assert any(p.startswith(f"ls_init_value={ls!r}") for p in unsupported_fields(GenLIPConfig(**conf)))


def tiny_state(layer_scale: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Trainer-named weights of the tiny model with 'trained' LayerScale vectors around ``layer_scale`` + 0.05."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in sorted(expected_shapes(tiny_config().model).items()):
        base = layer_scale + 0.05 if "lambda1" in k else 1.0 if ("norm" in k and k.endswith("weight")) else 0.0
        out[k] = base + 0.02 * torch.randn(shape, generator=g)
    return out


def tiny_client(**model) -> dict:
    cfg = tiny_config()
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return {"config": cfg.to_dict(), "iteration": 7, "source": "/runs/tiny/checkpoints"}


@pytest.mark.parametrize("init", [1e-6, 1e-7, 0.0])
def test_export_of_a_small_layer_scale_init_keeps_the_trained_gamma(init, tmp_path):
    """A run trained with LayerScale initialised at or below 1e-6 exports a config.json from which the official
    class builds LayerScale (ls_init_value 1e-5: only an initial value, the trained gamma is in the weights), so
    its strict load takes every tensor; the run's own init stays in genlip_training, and a re-import restores it."""
    state = tiny_state(layer_scale=init)
    out = write_hf_folder(state, tiny_client(layer_scale_init=init), tmp_path / "hf", dtype="fp32")
    conf = json.loads((out / "config.json").read_text())
    weights, _ = load_hf_weights(out)
    assert conf["ls_init_value"] > 1e-6 and conf["genlip_training"]["config"]["model"]["layer_scale_init"] == init
    assert set(weights) == official_state_keys(conf)  # the official GenLIPModel's strict load
    assert weights["visual.layers.2.layer_scale2.lambda1"].equal(state["layers.2.layer_scale2.lambda1"])

    convert("--from-hf", str(out), "--save", str(tmp_path / "ck"))
    assert marker_model(tmp_path / "ck")["layer_scale_init"] == init
    convert("--load", str(tmp_path / "ck"), "--save", str(tmp_path / "again"), "--dtype", "fp32")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: v for k, v in again.items() if k != "genlip_training"} == \
        {k: v for k, v in conf.items() if k != "genlip_training"}
    assert again["genlip_training"]["config"]["model"] == conf["genlip_training"]["config"]["model"]


# --------------------------------------------------------------------------------------------------
# 3. fields the trainer does not use survive a round trip as they were


@pytest.mark.parametrize("form", ["published", "save_pretrained"])
@pytest.mark.parametrize("name", ["L16", "So16", "g16"])
def test_round_trip_keeps_fields_it_does_not_use(name, form, tmp_path, quick_export):
    conf = small(name) if form == "published" else saved(name)
    weights = write_saved_folder(tmp_path / "hf", conf)
    convert("--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"))
    convert("--load", str(tmp_path / "ck"), "--save", str(tmp_path / "back"))
    out = json.loads((tmp_path / "back" / "config.json").read_text())
    changed = {k: (v, out.get(k, "(absent)")) for k, v in conf.items() if out.get(k, "(absent)") != v}
    assert set(changed) <= REWRITTEN, changed
    assert out["rope_scaling"] == {"type": "mrope", "mrope_section": conf["rope_scaling"]["mrope_section"]}
    assert out.get("num_patches", "(absent)") == conf.get("num_patches", "(absent)")
    assert out["architectures"] == (["GenLIP"] if name == "L16" else ["GenLIPModel"])
    back, _ = load_hf_weights(tmp_path / "back")
    assert sorted(back) == sorted(weights) and all(back[k].equal(weights[k]) for k in weights)

    # --vision-only: the kept fields too, but the class it holds
    convert("--load", str(tmp_path / "ck"), "--save", str(tmp_path / "enc"), "--vision-only")
    enc = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert enc["architectures"] == ["GenLIPVisionModel"] and enc.get("num_patches") == conf.get("num_patches")


def test_a_run_started_from_the_import_exports_the_kept_fields(tmp_path, quick_export, capsys):
    """A later checkpoint of a run started from the import (train.load names it) carries them too; when the
    imported checkpoint is gone, the export says which fields it could not carry."""
    conf = saved("g16")
    write_saved_folder(tmp_path / "hf", conf)
    ck = tmp_path / "ck"
    convert("--from-hf", str(tmp_path / "hf"), "--save", str(ck))
    state, client = read_checkpoint(ck)
    run_cfg = json.loads(json.dumps(client["config"]))
    run_cfg["train"]["load"] = str(ck)
    trained = {"config": run_cfg, "iteration": 40, "source": "/runs/g16/checkpoints"}  # a trainer checkpoint's
    out = write_hf_folder(state, trained, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert (written["num_patches"], written["lm_head_hdsz"], written["initializer_factor"]) == (196, 1024, 1.0)

    run_cfg["train"]["load"] = str(tmp_path / "moved")
    capsys.readouterr()
    out = write_hf_folder(state, trained, tmp_path / "out2")
    note = capsys.readouterr().err
    assert str(tmp_path / "moved") in note and "num_patches" in note, note
    assert "num_patches" not in json.loads((out / "config.json").read_text())


# --------------------------------------------------------------------------------------------------
# 4. non-finite weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_import_refuses_non_finite_weights_naming_the_tensor(value, tmp_path):
    bad = "visual.layers.0.mlp.fc2.weight"
    write_saved_folder(tmp_path / "hf", saved("So16"), poison={bad: value})
    res = convert("--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"), check=False)
    assert res.returncode == 2 and bad in res.stderr and "non-finite" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "ck").exists()


def test_export_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    state = tiny_state()
    state["layers.1.self_attn.gate.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"layers.1.self_attn.gate.weight.*non-finite|non-finite.*"
                                              r"layers.1.self_attn.gate.weight"):
        write_hf_folder(state, tiny_client(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------------------------------
# 5. --save never lands in a training run


def fake_run(out: Path) -> dict[str, bytes]:
    """A training run's output directory as the trainer leaves it (markers and a checkpoint tag with its
    manifest); returns every file's bytes to check that nothing changed."""
    tag = out / "checkpoints" / "iter_0000002"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"model states")
    (tag / "genlip_manifest.json").write_text("{}\n")
    (out / "checkpoints" / "latest").write_text("iter_0000002")
    (out / "logs").mkdir()
    (out / "logs" / "train.jsonl").write_text('{"step": 2}\n')
    (out / "config.json").write_text('{"model": "the run\'s"}\n')
    (out / ".genlip.lock").write_text("host h, pid 1\n")
    return snapshot(out)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_never_writes_into_a_run_even_with_overwrite(tmp_path, quick_export):
    run = tmp_path / "run"
    before = fake_run(run)
    write_saved_folder(tmp_path / "hf", saved("So16"))
    ck = tmp_path / "ck"
    convert("--from-hf", str(tmp_path / "hf"), "--save", str(ck))
    targets = {  # --save -> what the error must say
        run: "a training run's output directory",
        run / "checkpoints": "checkpoints",
        run / "checkpoints" / "iter_0000002": "checkpoint tag",
        run / "checkpoints" / "iter_0000002" / "hf": "checkpoint tag",
        run / "checkpoints" / "iter_0000009": "checkpoint tag",
    }
    for target, message in targets.items():
        for args in (["--load", str(ck)], ["--from-hf", str(tmp_path / "hf")]):
            res = convert(*args, "--save", str(target), "--overwrite", check=False)
            assert res.returncode == 2 and str(target) in res.stderr and message in res.stderr, (target, args, res)
            assert "Traceback" not in res.stderr
    assert snapshot(run) == before
    assert not (run / "checkpoints" / "iter_0000009").exists()
    # what --overwrite is for still works: an HF folder replaced, a weights-only import redone
    convert("--load", str(ck), "--save", str(tmp_path / "hf"), "--overwrite")
    convert("--from-hf", str(tmp_path / "hf"), "--save", str(ck), "--overwrite")
    # an export into its own source checkpoint directory is refused too
    res = convert("--load", str(ck), "--save", str(ck), "--overwrite", check=False)
    assert res.returncode == 2 and "checkpoints" in res.stderr, res.stderr


def test_help_says_what_overwrite_never_does():
    from hf_cases import CONVERT
    import runpy

    text = runpy.run_path(str(CONVERT))["build_parser"]().format_help()
    assert "--overwrite" in text and "output directory" in text and "checkpoint" in text
