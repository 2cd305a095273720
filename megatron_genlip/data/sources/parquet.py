"""Parquet files (one file, a glob, or a Hugging Face dataset folder on local disk), read with pyarrow.

One row group is one unit, read in batches of :data:`BATCH_ROWS` rows and only the columns needed (bounded
memory whatever the file size). Columns (names from the flags, else the first found):

* image: ``--image-field`` (``image``, ``jpg``, ``jpeg``, ``png``, ``webp``, ``images``): encoded bytes, a
  ``{"bytes", "path"}`` struct (the Hugging Face ``Image`` feature; a path is relative to ``--image-root`` or
  else to the parquet file's folder), a path string, or a list of one of those;
* text: ``--caption-field`` / ``--caption-fallback`` (string columns), or by default ``conversations`` (a list of
  ``{"from", "value"}`` structs, or a JSON string) else ``caption``;
* key: ``--key-field`` (``key``, ``id``), else ``<file name>:<row>``.

The columns are checked once, from each file's schema, before any part is built: a missing column is an error
naming the flag and listing the columns the file has; a caption column that is not text is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_genlip.data.records import RawRecord
from megatron_genlip.data.sources.base import SourceError, SourceOptions, Unit, image_from_value, record_key

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "images")
KEY_COLUMNS = ("key", "id")
BATCH_ROWS = 64  # rows decoded at once: a few MB of images


def _columns(schema: pa.Schema) -> str:
    names = ", ".join(f"{f.name} ({f.type})" for f in schema)
    return names if len(names) < 600 else names[:600] + " ..."


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or \
        getattr(pa.types, "is_string_view", lambda _: False)(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or getattr(pa.types, "is_list_view", lambda _: False)(t)


def _image_type_ok(t: pa.DataType) -> bool:
    if _is_list(t):
        return _image_type_ok(t.value_type)
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        return "bytes" in names or "path" in names
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_text(t) or \
        getattr(pa.types, "is_binary_view", lambda _: False)(t)


def plan_columns(schema: pa.Schema, path: str, opts: SourceOptions) -> dict:
    """Which columns to read for what, checked against the file's schema (SourceError naming the flag)."""
    names = schema.names

    def need(name: str, flag: str) -> pa.DataType:
        if name not in names:
            raise SourceError(f"{flag} {name!r} is not a column of {path}; its columns: {_columns(schema)}")
        return schema.field(name).type

    if opts.image_field is not None:
        image = opts.image_field
        need(image, "--image-field")
    else:
        image = next((c for c in IMAGE_COLUMNS if c in names), None)
        if image is None:
            raise SourceError(f"{path} has no image column (looked for {', '.join(IMAGE_COLUMNS)}); name it with "
                              f"--image-field; its columns: {_columns(schema)}")
    if not _image_type_ok(schema.field(image).type):
        raise SourceError(f"image column {image!r} of {path} is {schema.field(image).type}: it must hold encoded "
                          "bytes, a {bytes, path} struct, a path string, or a list of those (--image-field)")
    if opts.key_field is not None:
        need(opts.key_field, "--key-field")
        key = opts.key_field
    else:
        key = next((c for c in KEY_COLUMNS if c in names), None)
    text: list[str] = []
    if opts.caption_field is not None:
        for name, flag in ((opts.caption_field, "--caption-field"), (opts.caption_fallback, "--caption-fallback")):
            if name is None:
                continue
            t = need(name, flag)
            if not _is_text(t):
                raise SourceError(f"{flag} {name!r} of {path} is a column of {t}, not text: a caption must be a "
                                  "string column")
            text.append(name)
    else:
        conv = opts.conversations_field
        if conv in names:
            t = schema.field(conv).type
            if not (_is_list(t) or _is_text(t)):
                raise SourceError(f"--conversations-field {conv!r} of {path} is a column of {t}: conversations must be a "
                                  "list of {from, value} (or {role, content}) structs, or a JSON string")
            text.append(conv)
        elif opts.conversations_field != "conversations":
            need(conv, "--conversations-field")
        if "caption" in names:
            if not _is_text(schema.field("caption").type):
                raise SourceError(f"column 'caption' of {path} is {schema.field('caption').type}, not text; name the "
                                  "caption column with --caption-field")
            text.append("caption")
        if not text:
            raise SourceError(f"{path} has neither a {conv!r} nor a 'caption' column; name the text column with "
                              f"--caption-field (or --conversations-field); its columns: {_columns(schema)}")
        if opts.caption_fallback is not None:
            t = need(opts.caption_fallback, "--caption-fallback")
            if not _is_text(t):
                raise SourceError(f"--caption-fallback {opts.caption_fallback!r} of {path} is a column of {t}, not text")
            text.append(opts.caption_fallback)
    read = list(dict.fromkeys([image] + ([key] if key else []) + text))
    return {"image": image, "key": key, "text": text, "read": read}


def list_units(path: str, opts: SourceOptions) -> list[Unit]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not parquet
        raise SourceError(f"{path} is not a readable parquet file ({str(e)[:200]})") from None
    plan = plan_columns(pf.schema_arrow, path, opts)
    stem = Path(path).name
    stem = stem[: -len(".parquet")] if stem.endswith(".parquet") else stem
    units, first = [], 0
    meta = pf.metadata
    for i in range(meta.num_row_groups):
        rows = meta.row_group(i).num_rows
        units.append(Unit("parquet", path, f"{stem}.rg{i:05d}", {"row_group": i, "first_row": first, "rows": rows}, plan))
        first += rows
    return units


def read_unit(unit: Unit, opts: SourceOptions) -> Iterator[RawRecord]:
    plan = unit.plan
    base = opts.image_root or os.path.dirname(os.path.abspath(unit.path))
    name = Path(unit.path).name
    row = unit.location["first_row"]
    pf = pq.ParquetFile(unit.path)
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[unit.location["row_group"]],
                                 columns=plan["read"], use_threads=False):
        cols = {c: batch.column(c).to_pylist() for c in plan["read"]}
        for j in range(batch.num_rows):
            image, problem = image_from_value(cols[plan["image"]][j], plan["image"], base)
            key = record_key(cols[plan["key"]][j] if plan["key"] else None, f"{name}:{row}")
            yield RawRecord(key, {c: cols[c][j] for c in plan["text"]}, image=image, image_problem=problem)
            row += 1
