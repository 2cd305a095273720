"""Raw records -> validated image + text, with a reason for everything that is skipped.

Every input layout (``megatron_genlip/data/sources``: webdataset / img2dataset tars, parquet files, LLaVA-style
JSON(L) lists) is read into :class:`RawRecord` objects: a key, the encoded image bytes (or why there are none),
and the record's metadata fields (a tar's ``.json``, a parquet row, a JSON entry) plus a tar's ``.txt`` member.
One rule, :class:`TextRule` / :func:`choose_text`, takes the caption or the stage-2 conversation from those
fields for every layout:

* default: ``conversations`` (``[{"from": "user"|"human", "value": "<image>..."}, {"from": "gpt"|"assistant",
  ...}]``, or ``role``/``content`` turns), else ``caption``, else the ``.txt`` member;
* ``caption_field``: that field (``txt``: a tar's ``.txt`` member), e.g. ``re_caption`` of Recap-DataComp-1B;
  ``fallback_field`` (``org_caption``) when it is missing, empty or over ``max_caption_chars`` characters.

Bad input never raises out of :func:`record_from_raw`'s callers: it raises :class:`SkipSample` with a short
machine-readable reason, and the builder counts it with the unit and key.
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


@dataclass(frozen=True)
class TextRule:
    """Where a record's text comes from (the same rule for every input layout).

    ``caption_field`` None: ``conversations_field`` when the record has it, else ``caption``, else the ``.txt``
    member. A name: that field (``txt`` also names a tar's ``.txt`` member); conversations are then ignored.
    ``fallback_field``: taken instead when the caption is missing (absent or null), empty, or longer than
    ``max_caption_chars`` characters (0: no limit); a fallback that is itself missing, empty or too long skips
    the sample (``caption_too_long``, ``missing_caption`` or ``empty_caption``)."""

    caption_field: str | None = None
    fallback_field: str | None = None
    max_caption_chars: int = 0
    conversations_field: str = "conversations"


@dataclass
class RawRecord:
    """One record as a source read it, before any rule: ``fields`` is its metadata (a tar's ``.json``, a
    parquet row's columns, a JSON entry); ``txt`` a tar's ``.txt`` member; ``image`` the encoded bytes, or None
    with ``image_problem`` = (reason, detail) saying why (``missing_image``, ``missing_image_file``,
    ``multiple_images``); ``fields_problem`` = (reason, detail) when the metadata itself is unreadable."""

    key: str
    fields: dict
    image: bytes | None = None
    txt: bytes | str | None = None
    image_problem: tuple[str, str] | None = None
    fields_problem: tuple[str, str] | None = None


@dataclass
class Skip:
    """A record a source drops before any rule (a tar member repeated inside a sample, a JSONL line that is not
    JSON): counted like a :class:`SkipSample`, its key not registered."""

    key: str | None
    reason: str
    detail: str = ""


def _field_text(fields: dict, name: str, txt) -> str | None:
    """The text of field ``name`` (``txt``: the ``.txt`` member when the fields have no such key); None when
    absent or null; SkipSample(non_text_caption) when it is not text."""
    if name in fields:
        value = fields[name]
    elif name == "txt" and txt is not None:
        value = txt
    else:
        return None
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise SkipSample("non_text_caption", f"{name} is not UTF-8") from None
    if not isinstance(value, str):
        raise SkipSample("non_text_caption", f"{name!r} is {type(value).__name__}, not text")
    return value


def normalize_conversations(turns):
    """A conversation as :func:`parse_conversation` reads it: a JSON string is parsed, ``role``/``content``
    turns become ``from``/``value``; anything else is passed on (and refused there, as ``bad_text``)."""
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise SkipSample("bad_text", f"conversations is a string but not JSON ({str(e)[:60]})") from None
    if isinstance(turns, list):
        turns = [{"from": t["role"], "value": t["content"]}
                 if isinstance(t, dict) and "from" not in t and "role" in t and "content" in t else t for t in turns]
        tags = sum(t["value"].count("<image>") for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
        if tags > 1:
            raise SkipSample("multiple_images", f"{tags} <image> tags, one image per sample")
    return turns


def choose_text(fields: dict, rule: TextRule = TextRule(), txt=None) -> tuple[str | None, list | None, bool]:
    """(caption, conversations, fallback used) of a record's fields under ``rule``; SkipSample when there is
    no usable text."""
    name = rule.caption_field
    if name is None:
        turns = fields.get(rule.conversations_field)
        if turns is not None:
            return None, normalize_conversations(turns), False
        if fields.get("caption") is not None:
            name = "caption"
        elif txt is not None:
            name = "txt"
        elif "caption" in fields:
            name = "caption"  # null: missing
        else:
            have = ", ".join(sorted(map(str, fields))) or "none"
            raise SkipSample("missing_caption", f"no {rule.conversations_field!r} or 'caption' field and no txt "
                                                f"(fields: {have[:120]})")
    caption = _field_text(fields, name, txt)
    limit = rule.max_caption_chars
    if caption is None:
        problem = ("missing_caption", f"no {name!r}")
    elif not caption.strip():
        problem = ("empty_caption", f"{name!r} is empty")
    elif limit and len(caption) > limit:
        problem = ("caption_too_long", f"{name!r} has {len(caption)} characters > --max-caption-chars={limit}")
    else:
        return caption, None, False
    fallback = rule.fallback_field
    if fallback is not None:
        alt = _field_text(fields, fallback, txt)
        if alt is not None and alt.strip() and not (limit and len(alt) > limit):
            return alt, None, True
        why = "absent" if alt is None else "empty" if not alt.strip() else f"{len(alt)} characters too"
        problem = (problem[0], f"{problem[1]}; fallback {fallback!r} {why}")
    raise SkipSample(*problem)


def _text_fields(raw: dict) -> tuple[str | None, list | None]:
    """Caption / conversations of a raw webdataset sample under the default rule."""
    meta = {}
    if "json" in raw:
        meta = parse_json_member(raw["json"])
    caption, conversations, _ = choose_text(meta, TextRule(), raw.get("txt"))
    return caption, conversations


def parse_json_member(data: bytes) -> dict:
    """A tar's ``.json`` member as a dict, or SkipSample(bad_json)."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", str(e)[:80]) from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", "json is not an object")
    return meta


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
    """Validate one raw webdataset sample (a dict of members by extension) under the default text rule."""
    caption, conversations = _text_fields(raw)
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise SkipSample("missing_image", f"no member among {IMAGE_KEYS}")
    return validate_record(raw.get("__key__", "?"), raw[image_key], caption, conversations, cfg)


def record_from_raw(raw: RawRecord, rule: TextRule, cfg: DataConfig) -> tuple[Record, bool]:
    """A source's raw record -> (validated Record, whether the caption came from the fallback field). The order
    of checks is the same for every source: the metadata, the text, the image's presence, the image."""
    if raw.fields_problem is not None:
        raise SkipSample(*raw.fields_problem)
    caption, conversations, fallback = choose_text(raw.fields, rule, raw.txt)
    if raw.image is None:
        raise SkipSample(*(raw.image_problem or ("missing_image", "no image")))
    return validate_record(raw.key, raw.image, caption, conversations, cfg), fallback


def validate_record(key: str, image_bytes: bytes, caption: str | None, conversations: list | None,
                    cfg: DataConfig) -> Record:
    """Validate one sample: caption not empty, image decodable, convertible to RGB (transparency over
    ``data.background``), not one flat colour, within ``data.max_aspect_ratio`` and usable at ``cfg.stage``.
    ``Record.image`` is the converted RGB image; ``Record.image_bytes`` the original bytes."""
    if caption is not None and not caption.strip():
        raise SkipSample("empty_caption")
    img = decode_image(image_bytes)
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
    return Record(key, image_bytes, img, caption, conversations)


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
