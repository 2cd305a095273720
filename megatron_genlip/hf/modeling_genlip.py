"""Hugging Face model classes for exported GenLIP folders (GENLIP_SPEC.md §2 and §6).

This file is copied into every exported folder and runs there with ``trust_remote_code=True``; it depends
only on ``torch`` and ``transformers`` (never on the trainer), and is importable as
``megatron_genlip.hf.modeling_genlip``, which also registers the classes with ``AutoConfig``/``AutoModel``.

* :class:`GenLIPVisionModel`: the deployed encoder (patch embedding, ``visual.layers``, ``ln_post``);
  :meth:`~GenLIPVisionModel.get_image_features` returns ``ln_post`` features of image tokens with full
  bidirectional attention and positions (0, r, c), which is what an MLLM projector consumes (§6).
* :class:`GenLIPModel`: the whole pre-training model (adds the text embedding, ``in_proj``/``proj`` and the
  LM head): a packed-row forward with the prefix-LM mask returning logits, and greedy captioning
  (:meth:`~GenLIPModel.generate`) with a KV cache.

Module names are the official checkpoint keys of §6, so ``state_dict()`` *is* the export format, and the
classes load the released official folders too (``GenLIPModel.from_pretrained(folder)``, or ``AutoModel`` once
this module is imported). A config whose fields describe something else (e.g. ``mrope_interleaved`` false,
LayerScale off, an M-RoPE section naming channels that do not exist) is refused, naming the fields.
A packed batch uses the trainer's layout: ``input_ids`` [B, L] (0 on image slots), ``position_ids``
[B, 3, L], ``sample_ids`` [B, L] (-1 padding), ``token_kinds`` [B, L] (1 image, 0 text, -1 padding) and
``pixel_values`` [N, C, p, p], every image patch of the batch in row-major token order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

try:  # inside an exported folder (remote code) the modules sit side by side
    from .configuration_genlip import GenLIPConfig, unsupported_fields
except ImportError:  # pragma: no cover - imported as a top-level module
    from configuration_genlip import GenLIPConfig, unsupported_fields

KIND_TEXT, KIND_IMAGE = 0, 1
IGNORE_INDEX = -100


@dataclass
class GenLIPOutput(ModelOutput):
    loss: torch.Tensor | None = None  # token-mean next-token loss when ``labels`` are given
    logits: torch.Tensor | None = None  # [B, L, vocab_size]
    last_hidden_state: torch.Tensor | None = None  # ln_post output [B, L, d] (before proj)


def prefix_lm_mask(sample_ids: torch.Tensor, token_kinds: torch.Tensor) -> torch.Tensor:
    """§2.7: query q sees key k iff same sample and (k <= q or both are image tokens). bool [B, 1, L, L].

    A padding query sees only itself (otherwise softmax over nothing is NaN); no real token sees padding.
    """
    L = sample_ids.shape[-1]
    idx = torch.arange(L, device=sample_ids.device)
    same = sample_ids[:, :, None] == sample_ids[:, None, :]
    causal = (idx[:, None] >= idx[None, :]) & same & (sample_ids[:, :, None] >= 0)
    image = (token_kinds[:, :, None] == KIND_IMAGE) & (token_kinds[:, None, :] == KIND_IMAGE) & same
    pad_self = (sample_ids[:, :, None] < 0) & (idx[:, None] == idx[None, :])
    return (causal | image | pad_self)[:, None]


def image_positions(gh: int, gw: int, device=None) -> torch.Tensor:
    """(t=0, row, col) of each patch in row-major order: [3, gh*gw]."""
    r = torch.arange(gh, device=device).repeat_interleave(gw)
    c = torch.arange(gw, device=device).repeat(gh)
    return torch.stack((torch.zeros_like(r), r, c))


class GenLIPRotary(nn.Module):
    """Interleaved 3-axis M-RoPE (§2.6): frequency channel i follows H if i%3==1 and i<3*section[1], W if
    i%3==2 and i<3*section[2], else T; rotate-half pairing; cos/sin in fp32, cast to the activation dtype."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.head_dim, self.section, self.theta = config.head_dim, list(config.mrope_section), config.rope_theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # computed per call (no buffers): transformers builds models on the meta device before loading
        hd, sec, dev = self.head_dim, self.section, position_ids.device
        axis = [1 if (i % 3 == 1 and i < 3 * sec[1]) else 2 if (i % 3 == 2 and i < 3 * sec[2]) else 0
                for i in range(hd // 2)]
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=dev).float() / hd))
        pos = position_ids.float().transpose(1, 2)[..., torch.tensor(axis, device=dev)]  # [B, L, hd/2]
        freqs = pos * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, L, hd]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GenLIPAttention(nn.Module):
    """MHA whose q_proj [2d, d] holds the query (first half) and an elementwise sigmoid gate (second half)."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        d = config.hidden_size
        self.heads, self.head_dim, self.gated = config.num_attention_heads, config.head_dim, config.gated_attention
        self.q_proj = nn.Linear(d, 2 * d if self.gated else d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, cos, sin, mask, past=None):
        B, L, d = x.shape
        split = lambda t: t.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = self.q_proj(x)
        gate = None
        if self.gated:
            q, gate = q.chunk(2, dim=-1)
        q, k, v = _rotate(split(q), cos, sin), _rotate(split(self.k_proj(x)), cos, sin), split(self.v_proj(x))
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, d)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.out_proj(out), (k, v)


class GenLIPMLP(nn.Module):
    """SwiGLU: fc2(silu(gate_fc(x)) * fc1(x))."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.fc1 = nn.Linear(d, f)
        self.gate_fc = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(F.silu(self.gate_fc(x)) * self.fc1(x))


class GenLIPLayerScale(nn.Module):
    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), config.ls_init_value))

    def forward(self, x):
        return x * self.lambda1


class GenLIPBlock(nn.Module):
    """x += gamma1 * attn(LN1 x); x += gamma2 * mlp(LN2 x). (DropPath is a training-only identity here.)"""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.self_attn = GenLIPAttention(config)
        self.layer_scale1 = GenLIPLayerScale(config)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = GenLIPMLP(config)
        self.layer_scale2 = GenLIPLayerScale(config)

    def forward(self, x, cos, sin, mask, past=None):
        a, kv = self.self_attn(self.layer_norm1(x), cos, sin, mask, past)
        x = x + self.layer_scale1(a)
        return x + self.layer_scale2(self.mlp(self.layer_norm2(x))), kv


class GenLIPEncoderLayers(nn.Module):
    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(GenLIPBlock(config) for _ in range(config.num_hidden_layers))


class GenLIPVisionEmbeddings(nn.Module):
    """Conv2d(C -> d, kernel = stride = patch) applied to each patch: no position embedding, no CLS (§2.2)."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        p = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [N, C, p, p] -> [N, d]
        w = self.patch_embedding.weight
        return self.patch_embedding(pixel_values.to(w.dtype)).flatten(1)


class GenLIPPreTrainedModel(PreTrainedModel):
    config_class = GenLIPConfig
    base_model_prefix = "genlip"
    main_input_name = "pixel_values"
    _no_split_modules = ["GenLIPBlock"]

    def _init_weights(self, module):  # GENLIP_SPEC.md §2.10 (only used for fresh, non-loaded models)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, GenLIPLayerScale):
            module.lambda1.data.fill_(self.config.ls_init_value)


class GenLIPVisionModel(GenLIPPreTrainedModel):
    """The vision encoder: ``vision_embeddings``, ``visual.layers``, ``ln_post`` (the --vision-only export)."""

    def __init__(self, config: GenLIPConfig):
        super().__init__(config)
        self._build_encoder(config)
        self.post_init()

    def _build_encoder(self, config: GenLIPConfig) -> None:
        problems = unsupported_fields(config)
        if problems:
            raise ValueError("this GenLIP config describes a model that modeling_genlip does not implement: "
                             + "; ".join(problems))
        self.vision_embeddings = GenLIPVisionEmbeddings(config)
        self.visual = GenLIPEncoderLayers(config)
        self.ln_post = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = GenLIPRotary(config)

    def encode(self, x, position_ids, mask, cache: list | None = None) -> torch.Tensor:
        """Blocks + ln_post on embeddings x [B, L, d]; ``cache`` (a list, one (k, v) per layer) is extended."""
        cos, sin = self.rotary(position_ids, x.dtype)
        for i, layer in enumerate(self.visual.layers):
            past = cache[i] if cache is not None and i < len(cache) else None
            x, kv = layer(x, cos, sin, mask, past)
            if cache is not None:
                cache[i:i + 1] = [kv]
        return self.ln_post(x)

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """``ln_post`` features [N, d] of every patch; each image attends to itself only, bidirectionally.

        pixel_values: [N, C, p, p], all images' patches in row-major order; image_grid_thw: [num_images, 3].
        """
        feats, start = [], 0
        for t, gh, gw in image_grid_thw.tolist():
            n = int(t * gh * gw)
            x = self.vision_embeddings(pixel_values[start:start + n])[None]
            pos = image_positions(int(gh), int(gw), x.device)[None]
            mask = torch.ones(1, 1, n, n, dtype=torch.bool, device=x.device)
            feats.append(self.encode(x, pos, mask)[0])
            start += n
        return torch.cat(feats)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **_) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.get_image_features(pixel_values, image_grid_thw))


class GenLIPModel(GenLIPVisionModel):
    """The full pre-training model: encoder + text embedding (+ in_proj) and proj + LM head."""

    def __init__(self, config: GenLIPConfig):
        GenLIPPreTrainedModel.__init__(self, config)
        if config.vision_only:
            raise ValueError("this folder holds a --vision-only export; load it with GenLIPVisionModel / AutoModel")
        self._build_encoder(config)
        d, e = config.hidden_size, config.text_embed_dim
        self.embeddings = nn.Embedding(config.vocab_size, e)
        self.in_proj = nn.Linear(e, d) if e != d else None
        self.proj = nn.Linear(d, e) if e != d else None
        self.lm_head = nn.Linear(e, config.vocab_size, bias=False)
        self.post_init()

    def embed(self, input_ids, token_kinds=None, pixel_values=None) -> torch.Tensor:
        """Text embedding of every slot, image-patch embeddings scattered over image slots: [B, L, d]."""
        x = self.embeddings(input_ids)
        if self.in_proj is not None:
            x = self.in_proj(x)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            slots = token_kinds == KIND_IMAGE
            img = self.vision_embeddings(pixel_values).to(x.dtype)
            if img.shape[0] != int(slots.sum()):
                raise ValueError(f"{img.shape[0]} patches for {int(slots.sum())} image slots")
            x = x.masked_scatter(slots[..., None], img)
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.proj(h) if self.proj is not None else h)

    def forward(self, input_ids, pixel_values=None, position_ids=None, sample_ids=None, token_kinds=None,
                labels=None, **_) -> GenLIPOutput:
        """A packed batch (see the module docstring). Without ``sample_ids``/``token_kinds`` every row is one
        all-text sample; without ``position_ids`` text positions are 0, 1, 2, ... on all three axes."""
        B, L = input_ids.shape
        if token_kinds is None:
            token_kinds = torch.zeros_like(input_ids)
        if sample_ids is None:
            sample_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, 3, L)
        x = self.embed(input_ids, token_kinds, pixel_values)
        h = self.encode(x, position_ids, prefix_lm_mask(sample_ids, token_kinds))
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return GenLIPOutput(loss=loss, logits=logits, last_hidden_state=h)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, input_ids: torch.Tensor,
                 max_new_tokens: int = 64, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy caption of one image: ``[patches][prompt ids]`` once (prefix-LM mask), then one token at a
        time with a KV cache. Text positions continue from max(gh, gw) on all three axes (§2.5); the choice
        is restricted to the tokenizer's ``text_vocab_size`` ids. Returns the new ids [1, n] without EOS."""
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        (t, gh, gw), = image_grid_thw.tolist()
        n_img = int(t * gh * gw)
        dev = self.lm_head.weight.device
        prompt = input_ids.reshape(1, -1).to(dev)
        ids = torch.cat((torch.zeros(1, n_img, dtype=torch.long, device=dev), prompt), dim=1)
        kinds = torch.cat((torch.full((1, n_img), KIND_IMAGE, device=dev), torch.zeros_like(prompt)), dim=1)
        start = max(int(gh), int(gw))
        text_pos = torch.arange(start, start + prompt.shape[1], device=dev).expand(3, -1)
        pos = torch.cat((image_positions(int(gh), int(gw), dev), text_pos), dim=1)[None]
        cache: list = []
        h = self.encode(self.embed(ids, kinds, pixel_values.to(dev)), pos, prefix_lm_mask(torch.zeros_like(ids), kinds),
                        cache)
        next_pos, out = start + prompt.shape[1], []
        token = int(self.head(h[:, -1]).float()[..., :self.config.text_vocab_size].argmax(-1))
        while token != eos and len(out) < max_new_tokens:
            out.append(token)
            x = self.embed(torch.tensor([[token]], device=dev))
            p = torch.full((1, 3, 1), next_pos, device=dev)
            h = self.encode(x, p, None, cache)  # one query attends every cached key
            token = int(self.head(h[:, -1]).float()[..., :self.config.text_vocab_size].argmax(-1))
            next_pos += 1
        return torch.tensor([out], dtype=torch.long)


class GenLIPAutoModel:
    """What ``AutoModel`` maps a GenLIP config to: :class:`GenLIPVisionModel` for --vision-only exports, else
    :class:`GenLIPModel`. (transformers keeps one class per config class and process, so the choice has to be
    made per folder here, not in ``auto_map``.)"""

    config_class = GenLIPConfig

    @staticmethod
    def model_class(config: GenLIPConfig) -> type:
        return GenLIPVisionModel if getattr(config, "vision_only", False) else GenLIPModel

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = GenLIPConfig.from_pretrained(pretrained_model_name_or_path)
        return cls.model_class(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return cls.model_class(config)._from_config(config, **kwargs)

    from_config = _from_config

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):  # called by transformers for remote code
        return None


AutoConfig.register("genlip", GenLIPConfig, exist_ok=True)
AutoModel.register(GenLIPConfig, GenLIPAutoModel, exist_ok=True)
