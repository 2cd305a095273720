"""Image preprocessing (GENLIP_SPEC.md §2.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_genlip.batch import normalize_pixels
from megatron_genlip.data.image_processing import (
    ImageError, image_to_patches, patchify_into, process_image, smart_resize,
)


def test_stage1_resize_normalise_patchify():
    img = Image.fromarray(np.full((100, 300, 3), 255, dtype=np.uint8))  # white, 300x100: aspect is not kept
    patches, grid = process_image(img, stage=1, image_size=224)
    assert grid == (14, 14) and patches.shape == (196, 3, 16, 16)
    assert torch.allclose(patches, torch.ones_like(patches))  # 255 -> 1.0 with mean = std = 0.5
    black, _ = process_image(Image.new("RGB", (50, 50)), stage=1, image_size=224)
    assert torch.allclose(black, -torch.ones_like(black))


def test_palette_and_grayscale_become_rgb():
    p = Image.new("P", (32, 32))
    p.putpalette([10, 20, 30] * 256)
    patches, grid = process_image(p, stage=1, image_size=32)
    assert grid == (2, 2)
    assert torch.allclose(patches[0, :, 0, 0], torch.tensor([10, 20, 30]) / 127.5 - 1)
    g, _ = process_image(Image.new("L", (32, 32), 255), stage=1, image_size=32)
    assert torch.allclose(g, torch.ones_like(g))


def test_patch_order_is_row_major():
    rgb = (np.arange(32 * 48 * 3) % 251).astype(np.uint8).reshape(32, 48, 3)
    patches = patchify_into(rgb, 16)
    assert patches.shape == (6, 3, 16, 16)
    for idx in range(6):
        r, c = divmod(idx, 3)
        assert np.array_equal(patches[idx], rgb[16 * r:16 * r + 16, 16 * c:16 * c + 16].transpose(2, 0, 1))
    out = np.zeros_like(patches)
    assert patchify_into(rgb, 16, out) is out and np.array_equal(out, patches)  # in place, same layout


def test_uint8_patches_normalised_on_the_device_equal_the_float_reference():
    """The loader ships uint8; normalize_pixels (run by the model) gives exactly the host-side float32 values of
    the previous float pipeline: x / 255 then (x - 0.5) / 0.5 in float32, for all 256 byte values."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    raw, grid = image_to_patches(img, stage=2, patch_size=16, min_pixels=4096, max_pixels=262144)
    assert raw.dtype == np.uint8 and grid == (raw.shape[0] // grid[1], grid[1])
    every = torch.arange(256, dtype=torch.uint8)
    reference = (every.numpy().astype(np.float32) / 255.0 - 0.5) / 0.5  # the former host-side normalisation
    assert torch.equal(normalize_pixels(every), torch.from_numpy(reference))
    floats, grid2 = process_image(img, stage=2)
    assert grid2 == grid and torch.equal(floats, normalize_pixels(torch.from_numpy(raw)))


@pytest.mark.parametrize("h, w", [(300, 1000), (1000, 300), (4000, 3000), (20, 20), (224, 224), (517, 391), (50, 5000)])
def test_smart_resize_budget_and_aspect(h, w):
    nh, nw = smart_resize(h, w, 16, 4096, 262144)
    assert nh % 16 == 0 and nw % 16 == 0
    assert 4096 <= nh * nw <= 262144
    assert 16 <= (nh // 16) * (nw // 16) <= 1024
    # aspect kept within one patch: one scale s puts both sides within 16 px of h*s and w*s
    lo = max((nh - 16) / h, (nw - 16) / w)
    hi = min((nh + 16) / h, (nw + 16) / w)
    assert lo <= hi


def test_smart_resize_worked_examples():
    assert smart_resize(300, 1000) == (272, 928)  # 1000x300 -> 58x17 patches (986 <= 1024)
    assert smart_resize(224, 224) == (224, 224)  # already on the grid, inside the budget
    assert smart_resize(20, 20) == (64, 64)  # below min_pixels: scaled up to 4096
    assert smart_resize(2048, 2048) == (512, 512)


def test_extreme_aspect_ratio_is_rejected():
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ImageError, match="aspect ratio"):
        process_image(Image.new("RGB", (4020, 20)), stage=2)


def test_tiny_images_are_rejected():
    with pytest.raises(ImageError, match="too small"):
        process_image(Image.new("RGB", (1, 1)), stage=1)


def test_stage2_grid():
    patches, grid = process_image(Image.new("RGB", (1000, 300)), stage=2)
    assert grid == (17, 58) and patches.shape == (17 * 58, 3, 16, 16)
