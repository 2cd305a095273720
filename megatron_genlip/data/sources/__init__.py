"""Readers of the forms image-text data is published in, behind one seam.

A source lists its *units of work* (:class:`Unit`: a tar shard, a parquet row group, a range of JSON(L)
entries) and reads a unit into raw records (:class:`~megatron_genlip.data.records.RawRecord`: key, image bytes,
metadata fields, or a :class:`~megatron_genlip.data.records.Skip`). Everything after that is shared: the text
rule (caption field, fallback, length), image validation, tokenization, one dataset part per unit, resumable
parts, the SLURM array split, the report and its skip reasons (``megatron_genlip/data/builder.py``).

* ``webdataset``: ``.tar``/``.tar.gz``/``.tgz`` shards, img2dataset's layout included (:mod:`.webdataset`);
* ``parquet``: ``.parquet`` files, Hugging Face dataset folders (:mod:`.parquet`);
* ``json``: LLaVA-style ``.json`` lists and ``.jsonl`` files beside an image folder (:mod:`.jsonlist`).
"""

from __future__ import annotations

import glob
import importlib
import os
from typing import Iterator

from megatron_genlip.data.records import RawRecord, Skip
from megatron_genlip.data.sources import webdataset
from megatron_genlip.data.sources.base import FLAGS, FORMATS, SourceError, SourceOptions, Unit, file_identity

__all__ = ["FLAGS", "FORMATS", "SourceError", "SourceOptions", "Unit", "expand_inputs", "file_identity",
           "format_of", "list_units", "read_unit"]

DIR_PATTERNS = {"webdataset": (webdataset.PATTERNS, False), "parquet": (("*.parquet",), True),
                "json": (("*.jsonl", "*.json"), False)}  # (patterns, recursive) of a folder given as input


def format_of(path: str, input_format: str = "auto") -> str:
    """The source that reads ``path``: ``--input-format``, else by extension."""
    if input_format != "auto":
        return input_format
    name = path.lower()
    if name.endswith(webdataset.SUFFIXES):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".json", ".jsonl")):
        return "json"
    raise SourceError(f"cannot tell the format of input {path} from its name (.tar/.tar.gz/.tgz, .parquet, .json, "
                      ".jsonl): pass --input-format webdataset|parquet|json")


def _folder(item: str, input_format: str) -> list[str]:
    kinds = [input_format] if input_format != "auto" else ["webdataset", "parquet", "json"]
    for kind in kinds:  # auto: the first kind the folder holds (a tar folder's dataset_info.json is no input)
        patterns, recursive = DIR_PATTERNS[kind]
        found = sorted({f for pattern in patterns
                        for f in glob.glob(os.path.join(item, "**", pattern) if recursive else os.path.join(item, pattern),
                                           recursive=recursive) if os.path.isfile(f)})
        if found:
            return found
    raise FileNotFoundError(f"input directory {item} holds no .tar, .tar.gz or .tgz shard, no .parquet file (in any "
                            "subfolder) and no .json/.jsonl list" if input_format == "auto" else
                            f"input directory {item} holds no {input_format} input ({', '.join(DIR_PATTERNS[input_format][0])})")


def expand_inputs(inputs: list[str], duplicates: list[str] | None = None, input_format: str = "auto") -> list[str]:
    """Files, directories and glob patterns -> input files in order (a glob or folder sorted); a missing input is
    an error. A folder gives its tar shards, else its parquet files (recursively: a Hugging Face dataset folder),
    else its JSON(L) lists. A file named twice (by any path) is kept once; the repeats are appended to
    ``duplicates`` when given."""
    files: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"input pattern {item!r} matches no file")
            files += found
        elif os.path.isdir(item):
            files += _folder(item, input_format)
        elif os.path.isfile(item):
            if not os.access(item, os.R_OK):
                raise PermissionError(f"input {item} is not readable")
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    seen: set[str] = set()
    unique = []
    for path in files:
        real = os.path.realpath(path)
        if real in seen:
            if duplicates is not None:
                duplicates.append(path)
            continue
        seen.add(real)
        unique.append(path)
    return unique


MODULES = {"webdataset": "webdataset", "parquet": "parquet", "json": "jsonlist", "jsonl": "jsonlist"}


def source_module(kind: str):
    """The module reading ``kind``, imported when first needed (pyarrow only for parquet inputs: a cluster
    environment without it trains and reads tars and JSON)."""
    try:
        return importlib.import_module(f"{__name__}.{MODULES[kind]}")
    except ModuleNotFoundError as e:
        if e.name == "pyarrow" or (e.name or "").startswith("pyarrow."):
            raise SourceError("reading parquet inputs needs pyarrow: pip install -r requirements-cluster-data.txt "
                              "(or requirements.txt)") from None
        raise


def list_units(inputs: list[str], opts: SourceOptions | None = None,
               duplicates: list[str] | None = None) -> list[Unit]:
    """Every unit of work of ``inputs``, in a fixed order; raises SourceError (naming the file and the flag) for
    input that cannot be read as asked, before anything is built."""
    opts = (opts or SourceOptions()).check()
    units: list[Unit] = []
    for path in expand_inputs(inputs, duplicates, opts.input_format):
        units += source_module(format_of(path, opts.input_format)).list_units(path, opts)
    return units


def read_unit(unit: Unit, opts: SourceOptions) -> Iterator[RawRecord | Skip]:
    """The raw records of one unit, in order. An exception raised while iterating means the unit is broken from
    there on (a truncated tar, a damaged row group); what was yielded before stands."""
    return source_module(unit.kind).read_unit(unit, opts)
