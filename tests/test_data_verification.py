"""Nothing silently wrong: every stored data artefact is checked before its bytes are used (the pack index per
chunk, dataset parts at start-up and per sample, the lengths file against the parts), and every fault below is
a clear error naming the file, or a correct recovery. Each test failed on the code before these checks."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_genlip.config import ConfigError, load_config
from megatron_genlip.data import pack_index as pi
from megatron_genlip.data.builder import build_indexed_dataset
from megatron_genlip.data.indexed import DatasetError, GenLIPIndexedDataset
from megatron_genlip.data.pack_index import LengthSource, MissingEpochError, PackIndex, PackSettings, ensure_epochs
from megatron_genlip.data.packed_dataset import build_loader, check_data_files, open_rows
from megatron_genlip.data.synthetic import write_shards

ROOT = Path(__file__).parent.parent
TINY = ROOT / "examples/configs/tiny.yaml"
QUIET = {"log": lambda *_: None}


def cfg(*overrides):
    return load_config(TINY, list(overrides))


# -------------------------------------------------------------------------------------------------
# the pack index


@pytest.fixture
def lengths_source(tmp_path):
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 50, size=5000)
    arr = np.stack([np.ones_like(tokens), np.ones_like(tokens), tokens - 1], axis=1).astype(np.uint16)
    np.save(tmp_path / "lengths.npy", arr)
    return LengthSource([str(tmp_path / "lengths.npy")], [len(arr)])


def settings(n=5000):
    return PackSettings("fp", n, 1024, 64, seed=3, chunk_size=1500)  # 4 chunks per epoch


def swap_keeping_size_and_mtime(path: Path, i: int, j: int) -> None:
    """Exchange two entries of an order file in place, then give it back its modification time."""
    st = path.stat()
    arr = np.load(path, mmap_mode="r+")
    arr[i], arr[j] = int(arr[j]), int(arr[i])
    arr.flush()
    del arr
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_swapped_sample_ids_with_size_and_mtime_kept_stop_the_reader_then_the_epoch_is_rebuilt(tmp_path,
                                                                                             lengths_source):
    """Former: a size + mtime stamp was all that was checked, so two exchanged ids trained on other samples."""
    d = tmp_path / "idx"
    ensure_epochs(d, settings(), lengths_source, epochs=1, **QUIET)
    pristine = PackIndex(d, settings())
    want = [pristine.row_samples(r).tolist() for r in range(pristine.total_rows)]
    order = d / "epoch0000.order.npy"
    swap_keeping_size_and_mtime(order, 10, 2000)  # two samples of different chunks: plausible rows both
    index = ensure_epochs(d, settings(), lengths_source, epochs=1, **QUIET)  # start-up: stamp still "valid"
    with pytest.raises(pi.PackIndexDamaged, match=r"epoch0000\.order\.npy is damaged: chunk 0 .*restarting rebuilds"):
        index.row_samples(0)
    assert index.damage_mark(0) is not None
    messages = []
    index = ensure_epochs(d, settings(), lengths_source, epochs=1, log=messages.append)  # the restart
    assert any("damaged" in m and "rebuilding" in m for m in messages), messages
    assert [index.row_samples(r).tolist() for r in range(index.total_rows)] == want
    with pytest.raises(MissingEpochError, match="damaged"):  # build=False: says so instead of rebuilding
        swap_keeping_size_and_mtime(order, 10, 2000)
        fresh = PackIndex(d, settings())
        with pytest.raises(pi.PackIndexDamaged):
            fresh.row_samples(0)
        ensure_epochs(d, settings(), lengths_source, epochs=1, build=False, **QUIET)


def test_damage_under_a_live_reader_and_in_the_row_table_is_seen_before_use(tmp_path, lengths_source):
    d = tmp_path / "idx"
    index = ensure_epochs(d, settings(), lengths_source, epochs=1, **QUIET)
    index.row_samples(0)  # chunk 0 read and verified by this process
    last = index.total_rows - 1
    order = np.load(d / "epoch0000.order.npy", mmap_mode="r+")  # chunk 3 changes under the live map
    order[-1], order[-2] = int(order[-2]), int(order[-1])
    order.flush()
    del order
    with pytest.raises(pi.PackIndexDamaged, match=r"epoch0000\.order\.npy is damaged: chunk 3"):
        index.row_samples(last)
    shutil.rmtree(d)
    index = ensure_epochs(d, settings(), lengths_source, epochs=1, **QUIET)
    rows = np.load(d / "epoch0000.rows.npy", mmap_mode="r+")
    rows[5] += 1  # an implausible row boundary: formerly "samples of row 4 do not fit a row", naming no file
    rows.flush()
    del rows
    with pytest.raises(pi.PackIndexDamaged, match=r"epoch0000\.rows\.npy is damaged: rows 0\.\.\d+ \(chunk 0\)"):
        PackIndex(d, settings()).row_samples(4)


def _read_only(monkeypatch, folder: Path) -> list[str]:
    """``folder`` behaves like a read-only mount for this process (root ignores permission bits): os.access
    says no, and creating a file in it fails with EROFS. Returns the attempted creations."""
    folder = str(folder)
    tried: list[str] = []
    real_access, real_open, real_os_open = os.access, builtins.open, os.open

    def inside(path) -> bool:
        return os.path.abspath(str(path)).startswith(folder + os.sep) or os.path.abspath(str(path)) == folder

    def access(path, mode, *a, **k):
        if inside(path) and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, Path)) and inside(file) and any(c in mode for c in "wax+"):
            tried.append(str(file))
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if inside(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            tried.append(str(path))
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    return tried


def test_a_pack_index_built_ahead_is_read_from_a_read_only_folder(tmp_path, lengths_source, monkeypatch):
    """Former: a lock file was always created, so a read-only index folder failed with an OSError."""
    d = tmp_path / "idx"
    built = ensure_epochs(d, settings(), lengths_source, epochs=2, **QUIET)
    want = built.row_samples(built.total_rows - 1).tolist()
    for f in d.glob("*.lock"):
        f.unlink()
    tried = _read_only(monkeypatch, d)
    index = ensure_epochs(d, settings(), lengths_source, epochs=2, **QUIET)
    assert index.row_samples(index.total_rows - 1).tolist() == want
    with pytest.raises(MissingEpochError, match=r"epoch 2 .* is not built and that folder is not writable.*"
                                                r"data\.pack_index_dir"):
        ensure_epochs(d, settings(), lengths_source, epochs=3, **QUIET)
    assert tried == [] and not list(d.glob("*.lock"))
    monkeypatch.setattr(pi, "writable", lambda directory: True)  # access() says yes (root squash): the lock fails
    index = ensure_epochs(d, settings(), lengths_source, epochs=2, **QUIET)
    assert index.row_samples(index.total_rows - 1).tolist() == want and tried and not list(d.glob("*.lock"))


def test_pack_index_dir_that_is_a_file_names_that_field(tmp_path, built):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    for where in (blocker, blocker / "below"):
        with pytest.raises(ConfigError, match=r"^data\.pack_index_dir: .*is a file"):
            open_rows(str(built / "three"), cfg(f"data.pack_index_dir={where}").data).ensure(epochs=1, **QUIET)


# -------------------------------------------------------------------------------------------------
# dataset parts and the lengths file


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify-built")
    shards = write_shards(str(d / "shards"), "train", 90, 30, seed=4, image_size=48)
    build_indexed_dataset(shards, str(d / "three"), cfg(), progress=False)
    return d


@pytest.fixture
def copy(built, tmp_path):
    for f in built.glob("three*"):
        (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / f.name)
    return tmp_path / "three"


def part_file(prefix: Path, k: int, ext: str) -> Path:
    (f,) = Path(str(prefix) + ".parts").glob(f"{k:06d}-*{ext}")
    return f


def test_every_part_is_checked_at_start_up_by_one_call(copy):
    """Former: a deleted part let the run start and train until the first row that needed it."""
    rows = open_rows(str(copy), cfg().data)
    check_data_files(rows, None)  # all there
    part_file(copy, 2, ".bin").unlink()
    with pytest.raises(DatasetError, match=r"part .*000002-.*\.bin of dataset .* is missing.*rebuild that part"):
        check_data_files(open_rows(str(copy), cfg().data))


def test_swapped_parts_and_a_truncated_idx_fail_the_start_up_check(copy):
    a, b = part_file(copy, 0, ".idx"), part_file(copy, 1, ".idx")
    data = a.read_bytes()
    a.write_bytes(data[:-8])  # truncated
    with pytest.raises(DatasetError, match=r"000000-.*\.idx .* is \d+ bytes, the manifest says"):
        check_data_files(open_rows(str(copy), cfg().data))
    a.write_bytes(data)
    ba, bb = part_file(copy, 0, ".bin"), part_file(copy, 1, ".bin")
    for x, y in ((a, b), (ba, bb)):  # the two parts' files exchanged
        tmp = x.with_suffix(".swap")
        x.rename(tmp), y.rename(x), tmp.rename(y)
    with pytest.raises(DatasetError, match=r"part .*00000[01]-.*\.bin of dataset .* bytes, the manifest says"):
        check_data_files(open_rows(str(copy), cfg().data))
    for x, y in ((a, b), (ba, bb)):
        tmp = x.with_suffix(".swap")
        x.rename(tmp), y.rename(x), tmp.rename(y)
    edited = bytearray(data)
    edited[-20] ^= 0x01  # same size: a document start in the .idx
    a.write_bytes(bytes(edited))
    check_data_files(open_rows(str(copy), cfg().data))  # sizes are right: the content is checked on first open
    with pytest.raises(DatasetError, match=r"000000-.*\.idx does not match the checksum its build recorded"):
        GenLIPIndexedDataset(str(copy), cfg().data).raw(0)


def test_a_same_size_edit_of_token_ids_is_caught_when_the_sample_is_read(copy):
    """Former: only the .bin size was checked, so edited token ids trained silently."""
    ds = GenLIPIndexedDataset(str(copy), cfg().data)
    ids, _, _ = ds.raw(31)
    part = ds._parts[1]
    first = int(part.documents[1])
    at = int(part.pointers[first])  # the token ids of sample 1 of part 1
    del ds
    path = part_file(copy, 1, ".bin")
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    ds = GenLIPIndexedDataset(str(copy), cfg().data)
    ds.raw(30)  # the other samples of that part still read
    with pytest.raises(DatasetError, match=r"000001-.*\.bin: sample 1 \(bytes \d+\.\.\d+\) does not match its "
                                           r"checksum in .*000001-.*\.sums\.npy"):
        ds.raw(31)


def test_a_permuted_lengths_file_is_caught_naming_it(copy):
    """Former: ValueError: could not broadcast ... (from filling a row with the wrong number of tokens)."""
    rows = open_rows(str(copy), cfg().data)
    rows.ensure(epochs=1, **QUIET)  # epoch 0 packed from the right lengths
    path = Path(str(copy) + ".lengths.npy")
    arr = np.load(path)
    perm = np.random.default_rng(0).permutation(len(arr))
    assert not np.array_equal(arr[perm], arr)
    np.save(path, arr[perm])
    rows = open_rows(str(copy), cfg().data)
    with pytest.raises(DatasetError, match=r"lengths file .*three\.lengths\.npy: rows 0\.\.30 \(part .*000000-"):
        rows.batch([0])
    with pytest.raises(MissingEpochError, match=r"lengths file .*three\.lengths\.npy: rows 0\.\.30 .*no pack index"):
        rows.ensure(epochs=2, **QUIET)  # epoch 1 is not packed from them


def test_errors_in_loader_workers_arrive_as_one_sentence(copy):
    """Former: the DatasetError of a worker reached the trainer wrapped in the worker's traceback."""
    path = part_file(copy, 0, ".bin")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    rows = open_rows(str(copy), cfg().data)
    rows.ensure(epochs=1, **QUIET)
    loader = build_loader(rows, 0, 2, 0, 1, num_workers=1, limit=rows.rows_in_epoch(0) // 2)
    with pytest.raises(DatasetError) as caught:
        for _ in loader:
            pass
    text = str(caught.value)
    assert "Traceback" not in text and "\n" not in text, text
    assert "000000-" in text and "does not match its checksum" in text and "DataLoader worker" in text


def test_datasets_built_before_checksums_are_read_with_a_warning_once(copy, capsys):
    manifest = Path(str(copy) + ".json")
    meta = json.loads(manifest.read_text())
    for part in meta["parts"]:
        for key in ("idx_sha256", "sums_sha256", "lengths_sha256"):
            del part[key]
    manifest.write_text(json.dumps(meta))
    for f in Path(str(copy) + ".parts").glob("*.sums.npy"):
        f.unlink()
    ds = GenLIPIndexedDataset(str(copy), cfg().data)
    assert ds.raw(45)[0].size and ds.grid_and_text(45)
    GenLIPIndexedDataset(str(copy), cfg().data)
    err = capsys.readouterr().err
    assert err.count("built without content checksums") == 1 and "3 of 3 parts" in err
    check_data_files(open_rows(str(copy), cfg().data))  # sizes only: no .sums.npy asked for


def test_an_empty_dataset_list_is_a_clear_error(tmp_path):
    """Former: IndexError (indexed.py) on a .txt list with no entries."""
    listing = tmp_path / "none.txt"
    for text in ("", "# only a comment\n\n"):
        listing.write_text(text)
        with pytest.raises(DatasetError, match=r"dataset list .*none\.txt names no dataset"):
            GenLIPIndexedDataset(str(listing), cfg().data)


# -------------------------------------------------------------------------------------------------
# the output directory's lock


def test_lock_file_that_is_a_folder_or_a_read_only_output_dir_is_one_clear_error(tmp_path, monkeypatch):
    """Former: IsADirectoryError and OSError tracebacks."""
    from megatron_genlip.training.errors import RunAborted
    from megatron_genlip.training.lock import LOCK_FILE, RunLock

    (tmp_path / "a" / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(RunAborted, match=r"lock file .*\.genlip\.lock of train\.output_dir is a folder") as e:
        RunLock(tmp_path / "a").acquire()
    assert e.value.exit_code == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunAborted, match=r"train\.output_dir .*file.* cannot be created"):
        RunLock(tmp_path / "file" / "out").acquire()
    (tmp_path / "ro").mkdir()
    _read_only(monkeypatch, tmp_path / "ro")
    with pytest.raises(RunAborted, match=r"train\.output_dir .*ro is not writable.*Read-only file system"):
        RunLock(tmp_path / "ro").acquire()


def test_a_worker_re_raised_data_error_keeps_only_its_message():
    """Former: the trainer printed 'Caught DatasetError in DataLoader worker process 0. Original Traceback ...'."""
    from torch._utils import ExceptionWrapper

    for kind in (DatasetError, MissingEpochError, pi.PackIndexDamaged):
        try:
            raise kind("part /d/x.parts/000003-a.bin of dataset /d/x is missing: rebuild that part")
        except kind:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
        with pytest.raises(kind) as caught:
            wrapped.reraise()
        assert str(caught.value) == ("part /d/x.parts/000003-a.bin of dataset /d/x is missing: rebuild that part "
                                     "(in DataLoader worker process 1)")


def test_a_part_without_samples_is_no_damage():
    """A shard that yielded no sample leaves a part of 0 rows (its lengths hash recorded as no bytes): its check
    passes, at the end of the last lengths file too, instead of failing on the empty slice."""
    import hashlib

    import numpy as np

    from megatron_genlip.data.pack_index import LengthSource, array_sha256

    assert array_sha256(np.zeros((0, 3), np.uint16)).hexdigest() == hashlib.sha256(b"").hexdigest()
    rows = np.arange(12, dtype=np.uint16).reshape(4, 3)
    assert array_sha256(rows).hexdigest() == hashlib.sha256(rows.tobytes()).hexdigest()
    assert array_sha256(rows[1:3]).hexdigest() == hashlib.sha256(rows[1:3].tobytes()).hexdigest()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/x.lengths.npy"
        np.save(path, rows)
        full = hashlib.sha256(rows.tobytes()).digest()
        empty = hashlib.sha256(b"").digest()
        src = LengthSource([path], [4], checks=[(0, 4, full, "p0"), (4, 4, empty, "p1-empty")])
        src.verify()  # no exception: the empty part at the end is no damage
