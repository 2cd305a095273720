"""Image preprocessing (GENLIP_SPEC.md §2.1): PIL image -> 16x16 patches + grid.

Stage 1: RGB, bilinear resize straight to ``image_size`` x ``image_size`` (no crop, aspect not kept).
Stage 2: ``smart_resize`` to a multiple of the patch size within a pixel budget. Patches come out in
row-major (h, then w) order.

The data path keeps patches as **uint8** (:func:`image_to_patches`): a quarter of the bytes of float32
through the DataLoader's shared memory and the host-to-device copy. The model normalises them on the device
with ``megatron_genlip.batch.normalize_pixels`` (scale 1/255, mean = std = 0.5 -> [-1, 1]), which the host-side
reference :func:`process_image` calls too, so both give bit-identical values.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from megatron_genlip.batch import denormalize_pixels, normalize_pixels

MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """An image the pipeline cannot use (too small, extreme aspect ratio, undecodable)."""


WHITE = (255, 255, 255)
HIGH_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit (and 32-bit integer) grayscale


def to_rgb(img: Image.Image, background: tuple[int, int, int] | list[int] = WHITE) -> Image.Image:
    """Any PIL mode -> RGB (GENLIP_SPEC.md §2.1 takes RGB), losing nothing silently:

    * transparency (RGBA, LA, PA, palette images with a transparent colour) is composited onto ``background``
      (white by default, as Hugging Face's ``convert_to_rgb`` does), never dropped (dropping alpha shows
      whatever colour the transparent pixels happen to hold, often black);
    * 16-bit grayscale is scaled to 8 bits (x / 257, rounded), not clipped at 255 (which turns most of a
      16-bit image white); mode "I" (32-bit integers) is read as 16-bit values;
    * CMYK, YCbCr, LAB, HSV, 1-bit and 8-bit grayscale convert with PIL's own conversions.

    Float images (mode "F") have no agreed range and raise :class:`ImageError`.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "F":
        raise ImageError("floating-point image (mode F) has no defined 0-255 range")
    if mode in HIGH_BIT_GRAY:
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        try:
            rgba = img.convert("RGBA")
        except ValueError as e:
            raise ImageError(f"cannot convert a {mode} image: {e}") from None
        canvas = Image.new("RGB", rgba.size, tuple(int(c) for c in background))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"cannot convert a {mode} image to RGB: {e}") from None


def is_flat(img: Image.Image) -> bool:
    """One colour everywhere (after conversion): no content a caption can describe."""
    return all(lo == hi for lo, hi in img.getextrema())


def check_aspect_ratio(height: int, width: int, limit: float = MAX_ASPECT_RATIO) -> None:
    if min(height, width) <= 0:
        raise ImageError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > limit:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} image "
                         f"exceeds {limit:g}")


def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 4096,
                 max_pixels: int = 262144, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with min_pixels <= area <= max_pixels (§2.1 stage 2)."""
    check_aspect_ratio(height, width, max_aspect_ratio)
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


def patchify_into(rgb: np.ndarray, patch: int, out: np.ndarray | None = None) -> np.ndarray:
    """[H, W, C] uint8 -> [gh*gw, C, patch, patch] in row-major patch order (written into ``out`` if given)."""
    h, w, c = rgb.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w:
        raise ImageError(f"image {w}x{h} is not a multiple of the patch size {patch}")
    view = rgb.reshape(gh, patch, gw, patch, c).transpose(0, 2, 4, 1, 3)
    if out is None:
        return np.ascontiguousarray(view).reshape(gh * gw, c, patch, patch)
    np.copyto(out.reshape(gh, gw, c, patch, patch), view)
    return out


def patches_to_rgb(patches: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The inverse of :func:`patchify_into` (and of the normalisation, for float patches): patches
    [gh*gw, C, p, p], uint8 or normalised float -> the [gh*p, gw*p, C] uint8 image the model saw."""
    pixels = denormalize_pixels(torch.as_tensor(patches)).numpy()
    n, c, p, _ = pixels.shape
    gh, gw = grid
    if n != gh * gw:
        raise ImageError(f"{n} patches do not match grid {tuple(grid)}")
    return np.ascontiguousarray(pixels.reshape(gh, gw, c, p, p).transpose(0, 3, 1, 4, 2)).reshape(gh * p, gw * p, c)


def check_decodable(img: Image.Image) -> None:
    if img.width <= 1 or img.height <= 1:
        raise ImageError(f"image of size {img.width}x{img.height} is too small")


def target_size(img: Image.Image, *, stage: int = 1, image_size: int = 224, patch_size: int = 16,
                min_pixels: int = 4096, max_pixels: int = 262144, **_) -> tuple[int, int]:
    """(width, height) the image is resized to for ``stage``."""
    if stage == 1:
        return image_size, image_size
    if stage == 2:
        h, w = smart_resize(img.height, img.width, patch_size, min_pixels, max_pixels)
        return w, h
    raise ValueError(f"data.stage must be 1 or 2, got {stage}")


def resized_rgb(img: Image.Image, background=WHITE, **settings) -> np.ndarray:
    """Image -> [H, W, 3] uint8 at the training resolution (bilinear), transparency over ``background``."""
    check_decodable(img)
    img = to_rgb(img, background)
    return np.asarray(img.resize(target_size(img, **settings), resample=Image.BILINEAR))


def image_to_patches(img: Image.Image, *, patch_size: int = 16, **settings) -> tuple[np.ndarray, tuple[int, int]]:
    """Image -> (uint8 patches [N, 3, p, p], grid (gh, gw)): what the data path ships."""
    rgb = resized_rgb(img, patch_size=patch_size, **settings)
    return patchify_into(rgb, patch_size), (rgb.shape[0] // patch_size, rgb.shape[1] // patch_size)


def process_image(img: Image.Image, *, stage: int = 1, image_size: int = 224, patch_size: int = 16,
                  min_pixels: int = 4096, max_pixels: int = 262144, background=WHITE
                  ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image -> (normalised float32 patches [N, 3, p, p], grid (gh, gw)) for stage 1 or stage 2."""
    patches, grid = image_to_patches(img, stage=stage, image_size=image_size, patch_size=patch_size,
                                     min_pixels=min_pixels, max_pixels=max_pixels, background=background)
    return normalize_pixels(torch.from_numpy(patches)), grid
