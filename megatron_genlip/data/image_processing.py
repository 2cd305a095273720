"""Image preprocessing (GENLIP_SPEC.md §2.1): PIL image -> normalised 16x16 patches + grid.

Stage 1: RGB, bilinear resize straight to ``image_size`` x ``image_size`` (no crop, aspect not kept),
scale 1/255, mean = std = 0.5 -> pixels in [-1, 1]. Stage 2: ``smart_resize`` to a multiple of the patch
size within a pixel budget, same normalisation. Patches come out in row-major (h, then w) order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

MEAN = 0.5
STD = 0.5
MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """An image the pipeline cannot use (too small, extreme aspect ratio, undecodable)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB; palette images go through RGBA first (as the HF Siglip processor does)."""
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 4096,
                 max_pixels: int = 262144) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with min_pixels <= area <= max_pixels (§2.1 stage 2)."""
    if min(height, width) <= 0:
        raise ImageError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} image "
            f"exceeds {MAX_ASPECT_RATIO}"
        )
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def normalize(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy((arr - MEAN) / STD).permute(2, 0, 1).contiguous()


def patchify(pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[C, H, W] -> ([gh*gw, C, patch, patch] in row-major order, (gh, gw))."""
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w:
        raise ImageError(f"image {w}x{h} is not a multiple of the patch size {patch}")
    x = pixels.view(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4)
    return x.reshape(gh * gw, c, patch, patch).contiguous(), (gh, gw)


def check_decodable(img: Image.Image) -> None:
    if img.width <= 1 or img.height <= 1:
        raise ImageError(f"image of size {img.width}x{img.height} is too small")


def process_image(img: Image.Image, *, stage: int = 1, image_size: int = 224, patch_size: int = 16,
                  min_pixels: int = 4096, max_pixels: int = 262144) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image -> (patches [N, 3, p, p], grid (gh, gw)) for stage 1 or stage 2."""
    check_decodable(img)
    img = to_rgb(img)
    if stage == 1:
        size = (image_size, image_size)
    elif stage == 2:
        h, w = smart_resize(img.height, img.width, patch_size, min_pixels, max_pixels)
        size = (w, h)
    else:
        raise ValueError(f"data.stage must be 1 or 2, got {stage}")
    img = img.resize(size, resample=Image.BILINEAR)
    return patchify(normalize(img), patch_size)
