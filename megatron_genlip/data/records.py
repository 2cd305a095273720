"""Raw webdataset records -> validated image + text, with a reason for everything that is skipped.

A webdataset sample is a dict of raw member bytes keyed by extension (``jpg``/``jpeg``/``png``/``webp``,
``json``, ``txt``) plus ``__key__`` and ``__url__``. Supported layouts:

* Recap-DataComp-1B (stage 1): ``jpg`` + ``json`` ``{"caption": ...}``;
* stage 2: ``json`` ``{"conversations": [{"from": "user", "value": "<image>..."}, {"from": "gpt", ...}]}``;
* plain ``txt`` captions.

Bad input never raises out of :func:`decode_record`'s callers: it raises :class:`SkipSample` with a short
machine-readable reason, and the builder / streaming loader count it with the shard and key.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import PIL.Image
import torch

from megatron_genlip.config import DataConfig
from megatron_genlip.data.image_processing import (
    ImageError, check_aspect_ratio, image_to_patches, is_flat, smart_resize, to_rgb,
)
from megatron_genlip.data.sample import Sample, SampleError, assemble_sample, tokenize_text

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PIL.Image.MAX_IMAGE_PIXELS = 20000 * 20000  # generous, but still refuses decompression bombs


class SkipSample(Exception):
    """A sample that is dropped; ``reason`` is one of the report's counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    """A validated record: the decoded image and its text, before tokenization/packing."""

    key: str
    image_bytes: bytes
    image: PIL.Image.Image
    caption: str | None
    conversations: list | None


def _text_fields(raw: dict) -> tuple[str | None, list | None]:
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SkipSample("bad_json", str(e)[:80]) from None
        if not isinstance(meta, dict):
            raise SkipSample("bad_json", "json is not an object")
        if "conversations" in meta:
            return None, meta["conversations"]
        if "caption" in meta:
            cap = meta["caption"]
            if not isinstance(cap, str):
                raise SkipSample("non_text_caption", type(cap).__name__)
            return cap, None
    if "txt" in raw:
        try:
            return raw["txt"].decode("utf-8"), None
        except UnicodeDecodeError:
            raise SkipSample("non_text_caption", "txt is not UTF-8") from None
    raise SkipSample("missing_caption", "no json caption/conversations and no txt")


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """Fully decode image bytes (truncated files fail here, not later in training).

    ``draft_size`` (width, height): let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while staying at least
    that large (PIL's draft mode; faster, but the pixels differ slightly from a full decode + resize)."""
    try:
        img = PIL.Image.open(io.BytesIO(data))
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise SkipSample("undecodable_image", str(e)[:80]) from None
    return img


def decode_record(raw: dict, cfg: DataConfig) -> Record:
    """Validate one raw sample: caption present and textual, image decodable, convertible to RGB (transparency
    over ``data.background``), not one flat colour, within ``data.max_aspect_ratio`` and usable at ``cfg.stage``.
    ``Record.image`` is the converted RGB image; ``Record.image_bytes`` the original bytes."""
    caption, conversations = _text_fields(raw)
    if caption is not None and not caption.strip():
        raise SkipSample("empty_caption")
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise SkipSample("missing_image", f"no member among {IMAGE_KEYS}")
    img = decode_image(raw[image_key])
    if img.width <= 1 or img.height <= 1:
        raise SkipSample("too_small_image", f"{img.width}x{img.height}")
    try:
        check_aspect_ratio(img.height, img.width, cfg.max_aspect_ratio)
    except ImageError as e:
        raise SkipSample("bad_aspect_ratio", f"{e} (data.max_aspect_ratio)") from None
    mode = img.mode
    try:
        img = to_rgb(img, cfg.background)
    except ImageError as e:
        raise SkipSample("unsupported_image_mode", str(e)) from None
    if is_flat(img):
        raise SkipSample("flat_image", f"one colour {img.getpixel((0, 0))} after converting mode {mode} to RGB")
    if cfg.stage == 2:
        try:
            smart_resize(img.height, img.width, 16, cfg.min_pixels, cfg.max_pixels, cfg.max_aspect_ratio)
        except ImageError as e:
            raise SkipSample("bad_aspect_ratio", str(e)) from None
    return Record(raw.get("__key__", "?"), raw[image_key], img, caption, conversations)


def image_grid(img: PIL.Image.Image, cfg: DataConfig, patch_size: int = 16) -> tuple[int, int]:
    """The patch grid an image will have after preprocessing (without resizing it)."""
    if cfg.stage == 1:
        g = cfg.image_size // patch_size
        return g, g
    h, w = smart_resize(img.height, img.width, patch_size, cfg.min_pixels, cfg.max_pixels, cfg.max_aspect_ratio)
    return h // patch_size, w // patch_size


def tokenize_record(rec: Record, tokenizer, cfg: DataConfig, prompt: str, patch_size: int = 16
                    ) -> tuple[tuple[int, int], list[int], list[bool]]:
    """The image grid, text token ids and label flags of a record; raises SkipSample on bad text."""
    grid = image_grid(rec.image, cfg, patch_size)
    try:
        ids, flags = tokenize_text(tokenizer, rec.caption, prompt, rec.conversations)
    except SampleError as e:
        raise SkipSample("empty_caption" if "empty" in str(e) else "bad_text", str(e)) from None
    length = grid[0] * grid[1] + len(ids)
    if length > cfg.max_sample_length:
        raise SkipSample("too_long", f"{length} tokens > data.max_sample_length={cfg.max_sample_length}")
    return grid, ids, flags


def sample_from_parts(image: PIL.Image.Image, grid: tuple[int, int], ids: list[int], flags: list[bool],
                      cfg: DataConfig, patch_size: int = 16) -> Sample:
    """The training Sample of a record: uint8 patches of the resized image, tokens and labels laid out."""
    patches, got = image_to_patches(image, stage=cfg.stage, image_size=cfg.image_size, patch_size=patch_size,
                                    min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, background=cfg.background)
    if got != tuple(grid):
        raise ValueError(f"image grid {got} differs from the stored grid {tuple(grid)}; was the dataset built "
                         "with other data.stage/image_size/min_pixels/max_pixels settings?")
    return assemble_sample(torch.from_numpy(patches), grid, ids, flags)
