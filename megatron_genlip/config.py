"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

A config file is a YAML mapping whose top-level keys are the sections below (``model``, ``tokenizer``,
``data``, ``parallel``). ``--set model.num_layers=4`` style overrides are applied after the file.
Unknown keys are an error that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field(s)."""


@dataclass
class ModelConfig:
    """The GenLIP transformer (GENLIP_SPEC.md §1-2)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176  # SwiGLU inner width
    num_attention_heads: int = 4
    text_embed_dim: int = 64  # in_proj/proj exist only when this differs from hidden_size
    vocab_size: int = 151936  # model (padded) vocabulary; must cover the tokenizer
    patch_size: int = 16
    num_channels: int = 3
    mrope_section: list[int] = field(default_factory=lambda: [12, 12, 12])  # section[0] is never read
    rope_theta: float = 10000.0
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.1  # same rate in every layer, per packed row
    layernorm_eps: float = 1e-6
    init_std: float = 0.02
    gated_attention: bool = True
    backend: str = "local"  # layer classes: "local" (megatron-core TP layers) | "te" (Transformer Engine, GPU)
    attention: str = "sdpa"  # attention kernel: "sdpa" (dense prefix-LM mask reference)
    params_dtype: str = "float32"  # dtype the parameters are created in

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TokenizerConfig:
    """Which BPE vocabulary encodes text (GENLIP_SPEC.md §3)."""

    kind: str = "qwen"  # "qwen" (vendored Qwen ranks file) | "bpe" (a ranks file trained by tools/train_tokenizer.py)
    path: str | None = None  # ranks file; None = the vendored Qwen file
    prompt: str = "Describe the image in detail."  # stage-1 user prompt, no loss


@dataclass
class DataConfig:
    """How images and captions become packed rows (GENLIP_SPEC.md §2.1, §2.4, §4)."""

    stage: int = 1  # 1: fixed square resize; 2: native aspect ratio (smart_resize)
    image_size: int = 224  # stage 1: resize target (224 -> 14x14 = 196 patches)
    min_pixels: int = 4096  # stage 2 smart_resize budget
    max_pixels: int = 262144
    seq_length: int = 16384  # packed row length
    max_sample_length: int = 16384  # per-sample cap (stage 2 uses 4096); longer samples are skipped
    train_data: str | None = None  # indexed dataset prefix (tools/preprocess_data.py --output-prefix)
    valid_data: str | None = None  # held-out indexed dataset prefix
    pack_buffer_size: int = 2048  # samples scanned when filling a row (first-fit in arrival order)
    seed: int = 1234  # shuffling and packing seed (epoch e uses seed + e)
    num_workers: int = 2  # DataLoader worker processes per rank


@dataclass
class ParallelConfig:
    """Parallel layout. Only TP=PP=1 is built by this version of the model code."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# building dataclasses from plain dicts, with typed values and unknown-key errors


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` with YAML rules (numbers, bools, lists, null)."""
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config mapping (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    apply_overrides(raw, list(overrides or []))
    cfg = _from_dict(Config, raw)
    validate_model(cfg.model)
    return cfg


def validate_model(m: ModelConfig) -> None:
    """Fail fast, naming the fields, on a model that cannot be built."""
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    if m.head_dim % 2:
        raise ConfigError(f"head dim model.hidden_size/model.num_attention_heads = {m.head_dim} must be even (RoPE)")
    if len(m.mrope_section) != 3:
        raise ConfigError(f"model.mrope_section must have 3 entries (T, H, W), got {m.mrope_section}")
    if m.backend not in ("local", "te"):
        raise ConfigError(f"model.backend must be 'local' or 'te', got {m.backend!r}")
    if m.attention not in ("sdpa",):
        raise ConfigError(f"model.attention must be 'sdpa' in this version, got {m.attention!r}")
    if m.params_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.params_dtype must be 'float32' or 'bfloat16', got {m.params_dtype!r}")
    if not 0.0 <= m.drop_path_rate < 1.0:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
