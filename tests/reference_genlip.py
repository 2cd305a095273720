"""An independent, deliberately plain re-implementation of the GenLIP forward pass (GENLIP_SPEC.md §2),
written straight from the spec on the Hugging Face key names of §6. It shares no code with the trainer:
the mask is built with Python loops from the §2.7 rule, the M-RoPE channel axes from the §2.6 rule, and
the gate is the second contiguous half of q_proj. Tests compare the trainer (and later exports) to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_mask(sample_ids: list[int], kinds: list[int]) -> torch.Tensor:
    L = len(sample_ids)
    m = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            causal = q >= k and sample_ids[q] == sample_ids[k] and sample_ids[q] >= 0
            image = kinds[q] > 0 and kinds[q] == kinds[k] and sample_ids[q] == sample_ids[k]
            m[q, k] = causal or image
    return m


def reference_axes(head_dim: int, section: list[int]) -> list[int]:
    axes = []
    for i in range(head_dim // 2):
        if i % 3 == 1 and i < 3 * section[1]:
            axes.append(1)
        elif i % 3 == 2 and i < 3 * section[2]:
            axes.append(2)
        else:
            axes.append(0)
    return axes


def reference_rope(x: torch.Tensor, pos: torch.Tensor, section: list[int], theta: float) -> torch.Tensor:
    """x [L, H, hd], pos [3, L] -> rotated x (rotate-half pairing j <-> j + hd/2)."""
    L, H, hd = x.shape
    half = hd // 2
    axes = reference_axes(hd, section)
    out = torch.empty_like(x)
    for i in range(half):
        inv = theta ** (-2.0 * i / hd)
        ang = pos[axes[i]].double() * inv  # [L]
        c, s = torch.cos(ang).to(x.dtype)[:, None], torch.sin(ang).to(x.dtype)[:, None]
        a, b = x[:, :, i], x[:, :, i + half]
        out[:, :, i] = a * c - b * s
        out[:, :, i + half] = b * c + a * s
    return out


def reference_logits(sd: dict[str, torch.Tensor], cfg, row: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [L, V] of one packed row given an HF-keyed state dict."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    hd = d // H
    ids, kinds, sids, pos = row["input_ids"], row["token_kinds"], row["sample_ids"], row["positions"]
    L = ids.numel()
    x = sd["embeddings.weight"][ids]
    if "in_proj.weight" in sd:
        x = F.linear(x, sd["in_proj.weight"], sd["in_proj.bias"])
    conv_w = sd["vision_embeddings.patch_embedding.weight"]
    img = F.conv2d(row["patches"], conv_w, sd["vision_embeddings.patch_embedding.bias"], stride=cfg.patch_size)
    img = img.flatten(1)  # [N, d]
    x = x.clone()
    j = 0
    for t in range(L):
        if kinds[t] == 1:
            x[t] = img[j]
            j += 1
    mask = reference_mask(sids.tolist(), kinds.tolist())
    for i in range(cfg.num_layers):
        p = f"visual.layers.{i}."
        h = F.layer_norm(x, (d,), sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"], cfg.layernorm_eps)
        qg = F.linear(h, sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.q_proj.bias"])
        q, gate = qg[:, :d], qg[:, d:]
        k = F.linear(h, sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.k_proj.bias"])
        v = F.linear(h, sd[p + "self_attn.v_proj.weight"], sd[p + "self_attn.v_proj.bias"])
        q = reference_rope(q.view(L, H, hd), pos, cfg.mrope_section, cfg.rope_theta)
        k = reference_rope(k.view(L, H, hd), pos, cfg.mrope_section, cfg.rope_theta)
        v = v.view(L, H, hd)
        scores = torch.einsum("qhc,khc->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padding queries see nothing
        att = torch.einsum("hqk,khc->qhc", probs, v).reshape(L, d)
        att = att * torch.sigmoid(gate)
        att = F.linear(att, sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"])
        x = x + sd[p + "layer_scale1.lambda1"] * att
        h = F.layer_norm(x, (d,), sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"], cfg.layernorm_eps)
        u = F.silu(F.linear(h, sd[p + "mlp.gate_fc.weight"], sd[p + "mlp.gate_fc.bias"]))
        u = u * F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        x = x + sd[p + "layer_scale2.lambda1"] * F.linear(u, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    x = F.layer_norm(x, (d,), sd["ln_post.weight"], sd["ln_post.bias"], cfg.layernorm_eps)
    if "proj.weight" in sd:
        x = F.linear(x, sd["proj.weight"], sd["proj.bias"])
    return F.linear(x, sd["lm_head.weight"])
