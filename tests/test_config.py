"""YAML configs, dotted overrides, unknown keys and model validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_genlip.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml"))


def test_shipped_configs_load():
    assert {p.stem for p in CONFIGS} >= {"tiny", "L16", "L16-paper", "So16", "g16"}
    for p in CONFIGS:
        cfg = load_config(p)
        assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0


def test_overrides_are_typed(tmp_path):
    cfg = load_config(CONFIGS[0], ["model.num_layers=3", "model.mrope_section=[1,2,3]",
                                   "model.drop_path_rate=0.25", "tokenizer.path=null"])
    assert cfg.model.num_layers == 3 and cfg.model.mrope_section == [1, 2, 3]
    assert cfg.model.drop_path_rate == 0.25 and cfg.tokenizer.path is None


@pytest.mark.parametrize("override, needle", [
    ("model.num_layerz=3", "model.num_layerz"),
    ("modle.num_layers=3", "modle"),
    ("model.num_layers=2.5", "model.num_layers"),
    ("model.gated_attention=yes please", "model.gated_attention"),
    ("model.num_attention_heads=5", "model.num_attention_heads"),
    ("model.backend=cuda", "model.backend"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(Path(__file__).parent.parent / "examples/configs/tiny.yaml", [override])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden_sise: 8\n")
    with pytest.raises(ConfigError, match=r"model\.hidden_sise"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_te_backend_on_cpu_is_a_clear_error():
    import torch

    from megatron_genlip.model.spec import get_layer_spec

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the te backend error is CPU-specific")
    cfg = load_config(Path(__file__).parent.parent / "examples/configs/tiny.yaml", ["model.backend=te"])
    with pytest.raises(ConfigError, match="CUDA"):
        get_layer_spec(cfg.model)
