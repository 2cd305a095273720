"""Image processor shipped in exported GenLIP folders (GENLIP_SPEC.md §2.1); needs only PIL, numpy, torch.

It is deliberately self-contained (it runs from the exported folder, without the trainer installed) and
is tested to produce exactly the trainer's ``megatron_genlip.data.image_processing.process_image`` output.

    proc = GenLIPImageProcessor.from_pretrained(folder)   # reads preprocessor_config.json
    out = proc([pil_image, ...])   # {"pixel_values": [N, 3, p, p], "image_grid_thw": [num_images, 3]}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB as the trainer converts it: transparency composited onto ``background``, 16-bit
    grayscale scaled (x / 257) rather than clipped, other modes through PIL."""
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        raise ValueError("floating-point image (mode F) has no defined 0-255 range")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, tuple(int(c) for c in background))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


class GenLIPImageProcessor:
    def __init__(self, stage: int = 1, image_size: int = 224, patch_size: int = 16, min_pixels: int = 4096,
                 max_pixels: int = 262144, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                 background=(255, 255, 255), **_):
        self.stage, self.image_size, self.patch_size = stage, image_size, patch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.background = tuple(background)
        self.mean = np.asarray(image_mean, dtype=np.float32)
        self.std = np.asarray(image_std, dtype=np.float32)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "GenLIPImageProcessor":
        return cls(**json.loads((Path(folder) / "preprocessor_config.json").read_text()))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: square for stage 1, smart_resize for stage 2."""
        if self.stage == 1:
            return self.image_size, self.image_size
        f = self.patch_size
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"aspect ratio of a {width}x{height} image exceeds 200")
        h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return h, w

    def process(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (patches [gh*gw, 3, p, p] in row-major order, (gh, gw))."""
        img = to_rgb(img, self.background)
        h, w = self.target_size(img.height, img.width)
        arr = np.asarray(img.resize((w, h), resample=Image.BILINEAR), dtype=np.float32) / 255.0
        pixels = torch.from_numpy((arr - self.mean) / self.std).permute(2, 0, 1).contiguous()
        p, gh, gw = self.patch_size, h // self.patch_size, w // self.patch_size
        patches = pixels.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p)
        return patches.contiguous(), (gh, gw)

    def __call__(self, images) -> dict[str, torch.Tensor]:
        images = images if isinstance(images, (list, tuple)) else [images]
        done = [self.process(im) for im in images]
        return {"pixel_values": torch.cat([p for p, _ in done]),
                "image_grid_thw": torch.tensor([[1, gh, gw] for _, (gh, gw) in done])}
