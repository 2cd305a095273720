"""Parameter and FLOP accounting (GENLIP_SPEC.md §1.2, PERFORMANCE.md §1.2).

Parameters are counted on a real model instance built on the meta device (no memory, no init cost), so
the numbers are those of the code, not of a formula. FLOPs use the ideal GenLIP count: the LM head and
``proj`` run only on labelled positions, attention is counted dense-equivalent within the sample.
:func:`batch_flops` is the one count of a packed micro-batch (the trainer's metrics and both benchmarks use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_genlip.batch import KIND_IMAGE, KIND_TEXT, predicts_label
from megatron_genlip.config import ModelConfig


@dataclass
class ParamCounts:
    encoder: int  # patch embed + blocks + ln_post (the deployed ViT)
    gate: int  # the gate half of q_proj (weights + bias), part of ``encoder``
    text: int  # text embedding + in_proj/proj + lm_head
    total: int

    @property
    def encoder_without_gate(self) -> int:
        return self.encoder - self.gate


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    groups = {"encoder": 0, "gate": 0, "text": 0, "total": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        groups["total"] += n
        top = name.split(".")[0]
        if top in ("vision_embeddings", "layers", "ln_post"):
            groups["encoder"] += n
            if ".self_attn.gate." in name:
                groups["gate"] += n
        else:
            groups["text"] += n
    return ParamCounts(**groups)


def build_meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model on the meta device, for counting. Built with the local backend and no FP8: the same parameters
    and shapes (TE and torchao layers keep the weights' shapes), and no GPU or FP8 hardware needed to count them."""
    from dataclasses import replace

    from megatron_genlip.model.genlip import GenLIPModel

    with torch.device("meta"):
        return GenLIPModel(replace(cfg, fp8="none", backend="local"))


def flops_per_sample(cfg: ModelConfig, num_image: int, num_text: int, num_labels: int) -> float:
    """Training FLOPs (3x forward) of one sample with the LM head on labelled positions only."""
    L, h, f, e, V = cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.text_embed_dim, cfg.vocab_size
    q_out = 2 * h if cfg.gated_attention else h
    block_matmul = L * (h * q_out + 3 * h * h + 3 * h * f)
    T = num_image + num_text
    flops = 6 * block_matmul * T  # q(+gate), k, v, o and SwiGLU on every position
    flops += 12 * L * h * T * T  # attention scores and values, dense-equivalent within the sample
    flops += 6 * e * V * num_labels  # LM head on labelled positions
    if e != h:
        flops += 6 * h * e * (num_labels + num_text)  # proj on labelled, in_proj on text positions
    flops += 6 * cfg.num_channels * cfg.patch_size**2 * h * num_image  # patch embedding
    return float(flops)


def batch_flops(cfg: ModelConfig, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Training FLOPs of a packed micro-batch (:func:`flops_per_sample` of each of its samples) and its number
    of samples. A slot counts as labelled for the sample it belongs to when it predicts a label."""
    sids = batch["sample_ids"].cpu().numpy()
    kinds = batch["token_kinds"].cpu().numpy()
    labelled = np.zeros_like(sids, dtype=bool)
    labelled[:, :-1] = predicts_label(batch["labels"]).cpu().numpy()
    flops, samples = 0.0, 0
    for s, k, lab in zip(sids, kinds, labelled):
        real = s >= 0
        n = int(s[real].max()) + 1 if real.any() else 0
        counts = (np.bincount(s[real], weights=w[real], minlength=n) for w in (k == KIND_IMAGE, k == KIND_TEXT, lab))
        flops += sum(flops_per_sample(cfg, int(a), int(b), int(c)) for a, b, c in zip(*counts))
        samples += n
    return flops, samples


def stage1_flops_per_sample(cfg: ModelConfig, caption_tokens: int = 72, lm_head_everywhere: bool = False) -> float:
    """PERFORMANCE.md's stage-1 convention: 196 image + 2 marker + ``caption_tokens`` text positions,
    ``caption_tokens`` labelled. ``lm_head_everywhere`` gives the official code's count (head on all positions)."""
    num_image, num_text = 196, 2 + caption_tokens
    labels = num_image + num_text if lm_head_everywhere else caption_tokens
    return flops_per_sample(cfg, num_image, num_text, labels)
