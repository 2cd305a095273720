"""The one mapping between the official GenLIP ``config.json`` schema (GENLIP_SPEC.md §6.9) and ModelConfig.

Export (:func:`to_official`) writes every field the released configs carry, with the official names and
values, so that the official ``GenLIPConfig(**json)`` builds the model the trainer trained; our own fields
(:data:`OUR_FIELDS`) are added only where the official schema has no equivalent. Fields of an imported
config.json that the trainer does not use (:func:`kept_fields`: g/16's ``num_patches``, L/16's ``architectures``,
the official class's ``initializer_factor``, ...) travel in the weights-only checkpoint and are written back as
they were. A LayerScale init at or below the official class's threshold (it builds LayerScale only for
``ls_init_value > 1e-6``) is written as :data:`LAYER_SCALE_STAND_IN`, so that the official class builds LayerScale
and loads the trained vectors; the run's own init stays in ``genlip_training``, and an import restores it.

Import (:func:`from_official`) reads the official schema and the schema of our earlier exports
(``layer_scale_init_value``, top-level ``mrope_section``), and everything the official class's
``save_pretrained`` writes (``initializer_factor``, ``lm_head_hdsz``, ``rms_norm_eps``, ``num_key_value_heads``,
``rope_scaling`` with ``rope_type`` "default"). It interprets a ``config.json`` the way the official
class does (a missing field takes the official default, :data:`OFFICIAL_DEFAULTS`) and refuses, naming the
fields: unknown fields, values of the wrong type, and values that describe a model this trainer does not
implement (``mrope_interleaved`` false, ``use_swiglu_ffn`` false, LayerScale off, i.e. ``ls_init_value <= 1e-6``,
``num_key_value_heads`` other than the heads, an M-RoPE section naming channels that do not exist at the head
dim, ...). Name resolution, defaults and refusals are those of the
shipped ``configuration_genlip`` (the exported modeling code refuses the same configs), so a folder the
trainer accepts is one the exported code builds identically.
"""

from __future__ import annotations

import re
from typing import Any

from megatron_genlip.config import ConfigError, ModelConfig, validate_model
from megatron_genlip.hf.configuration_genlip import (IMPLEMENTED_VALUES, LAYER_SCALE_MIN, LEGACY_NAMES,
                                                     OFFICIAL_CLASS_FIELDS, OFFICIAL_DEFAULTS, GenLIPConfig,
                                                     unsupported_fields)

# official field -> the ModelConfig field holding the same value (rope_scaling.mrope_section <-> mrope_section
# is the one nested field, handled on its own)
MODEL_FIELDS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "text_embed_dim": "text_embed_dim",
    "vocab_size": "vocab_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "rope_theta": "rope_theta",
    "ls_init_value": "layer_scale_init",
    "drop_path_rate": "drop_path_rate",
    "layer_norm_eps": "layernorm_eps",
    "initializer_range": "init_std",
    "gated_attention": "gated_attention",
}

# model fields without a known official default: a config.json must state them
REQUIRED = tuple(k for k in MODEL_FIELDS if k not in OFFICIAL_DEFAULTS)

# training-only switches the trainer implements with one value (inference code ignores them)
TRAINER_ONLY_VALUES = {"attention_dropout": 0.0, "temporal_patch_size": 1}

# published fields that do not change the model: written with the published values, read with any value
PUBLISHED_INFO = {"use_liger_kernel": True, "tokens_per_second": 2}

# fields of ours the official schema has no equivalent for
OUR_FIELDS = ("text_vocab_size", "image_token_id", "eos_token_id", "vision_only", "auto_map", "genlip_training")

SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "text_embed_dim",
         "vocab_size", "patch_size", "num_channels")

# the JSON type of every field we read (int accepts no bool; float accepts int)
TYPES: dict[str, tuple[type, ...]] = {
    **{k: (int,) for k in (*SIZES, "spatial_merge_size", "temporal_patch_size", "max_position_embeddings",
                           "tokens_per_second", "vision_start_token_id", "vision_end_token_id", "num_patches",
                           "text_vocab_size", "image_token_id")},
    **{k: (int, float) for k in ("rope_theta", "ls_init_value", "layer_scale_init_value", "drop_path_rate",
                                 "layer_norm_eps", "initializer_range", "attention_dropout", "initializer_factor",
                                 "rms_norm_eps")},
    **{k: (int,) for k in ("lm_head_hdsz",)},
    **{k: (int, type(None)) for k in ("num_key_value_heads",)},
    **{k: (bool,) for k in ("gated_attention", "mrope_interleaved", "use_swiglu_ffn", "use_liger_kernel",
                            "use_llm_head", "tie_word_embeddings", "vision_only")},
    **{k: (str,) for k in ("model_type", "hidden_act")},
    **{k: (str, type(None)) for k in ("llm_decoder", "torch_dtype", "dtype")},
    **{k: (int, list, type(None)) for k in ("eos_token_id",)},
    **{k: (list,) for k in ("architectures", "mrope_section")},
    **{k: (dict, type(None)) for k in ("rope_scaling",)},
    **{k: (dict,) for k in ("auto_map", "genlip_training")},
}

# transformers' own bookkeeping fields (any version writes some of them); never part of the model
HF_GENERIC = frozenset({
    "transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id", "tokenizer_class",
    "prefix", "bos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "problem_type", "_attn_implementation_autoset", "use_cache",
})

ROPE_SCALING_KEYS = {"type", "rope_type", "mrope_section"}
ROPE_TYPES = ("mrope", "default")  # "default" is what transformers' Qwen2-VL code rewrites "mrope" to


def _known_fields() -> frozenset[str]:
    """Every field name an importable config.json may carry."""
    from transformers import GenerationConfig

    generation = set(GenerationConfig._get_default_generation_params())  # transformers drops these on load
    return frozenset({"model_type", "num_patches", "max_position_embeddings", "vision_start_token_id",
                      "vision_end_token_id", "rope_scaling", *MODEL_FIELDS, *OFFICIAL_DEFAULTS, *IMPLEMENTED_VALUES,
                      *TRAINER_ONLY_VALUES, *PUBLISHED_INFO, *OUR_FIELDS, *LEGACY_NAMES, *HF_GENERIC, *generation,
                      *OFFICIAL_CLASS_FIELDS})


# A run whose LayerScale init is at or below the official threshold (LAYER_SCALE_MIN) still has LayerScale, with
# trained vectors; its export says ls_init_value = this (only an initial value: the official class then builds
# LayerScale and loads the trained vectors), and keeps the run's own init in genlip_training, which an import of
# the folder restores.
LAYER_SCALE_STAND_IN = 1e-5

# fields an export derives from the model and the run (or writes in the published form: rope_scaling, the dtype);
# every other field of an imported config.json is one the trainer does not use, kept as it was (g/16's
# num_patches, L/16's architectures, the official class's initializer_factor, ...; :func:`kept_fields`)
DERIVED = frozenset({"model_type", "rope_scaling", "attention_dropout", "vision_only", "torch_dtype", "dtype",
                     "transformers_version", "_name_or_path", *MODEL_FIELDS, *IMPLEMENTED_VALUES, *OUR_FIELDS,
                     *LEGACY_NAMES})


def kept_fields(conf: dict) -> dict[str, Any]:
    """The fields of an imported config.json that the trainer does not use, to be written back as they were."""
    return {k: v for k, v in conf.items() if k not in DERIVED}


# --------------------------------------------------------------------------------------------------
# export


def official_model_fields(m: ModelConfig) -> dict[str, Any]:
    """The fields of the official schema that carry ModelConfig values (official names)."""
    out = {k: getattr(m, v) for k, v in MODEL_FIELDS.items()}
    out["rope_scaling"] = {"type": "mrope", "mrope_section": list(m.mrope_section)}
    return out


def to_official(m: ModelConfig, *, dtype: str, vision_only: bool, vision_start_token_id: int,
                vision_end_token_id: int, max_position_embeddings: int,
                kept: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json fields of the official schema for model ``m`` (§6.9), plus ``vision_only``.

    ``dtype``: "bfloat16" or "float32" (``torch_dtype``). The vision start/end ids come from the tokenizer
    (the official schema declares them; GenLIP sequences never contain them) and ``max_position_embeddings``
    from the packed row length. ``kept``: the unused fields of the config.json the model was imported from
    (:func:`kept_fields`), written as they were (``architectures`` only for the full model). A LayerScale init
    the official class would read as "no LayerScale" is written as :data:`LAYER_SCALE_STAND_IN`."""
    validate_model(m)
    out = {"architectures": ["GenLIPVisionModel" if vision_only else "GenLIPModel"], "model_type": "genlip"}
    out.update(official_model_fields(m))
    if not m.layer_scale_init > LAYER_SCALE_MIN:
        out["ls_init_value"] = LAYER_SCALE_STAND_IN
    out.update(IMPLEMENTED_VALUES)
    out.update(attention_dropout=TRAINER_ONLY_VALUES["attention_dropout"], torch_dtype=dtype,
               max_position_embeddings=max_position_embeddings, vision_start_token_id=vision_start_token_id,
               vision_end_token_id=vision_end_token_id, vision_only=vision_only, **PUBLISHED_INFO)
    kept = {k: v for k, v in (kept or {}).items() if k not in DERIVED and not (vision_only and k == "architectures")}
    if "num_key_value_heads" in kept:  # an import accepts only the heads themselves; they cannot have changed
        kept["num_key_value_heads"] = m.num_attention_heads
    out.update(kept)
    return out


# --------------------------------------------------------------------------------------------------
# import


def _check_names_and_types(conf: dict, where: str) -> None:
    """Unknown fields (and unknown rope_scaling keys) and values of the wrong JSON type, all named at once."""
    unknown = sorted(set(conf) - _known_fields())
    scaling = conf.get("rope_scaling")
    if isinstance(scaling, dict):
        unknown += [f"rope_scaling.{k}" for k in sorted(set(scaling) - ROPE_SCALING_KEYS)]
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (not in the official GenLIP schema "
                          "nor in megatron-genlip's exports)")
    wrong = [f"{k}={v!r} (expected {' or '.join(t.__name__ for t in TYPES[k])})" for k, v in conf.items()
             if k in TYPES and (not isinstance(v, TYPES[k]) or (isinstance(v, bool) and bool not in TYPES[k]))]
    wrong += [f"{k}={conf[k]!r} (expected a positive integer)" for k in SIZES
              if k in conf and isinstance(conf[k], int) and conf[k] < 1]
    if wrong:
        raise ConfigError(f"{where}: wrong value type: {'; '.join(wrong)}")


def _check_rope_scaling(conf: dict, where: str) -> None:
    """rope_scaling must be GenLIP's interleaved M-RoPE (type mrope), and the section (there or under the
    legacy top-level name) 3 integers."""
    scaling = conf.get("rope_scaling")
    if scaling is not None and scaling.get("type", scaling.get("rope_type")) not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope_scaling.type={scaling.get('type', scaling.get('rope_type'))!r}: GenLIP "
                          f"uses the interleaved M-RoPE (type {ROPE_TYPES[0]!r})")
    for name, section in (("rope_scaling.mrope_section", (scaling or {}).get("mrope_section")),
                          ("mrope_section", conf.get("mrope_section"))):
        if section is not None and not (isinstance(section, list) and len(section) == 3 and all(
                isinstance(s, int) and not isinstance(s, bool) for s in section)):
            raise ConfigError(f"{where}: {name}={section!r}: expected 3 integers [T, H, W]")


def _implemented(conf: dict, hf: GenLIPConfig, where: str) -> None:
    """Values the trainer cannot build, named with the field (the shipped modeling code's refusals plus the
    training-only switches); fields that were absent are said to be, since their official default applied."""
    problems = unsupported_fields(hf)
    problems += [f"{k}={conf[k]!r} (only {v!r} is implemented)" for k, v in TRAINER_ONLY_VALUES.items()
                 if k in conf and conf[k] != v]
    if conf.get("model_type") != "genlip":
        problems.insert(0, f"model_type={conf.get('model_type')!r} (expected 'genlip')")
    if problems:
        given = {LEGACY_NAMES.get(k, k).split(".")[0] for k in conf}
        absent = sorted({p.split("=")[0].split(".")[0] for p in problems} - given)
        note = f" ({', '.join(absent)} absent: the official class's default applies)" if absent else ""
        raise ConfigError(f"{where} describes a model this trainer does not implement: {'; '.join(problems)}{note}")


def from_official(conf: dict, where: str = "config.json") -> ModelConfig:
    """The trainer's ModelConfig of a config.json in the official schema or one of our exports (any
    version). Raises ConfigError naming ``where`` and the offending fields."""
    _check_names_and_types(conf, where)
    missing = [k for k in REQUIRED if k not in conf]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)} (no official default to fall back on)")
    _check_rope_scaling(conf, where)
    try:
        hf = GenLIPConfig(**conf)  # official names, legacy names and official defaults resolved in one place
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    _implemented(conf, hf, where)
    values = {v: getattr(hf, k) for k, v in MODEL_FIELDS.items()}
    recorded = _recorded_layer_scale_init(conf)
    if recorded is not None and hf.ls_init_value == LAYER_SCALE_STAND_IN:
        values["layer_scale_init"] = recorded  # our export of a run initialised at or below the threshold
    m = ModelConfig(**values, mrope_section=list(hf.mrope_section))
    try:
        validate_model(m)
    except ConfigError as e:  # the same checks as a training config, told in config.json's names
        official = {v: k for k, v in MODEL_FIELDS.items()} | {"mrope_section": "rope_scaling.mrope_section"}
        raise ConfigError(f"{where}: " + re.sub(r"model\.(\w+)", lambda w: official.get(w[1], w[0]), str(e))) from None
    return m


def _recorded_layer_scale_init(conf: dict) -> float | None:
    """The LayerScale init our export recorded in genlip_training when it wrote the stand-in (else None)."""
    training = conf.get("genlip_training")
    model = ((training or {}).get("config") or {}).get("model") if isinstance(training, dict) else None
    value = model.get("layer_scale_init") if isinstance(model, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > LAYER_SCALE_MIN:
        return float(value)
    return None


def check_gate_rows(q_proj_rows: int, m: ModelConfig, where: str) -> None:
    """``gated_attention`` must agree with q_proj: 2 x hidden_size rows (query, then gate) when true."""
    want = 2 * m.hidden_size if m.gated_attention else m.hidden_size
    if q_proj_rows != want:
        raise ConfigError(f"{where}: gated_attention is {str(m.gated_attention).lower()} but q_proj.weight has "
                          f"{q_proj_rows} rows (hidden_size {m.hidden_size}; gated q_proj holds query and gate "
                          f"rows, {2 * m.hidden_size})")


# ModelConfig fields that only shape training from scratch (init, regularisation), not the function computed
TRAINING_ONLY = ("layer_scale_init", "init_std", "drop_path_rate")


def model_differences(imported: ModelConfig, run: ModelConfig) -> list[str]:
    """Where a run's model config computes another function than the imported weights' config
    ("model.<field> <run value> != <imported value>"). Sections compare by the channels they place
    ([8,12,12] equals [12,12,12] at head dim 72); initialisation and DropPath may differ (a stage-2 run
    may change them)."""
    from megatron_genlip.model.rope import channel_axes

    out = [f"model.{f} {getattr(run, f)} != {getattr(imported, f)}" for f in MODEL_FIELDS.values()
           if f not in TRAINING_ONLY and getattr(run, f) != getattr(imported, f)]
    if not out and not channel_axes(run.head_dim, run.mrope_section).equal(
            channel_axes(imported.head_dim, imported.mrope_section)):
        out.append(f"model.mrope_section {run.mrope_section} != {imported.mrope_section} (other rotary channels)")
    return out
