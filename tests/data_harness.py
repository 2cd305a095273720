"""Helpers shared by the data tests."""

from __future__ import annotations

import json
from pathlib import Path


def read_files(prefix):
    """Everything a dataset is: the manifest (minus its own name in part paths), the lengths and every part's
    files, in order."""
    manifest = json.loads(Path(prefix + ".json").read_text())
    assert manifest.pop("lengths") == Path(prefix).name + ".lengths.npy"
    parts = [str(Path(prefix).parent / p.pop("path")) for p in manifest["parts"]]
    files = {"manifest": manifest, "lengths": Path(prefix + ".lengths.npy").read_bytes()}
    for i, part in enumerate(parts):
        for ext in (".bin", ".idx", ".lengths.npy"):
            files[f"{i}{ext}"] = Path(part + ext).read_bytes()
    return files
