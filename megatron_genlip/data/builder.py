"""Build an indexed multimodal dataset from webdataset shards: multiprocess, deterministic, resumable.

Every input shard becomes one *part* (``OUT.parts/NNNNNN-<shard>.{bin,idx,lengths.npy,report.json}``),
written by a worker under temporary names and committed by writing its report last. The final dataset is
the parts concatenated in input order, so the output is identical whatever the worker count, and a killed
build restarted with the same command redoes only the shards without a report. Bad samples are skipped
and counted per reason, with shard and key, in the JSON report; a half sample is never written.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import webdataset as wds

from megatron_genlip.config import Config
from megatron_genlip.data.indexed import FORMAT_VERSION, STORAGES, SampleWriter, merge_parts, record_items
from megatron_genlip.data.records import SkipSample, decode_record, tokenize_record
from megatron_genlip.data.tokenizer import load_tokenizer, resolve_asset

MAX_LOGGED_SKIPS = 1000  # per part; the counters are always complete


def tokenizer_fingerprint(kind: str, path: str | None) -> str:
    """sha256 (16 hex) of the ranks file a tokenizer config resolves to."""
    from megatron_genlip.data.tokenizer import QWEN_RANKS_PATH

    file = QWEN_RANKS_PATH if path is None else resolve_asset(path)
    return f"{kind}:" + hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16]


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, directories (their *.tar) and glob patterns -> sorted shard paths; missing input is an error."""
    shards: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"input pattern {item!r} matches no file")
            shards += found
        elif os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise FileNotFoundError(f"input directory {item} holds no .tar shard")
            shards += found
        elif os.path.isfile(item):
            if not os.access(item, os.R_OK):
                raise PermissionError(f"input shard {item} is not readable")
            shards.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return shards


def _iterate_shard(path: str):
    """Raw samples of one shard (no decoding); a broken tar ends the iteration with an exception."""
    return iter(wds.WebDataset([path], shardshuffle=False, empty_check=False, nodesplitter=lambda s: s,
                               workersplitter=lambda s: s))


def build_part(task: dict) -> dict:
    """Worker: one shard -> one committed part. Returns the part's report."""
    shard, part, cfg, storage = task["shard"], task["part"], task["config"], task["storage"]
    tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    tmp = part + ".tmp"
    writer = SampleWriter(tmp)
    counts: Counter[str] = Counter()
    skipped: list[dict] = []
    written = tokens = image_bytes = 0
    it = _iterate_shard(shard)
    while True:
        try:
            raw = next(it)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - a truncated/corrupt tar: keep what was read, record it
            counts["broken_shard"] += 1
            skipped.append({"shard": shard, "key": None, "reason": "broken_shard", "detail": str(e)[:200]})
            break
        key = raw.get("__key__", "?")
        try:
            rec = decode_record(raw, cfg.data)
            grid, ids, flags = tokenize_record(rec, tokenizer, cfg.data, cfg.tokenizer.prompt, cfg.model.patch_size)
            items = record_items(rec, grid, ids, flags, cfg.data, storage, cfg.model.patch_size)
        except SkipSample as e:
            counts[e.reason] += 1
            if len(skipped) < MAX_LOGGED_SKIPS:
                skipped.append({"shard": shard, "key": key, "reason": e.reason, "detail": e.detail})
            continue
        writer.add(items, grid, len(ids))
        written += 1
        tokens += grid[0] * grid[1] + len(ids)
        image_bytes += int(items[2][0].nbytes)
    writer.finalize()
    for ext in (".bin", ".idx", ".lengths.npy"):
        os.replace(tmp + ext, part + ext)
    report = {"shard": shard, "written": written, "tokens": tokens, "image_bytes": image_bytes,
              "skipped": dict(counts), "skipped_samples": skipped}
    tmp_report = part + ".report.json.tmp"
    Path(tmp_report).write_text(json.dumps(report, indent=1))
    os.replace(tmp_report, part + ".report.json")  # the commit point of this part
    return report


def _part_name(parts_dir: Path, index: int, shard: str) -> str:
    stem = Path(shard).name.replace(".tar", "")
    return str(parts_dir / f"{index:06d}-{stem}")


def build_indexed_dataset(inputs: list[str], output_prefix: str, cfg: Config, workers: int = 1,
                          storage: str = "encoded", progress: bool = True, keep_parts: bool = False) -> dict:
    """Build ``output_prefix.{bin,idx,lengths.npy,json}`` from webdataset shards; returns the report."""
    if storage not in STORAGES:
        raise ValueError(f"--image-storage must be one of {STORAGES}, got {storage!r}")
    if storage == "pixels" and cfg.data.stage != 1:
        raise ValueError("pixel storage needs a fixed resolution (data.stage=1); use --image-storage encoded")
    shards = expand_inputs(inputs)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = Path(str(out) + ".parts")
    parts_dir.mkdir(exist_ok=True)
    parts = [_part_name(parts_dir, i, s) for i, s in enumerate(shards)]
    todo = [{"shard": s, "part": p, "config": cfg, "storage": storage}
            for s, p in zip(shards, parts) if not os.path.exists(p + ".report.json")]
    reused = len(shards) - len(todo)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shards), initial=reused, unit="shard", desc="preprocess")
    if workers > 1 and len(todo) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for _ in pool.imap_unordered(build_part, todo):
                bar is not None and bar.update(1)
    else:
        for task in todo:
            build_part(task)
            bar is not None and bar.update(1)
    if bar is not None:
        bar.close()

    reports = [json.loads(Path(p + ".report.json").read_text()) for p in parts]
    merge_parts(parts, str(out))
    report = _summarise(reports, shards, cfg, storage, time.perf_counter() - start, reused)
    Path(str(out) + ".report.json").write_text(json.dumps(report, indent=1))
    meta = _metadata(report, cfg, storage, out)
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=1))
    if not keep_parts:
        shutil.rmtree(parts_dir)
    return report


def _summarise(reports: list[dict], shards: list[str], cfg: Config, storage: str, seconds: float,
               reused: int) -> dict:
    skipped: Counter[str] = Counter()
    for r in reports:
        skipped.update(r["skipped"])
    return {
        "shards": len(shards),
        "shards_reused": reused,
        "samples_written": sum(r["written"] for r in reports),
        "samples_skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "skipped_samples": [s for r in reports for s in r["skipped_samples"]],
        "tokens": sum(r["tokens"] for r in reports),
        "images": sum(r["written"] for r in reports),
        "image_bytes": sum(r["image_bytes"] for r in reports),
        "image_storage": storage,
        "seconds": round(seconds, 3),
        "config": {"data": asdict(cfg.data), "tokenizer": asdict(cfg.tokenizer)},
    }


def _metadata(report: dict, cfg: Config, storage: str, out: Path) -> dict:
    h = hashlib.sha256()
    for ext in (".idx", ".lengths.npy"):
        h.update(Path(str(out) + ext).read_bytes())
    return {
        "format_version": FORMAT_VERSION,
        "stage": cfg.data.stage,
        "image_size": cfg.data.image_size,
        "min_pixels": cfg.data.min_pixels,
        "max_pixels": cfg.data.max_pixels,
        "patch_size": cfg.model.patch_size,
        "max_sample_length": cfg.data.max_sample_length,
        "prompt": cfg.tokenizer.prompt,
        "tokenizer_fingerprint": tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path),
        "image_storage": storage,
        "samples": report["samples_written"],
        "tokens": report["tokens"],
        "fingerprint": h.hexdigest()[:16],
    }
