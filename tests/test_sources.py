"""Reading the data in the forms it is published in (issue #25): img2dataset tars, Hugging Face parquet, LLaVA
JSON(L) + image folders, through one source seam. Every layout is written here with the real writers
(webdataset's TarWriter, pyarrow); the same samples give byte-identical datasets through every source."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from megatron_genlip.config import load_config
from megatron_genlip.data.builder import build_indexed_dataset, finalize_dataset
from megatron_genlip.data.indexed import GenLIPIndexedDataset
from megatron_genlip.data.sources import SourceError, SourceOptions, list_units
from megatron_genlip.data.tokenizer import load_tokenizer

from data_harness import read_files, sample_specs, write_llava, write_parquet, write_webdataset

ROOT = Path(__file__).parent.parent
TINY = ROOT / "examples/configs/tiny.yaml"
STAGE2 = ("data.stage=2", "data.max_sample_length=1024", "data.seq_length=1024")


def cfg(*overrides):
    return load_config(TINY, list(overrides))


def build(inputs, prefix, c=None, source=None, **kw) -> dict:
    return build_indexed_dataset([str(i) for i in inputs], str(prefix), c or cfg(), progress=False, source=source, **kw)


def tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools/preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encode(size=(36, 28), fmt="PNG", seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def labelled_text(ds, i, tok) -> list[int]:
    s = ds[i]
    return s.input_ids[s.labels != -100].tolist()


def caption_ids(tok, text) -> list[int]:
    return tok.encode(text) + [tok.eos_id, tok.newline_id]


# -------------------------------------------------------------------------------------------------
# img2dataset shards


LONG = "A very long re-caption that goes on and on. " * 25  # 1,100 characters > 1,024


def img2dataset_shard(path) -> dict:
    """An img2dataset shard of Recap-DataComp-1B: caption in .txt, metadata with the extra columns in .json.
    Returns key -> expected caption (None: skipped, with its reason)."""
    rows = [  # key, image member, re_caption, org_caption (missing: absent from the json)
        ("000000000", "jpg", "A red and blue square.", "square"),
        ("000000001", "jpg", LONG, "alt text of the long one"),
        ("000000002", "webp", "A webp picture of noise.", "noise"),
        ("000000003", "jpeg", "A jpeg-named member.", "jpeg alt"),
        ("000000004", "png", None, "alt text when the re-caption is null"),
        ("000000005", "jpg", LONG, "missing"),
        ("000000006", "png", 3.5, "score instead of text"),
        ("000000007", "png", "Short and fine.", LONG),
    ]
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
    expected = {}
    with wds.TarWriter(str(path)) as w:
        for i, (key, ext, re_cap, org) in enumerate(rows):
            meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
                    "width": 36, "height": 28, "original_width": 360, "original_height": 280, "sha256": "0" * 64,
                    "re_caption": re_cap, "clip_l14_similarity_score": 0.31}
            if org != "missing":
                meta["org_caption"] = org
            w.write({"__key__": key, ext: encode(fmt=fmt[ext], seed=i), "txt": f"txt caption {i}".encode(),
                     "json": json.dumps(meta).encode()})
            expected[key] = re_cap if isinstance(re_cap, str) and len(re_cap) <= 1024 else \
                (org if org != "missing" and not isinstance(re_cap, float) else None)
    return expected


def test_img2dataset_shard_caption_field_fallback_and_length_rule(tmp_path):
    shard = tmp_path / "00000.tar"
    expected = img2dataset_shard(shard)
    prefix = tmp_path / "recap"
    report = tool().main(["--config", str(TINY), "--input", str(shard), "--output-prefix", str(prefix), "--no-progress",
                          "--caption-field", "re_caption", "--caption-fallback", "org_caption",
                          "--max-caption-chars", "1024"])
    assert report["samples_written"] == 6 and report["caption_fallbacks"] == 2  # 000000001 (too long), 000000004 (null)
    got = {(s["key"], s["reason"]) for s in report["skipped_samples"]}
    assert got == {("000000005", "caption_too_long"), ("000000006", "non_text_caption")}
    (too_long,) = [s for s in report["skipped_samples"] if s["key"] == "000000005"]
    assert "1100 characters > --max-caption-chars=1024; fallback 'org_caption' absent" in too_long["detail"]
    assert too_long["unit"] == "00000" and too_long["shard"] == str(shard)
    ds = GenLIPIndexedDataset(str(prefix), cfg().data)
    tok = load_tokenizer("bpe", "tiny_bpe.tiktoken")
    kept = [k for k, v in expected.items() if v is not None]
    assert len(ds) == len(kept) == 6
    for i, key in enumerate(kept):
        assert labelled_text(ds, i, tok) == caption_ids(tok, expected[key]), key
    # the .txt member instead: every sample, its own caption; the changed flag rebuilds the part
    again = build([shard], prefix, source=SourceOptions(caption_field="txt"))
    assert again["build"]["shards_reused"] == 0 and again["samples_written"] == 8 and again["caption_fallbacks"] == 0
    ds = GenLIPIndexedDataset(str(prefix), cfg().data)
    assert [labelled_text(ds, i, tok) for i in range(8)] == [caption_ids(tok, f"txt caption {i}") for i in range(8)]
    assert build([shard], prefix, source=SourceOptions(caption_field="txt"))["build"]["shards_reused"] == 1


# -------------------------------------------------------------------------------------------------
# parquet (Hugging Face image struct), row groups, the SLURM array split


def test_parquet_row_groups_split_over_two_tasks_equal_one_build_and_tars(tmp_path):
    specs = sample_specs(10, seed=1, conversations=True)
    path = write_parquet(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet", specs, row_group_size=5,
                         extra={"data_source": ["synthetic"] * 10})
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    c = cfg(*STAGE2)
    one = tmp_path / "one"
    build([tmp_path / "hf"], one, c)  # the Hugging Face dataset folder
    split = tmp_path / "split"
    for task in (1, 0):
        out = build([path], split, c, shard_index=task, num_shards=2)
        assert out["shards"] == 1 and not Path(str(split) + ".json").exists()
    report = finalize_dataset([path], str(split), c)
    assert report["units_by_kind"] == {"parquet": 2} and report["samples_written"] == 10
    assert read_files(str(one)) == read_files(str(split))  # manifest, lengths, every part's bin/idx/lengths
    names = sorted(p.name for p in Path(str(split) + ".parts").glob("*.report.json"))
    assert names == ["000000-train-00000-of-00001.rg00000.report.json",
                     "000001-train-00000-of-00001.rg00001.report.json"]
    part = json.loads((Path(str(split) + ".parts") / names[1]).read_text())
    assert part["source"]["row_group"] == 1 and part["unit"] == "train-00000-of-00001.rg00001"
    # the same samples as webdataset tars of 5: the same bytes
    tars = [write_webdataset(tmp_path / f"t-{k:06d}.tar", specs[5 * k:5 * k + 5]) for k in range(2)]
    build(tars, tmp_path / "tars", c)
    assert read_files(str(tmp_path / "tars")) == read_files(str(one))
    tok = load_tokenizer("bpe", "tiny_bpe.tiktoken")
    ds = GenLIPIndexedDataset(str(one), c.data)
    assert labelled_text(ds, 7, tok) == caption_ids(tok, specs[7]["conversations"][1]["value"])


# -------------------------------------------------------------------------------------------------
# LLaVA JSON / JSONL + image folder


def llava_entries(tmp_path) -> tuple[list[dict], dict]:
    """Stage-2 entries of every kind; returns them and id -> skip reason (None: kept)."""
    images = tmp_path / "llava" / "images"
    images.mkdir(parents=True)
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(encode(size=(48, 40), fmt="JPEG", seed=10 + i))
    q = lambda v: {"from": "human", "value": v}  # noqa: E731
    a = lambda v: {"from": "gpt", "value": v}  # noqa: E731
    entries = [
        {"id": "hg", "image": "images/0.jpg", "conversations": [q("<image>\nWhat is this?"), a("Noise in colour.")]},
        {"id": "ua", "image": "images/1.jpg", "conversations": [{"from": "user", "value": "Describe.<image>"},
                                                                {"from": "assistant", "value": "Grainy dots."}]},
        {"id": "rc", "image": ["images/2.jpg"], "conversations": [{"role": "user", "content": "<image> Caption it."},
                                                                  {"role": "assistant", "content": "Static."}]},
        {"id": "cap", "image": "images/3.jpg", "caption": "A caption with the default prompt."},
        {"image": "images/4.jpg", "conversations": [q("<image>Two turns?"), a("Yes."), q("Sure?"), a("Quite sure.")]},
        {"id": "textonly", "conversations": [q("What is 2+2?"), a("4.")]},
        {"id": "twoimages", "image": ["images/0.jpg", "images/1.jpg"], "conversations": [q("<image><image>"), a("Two.")]},
        {"id": "twotags", "image": "images/0.jpg", "conversations": [q("<image>\n<image> compare"), a("Same.")]},
        {"id": "nofile", "image": "images/missing.jpg", "conversations": [q("<image>"), a("Gone.")]},
        {"id": "nocaption", "image": "images/0.jpg", "other": "no text here"},
    ]
    reasons = {"hg": None, "ua": None, "rc": None, "cap": None, "textonly": "missing_image",
               "twoimages": "multiple_images", "twotags": "multiple_images", "nofile": "missing_image_file",
               "nocaption": "missing_caption"}
    return entries, reasons


def test_llava_json_and_jsonl_with_image_folder(tmp_path):
    entries, reasons = llava_entries(tmp_path)
    listing = tmp_path / "llava" / "llava_mix.json"
    listing.write_text(json.dumps(entries, indent=1))
    lines = tmp_path / "llava" / "llava_mix.jsonl"
    lines.write_text("".join(json.dumps(e) + "\n" for e in entries[:5]) + "{not json\n\n"
                     + "".join(json.dumps(e) + "\n" for e in entries[5:]) + "[1, 2]\n")
    c = cfg(*STAGE2)
    r_json = build([listing], tmp_path / "from-json", c)
    assert r_json["samples_written"] == 5 and r_json["samples_skipped"] == 5  # nothing else lost: 10 entries
    got = {s["key"]: s["reason"] for s in r_json["skipped_samples"]}
    assert got == {k: v for k, v in reasons.items() if v is not None}
    (nofile,) = [s for s in r_json["skipped_samples"] if s["key"] == "nofile"]
    assert nofile["detail"].startswith(str(tmp_path / "llava" / "images" / "missing.jpg"))
    r_lines = build([lines], tmp_path / "from-jsonl", c)
    got = {s["key"]: s["reason"] for s in r_lines["skipped_samples"]}
    assert got == dict({k: v for k, v in reasons.items() if v is not None},
                       **{"llava_mix.jsonl:6": "bad_json", "llava_mix.jsonl:13": "bad_json"})  # line 7 is blank
    assert read_files(str(tmp_path / "from-json")) == read_files(str(tmp_path / "from-jsonl"))
    ds = GenLIPIndexedDataset(str(tmp_path / "from-json"), c.data)
    tok = load_tokenizer("bpe", "tiny_bpe.tiktoken")
    want = ["Noise in colour.", "Grainy dots.", "Static.", "A caption with the default prompt."]
    for i, text in enumerate(want):
        assert labelled_text(ds, i, tok) == caption_ids(tok, text)
    multi = ds[4]  # two rounds: both answers supervised, both questions not
    assert multi.input_ids[multi.labels != -100].tolist() == tok.encode("Yes.") + tok.encode("Quite sure.") + [
        tok.eos_id, tok.newline_id]
    g = ds.grid_and_text(1)
    assert tok.decode(ds[1].input_ids[g[0] * g[1]:][ds[1].labels[g[0] * g[1]:] == -100].tolist()) == "Describe."
    # the key of an entry without an id is its place in the file
    assert r_json["duplicate_keys"]["count"] == 0
    assert sorted(json.loads(p.read_text())["unit"] for p in Path(str(tmp_path / "from-json") + ".parts").glob(
        "*.report.json")) == ["llava_mix.e000000000"]


def test_json_units_split_over_tasks_and_the_same_samples_as_tars(tmp_path):
    specs = sample_specs(8, seed=2, conversations=True)
    listing = write_llava(tmp_path / "l" / "list.json", specs, tmp_path / "l" / "img")
    lines = write_llava(tmp_path / "l" / "list.jsonl", specs, tmp_path / "l" / "img", jsonl=True)
    c = cfg(*STAGE2)
    opts = SourceOptions(rows_per_unit=3)
    units = list_units([listing, lines], opts)
    assert [(u.kind, u.name, u.location["entries"]) for u in units] == [
        ("json", "list.e000000000", [0, 3]), ("json", "list.e000000003", [3, 6]), ("json", "list.e000000006", [6, 8]),
        ("jsonl", "list.e000000000", [0, 3]), ("jsonl", "list.e000000003", [3, 6]), ("jsonl", "list.e000000006", [6, 8])]
    one = tmp_path / "one"
    build([listing], one, c, source=opts)
    split = tmp_path / "split"
    for task in (0, 1):
        build([listing], split, c, source=opts, shard_index=task, num_shards=2)
    finalize_dataset([listing], str(split), c, source=opts)
    assert read_files(str(one)) == read_files(str(split))
    build([lines], tmp_path / "jsonl", c, source=opts)
    tars = [write_webdataset(tmp_path / f"t-{k}.tar", specs[3 * k:3 * k + 3]) for k in range(3)]
    build(tars, tmp_path / "tars", c)
    assert read_files(str(tmp_path / "tars")) == read_files(str(one)) == read_files(str(tmp_path / "jsonl"))
    with pytest.raises(ValueError, match=r"built with other settings or source options"):  # another source flag
        finalize_dataset([listing], str(split), c, source=SourceOptions(rows_per_unit=3, key_field="id"))


# -------------------------------------------------------------------------------------------------
# every source, the same samples: identical datasets (tokens and pixels)


def img2dataset_tar(path, specs) -> str:
    """img2dataset's default layout: caption in .txt, metadata (no caption) in .json."""
    with wds.TarWriter(str(path)) as w:
        for s in specs:
            w.write({"__key__": s["key"], s["ext"]: s["image"], "txt": s["caption"].encode(),
                     "json": json.dumps({"url": "http://x/" + s["key"], "status": "success"}).encode()})
    return str(path)


@pytest.mark.parametrize("storage", ["encoded", "pixels"])
def test_every_source_gives_identical_parts(tmp_path, storage):
    specs = sample_specs(6, seed=3) + sample_specs(2, seed=4, fmt="JPEG")
    layouts = {
        "webdataset": [write_webdataset(tmp_path / "wds.tar", specs)],
        "img2dataset": [img2dataset_tar(tmp_path / "i2d.tar", specs)],
        "parquet-struct": [write_parquet(tmp_path / "struct.parquet", specs)],
        "parquet-path": [write_parquet(tmp_path / "pq" / "path.parquet", specs, image="path",
                                       image_dir=tmp_path / "pq" / "images")],
        "parquet-bytes": [write_parquet(tmp_path / "bytes.parquet", specs, image="bytes")],
        "jsonl": [write_llava(tmp_path / "js" / "l.jsonl", specs, tmp_path / "js" / "images", jsonl=True)],
        "json": [write_llava(tmp_path / "js" / "l.json", specs, tmp_path / "js" / "images")],
    }
    content = {}
    for name, inputs in layouts.items():
        report = build(inputs, tmp_path / name, storage=storage)
        assert report["samples_written"] == 8 and report["samples_skipped"] == 0, (name, report["skipped_samples"])
        content[name] = read_files(str(tmp_path / name))
    for name in layouts:
        assert content[name] == content["webdataset"], name
    # read back: the same token arrays and pixels, and the ones the captions and images give
    tok = load_tokenizer("bpe", "tiny_bpe.tiktoken")
    a = GenLIPIndexedDataset(str(tmp_path / "webdataset"), cfg().data)
    b = GenLIPIndexedDataset(str(tmp_path / "parquet-path"), cfg().data)
    for i, s in enumerate(specs):
        x, y = a[i], b[i]
        assert x.input_ids.tolist() == y.input_ids.tolist() and x.labels.tolist() == y.labels.tolist()
        assert np.array_equal(x.patches.numpy(), y.patches.numpy())
        assert labelled_text(b, i, tok) == caption_ids(tok, s["caption"])
        if storage == "encoded":
            assert bytes(b.raw(i)[2]) == s["image"]  # the original encoded bytes, whatever the source


# -------------------------------------------------------------------------------------------------
# bad input: refused up front naming the flag and the columns, or skipped and counted


def test_wrong_parquet_columns_are_clear_errors_listing_the_columns(tmp_path, capsys):
    path = write_parquet(tmp_path / "d.parquet", sample_specs(3), extra={"score": [0.1, 0.2, 0.3], "n": [1, 2, 3]})
    cases = [
        (SourceOptions(caption_field="re_caption"), r"--caption-field 're_caption' is not a column of .*d\.parquet; "
                                                    r"its columns: key \(string\), image \(struct<bytes: binary, path: "
                                                    r"string>\), caption \(string\), score \(double\), n \(int64\)"),
        (SourceOptions(caption_field="caption", caption_fallback="org_caption"), "--caption-fallback 'org_caption' is not"),
        (SourceOptions(image_field="jpg"), "--image-field 'jpg' is not a column"),
        (SourceOptions(key_field="uid"), "--key-field 'uid' is not a column"),
        (SourceOptions(caption_field="score"), "--caption-field 'score' of .* is a column of double, not text"),
        (SourceOptions(image_field="n"), "image column 'n' of .* is int64"),
        (SourceOptions(conversations_field="messages"), "--conversations-field 'messages' is not a column"),
    ]
    for opts, message in cases:
        with pytest.raises(SourceError, match=message):
            build([path], tmp_path / "x", source=opts)
    assert not Path(str(tmp_path / "x") + ".parts").exists()  # refused before anything was written
    pq.write_table(pa.table({"key": ["a"], "image": [b"x"], "text": ["t"]}), str(tmp_path / "notext.parquet"))
    with pytest.raises(SourceError, match=r"neither a 'conversations' nor a 'caption' column; name the text column "
                                          r"with --caption-field .*columns: key \(string\), image \(binary\), text"):
        list_units([str(tmp_path / "notext.parquet")])
    with pytest.raises(SystemExit) as e:  # the command line: exit 2 and the message, no traceback
        tool().main(["--config", str(TINY), "--input", path, "--output-prefix", str(tmp_path / "y"),
                     "--caption-field", "re_caption", "--no-progress"])
    assert e.value.code == 2 and "error: --caption-field 're_caption' is not a column" in capsys.readouterr().err


def test_struct_images_with_only_a_path_resolve_against_the_file_or_image_root(tmp_path):
    specs = sample_specs(4, seed=5)
    elsewhere = tmp_path / "shared-images"
    path = write_parquet(tmp_path / "meta" / "p.parquet", specs, image="path", image_dir=elsewhere / "imgs")
    # paths are "imgs/<key>.png": not beside the parquet file
    report = build([path], tmp_path / "no-root")
    assert report["samples_written"] == 0 and report["skipped_by_reason"] == {"missing_image_file": 4}
    assert report["skipped_samples"][0]["detail"].startswith(str(tmp_path / "meta" / "imgs" / specs[0]["key"]))
    report = build([path], tmp_path / "root", source=SourceOptions(image_root=str(elsewhere)))
    assert report["samples_written"] == 4
    (elsewhere / "imgs" / f"{specs[2]['key']}.png").unlink()
    report = build([path], tmp_path / "root-2", source=SourceOptions(image_root=str(elsewhere)))
    assert report["samples_written"] == 3 and report["skipped_by_reason"] == {"missing_image_file": 1}
    assert report["skipped_samples"][0]["key"] == specs[2]["key"]


def test_broken_rows_and_lines_are_skipped_and_counted(tmp_path):
    # a JSONL line that is not JSON, a JSON list that is not valid JSON, a parquet row group that is damaged
    specs = sample_specs(6, seed=6)
    jsonl = write_llava(tmp_path / "a.jsonl", specs, tmp_path / "img", jsonl=True)
    text = Path(jsonl).read_text().splitlines()
    text[2] = text[2][:-5]  # cut short
    Path(jsonl).write_text("\n".join(text) + "\n")
    report = build([jsonl], tmp_path / "jl")
    assert report["samples_written"] == 5 and report["skipped_by_reason"] == {"bad_json": 1}
    assert report["skipped_samples"][0]["key"] == "a.jsonl:3"
    broken = tmp_path / "b.json"
    broken.write_text('[{"id": "x", "image": "img/x.png", "caption": "c"},\n {"id": "y", "caption": }]')
    with pytest.raises(SourceError, match=r"b\.json is not a valid JSON list: entry 1"):
        build([broken], tmp_path / "bj")
    (tmp_path / "dict.json").write_text('{"annotations": []}')
    with pytest.raises(SourceError, match="is not a JSON list of entries"):
        build([tmp_path / "dict.json"], tmp_path / "dj")
    # parquet: two row groups, the second's image pages overwritten with garbage
    path = write_parquet(tmp_path / "c.parquet", specs, row_group_size=3, image="bytes")
    meta = pq.ParquetFile(path).metadata
    col = [meta.row_group(1).column(j) for j in range(meta.num_columns)
           if meta.row_group(1).column(j).path_in_schema == "image"][0]
    raw = bytearray(Path(path).read_bytes())
    start = col.data_page_offset
    raw[start:start + 40] = b"\xff" * 40  # the page header: unreadable
    Path(path).write_bytes(bytes(raw))
    report = build([path], tmp_path / "pq")
    assert report["samples_written"] == 3 and report["skipped_by_reason"] == {"broken_shard": 1}
    (entry,) = report["skipped_samples"]
    assert entry["unit"] == "c.rg00001" and entry["key"] is None and entry["shard"] == path


def test_flags_are_checked_before_anything_is_built(tmp_path, capsys):
    shard = write_webdataset(tmp_path / "s.tar", sample_specs(2))
    for opts, message in [(SourceOptions(max_caption_chars=-1), "--max-caption-chars must be >= 0"),
                          (SourceOptions(rows_per_unit=0), "--rows-per-unit must be >= 1"),
                          (SourceOptions(image_root=str(tmp_path / "nope")), "--image-root .*nope is not a directory"),
                          (SourceOptions(caption_field="a", caption_fallback="a"), "is the --caption-field itself"),
                          (SourceOptions(input_format="csv"), "--input-format must be one of")]:
        with pytest.raises(SourceError, match=message):
            build([shard], tmp_path / "x", source=opts)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match=r"cannot tell the format of input .*data\.csv.*--input-format"):
        build([tmp_path / "data.csv"], tmp_path / "x")
    with pytest.raises(SystemExit) as e:
        tool().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input-format", "--caption-field", "--caption-fallback", "--max-caption-chars",
                 "--conversations-field", "--image-field", "--key-field", "--image-root", "--rows-per-unit"):
        assert flag in text, flag


def test_parts_of_older_builds_and_changed_sources(tmp_path):
    """A tar part committed before sources existed (no ``unit``/``reader`` in its report) is still current; a
    parquet file rewritten in place, or a changed source flag, rebuilds its parts."""
    shard = write_webdataset(tmp_path / "s-000000.tar", sample_specs(3))
    build([shard], tmp_path / "old")
    for report_path in Path(str(tmp_path / "old") + ".parts").glob("*.report.json"):
        report = json.loads(report_path.read_text())
        for key in ("unit", "kind", "reader", "caption_fallbacks"):
            report.pop(key)
        report_path.write_text(json.dumps(report))
    again = build([shard], tmp_path / "old")
    assert again["build"]["shards_reused"] == 1 and again["samples_written"] == 3
    path = write_parquet(tmp_path / "p.parquet", sample_specs(4, seed=8), row_group_size=2)
    build([path], tmp_path / "p")
    before = read_files(str(tmp_path / "p"))
    assert build([path], tmp_path / "p")["build"]["shards_reused"] == 2
    assert build([path], tmp_path / "p", source=SourceOptions(key_field="key"))["build"]["shards_reused"] == 0
    write_parquet(tmp_path / "p.parquet", sample_specs(4, seed=9), row_group_size=2)
    changed = build([path], tmp_path / "p")
    assert changed["build"]["shards_reused"] == 0 and read_files(str(tmp_path / "p")) != before
    fresh = build([path], tmp_path / "fresh")
    assert fresh["samples_written"] == 4 and read_files(str(tmp_path / "p")) == read_files(str(tmp_path / "fresh"))


def test_repeated_and_folder_inputs(tmp_path):
    """A Hugging Face folder (parquet in a subfolder, README beside it), a tar folder with a dataset_info.json,
    and one file named twice."""
    hf = tmp_path / "hf"
    write_parquet(hf / "data" / "train-00001-of-00002.parquet", sample_specs(2, seed=11))
    write_parquet(hf / "data" / "train-00000-of-00002.parquet", sample_specs(2, seed=10))
    (hf / "README.md").write_text("# card")
    duplicates: list[str] = []
    units = list_units([str(hf), str(hf / "data" / "train-00000-of-00002.parquet")], None, duplicates)
    assert [u.name for u in units] == ["train-00000-of-00002.rg00000", "train-00001-of-00002.rg00000"]
    assert duplicates == [str(hf / "data" / "train-00000-of-00002.parquet")]
    tars = tmp_path / "tars"
    tars.mkdir()
    write_webdataset(tars / "a-000000.tar", sample_specs(2))
    (tars / "dataset_info.json").write_text("{}")
    assert [u.kind for u in list_units([str(tars)])] == ["webdataset"]
    shutil.copy(tars / "a-000000.tar", tmp_path / "copy.tar")
    assert len(list_units([str(tars), str(tmp_path / "copy.tar")])) == 2  # a copy is another file


def test_parquet_needs_pyarrow_only_when_parquet_is_read(tmp_path, monkeypatch):
    """The builder (and the trainer that imports it) never imports pyarrow: a cluster environment without it
    reads tars and JSON, and a parquet input there is one clear error naming the requirements file."""
    import subprocess
    import sys

    code = "import sys, megatron_genlip.data.builder; assert 'pyarrow' not in sys.modules, 'pyarrow imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
    path = write_parquet(tmp_path / "p.parquet", sample_specs(1))
    monkeypatch.delitem(sys.modules, "megatron_genlip.data.sources.parquet", raising=False)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SourceError, match="reading parquet inputs needs pyarrow: pip install -r requirements-cluster-data"):
        list_units([path])
    shard = write_webdataset(tmp_path / "s.tar", sample_specs(2))
    assert build([shard], tmp_path / "tar")["samples_written"] == 2


def test_the_text_rule_case_by_case():
    """The one rule every source applies (records.choose_text): defaults, caption field, fallback and length."""
    from megatron_genlip.data.records import SkipSample, TextRule, choose_text

    conv = [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello."}]
    assert choose_text({"conversations": conv, "caption": "c"}) == (
        None, [{"from": "user", "value": "<image>Hi"}, {"from": "assistant", "value": "Hello."}], False)
    assert choose_text({"caption": "c"}, txt=b"t") == ("c", None, False)  # the .json caption before the .txt
    assert choose_text({"caption": None}, txt=b"t") == ("t", None, False)
    assert choose_text({}, txt=b"t") == ("t", None, False)
    rule = TextRule("re_caption", "org_caption", 10)
    assert choose_text({"re_caption": "short", "org_caption": "o"}, rule) == ("short", None, False)
    assert choose_text({"re_caption": "x" * 10, "org_caption": "o"}, rule) == ("x" * 10, None, False)  # 10 is fine
    assert choose_text({"re_caption": "x" * 11, "org_caption": "o"}, rule) == ("o", None, True)
    assert choose_text({"re_caption": "  ", "org_caption": "o"}, rule) == ("o", None, True)
    assert choose_text({"org_caption": "o"}, rule) == ("o", None, True)
    for fields, reason, detail in [
        ({"re_caption": "x" * 11}, "caption_too_long", "fallback 'org_caption' absent"),
        ({"re_caption": "x" * 11, "org_caption": "y" * 11}, "caption_too_long", "11 characters too"),
        ({"re_caption": "x" * 11, "org_caption": ""}, "caption_too_long", "empty"),
        ({}, "missing_caption", "no 're_caption'"),
        ({"re_caption": 7, "org_caption": "o"}, "non_text_caption", "int, not text"),  # not text: no fallback
        ({"re_caption": b"\xff\xfe", "org_caption": "o"}, "non_text_caption", "not UTF-8"),
    ]:
        with pytest.raises(SkipSample) as e:
            choose_text(fields, rule)
        assert e.value.reason == reason and detail in e.value.detail, (fields, e.value)
    with pytest.raises(SkipSample) as e:
        choose_text({"re_caption": "x" * 11}, TextRule("re_caption", None, 10))
    assert e.value.reason == "caption_too_long"
    with pytest.raises(SkipSample) as e:
        choose_text({"conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}]})
    assert e.value.reason == "multiple_images"
    with pytest.raises(SkipSample) as e:
        choose_text({"url": "u"}, txt=None)
    assert e.value.reason == "missing_caption" and "fields: url" in e.value.detail
