"""GenLIP: one transformer reads [image patches][prompt][caption] and predicts the caption (GENLIP_SPEC.md §2).

A packed batch (see ``megatron_genlip.data.packing``) is a dict of
  input_ids   [B, L]  token ids; 0 at image and padding slots
  labels      [B, L]  target id at caption / <|im_end|> / "\\n" slots, -100 elsewhere
  positions   [B, 3, L] 3-axis M-RoPE positions (image (0,r,c); text from max(gh,gw); padding -1)
  sample_ids  [B, L]  packed-sample index per token, -1 on padding
  token_kinds [B, L]  1 image, 0 text, -1 padding
  patches     [N, 3, p, p]  all image patches of the batch, in row-major token order

Module names follow the Hugging Face keys of GENLIP_SPEC.md §6 where they can (``vision_embeddings``,
``layers``, ``ln_post``, ``embeddings``, ``in_proj``, ``proj``, ``lm_head``); q_proj is held as ``q`` + ``gate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_genlip.config import ModelConfig
from megatron_genlip.model.layers import KVCache, TransformerBlock, normal_init
from megatron_genlip.model.masks import KIND_IMAGE, sdpa_mask
from megatron_genlip.model.rope import MultimodalRotaryEmbedding
from megatron_genlip.model.spec import get_layer_spec, parallel_config
from megatron_genlip.parallel import state

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """Token-mean loss over the micro-batch plus what is needed to split it per sample."""

    loss: torch.Tensor  # scalar: mean over labelled tokens (GENLIP_SPEC.md §2.9)
    token_losses: torch.Tensor  # [N_lab] per labelled target
    token_rows: torch.Tensor  # [N_lab] row index of each target
    token_sample_ids: torch.Tensor  # [N_lab] packed-sample id of each target

    @property
    def num_tokens(self) -> int:
        return self.token_losses.numel()


class VisionEmbeddings(torch.nn.Module):
    """Conv2d(3 -> d, kernel = stride = patch) applied per 16x16 patch: no position embedding, no CLS."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = cfg.patch_size
        self.patch_embedding = torch.nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, C, p, p] -> [N, d]; identical to the conv on the patch (a linear map of (c, y, x))."""
        w = self.patch_embedding.weight
        return F.linear(patches.to(w.dtype).flatten(1), w.flatten(1), self.patch_embedding.bias)


class GenLIPModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, tensor_parallel: int = 1):
        super().__init__()
        state.ensure_initialized(tensor_parallel)
        self.cfg = cfg
        spec = get_layer_spec(cfg)
        pconfig = parallel_config(cfg, tensor_parallel)
        tp_group = state.tensor_parallel_group()
        d, e = cfg.hidden_size, cfg.text_embed_dim
        init = normal_init(cfg.init_std)

        self.vision_embeddings = VisionEmbeddings(cfg)
        self.embeddings = spec.vocab_embedding(cfg.vocab_size, e, init_method=init, config=pconfig, tp_group=tp_group)
        self.in_proj = torch.nn.Linear(e, d) if e != d else None
        self.rotary = MultimodalRotaryEmbedding(cfg.head_dim, cfg.mrope_section, cfg.rope_theta)
        self.layers = torch.nn.ModuleList(
            TransformerBlock(cfg, spec, pconfig, tp_group, i) for i in range(cfg.num_layers)
        )
        self.ln_post = spec.layer_norm(d, eps=cfg.layernorm_eps)
        self.proj = torch.nn.Linear(d, e) if e != d else None
        self.lm_head = spec.column_linear(e, cfg.vocab_size, bias=False, init_method=init, config=pconfig,
                                          tp_group=tp_group)
        self._init_replicated_modules()
        self.to(getattr(torch, cfg.params_dtype))

    def _init_replicated_modules(self) -> None:
        """§2.10 for the modules megatron-core does not initialise (TP layers get init_method at build)."""
        std = self.cfg.init_std
        with torch.no_grad():
            pe = self.vision_embeddings.patch_embedding
            torch.nn.init.normal_(pe.weight, std=std)
            pe.bias.zero_()
            for lin in (self.in_proj, self.proj):
                if lin is not None:
                    torch.nn.init.normal_(lin.weight, std=std)
                    lin.bias.zero_()

    # ----------------------------------------------------------------------------------------------
    # pieces (reused by training, generation and feature extraction)

    def embed(self, input_ids: torch.Tensor, token_kinds: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        """Text embedding of every slot, then image-patch embeddings scattered over image slots: [L, B, d]."""
        x = self.embeddings(input_ids)
        if self.in_proj is not None:
            x = self.in_proj(x)
        image_slots = token_kinds == KIND_IMAGE
        if patches is not None and patches.shape[0] > 0:
            img = self.vision_embeddings(patches).to(x.dtype)
            if img.shape[0] != int(image_slots.sum()):
                raise ValueError(f"{img.shape[0]} patches for {int(image_slots.sum())} image slots")
            x = x.masked_scatter(image_slots[..., None], img)
        return x.transpose(0, 1).contiguous()

    def encode(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """Blocks and ln_post. x [L, B, d]; positions [B, 3, L]; mask bool [B|1, 1, L, L_kv]."""
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.ln_post(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """proj + lm_head: [..., d] -> vocab logits (the local vocab shard under TP)."""
        if self.proj is not None:
            h = self.proj(h)
        return self.lm_head(h)

    # ----------------------------------------------------------------------------------------------
    # training / evaluation entry points

    def final_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """ln_post output for every slot of a packed batch: [B, L, d]."""
        x = self.embed(batch["input_ids"], batch["token_kinds"], batch.get("patches"))
        mask = sdpa_mask(batch["sample_ids"], batch["token_kinds"])
        return self.encode(x, batch["positions"], mask).transpose(0, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Next-token loss; the LM head runs only on positions whose next token carries a label (§2.9)."""
        h = self.final_hidden(batch)
        targets = batch["labels"][:, 1:]
        selected = targets != IGNORE_INDEX  # position i predicts label i+1; cross-sample pairs are -100
        logits = self.head(h[:, :-1][selected]).float()  # [N_lab, V/TP]
        token_losses = vocab_parallel_cross_entropy(logits[None], targets[selected][None])[0]
        rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(targets)[selected]
        loss = token_losses.mean() if token_losses.numel() else h.sum() * 0.0
        return LossOutput(loss, token_losses, rows, batch["sample_ids"][:, 1:][selected])

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for every slot [B, L, V/TP] (tests and export parity; training never builds these)."""
        return self.head(self.final_hidden(batch))


def build_model(cfg: ModelConfig, tensor_parallel: int = 1, seed: int | None = None) -> GenLIPModel:
    """Build a model with the §2.10 init; ``seed`` makes the weights identical on every rank and layout."""
    if seed is not None:
        torch.manual_seed(seed)
    return GenLIPModel(cfg, tensor_parallel)
