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


# -------------------------------------------------------------------------------------------------
# the same samples in every published layout (tests/test_sources.py, benchmarks/source_bench.py)


def sample_specs(n: int, seed: int = 0, size: tuple[int, int] = (40, 32), fmt: str = "PNG",
                 conversations: bool = False) -> list[dict]:
    """``n`` samples: key, encoded image (random content, so never flat), extension, and a caption or a stage-2
    conversation."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
        spec = {"key": f"s{seed:03d}{i:05d}", "image": buf.getvalue(), "ext": "jpg" if fmt == "JPEG" else fmt.lower()}
        if conversations:
            spec["conversations"] = [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                                     {"from": "gpt", "value": f"Picture {i} shows {'red blue green'.split()[i % 3]} noise."}]
        else:
            spec["caption"] = f"a noisy picture number {i}, mostly {'red blue green'.split()[i % 3]}."
        out.append(spec)
    return out


def _text_of(spec: dict) -> dict:
    return {"conversations": spec["conversations"]} if "conversations" in spec else {"caption": spec["caption"]}


def write_webdataset(path, specs: list[dict]) -> str:
    """A webdataset tar: image member + ``.json`` holding the caption or the conversation."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in specs:
            w.write({"__key__": s["key"], s["ext"]: s["image"], "json": json.dumps(_text_of(s)).encode()})
    return str(path)


def write_parquet(path, specs: list[dict], image: str = "struct", row_group_size: int | None = None,
                  image_dir=None, extra: dict | None = None) -> str:
    """A parquet file in the Hugging Face ``Image`` layout: ``key``, ``image`` (``struct``: {bytes, path};
    ``path``: the struct with only a path, the file written under ``image_dir``; ``bytes``: plain binary), then
    ``caption`` or ``conversations`` (a list of {from, value} structs); ``extra``: more columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if image == "struct":
        images = [{"bytes": s["image"], "path": f"{s['key']}.{s['ext']}"} for s in specs]
    elif image == "path":
        Path(image_dir).mkdir(parents=True, exist_ok=True)
        images = []
        for s in specs:
            Path(image_dir, f"{s['key']}.{s['ext']}").write_bytes(s["image"])
            images.append({"bytes": None, "path": f"{Path(image_dir).name}/{s['key']}.{s['ext']}"})
    else:
        images = [s["image"] for s in specs]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {"key": pa.array([s["key"] for s in specs]),
               "image": pa.array(images, type=struct if image in ("struct", "path") else pa.binary())}
    if "conversations" in specs[0]:
        turn = pa.struct([("from", pa.string()), ("value", pa.string())])
        columns["conversations"] = pa.array([s["conversations"] for s in specs], type=pa.list_(turn))
    else:
        columns["caption"] = pa.array([s["caption"] for s in specs])
    for name, values in (extra or {}).items():
        columns[name] = pa.array(values)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return str(path)


def write_llava(path, specs: list[dict], image_dir, jsonl: bool = False) -> str:
    """A LLaVA-style list (``.json``) or JSONL of {"id", "image": path relative to the list's folder, caption |
    conversations}, the images written under ``image_dir``."""
    Path(image_dir).mkdir(parents=True, exist_ok=True)
    entries = []
    for s in specs:
        Path(image_dir, f"{s['key']}.{s['ext']}").write_bytes(s["image"])
        rel = Path(image_dir).relative_to(Path(path).parent) / f"{s['key']}.{s['ext']}"
        entries.append({"id": s["key"], "image": str(rel), **_text_of(s)})
    Path(path).write_text("".join(json.dumps(e) + "\n" for e in entries) if jsonl else json.dumps(entries, indent=1))
    return str(path)
