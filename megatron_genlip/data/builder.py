"""Build an indexed multimodal dataset from any source (``megatron_genlip/data/sources``): parallel, across
machines, resumable.

Inputs are webdataset / img2dataset tars, parquet files (Hugging Face dataset folders) or LLaVA-style JSON(L)
lists; each source names its *units of work* (a tar shard, a parquet row group, a range of JSON(L) entries).
Every unit becomes one *part* (``OUT.parts/NNNNNN-<unit>.{bin,idx,lengths.npy,sums.npy,report.json}``,
``sums.npy`` the crc32 of every sample's bytes; the report records the sha256 of the ``.idx``, sums and lengths),
NNNNNN its index among the units), written under host- and process-unique temporary names and committed by
writing its report last. Parts are the dataset: they are never merged. A build can be split over machines
(``shard_index``/``num_shards``, e.g. a SLURM array job: task i builds units i, i+n, i+2n, ...); a
metadata-only :func:`finalize_dataset` then writes the manifest ``OUT.json``, the concatenated
``OUT.lengths.npy`` and the fingerprint, streaming part by part (O(parts) memory, no ``.bin`` byte copied).
The result is identical whatever the number of machines and workers, and a killed build restarted with the
same command redoes only the units whose part is not committed, or was built with other settings (build
settings, source options, or another version of the unit's file).

Bad samples are skipped and counted per reason, with unit and key, in the part reports and the summary
report; a half sample is never written.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from megatron_genlip.config import Config
from megatron_genlip.data.files import TEMP_MARK, remove_dead_temporaries, replace_atomically, temp_name
from megatron_genlip.data.indexed import (
    LENGTHS_DTYPE, STORAGES, SampleWriter, build_settings, file_fingerprint, record_items, sha256_hex,
)
from megatron_genlip.data.records import Skip, SkipSample, record_from_raw, tokenize_record
from megatron_genlip.data.sources import SourceOptions, Unit, expand_inputs, file_identity, list_units, read_unit
from megatron_genlip.data.tokenizer import load_tokenizer

CHECKSUM_KEYS = ("idx_sha256", "sums_sha256", "lengths_sha256")  # per part, recorded by the task that built it
MAX_LOGGED_SKIPS = 1000  # skipped samples named per part and in the summary; the counters are always complete


__all__ = ["build_indexed_dataset", "finalize_dataset", "expand_inputs", "list_units", "part_name",
           "read_part_report", "shard_identity", "shard_task_from_env", "SourceOptions"]


def shard_identity(shard: str) -> dict:
    """What a tar part was built from (a unit's :meth:`~megatron_genlip.data.sources.Unit.identity`)."""
    return file_identity(shard)


def build_part(task: dict) -> dict:
    """Worker: one unit -> one committed part. Returns the part's report."""
    unit, part, cfg, storage = task["unit"], task["part"], task["config"], task["storage"]
    opts: SourceOptions = task["source"]
    remove_dead_temporaries(part + TEMP_MARK + "*")  # left by a build of this part killed on this host
    tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    rule = opts.text_rule()
    source = unit.identity()
    tmp = temp_name(part)
    writer = SampleWriter(tmp)
    counts: Counter[str] = Counter()
    skipped: list[dict] = []
    written = tokens = image_bytes = fallbacks = 0
    keys_seen: set[str] = set()
    duplicate_keys: list[str] = []

    def skip(key, reason: str, detail: str = "") -> None:
        counts[reason] += 1
        if len(skipped) < MAX_LOGGED_SKIPS:
            skipped.append({"shard": unit.path, "unit": unit.name, "key": key, "reason": reason, "detail": detail})

    it = read_unit(unit, opts)
    while True:
        try:
            raw = next(it)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - a truncated tar, a damaged row group: keep what was read, record it
            skip(None, "broken_shard", f"{type(e).__name__}: {str(e)[:200]}")
            break
        if isinstance(raw, Skip):
            skip(raw.key, raw.reason, raw.detail)
            continue
        key = raw.key
        if key in keys_seen:
            duplicate_keys.append(key)
            if cfg.data.drop_duplicate_keys:
                skip(key, "duplicate_key", "an earlier sample of this unit has the same key")
                continue
        keys_seen.add(key)
        try:
            rec, fallback = record_from_raw(raw, rule, cfg.data)
            grid, ids, flags = tokenize_record(rec, tokenizer, cfg.data, cfg.tokenizer.prompt, cfg.model.patch_size)
            items = record_items(rec, grid, ids, flags, cfg.data, storage, cfg.model.patch_size)
        except SkipSample as e:
            skip(key, e.reason, e.detail)
            continue
        writer.add(items, grid, len(ids))
        written += 1
        fallbacks += fallback
        tokens += grid[0] * grid[1] + len(ids)
        image_bytes += int(items[2][0].nbytes)
    checksums = writer.finalize()  # sha256 of the .idx, the per-sample crc32s and the lengths: read at training
    for ext in (".bin", ".idx", ".lengths.npy", ".sums.npy"):
        os.replace(tmp + ext, part + ext)
    report = {"shard": unit.path, "unit": unit.name, "kind": unit.kind, "written": written, "tokens": tokens,
              "image_bytes": image_bytes, "caption_fallbacks": fallbacks,
              "skipped": dict(counts), "skipped_samples": skipped, "settings": task["settings"], "source": source,
              "reader": opts.reader_settings(unit.kind),
              "duplicate_keys": duplicate_keys[:MAX_LOGGED_SKIPS], "duplicate_key_count": len(duplicate_keys),
              "fingerprint": file_fingerprint([part + ".bin", part + ".idx", part + ".lengths.npy"]),
              "bin_bytes": os.path.getsize(part + ".bin"), "idx_bytes": os.path.getsize(part + ".idx"), **checksums}
    replace_atomically(part + ".report.json", json.dumps(report, indent=1))  # the commit point of this part
    return report


def part_name(parts_dir: Path, index: int, unit: Unit | str) -> str:
    """``parts_dir/NNNNNN-<unit name>``; a path stands for a tar shard (its name without .tar/.tar.gz/.tgz)."""
    if isinstance(unit, str):
        from megatron_genlip.data.sources.webdataset import unit_name

        return str(parts_dir / f"{index:06d}-{unit_name(unit)}")
    return str(parts_dir / f"{index:06d}-{unit.name}")


def read_part_report(part: str) -> dict | None:
    """A committed part's report, or None (not built, or its report unreadable: it will be rebuilt)."""
    try:
        return json.loads(Path(part + ".report.json").read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_current(part: str, unit: Unit, settings: dict, opts: SourceOptions) -> bool:
    """A committed part built from this very unit (same file version, same rows) with these settings and
    source options (a report without ``reader``, from before sources existed, was read with the defaults)."""
    report = read_part_report(part)
    return _report_problem(report, unit, settings, opts) is None


def _report_problem(report: dict | None, unit: Unit, settings: dict, opts: SourceOptions) -> str | None:
    if report is None:
        return "missing"
    if report.get("settings") != settings:
        return "settings"
    if report.get("source") != unit.identity():
        return "source"
    if report.get("reader", {}) != opts.reader_settings(unit.kind):
        return "reader"
    return None


def shard_task_from_env() -> tuple[int, int]:
    """(shard index, number of shards) of this task of a SLURM array job (``--array=0-N``, any start and step),
    else (0, 1). An array given as a list of ids has no such index: pass --shard-index/--num-shards."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return 0, 1
    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    first, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    index, off = divmod(task - first, step)
    if off or not 0 <= index < count:
        raise ValueError(f"SLURM array task {task} (min {first}, step {step}, count {count}) is not in an evenly "
                         "spaced range: submit with --array=START-END[:STEP] or pass --shard-index/--num-shards")
    return index, count


def build_indexed_dataset(inputs: list[str], output_prefix: str, cfg: Config, workers: int = 1,
                          storage: str = "encoded", progress: bool = True, shard_index: int = 0,
                          num_shards: int = 1, finalize: bool | None = None,
                          source: SourceOptions | None = None) -> dict:
    """Build this task's parts of ``output_prefix`` (all of them when ``num_shards == 1``) and, unless the
    build is split over several tasks (``finalize`` defaults to ``num_shards == 1``), finalize the dataset.
    ``source``: how the inputs are read (format, caption field and fallback, columns; the defaults read
    webdataset tars as they always were). Returns the summary report (finalized) or this task's build report."""
    if storage not in STORAGES:
        raise ValueError(f"--image-storage must be one of {STORAGES}, got {storage!r}")
    if storage == "pixels" and cfg.data.stage != 1:
        raise ValueError("pixel storage needs a fixed resolution (data.stage=1); use --image-storage encoded")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} must be in [0, --num-shards={num_shards})")
    from megatron_genlip.data.packed_dataset import check_data_config

    check_data_config(cfg.data)
    opts = (source or SourceOptions()).check()
    repeated: list[str] = []
    units = list_units(inputs, opts, repeated)
    out = Path(output_prefix)
    parts_dir = Path(str(out) + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    settings = build_settings(cfg, storage)
    parts = [part_name(parts_dir, i, u) for i, u in enumerate(units)]
    mine = range(shard_index, len(units), num_shards)
    todo = [{"unit": units[i], "part": parts[i], "config": cfg, "storage": storage, "settings": settings,
             "source": opts} for i in mine if not _is_current(parts[i], units[i], settings, opts)]
    reused = len(mine) - len(todo)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=reused, unit="part", desc=f"preprocess {shard_index}/{num_shards}")
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
    built = {"shards": len(mine), "shards_reused": reused, "seconds": round(time.perf_counter() - start, 3),
             "repeated_inputs_ignored": repeated}
    if finalize if finalize is not None else num_shards == 1:
        return finalize_dataset(inputs, output_prefix, cfg, storage, built, source=opts)
    return built


def finalize_dataset(inputs: list[str], output_prefix: str, cfg: Config, storage: str = "encoded",
                     built: dict | None = None, source: SourceOptions | None = None) -> dict:
    """Write the manifest, the concatenated lengths and the summary report from the committed parts.

    Metadata only and streamed: each part's report and lengths are read once, one at a time (O(parts)
    memory); the manifest is written last, so a dataset either has a complete manifest or none. ``inputs``
    and ``source`` must be those of the build (they name the units, hence the parts)."""
    opts = (source or SourceOptions()).check()
    repeated: list[str] = []
    units = list_units(inputs, opts, repeated)
    out = Path(output_prefix)
    parts_dir = Path(str(out) + ".parts")
    settings = build_settings(cfg, storage)
    parts = [part_name(parts_dir, i, u) for i, u in enumerate(units)]
    entries, missing, stale = [], [], []
    skipped: Counter[str] = Counter()
    named: list[dict] = []
    duplicate_keys: list[str] = []
    totals = Counter()
    for part, unit in zip(parts, units):
        report = read_part_report(part)
        problem = _report_problem(report, unit, settings, opts)
        if problem == "missing":
            missing.append(part)
            continue
        if problem is not None:
            stale.append(part)
            continue
        entries.append({"path": os.path.relpath(part, out.parent), "samples": report["written"],
                        "tokens": report["tokens"], "fingerprint": report["fingerprint"],
                        "bin_bytes": report["bin_bytes"], "idx_bytes": report["idx_bytes"],
                        **{k: report[k] for k in CHECKSUM_KEYS if k in report}})  # absent: an older part
        skipped.update(report["skipped"])
        named += report["skipped_samples"][: MAX_LOGGED_SKIPS - len(named)]
        totals.update(written=report["written"], tokens=report["tokens"], image_bytes=report["image_bytes"],
                      duplicate_keys=report["duplicate_key_count"], caption_fallbacks=report.get("caption_fallbacks", 0))
        duplicate_keys += [f"{report['shard']}:{k}" for k in report["duplicate_keys"][: MAX_LOGGED_SKIPS - len(duplicate_keys)]]
    if missing or stale:
        problems = ([f"{len(missing)} part(s) not built, e.g. {missing[0]}"] if missing else []) + \
                   ([f"{len(stale)} part(s) built with other settings or source options, or from another version of their input, "
                     f"e.g. {stale[0]}"] if stale else [])
        raise ValueError(f"cannot finalize {output_prefix}: {'; '.join(problems)}. Run tools/preprocess_data.py "
                         "with the same --input, source flags, --output-prefix and config (all units, or every --shard-index of "
                         "--num-shards) first")
    n = int(totals["written"])
    lengths_path = str(out) + ".lengths.npy"
    tmp = temp_name(lengths_path)
    merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=LENGTHS_DTYPE, shape=(n, 3))
    at = 0
    for entry in entries:
        part = str(out.parent / entry["path"])
        piece = np.load(part + ".lengths.npy", mmap_mode="r")
        if piece.shape != (entry["samples"], 3) or piece.dtype != LENGTHS_DTYPE or (
                "lengths_sha256" in entry and sha256_hex(np.ascontiguousarray(piece).tobytes()) != entry["lengths_sha256"]):
            os.remove(tmp)
            raise ValueError(f"{part}.lengths.npy holds {piece.dtype} {piece.shape}, its report {entry['samples']} "
                             "samples: the part is damaged; delete its .report.json and rebuild it")
        merged[at:at + len(piece)] = piece
        at += len(piece)
    merged.flush()
    del merged
    os.replace(tmp, lengths_path)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()
                                 + ",".join(e["fingerprint"] for e in entries).encode()).hexdigest()[:16]
    kinds = Counter(u.kind for u in units)
    report = {"shards": len(units), "inputs": len({u.path for u in units}), "units_by_kind": dict(sorted(kinds.items())),
              "source_options": opts.non_default(), "caption_fallbacks": int(totals["caption_fallbacks"]),
              "samples_written": n, "samples_skipped": sum(skipped.values()),
              "skipped_by_reason": dict(sorted(skipped.items())), "skipped_samples": named,
              "skipped_samples_note": f"at most {MAX_LOGGED_SKIPS} named here (input file, unit, key); every part's report "
                                      "names its own",
              "tokens": int(totals["tokens"]), "images": n, "image_bytes": int(totals["image_bytes"]),
              "image_storage": storage, "build": built or {}, "repeated_inputs_ignored": repeated,
              "duplicate_keys": {"count": int(totals["duplicate_keys"]), "examples": duplicate_keys,
                                 "dropped": cfg.data.drop_duplicate_keys}}
    leftovers = glob.glob(str(parts_dir / f"*{TEMP_MARK}*"))
    if leftovers:
        report["temporary_files_left"] = {"count": len(leftovers), "example": leftovers[0],
                                          "note": "left by killed builds on other hosts; delete them once no build runs"}
    replace_atomically(str(out) + ".report.json", json.dumps(report, indent=1))
    manifest = dict(settings, samples=n, tokens=int(totals["tokens"]), fingerprint=fingerprint,
                    lengths=os.path.basename(lengths_path), parts=entries)  # indexed.MANIFEST_FIELDS + settings
    replace_atomically(str(out) + ".json", json.dumps(manifest, indent=1))  # the commit point of the dataset
    return report
