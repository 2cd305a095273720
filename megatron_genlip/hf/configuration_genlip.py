"""Hugging Face configuration of an exported GenLIP model (``model_type`` "genlip", GENLIP_SPEC.md §1 and §6).

This file is copied into every exported folder and loaded there with ``trust_remote_code=True``; it
depends only on ``transformers``. Field names follow the official GenLIP configs where the spec names them
(``text_embed_dim``, ``mrope_section``, ``gated_attention``, ``mrope_interleaved``, ``use_swiglu_ffn``,
``spatial_merge_size``, ``temporal_patch_size``, ``vision_start/end_token_id``, ``tie_word_embeddings``) and
the usual transformers names elsewhere.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class GenLIPConfig(PretrainedConfig):
    model_type = "genlip"

    def __init__(
        self,
        hidden_size: int = 1152,
        intermediate_size: int = 3072,  # SwiGLU inner width
        num_hidden_layers: int = 27,
        num_attention_heads: int = 16,
        text_embed_dim: int = 1152,  # in_proj / proj exist only when this differs from hidden_size
        vocab_size: int = 151936,  # rows of the embedding and the LM head (padded vocabulary)
        text_vocab_size: int | None = None,  # ids the tokenizer can produce; greedy decoding picks among these
        patch_size: int = 16,
        num_channels: int = 3,
        mrope_section: list[int] | None = None,  # interleaved M-RoPE; section[0] is never read (§2.6)
        mrope_interleaved: bool = True,
        rope_theta: float = 10000.0,
        layer_scale_init_value: float = 0.1,
        drop_path_rate: float = 0.1,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        gated_attention: bool = True,  # q_proj is [2d, d]: query rows, then gate rows
        use_swiglu_ffn: bool = True,
        use_liger_kernel: bool = False,  # the official trainer's fused loss; irrelevant for inference
        spatial_merge_size: int = 1,
        temporal_patch_size: int = 1,
        vision_start_token_id: int = 151652,  # declared, never used in GenLIP sequences (§1.1)
        vision_end_token_id: int = 151653,
        image_token_id: int = 151655,  # <|image_pad|>; image slots carry input id 0 in packed rows
        eos_token_id: int | None = 151645,  # <|im_end|>
        vision_only: bool = False,  # exported with --vision-only: encoder weights only
        tie_word_embeddings: bool = False,
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
        self.mrope_section = list(mrope_section) if mrope_section is not None else [12, 12, 12]
        self.mrope_interleaved = mrope_interleaved
        self.rope_theta = rope_theta
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.gated_attention = gated_attention
        self.use_swiglu_ffn = use_swiglu_ffn
        self.use_liger_kernel = use_liger_kernel
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.image_token_id = image_token_id
        self.vision_only = vision_only
        super().__init__(eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
