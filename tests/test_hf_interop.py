"""Interoperation with the official GenLIP checkpoints (GENLIP_SPEC.md §6.9): released folders in, exports in
the official schema out.

The official code is not a dependency: ``official_configs.py`` holds the three published config.json files
field for field and writes folders laid out like the released checkpoints (official-schema config.json, bf16
safetensors shards with an index, no modeling code). Folders keep the real widths and heads but fewer layers
and a smaller vocabulary, so that each case takes seconds; the published values themselves, full size, go
through the config mapping in :func:`test_published_config_imports_and_exports_unchanged`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from hf_cases import COMMON, TOLERANCE, convert, hf_validation_loss, tiny_config
from official_configs import PUBLISHED, official_shapes, published, write_official_folder
from trainer_harness import build_test_dataset, run, train_log

from megatron_genlip.config import ConfigError, ModelConfig
from megatron_genlip.hf.configuration_genlip import OFFICIAL_DEFAULTS, GenLIPConfig
from megatron_genlip.hf.convert import hf_config, load_hf_weights
from megatron_genlip.hf.official_config import from_official, kept_fields
from megatron_genlip.training.ckpt_format import WEIGHTS_ONLY_MARKER

OLD_EXPORT = Path(__file__).parent / "data" / "export_v1_tiny_config.json"  # written by the previous schema
ABSENT = object()
# where an export of an imported folder differs from its published config.json: nowhere. Fields the trainer does not
# use are written back as they were (L/16's architectures ["GenLIP"], a release bug (§9), g/16's num_patches, the
# 224-px patch count): test_hf_official_forms.py::test_round_trip_keeps_fields_it_does_not_use
EXPORT_CHANGES = {"L16": {}, "So16": {}, "g16": {}}
# a fresh export of a model (no imported config.json to keep fields of) writes what the trainer knows
FRESH_EXPORT_CHANGES = {
    "L16": {"architectures": (["GenLIP"], ["GenLIPModel"])},
    "So16": {},
    "g16": {"num_patches": (196, ABSENT)},
}
# T/H/W rotary channel counts the interleaved rule gives each published section (GENLIP_SPEC.md §2.6)
CHANNELS = {"L16": (12, 12, 12), "So16": (12, 12, 12), "g16": (16, 16, 16)}


def exported_differences(conf: dict, out: dict) -> dict:
    """{field: (published, exported)} for every field of ``conf`` that ``out`` does not carry unchanged."""
    return {k: (v, out.get(k, ABSENT)) for k, v in conf.items() if out.get(k, ABSENT) != v}


def axis_counts(axes: torch.Tensor) -> tuple[int, ...]:
    return tuple(int((axes == a).sum()) for a in range(3))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_imports_and_exports_unchanged(name, qwen_tokenizer):
    conf = published(name)
    m = from_official(conf)
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.text_embed_dim, m.vocab_size) \
        == tuple(conf[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                   "text_embed_dim", "vocab_size"))
    assert m.mrope_section == conf["rope_scaling"]["mrope_section"]
    assert (m.layer_scale_init, m.drop_path_rate, m.init_std, m.rope_theta) == \
        (conf["ls_init_value"], conf["drop_path_rate"], conf["initializer_range"], conf["rope_theta"])
    assert m.gated_attention and m.layernorm_eps == 1e-6  # class default (the JSONs do not set it)

    out = hf_config(m, qwen_tokenizer, vision_only=False, dtype="bf16")
    assert exported_differences(conf, out) == FRESH_EXPORT_CHANGES[name]
    kept = hf_config(m, qwen_tokenizer, vision_only=False, dtype="bf16", kept=kept_fields(conf))
    assert exported_differences(conf, kept) == EXPORT_CHANGES[name]
    # a field the official class would fill with a different default must be written explicitly
    assert set(OFFICIAL_DEFAULTS) <= set(out)
    assert "mrope_section" not in out and "layer_scale_init_value" not in out


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shipped_config_class_reads_the_published_json(name):
    from megatron_genlip.hf.modeling_genlip import GenLIPModel

    conf = published(name)
    config = GenLIPConfig(**conf)
    assert config.mrope_section == conf["rope_scaling"]["mrope_section"] and config.ls_init_value == 0.1
    with torch.device("meta"):
        model = GenLIPModel._from_config(config)  # full size on the meta device: shapes only
    d, heads = conf["hidden_size"], conf["num_attention_heads"]
    attn = model.visual.layers[0].self_attn
    assert (attn.heads, attn.head_dim, tuple(attn.q_proj.weight.shape)) == (heads, d // heads, (2 * d, d))
    assert tuple(model.visual.layers[0].mlp.fc1.weight.shape) == (conf["intermediate_size"], d)
    assert len(model.visual.layers) == conf["num_hidden_layers"] and model.rotary.section == config.mrope_section
    written = config.to_dict()  # and it writes the official schema back
    assert written["rope_scaling"] == conf["rope_scaling"] and written["ls_init_value"] == 0.1
    assert "mrope_section" not in written and "layer_scale_init_value" not in written


@pytest.fixture
def quick_qwen_export(monkeypatch, qwen_tokenizer):
    """Exports of imported official folders use the Qwen tokenizer; parsing its ranks and rebuilding its
    tokenizer.json take most of a minute on the test machine and have nothing to do with configs or weights:
    reuse the session's tokenizer and skip the tokenizer files (the export tests cover them)."""
    import megatron_genlip.data.tokenizer as tokenizer_module
    import megatron_genlip.hf.convert as convert_module

    monkeypatch.setattr(tokenizer_module, "load_tokenizer", lambda kind, path=None: qwen_tokenizer)
    monkeypatch.setattr(convert_module, "_write_tokenizer", lambda tok_cfg, out: None)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_official_folder_imports_and_exports_back(name, tmp_path, quick_qwen_export):
    """Official-format folder -> weights-only checkpoint (layout checked for TP=2 x PP=2) -> trainer model of its
    config -> exported folder: config.json equal on every published field, weights bit-identical."""
    from megatron_genlip.model.accounting import build_meta_model
    from megatron_genlip.model.rope import MultimodalRotaryEmbedding

    conf = published(name, num_hidden_layers=2, vocab_size=1024)
    src = tmp_path / "official"
    weights = write_official_folder(src, conf)
    ck = tmp_path / "ck"
    convert("--from-hf", str(src), "--save", str(ck), "--tp", "2", "--pp", "2")
    marker = json.loads((ck / "iter_0000000" / WEIGHTS_ONLY_MARKER).read_text())
    m = ModelConfig(**marker["config"]["model"])
    assert m.mrope_section == conf["rope_scaling"]["mrope_section"] and m.layer_scale_init == conf["ls_init_value"]

    model = build_meta_model(m)  # the trainer's model of the imported config (shapes and settings)
    d, heads = conf["hidden_size"], conf["num_attention_heads"]
    block = model.layers[1]
    assert (len(model.layers), block.self_attn.local_heads, block.self_attn.head_dim) == (2, heads, d // heads)
    assert tuple(block.self_attn.gate.weight.shape) == tuple(block.self_attn.q.weight.shape) == (d, d)
    assert tuple(block.mlp.fc1.weight.shape) == (conf["intermediate_size"], d)
    rotary = MultimodalRotaryEmbedding(m.head_dim, m.mrope_section, m.rope_theta)  # what the model builds
    assert axis_counts(rotary.axes) == CHANNELS[name]

    back = tmp_path / "back"
    convert("--load", str(ck), "--save", str(back), "--max-shard-size", "20MB")
    assert exported_differences(conf, json.loads((back / "config.json").read_text())) == EXPORT_CHANGES[name]
    again, _ = load_hf_weights(back)
    assert sorted(again) == sorted(weights) and all(torch.equal(again[k], weights[k]) for k in weights)


def rotary_angles(section: list[int], positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """GENLIP_SPEC.md §2.6 written out channel by channel: [L, head_dim/2] rotation angles."""
    out = torch.zeros(positions.shape[1], head_dim // 2, dtype=torch.float64)
    for i in range(head_dim // 2):
        axis = 1 if i % 3 == 1 and i < 3 * section[1] else 2 if i % 3 == 2 and i < 3 * section[2] else 0
        out[:, i] = positions[axis].double() * 10000.0 ** (-2 * i / head_dim)
    return out


def test_g16_section_reaches_the_rotary_tables(tmp_path):
    """[16,16,16] at head dim 96 puts channels 37, 38, 40, 41, ..., 47 on H/W; [12,12,12] would leave them on T,
    where image tokens (t = 0) do not rotate. Checked in the trainer's rotary of the imported config and in our
    Hugging Face model loaded from the official folder. These are the slowest channels (at most 8.3e-4 rad per
    position step), so the sine tables show the difference plainly and the attention output only slightly."""
    from transformers import AutoModel

    import megatron_genlip.hf.modeling_genlip  # noqa: F401 - registers "genlip" with AutoConfig/AutoModel
    from megatron_genlip.model.rope import MultimodalRotaryEmbedding

    conf = published("g16", num_hidden_layers=1, vocab_size=256)
    write_official_folder(tmp_path / "g16", conf, seed=1)
    m = from_official(json.loads((tmp_path / "g16" / "config.json").read_text()))
    gh, gw = 12, 16
    pos = torch.stack((torch.zeros(gh * gw, dtype=torch.long), torch.arange(gh).repeat_interleave(gw),
                       torch.arange(gw).repeat(gh)))
    want, old = rotary_angles([16, 16, 16], pos, 96), rotary_angles([12, 12, 12], pos, 96)
    moved = [i for i in range(48) if not torch.equal(want[:, i], old[:, i])]
    assert moved == [37, 38, 40, 41, 43, 44, 46, 47]
    assert (want.sin() - old.sin()).abs().max() > 5e-3

    _, sin = MultimodalRotaryEmbedding(m.head_dim, m.mrope_section, m.rope_theta)(pos[None], torch.float32)
    assert (sin[0, :, :48].double() - want.sin()).abs().max() < 1e-6

    hf = AutoModel.from_pretrained(str(tmp_path / "g16"), trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == "GenLIPModel" and hf.config.mrope_section == [16, 16, 16]
    _, sin = hf.rotary(pos[None], torch.float32)
    assert (sin[0, 0, :, :48].double() - want.sin()).abs().max() < 1e-6

    attn = hf.visual.layers[0].self_attn
    with torch.no_grad():  # random weights attend almost uniformly; sharpen q.k so that positions matter
        attn.q_proj.weight[:1536] *= 30
        attn.k_proj.weight *= 30
    branch = []
    attn.register_forward_hook(lambda module, args, out: branch.append(out[0]))
    patches = torch.rand(gh * gw, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for section in ([16, 16, 16], [12, 12, 12]):
        hf.rotary.section = section
        hf.get_image_features(patches, torch.tensor([[1, gh, gw]]))
    change = float((branch[0] - branch[1]).abs().max() / branch[0].abs().max())
    assert change > 5e-3, f"the attention output moved by {change:.2e} only"


REJECTED = [  # (changes to the published So/16 config.json, text the error must contain)
    ({"mrope_interleaved": False}, "mrope_interleaved=False"),
    ({"use_swiglu_ffn": False}, "use_swiglu_ffn=False"),
    ({"use_swiglu_ffn": ABSENT}, "use_swiglu_ffn absent"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act='gelu_pytorch_tanh'"),
    ({"ls_init_value": 0.0}, "ls_init_value=0.0"),
    ({"ls_init_value": ABSENT}, "ls_init_value absent"),
    ({"ls_init_value": 1e-6}, "ls_init_value=1e-06 (the official class builds LayerScale only for ls_init_value > 1e-6"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8 (grouped-query attention is not implemented"),
    ({"lm_head_hdsz": 10.5}, "lm_head_hdsz=10.5 (expected int)"),
    ({"rope_scaling": ABSENT}, "rope_scaling absent"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [12, 13, 12]}}, "mrope_section=[12, 13, 12]"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [12, 12, 13]}}, "mrope_section=[12, 12, 13]"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [12, 12]}}, "rope_scaling.mrope_section=[12, 12]"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.factor"),
    ({"rope_scaling": {"type": "yarn", "mrope_section": [12, 12, 12]}}, "rope_scaling.type='yarn'"),
    ({"use_llm_head": True}, "use_llm_head=True"),
    ({"llm_decoder": "Qwen/Qwen3-0.6B"}, "llm_decoder='Qwen/Qwen3-0.6B'"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
    ({"spatial_merge_size": 2}, "spatial_merge_size=2"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"model_type": "qwen2_vl"}, "model_type='qwen2_vl'"),
    ({"mrope_sections": [12, 12, 12]}, "unknown field(s) mrope_sections"),
    ({"hidden_size": "1152"}, "hidden_size='1152'"),
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"num_attention_heads": 5}, "hidden_size (1152) must be divisible by num_attention_heads (5)"),
    ({"hidden_size": ABSENT}, "missing field(s) hidden_size"),
    ({"mrope_section": [16, 16, 16]}, "rope_scaling.mrope_section [12, 12, 12] and mrope_section [16, 16, 16]"),
    ({"layer_scale_init_value": 0.2}, "ls_init_value 0.1 and layer_scale_init_value 0.2"),
]


@pytest.mark.parametrize("changes,message", REJECTED, ids=[m.split("=")[0].split(" ")[0] for _, m in REJECTED])
def test_import_rejects_fields_it_cannot_build_naming_them(changes, message):
    conf = published("So16", **changes)
    conf = {k: v for k, v in conf.items() if v is not ABSENT}
    with pytest.raises(ConfigError) as err:
        from_official(conf, "/x/config.json")
    assert message in str(err.value) and str(err.value).startswith("/x/config.json"), str(err.value)


@pytest.mark.parametrize("head_dim,section", [(72, [8, 12, 12]), (72, [0, 12, 12]), (64, [11, 11, 10]),
                                              (96, [16, 16, 16]), (96, [48, 4, 2])])
def test_sections_the_interleaved_rule_can_place_import(head_dim, section):
    """section[0] is not read and the sum need not be head_dim/2 (L/16's [8,12,12] at 72)."""
    conf = published("So16", hidden_size=head_dim * 16, rope_scaling={"type": "mrope", "mrope_section": section})
    assert from_official(conf).mrope_section == section


def test_training_configs_refuse_sections_the_rule_would_cap():
    """The trainer applies the same rule, so everything it exports imports again: L16-paper's section is
    written as the channels [8,12,12] actually places at head dim 64."""
    from megatron_genlip.config import load_config
    from megatron_genlip.model.rope import channel_axes

    paper = Path(__file__).parent.parent / "examples/configs/L16-paper.yaml"
    assert load_config(paper).model.mrope_section == [11, 11, 10]
    assert torch.equal(channel_axes(64, [11, 11, 10]), channel_axes(64, [8, 12, 12]))
    with pytest.raises(ConfigError, match=r"model.mrope_section \[8, 12, 12\] .* head dim 64 .* write \[11, 11, 10\]"):
        load_config(paper, ["model.mrope_section=[8,12,12]"])


def small_official(**changes) -> dict:
    """So/16's published fields at a width that converts in milliseconds (head dim 96 keeps [12,12,12] valid)."""
    return published("So16", num_hidden_layers=1, hidden_size=96, num_attention_heads=1, intermediate_size=256,
                     text_embed_dim=96, vocab_size=256, **changes)


def test_tool_refuses_inconsistent_folders_naming_the_field(tmp_path):
    cases = {  # folder -> text stderr must contain
        "interleave": (small_official(mrope_interleaved=False), None, "mrope_interleaved=False"),
        "gate": (small_official(gated_attention=False), True, "gated_attention is false but q_proj.weight has 192 rows"),
        "nogate": (small_official(), False, "gated_attention is true but q_proj.weight has 96 rows"),
    }
    for name, (conf, gated_rows, message) in cases.items():
        write_official_folder(tmp_path / name, conf, gated_rows=gated_rows)
        res = convert("--from-hf", str(tmp_path / name), "--save", str(tmp_path / f"ck-{name}"), check=False)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (name, res.stderr)
        assert str(tmp_path / name / "config.json") in res.stderr


def test_ungated_official_folder_imports(tmp_path):
    """The trainer implements ungated attention (the paper's "w/o gated attention" ablation): accepted when
    q_proj has no gate rows."""
    conf = small_official(gated_attention=False)
    write_official_folder(tmp_path / "hf", conf)
    convert("--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"))
    marker = json.loads((tmp_path / "ck" / "iter_0000000" / WEIGHTS_ONLY_MARKER).read_text())
    assert marker["config"]["model"]["gated_attention"] is False


def test_a_run_whose_model_differs_from_the_imported_config_is_refused(tmp_path):
    """Same shapes, another model: a run config with 24 heads (the paper's g/16) on the official 16-head g/16
    weights, or another rotary layout, is refused when the weights load; [8,12,12] vs [12,12,12] at head
    dim 72 is the same layout, and initialisation / DropPath may change between stages."""
    from megatron_genlip.config import load_config
    from megatron_genlip.hf.convert import load_weights_only
    from megatron_genlip.hf.official_config import model_differences

    g16 = from_official(published("g16"))
    run = load_config(Path(__file__).parent.parent / "examples/configs/g16.yaml").model
    assert model_differences(g16, run) == []
    assert model_differences(g16, dataclasses.replace(run, num_attention_heads=24, drop_path_rate=0.0)) == \
        ["model.num_attention_heads 24 != 16"]
    assert model_differences(g16, dataclasses.replace(run, mrope_section=[12, 12, 12])) == \
        ["model.mrope_section [12, 12, 12] != [16, 16, 16] (other rotary channels)"]
    l16 = from_official(published("L16"))
    assert model_differences(l16, dataclasses.replace(l16, mrope_section=[12, 12, 12], init_std=0.01)) == []

    write_official_folder(tmp_path / "hf", small_official())
    convert("--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"))
    imported = from_official(small_official())
    with pytest.raises(ConfigError, match=r"genlip_weights_only.json.*model.num_attention_heads 2 != 1"):
        load_weights_only(None, tmp_path / "ck" / "iter_0000000", dataclasses.replace(imported, num_attention_heads=2))


def test_exports_of_the_previous_schema_still_import(tmp_path):
    """A config.json exactly as megatron-genlip wrote it before the official schema (layer_scale_init_value,
    top-level mrope_section, the training recipe under genlip_training) imports to the same model and recipe."""
    old = json.loads(OLD_EXPORT.read_text())
    assert {"mrope_section", "layer_scale_init_value"} <= set(old) and not {"rope_scaling", "ls_init_value"} & set(old)
    tiny = tiny_config()
    assert from_official(old) == tiny.model
    config = GenLIPConfig(**old)
    assert config.mrope_section == [6, 5, 5] and config.ls_init_value == 0.1

    write_official_folder(tmp_path / "old", old, shards=1)
    convert("--from-hf", str(tmp_path / "old"), "--save", str(tmp_path / "ck"))
    marker = json.loads((tmp_path / "ck" / "iter_0000000" / WEIGHTS_ONLY_MARKER).read_text())
    assert marker["config"] == dict(old["genlip_training"]["config"], model=marker["config"]["model"])
    assert ModelConfig(**marker["config"]["model"]) == tiny.model


@pytest.mark.slow
def test_official_folder_starts_a_tp2_run(tmp_path):
    """A folder in the official layout (shaped like the tiny model) -> --from-hf --tp 2 -> the trainer at TP=2
    with lr 1e-30 for two steps. Its validation loss equals the loss of our Hugging Face model loaded from the
    official folder itself on the same held-out rows, so every weight arrived in its TP shard."""
    from transformers import AutoModel

    import megatron_genlip.hf.modeling_genlip  # noqa: F401 - registers "genlip" with AutoConfig/AutoModel

    m = tiny_config().model
    conf = published("So16", num_hidden_layers=m.num_layers, hidden_size=m.hidden_size, text_embed_dim=m.text_embed_dim,
                     intermediate_size=m.ffn_hidden_size, num_attention_heads=m.num_attention_heads,
                     vocab_size=m.vocab_size, rope_scaling={"type": "mrope", "mrope_section": m.mrope_section})
    src, ck = tmp_path / "official", tmp_path / "ck"
    write_official_folder(src, conf, seed=5, shards=3)
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model-00001-of-00003.safetensors",
                                                     "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                                                     "model.safetensors.index.json"]
    convert("--from-hf", str(src), "--save", str(ck), "--tp", "2")
    data = build_test_dataset(tmp_path, 40, 24)
    out = tmp_path / "run"
    proc = run(2, data, out, COMMON + ["parallel.tensor_parallel=2", "train.train_steps=2", "train.warmup_steps=1",
                                       "train.lr=1e-30", "train.min_lr=0", f"train.load={ck}"], timeout=600)
    assert "initialised from the weights of" in proc.stdout + proc.stderr
    evals = train_log(out, "eval")
    assert max(evals) == 2 and math.isfinite(evals[2]["val_loss"])

    hf = AutoModel.from_pretrained(str(src), trust_remote_code=True, dtype=torch.float32).eval()
    want = hf_validation_loss(hf, data["val"])
    assert math.isclose(evals[2]["val_loss"], want, rel_tol=TOLERANCE), (evals[2]["val_loss"], want)


def test_official_shapes_helper_matches_the_export_check():
    """The test folders' key list is the one the importer checks (both from GENLIP_SPEC.md §6)."""
    from megatron_genlip.hf.convert import expected_hf_shapes

    for name in PUBLISHED:
        conf = published(name, num_hidden_layers=3)
        assert official_shapes(conf) == expected_hf_shapes(conf)
