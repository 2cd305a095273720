"""JSON lists and JSONL files of entries beside an image folder (the LLaVA / ShareGPT4V layout).

An entry: ``{"id": ..., "image": "relative/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}`` (``user``/``assistant`` roles and ``role``/``content`` turns work too), or a
``caption`` instead of ``conversations``. Image paths are relative to ``--image-root`` (default: the JSON file's
folder). A ``.json`` file is a list (``[...]``); a ``.jsonl`` file has one entry per line.

Units are ranges of ``--rows-per-unit`` entries (lines of a JSONL file), found by one pass over the file that
records byte offsets (JSONL: newlines counted with numpy; a JSON list: parsed entry by entry, then discarded), so
a unit's reader reads only its own bytes. Skipped and counted: a JSONL line that is not a JSON object
(``bad_json``, keyed ``file:line``), an entry without an image (``missing_image``: text-only conversations), with
several images or several ``<image>`` tags (``multiple_images``), whose image file is missing
(``missing_image_file``). A ``.json`` that is not a valid list is refused before any part is built.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_genlip.data.records import RawRecord, Skip
from megatron_genlip.data.sources.base import SourceError, SourceOptions, Unit, image_from_value, record_key

_WS = re.compile(r"[ \t\n\r]*")
CHUNK = 1 << 24


def kind_of(path: str) -> str:
    """``jsonl`` (one entry per line) for ``.jsonl``, ``json`` (a list) for ``.json``; another name (read under
    ``--input-format json``): a list when its first non-blank byte is ``[``."""
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".json"):
        return "json"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
    return "json" if head.startswith(b"[") else "jsonl"


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".jsonl", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _units(kind: str, path: str, starts: list[int], byte_starts: list[int], total: int, end_byte: int) -> list[Unit]:
    units = []
    for k, (first, b0) in enumerate(zip(starts, byte_starts)):
        end = starts[k + 1] if k + 1 < len(starts) else total
        b1 = byte_starts[k + 1] if k + 1 < len(starts) else end_byte
        if end > first:
            units.append(Unit(kind, path, f"{_stem(path)}.e{first:09d}", {"entries": [first, end], "bytes": [b0, b1]}))
    return units


def list_jsonl(path: str, opts: SourceOptions) -> list[Unit]:
    """Units of ``rows_per_unit`` lines: byte offsets of every unit's first line, from one pass of newline counts."""
    per = opts.rows_per_unit
    byte_starts, lines, pos = [0], 0, 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            hits = nl[(lines + 1 + np.arange(len(nl))) % per == 0]  # the newline ending a unit's last line
            byte_starts += (pos + hits + 1).tolist()
            lines += len(nl)
            pos += len(chunk)
            last = chunk[-1:]
    total = lines + (pos > 0 and last != b"\n")
    return _units("jsonl", path, [per * k for k in range(len(byte_starts))], byte_starts, total, pos)


def list_json(path: str, opts: SourceOptions) -> list[Unit]:
    """Units of ``rows_per_unit`` entries of a JSON list: the list is parsed once, entry by entry (each dropped
    after parsing), to find where every unit's first entry starts."""
    raw = Path(path).read_bytes()
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[bom:].decode("utf-8")
        del raw
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text ({e}); a JSON list of entries was expected") from None
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end()
    if not text.startswith("[", pos):
        raise SourceError(f"{path} is not a JSON list of entries (it starts with {text[pos:pos + 20]!r}); a file with "
                          "one entry per line should be named .jsonl")
    pos = _WS.match(text, pos + 1).end()
    starts, chars, count = [], [], 0
    while not text.startswith("]", pos):
        if count % opts.rows_per_unit == 0:
            starts.append(count)
            chars.append(pos)
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path} is not a valid JSON list: entry {count} ({e}); fix the file, or write it as "
                              "JSONL (one entry per line), whose bad lines are skipped and counted") from None
        count += 1
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise SourceError(f"{path} is not a valid JSON list: expected ',' or ']' after entry {count - 1} at "
                              f"character {pos}")
    byte_starts, b, prev = [], 0, 0
    ascii_ = text.isascii()
    for c in chars + [pos]:  # character offsets -> byte offsets, encoding each stretch once
        b += (c - prev) if ascii_ else len(text[prev:c].encode("utf-8"))
        prev = c
        byte_starts.append(b)
    byte_starts = [x + bom for x in byte_starts]
    return _units("json", path, starts, byte_starts[:-1], count, byte_starts[-1])


def list_units(path: str, opts: SourceOptions) -> list[Unit]:
    return list_json(path, opts) if kind_of(path) == "json" else list_jsonl(path, opts)


def entry_to_raw(entry: dict, default_key: str, opts: SourceOptions, base: str) -> RawRecord:
    field = opts.image_field or "image"
    image, problem = image_from_value(entry.get(field), field, base)
    key_field = opts.key_field or ("key" if "key" in entry else "id")
    key = record_key(entry.get(key_field), default_key)
    return RawRecord(key, entry, image=image, image_problem=problem)


def read_unit(unit: Unit, opts: SourceOptions) -> Iterator[RawRecord | Skip]:
    first, end = unit.location["entries"]
    b0, b1 = unit.location["bytes"]
    base = opts.image_root or os.path.dirname(os.path.abspath(unit.path))
    name = Path(unit.path).name
    with open(unit.path, "rb") as f:
        f.seek(b0)
        data = f.read(b1 - b0)
    if unit.kind == "jsonl":
        for i, line in enumerate(data.split(b"\n")[: end - first]):
            where = f"{name}:{first + i + 1}"  # the line number an editor shows
            if not line.strip():
                continue  # a blank line is no entry
            try:
                entry = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield Skip(where, "bad_json", f"line {first + i + 1} is not JSON ({str(e)[:60]})")
                continue
            if not isinstance(entry, dict):
                yield Skip(where, "bad_json", f"line {first + i + 1} is {type(entry).__name__}, not an object")
                continue
            yield entry_to_raw(entry, where, opts, base)
        return
    text, pos, decoder = data.decode("utf-8"), 0, json.JSONDecoder()
    for i in range(first, end):
        pos = _WS.match(text, pos).end()
        entry, pos = decoder.raw_decode(text, pos)
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        where = f"{name}[{i}]"
        if not isinstance(entry, dict):
            yield Skip(where, "bad_json", f"entry {i} is {type(entry).__name__}, not an object")
            continue
        yield entry_to_raw(entry, where, opts, base)
