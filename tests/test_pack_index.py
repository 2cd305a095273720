"""The pack index (megatron_genlip/data/pack_index.py): the packing rule, the shuffle, epochs as memory-mapped
build artefacts, O(1) lookups at any epoch, and what happens to missing, truncated or flipped files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_genlip.data import pack_index as pi
from megatron_genlip.data.pack_index import (
    LengthSource, MissingEpochError, PackIndex, PackSettings, build_epoch, ensure_epochs, pack_arrivals,
    shuffle_positions,
)

ROOT = Path(__file__).parent.parent


def reference_buffered_first_fit(lengths, seq_length: int, buffer_size: int) -> list[list[int]]:
    """The official rule written plainly (the project's former packer): a buffer of ``buffer_size`` samples in
    arrival order, refilled after each row; a row takes, in order, every buffered sample that still fits."""
    rows, buf, nxt = [], [], 0
    while nxt < len(lengths) or buf:
        take = min(buffer_size - len(buf), len(lengths) - nxt)
        buf += range(nxt, nxt + take)
        nxt += take
        room, row = seq_length, []
        for i in buf:
            if lengths[i] <= room:
                row.append(i)
                room -= lengths[i]
        rows.append(row)
        buf = [i for i in buf if i not in set(row)]
    return rows


def stage1_lengths(n: int, seed: int = 0) -> np.ndarray:
    """PERFORMANCE.md §1.4/§2.7: 196 image + prompt (6) + caption ~N(72, 20) clipped to [8, 130] + eos pair."""
    rng = np.random.default_rng(seed)
    return 196 + 6 + 2 + np.clip(np.round(rng.normal(72, 20, size=n)), 8, 130).astype(np.int64)


def split_rows(order, sizes):
    return [r.tolist() for r in np.split(order, np.cumsum(sizes)[:-1])]


@pytest.mark.parametrize("trial", range(6))
def test_vectorised_packer_equals_the_reference_rule(trial):
    rng = np.random.default_rng(trial)
    n, seq, buf = int(rng.integers(1, 1500)), int(rng.integers(50, 2000)), int(rng.integers(1, 200))
    lengths = rng.integers(1, seq + 1, size=n)
    order, sizes = pack_arrivals(lengths, seq, buf)
    assert split_rows(order, sizes) == reference_buffered_first_fit(lengths.tolist(), seq, buf)


def test_packing_efficiency_on_stage1_lengths():
    """>= 99.4% real tokens in 16384-token rows (the recipe's buffer of 4096); whole samples only."""
    lengths = stage1_lengths(200_000)
    order, sizes = pack_arrivals(lengths, 16384, 4096)
    assert np.array_equal(np.sort(order), np.arange(len(lengths)))
    fill = np.add.reduceat(lengths[order], np.concatenate(([0], np.cumsum(sizes)[:-1])))
    assert fill.max() <= 16384
    assert lengths.sum() / (len(sizes) * 16384) >= 0.994


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_shuffle_is_a_bijection_computed_per_slice(n):
    full = shuffle_positions(np.arange(n), n, seed=5, epoch=2)
    assert np.array_equal(np.sort(full), np.arange(n))
    lo, hi = n // 3, (2 * n) // 3
    assert np.array_equal(shuffle_positions(np.arange(lo, hi), n, 5, 2), full[lo:hi])  # no global state
    if n >= 64:
        assert not np.array_equal(full, np.arange(n))
        assert not np.array_equal(full, shuffle_positions(np.arange(n), n, 5, 3))  # epochs differ
        assert not np.array_equal(full, shuffle_positions(np.arange(n), n, 6, 2))  # seeds differ


def write_lengths(path: Path, total_tokens: np.ndarray) -> LengthSource:
    """A lengths file with grid 1x1 and the rest as text, as a LengthSource."""
    arr = np.stack([np.ones_like(total_tokens), np.ones_like(total_tokens), total_tokens - 1], axis=1)
    np.save(path, arr.astype(np.uint16))
    return LengthSource([str(path)], [len(arr)])


@pytest.fixture
def source(tmp_path):
    lengths = stage1_lengths(5000, seed=1) // 8  # ~34 tokens: ~30 samples per 1024-token row
    return write_lengths(tmp_path / "lengths.npy", lengths), lengths


def settings_for(n: int, chunk: int = 1500) -> PackSettings:
    return PackSettings("fp", n, 1024, 64, seed=3, chunk_size=chunk)


def test_epoch_files_are_identical_for_any_worker_count(tmp_path, source):
    src, lengths = source
    s = settings_for(len(lengths))
    serial = build_epoch(tmp_path / "a", s, src, 0, workers=1)
    parallel = build_epoch(tmp_path / "b", s, src, 0, workers=2)
    for name in ("epoch0000.order.npy", "epoch0000.rows.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert serial["chunk_sha256"] == parallel["chunk_sha256"] and len(serial["chunk_sha256"]) == 4
    order = np.load(tmp_path / "a" / "epoch0000.order.npy")
    rows = np.load(tmp_path / "a" / "epoch0000.rows.npy")
    assert order.dtype == np.uint32 and rows[-1] == len(lengths)
    assert np.array_equal(np.sort(order), np.arange(len(lengths)))  # every sample once per epoch
    assert max(lengths[order[a:b]].sum() for a, b in zip(rows[:-1], rows[1:])) <= 1024
    assert not list((tmp_path / "a").glob("*.tmp-*"))


def test_row_lookup_at_epoch_7_opens_only_epoch_7(tmp_path, source, monkeypatch):
    """The former index walked and reloaded every earlier epoch for a row of epoch 7; now a row costs one
    binary search over the epochs and the two memory-mapped arrays of its own epoch."""
    src, lengths = source
    s = settings_for(len(lengths))
    index = ensure_epochs(tmp_path, s, src, epochs=8, log=lambda *_: None)
    loads = []
    real_load = np.load
    monkeypatch.setattr(pi.np, "load", lambda path, *a, **k: loads.append(Path(path).name) or real_load(path, *a, **k))
    fresh = PackIndex(tmp_path, s)
    late = int(fresh.row_starts[7]) + 5
    samples = fresh.row_samples(late)
    assert loads == ["epoch0007.order.npy", "epoch0007.rows.npy"]
    fresh.row_samples(late + 1)
    assert len(loads) == 2  # kept open
    order = real_load(tmp_path / "epoch0007.order.npy", mmap_mode="r")
    rows = real_load(tmp_path / "epoch0007.rows.npy")
    assert np.array_equal(samples, order[rows[5]:rows[6]])
    assert fresh.locate(late) == (7, 5) and index.total_rows == fresh.total_rows


def test_missing_epoch_is_a_clear_error_or_built_once(tmp_path, source):
    src, lengths = source
    s = settings_for(len(lengths))
    with pytest.raises(MissingEpochError, match="tools/build_pack_index.py"):
        ensure_epochs(tmp_path, s, src, epochs=1, build=False)
    messages = []
    index = ensure_epochs(tmp_path, s, src, rows=1, log=messages.append)
    assert index.epochs == 1 and len(messages) == 1
    again = ensure_epochs(tmp_path, s, src, rows=index.total_rows + 1, log=messages.append)
    assert again.epochs == 2 and len(messages) == 2  # only the missing epoch was built
    with pytest.raises(MissingEpochError, match="epoch 2 is needed"):
        again.row_samples(again.total_rows)


def test_concurrent_builders_build_each_epoch_once(tmp_path, source):
    """Two processes (two ranks, or the same command started twice) ask for the same epochs: the lock makes
    one build them, the other finds them built; the files are whole and no temporary is left behind."""
    src, lengths = source
    code = (
        "import sys, numpy as np\n"
        "from megatron_genlip.data.pack_index import ensure_epochs, LengthSource, PackSettings\n"
        f"s = PackSettings('fp', {len(lengths)}, 1024, 64, seed=3, chunk_size=1500)\n"
        f"src = LengthSource([{str(src.files[0])!r}], [{len(lengths)}])\n"
        f"ensure_epochs({str(tmp_path / 'idx')!r}, s, src, epochs=3, log=lambda m: print('BUILT', m))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    built = [int(n) for o in outs for n in re.findall(r"BUILT built pack index epochs \S+ \((\d+) epochs", o[0])]
    assert sum(built) == 3, outs  # each epoch built by exactly one of the two
    reference = ensure_epochs(tmp_path / "ref", settings_for(len(lengths)), src, epochs=3, log=lambda *_: None)
    for e in range(3):
        for ext in ("order.npy", "rows.npy"):
            name = f"epoch{e:04d}.{ext}"
            assert (tmp_path / "idx" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert reference.epochs == 3 and not list((tmp_path / "idx").glob("*.tmp-*"))


def test_truncated_or_flipped_index_files_are_detected(tmp_path, source):
    src, lengths = source
    s = settings_for(len(lengths))
    ensure_epochs(tmp_path, s, src, epochs=2, log=lambda *_: None)
    order_file = tmp_path / "epoch0001.order.npy"
    data = bytearray(order_file.read_bytes())
    data[-7] ^= 0x10  # one flipped bit in the last chunk
    order_file.write_bytes(bytes(data))
    index = PackIndex(tmp_path, s)
    assert index.verify(0) == []
    assert index.verify(1) == ["epoch 1 chunk 3: checksum mismatch"]
    order_file.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(MissingEpochError, match="rebuild"):
        PackIndex(tmp_path, s).row_samples(int(index.row_starts[1]))
    (tmp_path / "epoch0000.json").write_text("{not json")  # a torn metadata file: epoch 0 is not built
    assert PackIndex(tmp_path, s).epochs == 0


def test_settings_change_the_rows_and_name_another_directory(source):
    src, lengths = source
    base = settings_for(len(lengths))
    keys = {base.key()}
    for change in ({"seq_length": 2048}, {"buffer_size": 32}, {"seed": 4}, {"data_fingerprint": "other"},
                   {"chunk_size": 1000}):
        keys.add(PackSettings(**{**base.__dict__, **change}).key())
    assert len(keys) == 6


@pytest.mark.slow
def test_build_pack_index_tool_builds_and_verifies(tmp_path):
    """tools/build_pack_index.py on a real (tiny) dataset: builds the epochs asked for, --verify passes, and
    a flipped byte makes --verify fail with exit code 1."""
    from megatron_genlip.config import load_config
    from megatron_genlip.data.builder import build_indexed_dataset
    from megatron_genlip.data.synthetic import write_shards

    tiny = ROOT / "examples/configs/tiny.yaml"
    shards = write_shards(str(tmp_path / "shards"), "train", 60, 30, seed=1, image_size=48)
    build_indexed_dataset(shards, str(tmp_path / "ds"), load_config(tiny), progress=False)
    cmd = [sys.executable, "tools/build_pack_index.py", "--config", str(tiny), "--set",
           f"data.train_data={tmp_path / 'ds'}", "--set", "data.valid_data=null", "--epochs", "3", "--workers", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train: epochs 0..2 built" in out.stdout
    verify = subprocess.run(cmd + ["--verify"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout.count("intact") == 3, verify.stdout
    (meta,) = (tmp_path / "ds.packs").glob("*/epoch0002.json")
    order = meta.with_name("epoch0002.order.npy")
    data = bytearray(order.read_bytes())
    data[-1] ^= 1
    order.write_bytes(bytes(data))
    verify = subprocess.run(cmd + ["--verify"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 1 and "epoch 2 chunk 0: checksum mismatch" in verify.stdout
    assert json.loads(meta.read_text())["rows"] > 0
    (part,) = (tmp_path / "ds.parts").glob("000001-*.bin")  # --verify-data reads every sample of every part
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x40
    part.write_bytes(bytes(data))
    verify = subprocess.run(cmd + ["--verify-data"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 1 and re.search(r"000001-.*\.bin: sample \d+ .*does not match its checksum",
                                                 verify.stdout), verify.stdout


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_damaged_epochs_are_rebuilt_and_killed_builders_leave_nothing(tmp_path, source):
    """ensure_epochs checks an epoch's checksums once after its files change: a flipped bit is rebuilt (or,
    with build=False, stops with a message), and temporaries of builders killed on this host are removed."""
    import socket

    src, lengths = source
    s = settings_for(len(lengths))
    ensure_epochs(tmp_path, s, src, epochs=2, log=lambda *_: None)
    pristine = (tmp_path / "epoch0001.order.npy").read_bytes()
    leftover = tmp_path / f"epoch0001.order.npy.tmp-{socket.gethostname()}-{dead_pid()}"
    leftover.write_bytes(b"half an epoch")
    data = bytearray(pristine)
    data[-3] ^= 4
    (tmp_path / "epoch0001.order.npy").write_bytes(bytes(data))
    with pytest.raises(MissingEpochError, match="epoch 1 .* is damaged"):
        ensure_epochs(tmp_path, s, src, epochs=2, build=False)
    messages = []
    ensure_epochs(tmp_path, s, src, epochs=2, log=messages.append)
    assert (tmp_path / "epoch0001.order.npy").read_bytes() == pristine
    assert any("damaged" in m for m in messages) and not leftover.exists()
    messages.clear()
    ensure_epochs(tmp_path, s, src, epochs=2, log=messages.append)
    assert messages == []  # verified once: nothing is read again until the files change


def test_building_many_epochs_reads_each_epoch_metadata_a_bounded_number_of_times(tmp_path, source, monkeypatch):
    """A small dataset read for many epochs (a long test run of a tiny set: thousands of epochs) must build in
    O(epochs): each epoch's metadata is read a few times, not once per later epoch (which made a 100000-step
    run of a 400-sample set spend minutes at start-up)."""
    src, lengths = source
    reads = []
    real = PackIndex._read_meta
    monkeypatch.setattr(PackIndex, "_read_meta", lambda self, epoch: reads.append(epoch) or real(self, epoch))
    epochs = 40
    index = ensure_epochs(tmp_path, settings_for(len(lengths)), src, epochs=epochs, log=lambda *_: None)
    assert index.epochs == epochs
    assert len(reads) <= 5 * epochs, len(reads)  # ~4 per epoch; was ~epochs^2 / 2
    reads.clear()
    ensure_epochs(tmp_path, settings_for(len(lengths)), src, epochs=epochs, log=lambda *_: None)  # all built
    assert len(reads) <= 5 * epochs, len(reads)


# sha256 over an epoch's .npy files and its metadata (less "seconds") as the former builder wrote them (kept every
# chunk's row sizes in the parent, then np.save of the whole row table): the streaming builder writes the same bytes
FORMER_BUILDER_SHA256 = {
    (5000, 1500, 1024, 0): "4e00a09df2ae54eae876563b1aadb8a58f5f0e9138d8e55ca3003f79d1089ba5",
    (5000, 1500, 1024, 1): "cd11eace9c0b24818c338530d66bcc392f2d6b49853f0afc15642044d0a53609",
    (6000, 1500, 1024, 0): "01f06e2b2c051355edc311dfe0e650db2a33a3ce5e56f8d337624dd7287fa71a",  # chunks divide N
    (5000, 8192, 1024, 1): "7faf728b7ac1005b3c15c3e3e1f521625066b81937c133afc3b48a7474f64331",  # one chunk
    (20000, 1000, 300, 0): "d994ddabe1622bac33bb76cc3722063f867bf9bdb9f4a3223c6cf6e10c5907e9",
}


def epoch_digest(directory: Path, meta: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(p.name for p in directory.glob("epoch*.npy")):
        h.update(name.encode())
        h.update((directory / name).read_bytes())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "seconds"}, sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("case,workers", [(c, 1) for c in FORMER_BUILDER_SHA256] + [((5000, 1500, 1024, 1), 2)])
def test_epoch_files_are_byte_identical_to_the_former_builder(tmp_path, case, workers):
    n, chunk, seq, epoch = case
    src = write_lengths(tmp_path / "lengths.npy", stage1_lengths(n, seed=1) // 8)
    meta = build_epoch(tmp_path / "idx", PackSettings("fp", n, seq, 64, seed=3, chunk_size=chunk), src, epoch,
                       workers=workers)
    assert epoch_digest(tmp_path / "idx", meta) == FORMER_BUILDER_SHA256[case]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        f"epoch{epoch:04d}.{x}" for x in ("json", "order.npy", "rows.npy", "verified")]  # no chunk file left


def test_build_memory_of_the_building_process_does_not_grow_with_samples(tmp_path):
    """The process building an epoch holds a few numbers per chunk, never every chunk's row sizes nor the whole
    row table: its traced peak grows by well under a byte per sample (the former builder: ~6 B/sample with ~3
    samples per row, ~180 MB at 10^9 real samples)."""
    import tracemalloc

    peaks = {}
    for n in (5_000, 25_000):
        src = write_lengths(tmp_path / f"lengths{n}.npy", stage1_lengths(n, seed=1) // 8)
        s = PackSettings("fp", n, 100, 64, seed=3, chunk_size=4096)  # ~3 samples per row: many rows
        tracemalloc.start()
        meta = build_epoch(tmp_path / f"idx{n}", s, src, 0, workers=1)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert meta["rows"] > n // 4
    growth = (peaks[25_000] - peaks[5_000]) / 20_000
    assert growth < 1.5, f"{growth:.2f} B per sample ({peaks})"


def count_pools(monkeypatch) -> list:
    import multiprocessing.pool

    made = []
    real = multiprocessing.pool.Pool.__init__
    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__",
                        lambda self, *a, **k: made.append(a[0] if a else k.get("processes")) or real(self, *a, **k))
    return made


def test_one_pool_of_workers_builds_every_epoch(tmp_path, source, monkeypatch):
    """Several epochs built with workers > 1 start one pool (each spawned worker's start-up paid once), not one per
    epoch; the files are those of a serial build."""
    src, lengths = source
    s = settings_for(len(lengths))
    made = count_pools(monkeypatch)
    ensure_epochs(tmp_path / "pooled", s, src, epochs=3, workers=2, log=lambda *_: None)
    assert made == [2]
    with pi.shared_pool(2):  # what tools/build_pack_index.py does around all its datasets and epochs
        for e in range(3):
            pi.ensure_epoch(tmp_path / "shared", s, src, e, workers=2, log=lambda *_: None)
        ensure_epochs(tmp_path / "shared", s, src, epochs=4, workers=2, log=lambda *_: None)  # nested: same pool
    assert made == [2, 2]
    ensure_epochs(tmp_path / "serial", s, src, epochs=4, log=lambda *_: None)
    for e in range(4):
        for ext in ("order.npy", "rows.npy"):
            name = f"epoch{e:04d}.{ext}"
            assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()


@pytest.mark.slow
def test_build_pack_index_tool_starts_one_pool_and_light_workers(tmp_path, monkeypatch):
    """tools/build_pack_index.py --epochs 3 --workers 2: one pool for the three epochs, and a spawned worker, which
    re-runs the tool's module first, imports neither torch nor the datasets' modules there."""
    import importlib.util

    from megatron_genlip.config import load_config
    from megatron_genlip.data.builder import build_indexed_dataset
    from megatron_genlip.data.synthetic import write_shards

    tiny = ROOT / "examples/configs/tiny.yaml"
    shards = write_shards(str(tmp_path / "shards"), "train", 60, 30, seed=1, image_size=48)
    build_indexed_dataset(shards, str(tmp_path / "ds"), load_config(tiny), progress=False)
    monkeypatch.setattr(PackSettings.__init__, "__defaults__", (16, pi.PACK_VERSION))  # 16-sample chunks: 4 chunks
    made = count_pools(monkeypatch)
    spec = importlib.util.spec_from_file_location("build_pack_index_tool", ROOT / "tools/build_pack_index.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["--config", str(tiny), "--set", f"data.train_data={tmp_path / 'ds'}", "--set",
                      "data.valid_data=null", "--epochs", "3", "--workers", "2"])
    assert code == 0 and made == [2]
    (key,) = (tmp_path / "ds.packs").iterdir()
    assert [json.loads((key / f"epoch{e:04d}.json").read_text())["settings"]["chunk_size"] for e in range(3)] == [16] * 3
    probe = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
             "import megatron_genlip.data.pack_index; print(sorted(m for m in ('torch', 'webdataset', "
             "'megatron_genlip.data.packed_dataset', 'megatron_genlip.config') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(ROOT / "tools/build_pack_index.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)
