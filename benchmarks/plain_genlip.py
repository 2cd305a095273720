"""R0 of PERFORMANCE.md §4.2: a plain-PyTorch GenLIP (nn.Linear, SDPA with a boolean prefix-LM mask, LM
head on labelled positions, torch AdamW(foreach)) used as the speed reference for the trainer's step.

It loads the Hugging Face-keyed weights of a trainer model, so both compute the same function
(checked by the benchmark before timing). No megatron-core, no DeepSpeed, no layer spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_genlip.model.rope import MultimodalRotaryEmbedding, apply_rotary


class PlainBlock(nn.Module):
    def __init__(self, d: int, f: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.q_proj = nn.Linear(d, 2 * d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, f)
        self.gate_fc = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.ls1 = nn.Parameter(torch.full((d,), 0.1))
        self.ls2 = nn.Parameter(torch.full((d,), 0.1))

    def forward(self, x, cos, sin, mask):  # x [B, L, d]
        B, L, d = x.shape
        h = self.layer_norm1(x)
        q, gate = self.q_proj(h).chunk(2, dim=-1)

        def heads(t):
            return t.view(B, L, self.heads, -1).transpose(1, 2)

        q = apply_rotary(heads(q), cos, sin)
        k = apply_rotary(heads(self.k_proj(h)), cos, sin)
        a = F.scaled_dot_product_attention(q, k, heads(self.v_proj(h)), attn_mask=mask)
        a = a.transpose(1, 2).reshape(B, L, d) * torch.sigmoid(gate)
        x = x + self.ls1 * self.out_proj(a)
        h = self.layer_norm2(x)
        return x + self.ls2 * self.fc2(F.silu(self.gate_fc(h)) * self.fc1(h))


class PlainGenLIP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, e = cfg.hidden_size, cfg.text_embed_dim
        self.patch = nn.Linear(cfg.num_channels * cfg.patch_size**2, d)
        self.embeddings = nn.Embedding(cfg.vocab_size, e)
        self.in_proj = nn.Linear(e, d) if e != d else nn.Identity()
        self.rotary = MultimodalRotaryEmbedding(cfg.head_dim, cfg.mrope_section, cfg.rope_theta)
        self.layers = nn.ModuleList(PlainBlock(d, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.layernorm_eps)
                                    for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(d, eps=cfg.layernorm_eps)
        self.proj = nn.Linear(d, e) if e != d else nn.Identity()
        self.lm_head = nn.Linear(e, cfg.vocab_size, bias=False)

    def load_hf(self, hf: dict[str, torch.Tensor]) -> None:
        sd = {}
        for k, v in hf.items():
            k = k.replace("visual.layers.", "layers.").replace("self_attn.", "").replace("mlp.", "")
            k = k.replace("layer_scale1.lambda1", "ls1").replace("layer_scale2.lambda1", "ls2")
            if k.startswith("vision_embeddings.patch_embedding."):
                k, v = k.replace("vision_embeddings.patch_embedding.", "patch."), v.flatten(1) if v.dim() > 1 else v
            sd[k] = v
        self.load_state_dict(sd, strict=True)

    def forward(self, batch):
        x = self.in_proj(self.embeddings(batch["input_ids"]))
        image = batch["token_kinds"] == 1
        x = x.masked_scatter(image[..., None], self.patch(batch["patches"].flatten(1)))
        s, k = batch["sample_ids"], batch["token_kinds"]
        L = s.shape[1]
        i = torch.arange(L)
        same = s[:, :, None] == s[:, None, :]
        mask = (same & (i[:, None] >= i[None]) & (s[:, :, None] >= 0)) | (same & (k[:, :, None] == 1) & (k[:, None] == 1))
        mask = (mask | torch.eye(L, dtype=torch.bool))[:, None]  # padding sees itself (no NaN rows)
        cos, sin = self.rotary(batch["positions"], x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        targets = batch["labels"][:, 1:]
        sel = targets != -100
        logits = self.lm_head(self.proj(self.ln_post(x)[:, :-1][sel]))
        return F.cross_entropy(logits.float(), targets[sel])
