"""What every source shares: the options (one per command-line flag), the unit of work, file identities, errors.

A *unit* is what one dataset part is built from: a tar shard, one row group of a parquet file, a range of
entries of a JSON / JSONL list. Units are listed in a fixed order (inputs in the order given, globs and folders
sorted, then row groups / entry ranges in file order), so part ``NNNNNN-<unit name>`` is the same unit in every
task of a split build and in ``--finalize``. A unit's :meth:`Unit.identity` (the file's path, size and
modification time, plus which row group / entries) and the options that changed how it was read
(:meth:`SourceOptions.reader_settings`, only those that differ from the defaults) are stored in its part's
report: a part is reused only when both still match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

from megatron_genlip.data.records import TextRule

FORMATS = ("auto", "webdataset", "parquet", "json")
TEXT_OPTIONS = ("caption_field", "caption_fallback", "max_caption_chars", "conversations_field")
FILE_OPTIONS = ("image_field", "key_field", "image_root")  # sources whose images/keys are named fields
FLAGS = {"input_format": "--input-format", "caption_field": "--caption-field", "caption_fallback": "--caption-fallback",
         "max_caption_chars": "--max-caption-chars", "conversations_field": "--conversations-field",
         "image_field": "--image-field", "key_field": "--key-field", "image_root": "--image-root",
         "rows_per_unit": "--rows-per-unit"}


class SourceError(ValueError):
    """Input that cannot be read as asked (a wrong column name, a file that is not what its name says, a bad
    flag): raised before any part is built, naming the file and the flag."""


@dataclass(frozen=True)
class SourceOptions:
    """How inputs are read; one field per flag of ``tools/preprocess_data.py`` (:data:`FLAGS`)."""

    input_format: str = "auto"  # auto: by extension (.tar/.tar.gz/.tgz, .parquet, .json/.jsonl)
    caption_field: str | None = None  # None: conversations, else caption, else a tar's .txt
    caption_fallback: str | None = None  # e.g. org_caption: used when the caption is missing, empty or too long
    max_caption_chars: int = 0  # 0: no limit
    conversations_field: str = "conversations"
    image_field: str | None = None  # parquet / JSON: None = the first of IMAGE_COLUMNS there is
    key_field: str | None = None  # parquet / JSON: None = key, else id, else file:row
    image_root: str | None = None  # relative image paths (JSON entries, parquet structs): None = the file's folder
    rows_per_unit: int = 10000  # JSON / JSONL entries per unit (per part)

    def __post_init__(self):
        if self.image_root is not None:
            object.__setattr__(self, "image_root", os.path.abspath(self.image_root))

    def check(self) -> "SourceOptions":
        """Refuse impossible settings up front, naming the flag."""
        if self.input_format not in FORMATS:
            raise SourceError(f"--input-format must be one of {', '.join(FORMATS)}, got {self.input_format!r}")
        if self.max_caption_chars < 0:
            raise SourceError(f"--max-caption-chars must be >= 0 (0: no limit), got {self.max_caption_chars}")
        if self.rows_per_unit < 1:
            raise SourceError(f"--rows-per-unit must be >= 1, got {self.rows_per_unit}")
        for name in ("caption_field", "caption_fallback", "conversations_field", "image_field", "key_field"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SourceError(f"{FLAGS[name]} must be a non-empty field name, got {value!r}")
        if self.caption_fallback is not None and self.caption_fallback == self.caption_field:
            raise SourceError(f"--caption-fallback {self.caption_fallback!r} is the --caption-field itself")
        if self.image_root is not None and not os.path.isdir(self.image_root):
            raise SourceError(f"--image-root {self.image_root} is not a directory")
        return self

    def text_rule(self) -> TextRule:
        return TextRule(self.caption_field, self.caption_fallback, self.max_caption_chars, self.conversations_field)

    def reader_settings(self, kind: str) -> dict:
        """The options that decide how a unit of ``kind`` is read, where they differ from the defaults (so a part
        built with default options, by any version of the builder, carries ``{}``)."""
        names = TEXT_OPTIONS + (FILE_OPTIONS if kind != "webdataset" else ())
        default = SourceOptions()
        return {n: getattr(self, n) for n in names if getattr(self, n) != getattr(default, n)}

    def non_default(self) -> dict:
        default = SourceOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    def with_(self, **kw) -> "SourceOptions":
        return replace(self, **kw)


def file_identity(path: str) -> dict:
    """What a part was built from: a replaced or re-downloaded file at the same path differs in size or time."""
    st = os.stat(path)
    return {"path": os.path.realpath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class Unit:
    """One unit of work = one dataset part. ``name``: the part's stem (unique with the part's index, stable for
    the same inputs and options); ``location``: where in the file (row group, entry range); ``plan``: what the
    reader needs that listing found out (resolved column names)."""

    kind: str  # webdataset | parquet | json | jsonl
    path: str
    name: str
    location: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """The file's identity plus which of its rows this unit is (a tar: the file alone, as parts always had)."""
        ident = file_identity(self.path)
        if self.kind == "parquet":
            ident["row_group"] = self.location["row_group"]
        elif self.kind in ("json", "jsonl"):
            ident["entries"] = list(self.location["entries"])
        return ident

    def describe(self) -> str:
        if self.kind == "parquet":
            return f"{self.path} row group {self.location['row_group']}"
        if self.kind in ("json", "jsonl"):
            first, end = self.location["entries"]
            return f"{self.path} {'lines' if self.kind == 'jsonl' else 'entries'} {first + (self.kind == 'jsonl')}.." \
                   f"{end - (self.kind != 'jsonl')}"
        return self.path


def read_image_file(path: str, base: str) -> tuple[bytes | None, tuple[str, str] | None]:
    """An image named by a path (relative to ``base``): (bytes, None), or (None, (reason, detail))."""
    full = path if os.path.isabs(path) else os.path.join(base, path)
    try:
        with open(full, "rb") as f:
            return f.read(), None
    except OSError as e:
        return None, ("missing_image_file", f"{full} ({e.strerror or e})")


def image_from_value(value, field_name: str, base: str) -> tuple[bytes | None, tuple[str, str] | None]:
    """An image given as a field's value: encoded bytes, a path, a ``{"bytes", "path"}`` struct (the Hugging Face
    ``Image`` feature; the bytes win), or a list of exactly one of those. (bytes, None) or (None, problem)."""
    if isinstance(value, list):
        if len(value) > 1:
            return None, ("multiple_images", f"{field_name!r} holds {len(value)} images, one per sample")
        value = value[0] if value else None
    if value is None:
        return None, ("missing_image", f"no {field_name!r}")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value), None) if len(value) else (None, ("missing_image", f"{field_name!r} is empty"))
    if isinstance(value, str):
        return read_image_file(value, base) if value else (None, ("missing_image", f"{field_name!r} is empty"))
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        if value.get("path"):
            return read_image_file(value["path"], base)
        return None, ("missing_image", f"{field_name!r} has neither bytes nor a path")
    return None, ("missing_image", f"{field_name!r} is {type(value).__name__}, not image bytes or a path")


def record_key(value, default: str) -> str:
    return default if value is None or value == "" else str(value)
