"""Hugging Face configuration of a GenLIP model (``model_type`` "genlip", GENLIP_SPEC.md §1, §6 and §6.9).

This file is copied into every exported folder and loaded there with ``trust_remote_code=True``; it
depends only on ``transformers``. It reads and writes the **official** GenLIP ``config.json`` schema: the
M-RoPE section lives under ``rope_scaling = {"type": "mrope", "mrope_section": [...]}`` and the LayerScale
init under ``ls_init_value``. A field that a ``config.json`` leaves out takes the official class's default
(:data:`OFFICIAL_DEFAULTS`), not a GenLIP training value, so that a folder means here what it means to the
official code; ``modeling_genlip`` refuses the defaults it does not implement instead of guessing.

Folders written by megatron-genlip before the official schema was adopted used ``layer_scale_init_value``
and a top-level ``mrope_section``; both are still read (:data:`LEGACY_NAMES`).
"""

from __future__ import annotations

from transformers import PretrainedConfig

# The official GenLIPConfig's defaults where they differ from the published GenLIP values (GENLIP_SPEC.md
# §6.9): a config.json without these fields builds a different model in the official code.
OFFICIAL_DEFAULTS = {
    "use_swiglu_ffn": False,
    "gated_attention": False,
    "mrope_interleaved": False,
    "ls_init_value": 0.0,  # LayerScale off
    "hidden_act": "gelu_pytorch_tanh",
    "vocab_size": 152064,
    "intermediate_size": 4304,
    "max_position_embeddings": 32768,
    "tokens_per_second": 4,
    "rope_scaling": None,
    "layer_norm_eps": 1e-6,
}

# The one value of each architecture switch that GenLIP trains with and modeling_genlip implements
# (GENLIP_SPEC.md §1.1, §6.9); a config with another value describes a model this code refuses to build.
IMPLEMENTED_VALUES = {
    "mrope_interleaved": True,
    "use_swiglu_ffn": True,
    "hidden_act": "silu",
    "use_llm_head": False,
    "llm_decoder": None,
    "spatial_merge_size": 1,
    "tie_word_embeddings": False,
}

# Fields the official GenLIPConfig sets in __init__ (so its save_pretrained writes them) that no layer of the official
# model reads: any value describes the same model. num_key_value_heads is read by no layer either (k_proj and v_proj
# are [d, d]); a value other than num_attention_heads claims grouped-query attention and is refused.
OFFICIAL_CLASS_FIELDS = {"initializer_factor": 1.0, "lm_head_hdsz": 1024, "rms_norm_eps": 1e-05,
                         "num_key_value_heads": None}

# The official block builds LayerScale only when ls_init_value > this (nn.Identity otherwise): a config at or
# below it describes a model without LayerScale, whatever the weights file holds.
LAYER_SCALE_MIN = 1e-6

# names our exports used before the official schema -> the official name they mean
LEGACY_NAMES = {"layer_scale_init_value": "ls_init_value", "mrope_section": "rope_scaling.mrope_section"}


def mrope_section_of(rope_scaling: dict | None, legacy_section: list[int] | None) -> list[int] | None:
    """The M-RoPE section of a config: ``rope_scaling.mrope_section`` (official) or a top-level
    ``mrope_section`` (legacy exports). Conflicting values raise, naming both fields."""
    official = list(rope_scaling["mrope_section"]) if rope_scaling and "mrope_section" in rope_scaling else None
    legacy = list(legacy_section) if legacy_section is not None else None
    if official is not None and legacy is not None and official != legacy:
        raise ValueError(f"rope_scaling.mrope_section {official} and mrope_section {legacy} disagree")
    return official if official is not None else legacy


class GenLIPConfig(PretrainedConfig):
    model_type = "genlip"

    def __init__(
        self,
        hidden_size: int = 1152,
        intermediate_size: int = OFFICIAL_DEFAULTS["intermediate_size"],  # SwiGLU inner width
        num_hidden_layers: int = 27,
        num_attention_heads: int = 16,
        text_embed_dim: int = 1152,  # in_proj / proj exist only when this differs from hidden_size
        vocab_size: int = OFFICIAL_DEFAULTS["vocab_size"],  # rows of the embedding and the LM head (padded)
        text_vocab_size: int | None = None,  # ids the tokenizer can produce; greedy decoding picks among these
        patch_size: int = 16,
        num_channels: int = 3,
        rope_scaling: dict | None = OFFICIAL_DEFAULTS["rope_scaling"],  # {"type": "mrope", "mrope_section": [T, H, W]}
        mrope_interleaved: bool = OFFICIAL_DEFAULTS["mrope_interleaved"],
        rope_theta: float = 10000.0,
        ls_init_value: float | None = None,  # LayerScale init; <= 1e-6 = LayerScale off in the official code
        drop_path_rate: float = 0.1,
        layer_norm_eps: float = OFFICIAL_DEFAULTS["layer_norm_eps"],
        hidden_act: str = OFFICIAL_DEFAULTS["hidden_act"],
        initializer_range: float = 0.02,
        attention_dropout: float = 0.0,
        gated_attention: bool = OFFICIAL_DEFAULTS["gated_attention"],  # q_proj [2d, d]: query rows, then gate rows
        use_swiglu_ffn: bool = OFFICIAL_DEFAULTS["use_swiglu_ffn"],
        use_liger_kernel: bool = True,  # the official trainer's fused loss; irrelevant for inference
        use_llm_head: bool = False,  # the official LLM-initialised head option (not implemented here)
        llm_decoder: str | None = None,
        max_position_embeddings: int = OFFICIAL_DEFAULTS["max_position_embeddings"],
        tokens_per_second: int = OFFICIAL_DEFAULTS["tokens_per_second"],  # video only
        spatial_merge_size: int = 1,
        vision_start_token_id: int = 151652,  # declared, never used in GenLIP sequences (§1.1)
        vision_end_token_id: int = 151653,
        image_token_id: int = 151655,  # <|image_pad|>; image slots carry input id 0 in packed rows
        eos_token_id: int | None = 151645,  # <|im_end|>
        vision_only: bool = False,  # exported with --vision-only: encoder weights only
        tie_word_embeddings: bool = False,
        mrope_section: list[int] | None = None,  # legacy name of rope_scaling.mrope_section
        layer_scale_init_value: float | None = None,  # legacy name of ls_init_value
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.text_embed_dim = text_embed_dim
        self.vocab_size = vocab_size
        self.text_vocab_size = text_vocab_size if text_vocab_size is not None else vocab_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        # held as the section itself; to_dict() writes it back as rope_scaling (transformers 5 would turn an
        # attribute named rope_scaling into its own rope_parameters format)
        self.mrope_section = mrope_section_of(rope_scaling, mrope_section)
        self.mrope_interleaved = mrope_interleaved
        self.rope_theta = rope_theta
        if ls_init_value is not None and layer_scale_init_value is not None and ls_init_value != layer_scale_init_value:
            raise ValueError(f"ls_init_value {ls_init_value} and layer_scale_init_value {layer_scale_init_value} disagree")
        self.ls_init_value = next((v for v in (ls_init_value, layer_scale_init_value) if v is not None),
                                  OFFICIAL_DEFAULTS["ls_init_value"])
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.gated_attention = gated_attention
        self.use_swiglu_ffn = use_swiglu_ffn
        self.use_liger_kernel = use_liger_kernel
        self.use_llm_head = use_llm_head
        self.llm_decoder = llm_decoder
        self.max_position_embeddings = max_position_embeddings
        self.tokens_per_second = tokens_per_second
        self.spatial_merge_size = spatial_merge_size
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.image_token_id = image_token_id
        self.vision_only = vision_only
        super().__init__(eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """The official schema: the section under ``rope_scaling``, never a top-level ``mrope_section``."""
        out = super().to_dict()
        section = out.pop("mrope_section", None)
        out["rope_scaling"] = None if section is None else {"type": "mrope", "mrope_section": list(section)}
        return out


def unsupported_fields(config: GenLIPConfig) -> list[str]:
    """Fields whose value describes a model that modeling_genlip (and the trainer) do not implement, each
    with the reason: the official class's defaults for fields a config.json leaves out, options GenLIP does
    not train with, LayerScale at or below the official class's threshold (:data:`LAYER_SCALE_MIN`: that class
    builds none), ``num_key_value_heads`` other than the heads, and an M-RoPE section naming channels the head dim
    does not have (GENLIP_SPEC.md §9 pitfall 1: the interleaved rule would silently cap it)."""
    problems = []
    for name, want in IMPLEMENTED_VALUES.items():
        if getattr(config, name, want) != want:
            problems.append(f"{name}={getattr(config, name)!r} (only {want!r} is implemented)")
    if not config.ls_init_value > LAYER_SCALE_MIN:
        problems.append(f"ls_init_value={config.ls_init_value!r} (the official class builds LayerScale only for "
                        "ls_init_value > 1e-6, so this config describes a model without it, which is not implemented)")
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is not None and kv_heads != config.num_attention_heads:
        problems.append(f"num_key_value_heads={kv_heads!r} (grouped-query attention is not implemented: it must "
                        f"equal num_attention_heads {config.num_attention_heads})")
    section = config.mrope_section
    if section is None or len(section) != 3:
        problems.append(f"rope_scaling.mrope_section={section!r} (3 entries [T, H, W] are needed)")
    else:
        half = config.head_dim // 2
        h_slots, w_slots = (half + 1) // 3, half // 3  # channels i < head_dim/2 with i % 3 == 1 (H), == 2 (W)
        if not (0 <= section[1] <= h_slots and 0 <= section[2] <= w_slots):
            problems.append(f"rope_scaling.mrope_section={list(section)} (at head dim {config.head_dim} only "
                            f"{h_slots} H and {w_slots} W channels exist; section[0] is not read)")
    return problems
