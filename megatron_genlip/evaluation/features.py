"""Frozen ``ln_post`` features of images (GENLIP_SPEC.md §6): image tokens alone, full bidirectional attention.

Works with the trainer's model (``megatron_genlip.model.genlip.GenLIPModel``, sequence-first ``encode``, any
tensor-parallel degree: every TP rank gets the full features) and with the exported Hugging Face classes
(``megatron_genlip.hf.modeling_genlip.GenLIPModel`` / ``GenLIPVisionModel``, batch-first ``encode``). Images of
one grid are encoded together, ``batch_size`` per forward.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from megatron_genlip.batch import normalize_pixels
from megatron_genlip.data.sample import image_positions
from megatron_genlip.model.masks import image_only_mask


def is_hf_model(model) -> bool:
    return hasattr(model, "visual") and hasattr(model, "get_image_features")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def encode_images(model, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``ln_post`` output [B, N, d] of B images of one grid; patches [B, N, 3, p, p] (uint8 or normalised)."""
    B, N = patches.shape[:2]
    if N != grid[0] * grid[1]:
        raise ValueError(f"{N} patches per image do not match grid {tuple(grid)}")
    device = model_device(model)
    flat = patches.to(device).flatten(0, 1)
    pos = image_positions(*grid)[None].expand(B, 3, N).to(device)
    mask = image_only_mask(N, device)
    if is_hf_model(model):
        if flat.dtype == torch.uint8:
            flat = normalize_pixels(flat)
        x = model.vision_embeddings(flat).view(B, N, -1)
        return model.encode(x, pos, mask)
    x = model.vision_embeddings(flat).view(B, N, -1).transpose(0, 1).contiguous()  # [N, B, d]
    return model.encode(x, pos, mask).transpose(0, 1)


@torch.no_grad()
def extract_features(model, images: Sequence[torch.Tensor] | torch.Tensor, grid: tuple[int, int],
                     pool: str = "mean", batch_size: int = 32, dtype: torch.dtype = torch.float32,
                     progress=None) -> torch.Tensor:
    """Features of images of one grid, on the CPU: ``pool="mean"`` -> [n, d] (mean over the image's patches, the
    linear probe's input), ``pool="none"`` -> [n, N, d] (every patch: the attentive probe's input).

    ``images``: a sequence of [N, 3, p, p] patch tensors (uint8 pixels as the data path ships them, or normalised
    floats) or one [n, N, 3, p, p] tensor. ``progress(done, total)`` is called after each batch."""
    if pool not in ("mean", "none"):
        raise ValueError(f"pool must be 'mean' or 'none', got {pool!r}")
    was_training = model.training
    model.eval()
    n = len(images)
    out = []
    try:
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else torch.stack([torch.as_tensor(c) for c in chunk])
            h = encode_images(model, batch, grid).float()
            out.append((h.mean(1) if pool == "mean" else h).to("cpu", dtype))
            if progress is not None:
                progress(min(n, start + batch_size), n)
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def readout_logits(model, features: torch.Tensor, n_vocab: int | None = None) -> torch.Tensor:
    """``proj`` -> LM head on ln_post features [..., d]: full-vocabulary logits (gathered under TP), restricted to
    the tokenizer's ``n_vocab`` ids when given (the model's vocabulary is padded beyond them)."""
    from megatron_genlip.parallel.state import gather_last_dim

    with torch.no_grad():
        h = features.to(model_device(model), model_dtype(model))
        logits = model.head(h).float()
        if not is_hf_model(model):
            logits = gather_last_dim(logits)
    return logits[..., :n_vocab] if n_vocab is not None else logits


def iter_batches(indices: Sequence[int], size: int) -> Iterable[list[int]]:
    for s in range(0, len(indices), size):
        yield list(indices[s:s + size])
