"""Webdataset tar shards, including img2dataset's layout.

A sample is the members sharing a key: the image (``jpg``/``jpeg``/``png``/``webp``), a ``.json`` (the metadata:
``{"caption": ...}``, ``{"conversations": [...]}``, or img2dataset's ``url``, ``key``, ``status``, ``width``, ...
and any extra columns such as ``re_caption`` / ``org_caption``) and a ``.txt`` (img2dataset's caption). One tar is
one unit. Read with webdataset's own tar iterator, without decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import webdataset as wds

from megatron_genlip.data.records import IMAGE_KEYS, RawRecord, Skip, SkipSample, parse_json_member
from megatron_genlip.data.sources.base import SourceOptions, Unit

SUFFIXES = (".tar.gz", ".tgz", ".tar")
PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")


def unit_name(path: str) -> str:
    stem = Path(path).name
    for suffix in SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def list_units(path: str, opts: SourceOptions) -> list[Unit]:
    return [Unit("webdataset", path, unit_name(path))]


def iterate_shard(path: str, duplicate_members: list[str]):
    """Raw samples of one shard (no decoding). A member repeated inside a sample (``a.jpg`` twice) is not fatal:
    its name goes to ``duplicate_members`` and the shard goes on (webdataset's default ends the shard there). A
    broken tar ends the iteration with an exception."""

    def handler(exn: Exception) -> bool:
        if isinstance(exn, ValueError) and "duplicate file name in tar file" in str(exn.args[0]):
            duplicate_members.append(str(exn.args[0]).split(":", 1)[0])
            return True  # skip that member, continue with the next
        raise exn

    return iter(wds.tariterators.tarfile_samples([{"url": path}], handler=handler))


def to_raw(raw: dict) -> RawRecord:
    """A webdataset sample dict -> RawRecord (the ``.json`` parsed into the fields, the ``.txt`` kept aside)."""
    fields, problem = {}, None
    if "json" in raw:
        try:
            fields = parse_json_member(raw["json"])
        except SkipSample as e:
            problem = (e.reason, e.detail)
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    return RawRecord(raw.get("__key__", "?"), fields, image=raw[image_key] if image_key else None,
                     txt=raw.get("txt"), fields_problem=problem,
                     image_problem=None if image_key else ("missing_image", f"no member among {IMAGE_KEYS}"))


def read_unit(unit: Unit, opts: SourceOptions) -> Iterator[RawRecord | Skip]:
    duplicate_members: list[str] = []
    for raw in iterate_shard(unit.path, duplicate_members):
        key = raw.get("__key__", "?")
        members = [m for m in duplicate_members if m.startswith(key + ".")]
        if members:  # which copy belongs to the caption is unknown: the whole sample goes
            duplicate_members.clear()
            yield Skip(key, "duplicate_member", f"{', '.join(members)} appears more than once in the tar")
            continue
        yield to_raw(raw)
