"""The checkpoint format without processes: manifests catch damaged files, `latest` is only a hint, the newest
checkpoint that verifies wins, retention keeps the last complete one, one writer per output directory."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_genlip.training import ckpt_format as fmt
from megatron_genlip.training.checkpoint import _space_problem, mount_point, prune
from megatron_genlip.training.errors import OutputDirBusy
from megatron_genlip.training.lock import RunLock

FILES = {"mp_rank_00_model_states.pt": 3000, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 5000,
         "zero_pp_rank_1_mp_rank_00_optim_states.pt": 5000, "rng_rank00000.pt": 300, "rng_rank00001.pt": 300}


def make_tag(ckpt_dir: Path, step: int, manifest: bool = True) -> Path:
    """A fake checkpoint: DeepSpeed-named files of random bytes (+ a manifest, as the trainer writes it)."""
    tag = ckpt_dir / fmt.tag_for(step)
    tag.mkdir(parents=True)
    for name, size in FILES.items():
        (tag / name).write_bytes(os.urandom(size))
    if manifest:
        fmt.write_manifest(tag, fmt.manifest_files(tag), iteration=step)
    return tag


@pytest.fixture
def ckpts(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        make_tag(d, step)
    fmt.write_latest(d, "iter_0000006")
    return d


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x04
    p.write_bytes(bytes(b))


def zero_fill(p: Path) -> None:
    p.write_bytes(bytes(p.stat().st_size))


DAMAGE = {"truncated": truncate, "bit-flipped": flip, "zero-filled": zero_fill, "deleted": Path.unlink}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_damaged_newest_checkpoint_falls_back_naming_the_file(ckpts, damage, name):
    DAMAGE[damage](ckpts / "iter_0000006" / name)
    choice = fmt.choose(ckpts)
    assert choice.tag == "iter_0000004"
    assert any(n.startswith("iter_0000006 cannot be used") and name in n for n in choice.notes), choice.notes
    assert any("latest names iter_0000006, but iter_0000004" in n for n in choice.notes), choice.notes


def test_sizes_only_without_checksums(ckpts):
    """train.verify_checkpoint=false: sizes are still checked (a truncation is caught), bit flips are not."""
    flip(ckpts / "iter_0000006" / "mp_rank_00_model_states.pt")
    assert fmt.choose(ckpts, checksums=False).tag == "iter_0000006"
    truncate(ckpts / "iter_0000006" / "mp_rank_00_model_states.pt")
    assert fmt.choose(ckpts, checksums=False).tag == "iter_0000004"


def test_rng_file_problems_are_warnings_not_failures(ckpts):
    (ckpts / "iter_0000006" / "rng_rank00001.pt").unlink()
    flip(ckpts / "iter_0000006" / "rng_rank00000.pt")
    choice = fmt.choose(ckpts)
    assert choice.tag == "iter_0000006"
    assert len(choice.verdict.warnings) == 2 and "rng_rank00001.pt is missing" in choice.verdict.warnings[1]


@pytest.mark.parametrize("content, says", [(None, "does not exist"), (b"", "is empty"),
                                           (b"\x80\x03\xff\xfe binary", "binary"), (b"iter_0000099", "does not exist"),
                                           (b"global_step57", "not a checkpoint tag"),
                                           (b"iter_0000004", "names iter_0000004, but iter_0000006 is the newest")])
def test_latest_is_only_a_hint(ckpts, content, says):
    (ckpts / "latest").unlink()  # a crash between the manifest and `latest` leaves it naming an older tag
    if content is not None:
        (ckpts / "latest").write_bytes(content)
    choice = fmt.choose(ckpts)
    assert choice.tag == "iter_0000006"
    assert any(says in n for n in choice.notes), choice.notes


def test_manifest_damage_makes_a_tag_corrupt(ckpts):
    (ckpts / "iter_0000006" / fmt.MANIFEST).write_bytes(b"\x00garbage")
    manifest = ckpts / "iter_0000004" / fmt.MANIFEST  # a flipped bit in a listed checksum
    entry = json.loads(manifest.read_text())["files"]["mp_rank_00_model_states.pt"]["sha256"]
    manifest.write_text(manifest.read_text().replace(entry, entry[:10] + chr(ord(entry[10]) ^ 1) + entry[11:]))
    choice = fmt.choose(ckpts)
    assert choice.tag == "iter_0000002"
    assert "genlip_manifest.json is unreadable" in choice.notes[0]


def test_tags_without_manifest_legacy_or_unverifiable(tmp_path):
    """No manifest: trusted (legacy, with a warning) only when `latest` names it or a later tag, since the old
    format wrote `latest` after a save finished; otherwise it cannot be told from an unfinished old save."""
    d = tmp_path / "ck"
    for step in (2, 4, 6):
        make_tag(d, step, manifest=False)
    fmt.write_latest(d, "iter_0000004")
    choice = fmt.choose(d)
    assert choice.tag == "iter_0000004" and choice.verdict.status == "legacy"
    assert "iter_0000006 cannot be used: no genlip_manifest.json and latest does not name it" in choice.notes[0]
    assert "without verification" in choice.verdict.warnings[0]
    (d / "latest").unlink()
    assert fmt.choose(d).tag is None and fmt.choose(d).tags  # nothing vouches for them, but they exist
    make_tag(d, 8)
    assert fmt.choose(d).tag == "iter_0000008"


def test_a_save_cut_short_is_no_checkpoint(tmp_path):
    """Saves are written into iter_N.partial and renamed once their manifest is there: a save killed halfway
    (here the very first one) leaves no tag, so the restart starts from scratch instead of refusing."""
    d = tmp_path / "ck"
    make_tag(d, 2, manifest=False).rename(d / "iter_0000002.partial")
    choice = fmt.choose(d)
    assert choice.tag is None and choice.tags == [] and fmt.list_partials(d) == ["iter_0000002.partial"]
    make_tag(d, 4, manifest=False).rename(d / "iter_0000004.partial")
    assert fmt.publish(d, "iter_0000004", iteration=4) == d / "iter_0000004"
    assert fmt.choose(d).verdict.status == "verified" and fmt.read_latest(d).tag == "iter_0000004"
    assert json.loads((d / "iter_0000004" / fmt.MANIFEST).read_text())["tag"] == "iter_0000004"


def test_empty_and_missing_directories(tmp_path):
    assert fmt.choose(tmp_path / "nope").tag is None and fmt.choose(tmp_path / "nope").notes == []
    (tmp_path / "ck").mkdir()
    assert fmt.choose(tmp_path / "ck").tag is None
    (tmp_path / "ck" / "iter_0000005").mkdir()  # an empty tag folder
    choice = fmt.choose(tmp_path / "ck")
    assert choice.tag is None and choice.tags == ["iter_0000005"]


def test_resolve_for_tools(ckpts):
    flip(ckpts / "iter_0000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    said = []
    assert fmt.resolve(ckpts, log=said.append).tag == "iter_0000004"
    assert any("iter_0000006 cannot be used" in s for s in said)
    with pytest.raises(fmt.CheckpointFormatError, match=r"iter_0000006 cannot be used: zero_pp_rank_0.*corrupted.*"
                                                        r"newest one that verifies is iter_0000004"):
        fmt.resolve(ckpts, 6)
    with pytest.raises(fmt.CheckpointFormatError, match=r"iter_0000007 does not exist \(checkpoints in .*: "
                                                        r"iter_0000002, iter_0000004, iter_0000006\)"):
        fmt.resolve(ckpts, 7)


def test_retention_keeps_the_last_complete_checkpoint(ckpts):
    """keep_last counts complete checkpoints only: a damaged newest one (which `latest` may name) never costs
    the last good one; protected tags are never deleted; older junk goes."""
    make_tag(ckpts, 8)
    truncate(ckpts / "iter_0000008" / "mp_rank_00_model_states.pt")
    (ckpts / "iter_0000010").mkdir()  # unfinished save
    fmt.write_latest(ckpts, "iter_0000008")
    assert prune(ckpts, keep_last=1) == ["iter_0000002", "iter_0000004"]
    assert fmt.list_tags(ckpts) == ["iter_0000006", "iter_0000008", "iter_0000010"]
    make_tag(ckpts, 12)
    assert prune(ckpts, keep_last=1, protect=("iter_0000006",)) == ["iter_0000008", "iter_0000010"]
    assert fmt.list_tags(ckpts) == ["iter_0000006", "iter_0000012"]
    assert prune(ckpts, keep_last=0) == []


def test_latest_is_written_atomically(tmp_path):
    fmt.write_latest(tmp_path, "iter_0000003")
    assert (tmp_path / "latest").read_text() == "iter_0000003"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary file left


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(OutputDirBusy, match=rf"in use by another run \(host {os.uname().nodename}, pid {os.getpid()}, "
                                            r"started [^;]*; lock file .*\.genlip\.lock\)"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    RunLock(tmp_path / "run").acquire().release()


def test_lock_dies_with_its_holder(tmp_path):
    """kill -9 of the holder frees the lock (the kernel drops a dead process's flocks); its name stays."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from megatron_genlip.training.lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(Path(__file__).parent.parent)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(tmp_path).acquire().release()


def test_save_failures_are_recognised_as_full_disks(tmp_path):
    assert _space_problem(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == "space"
    assert _space_problem(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == "quota"
    try:  # torch's writer reports a full disk without an errno; the OSError it came from is in the chain
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("basic_ios::clear: iostream error") from inner
    except RuntimeError as e:
        assert _space_problem(e, tmp_path) == "space"
    assert _space_problem(RuntimeError("basic_ios::clear: iostream error"), tmp_path) is None  # plenty free here
    assert mount_point(tmp_path / "not" / "there") == mount_point(tmp_path)
    assert os.path.ismount(mount_point(tmp_path))


def test_manifest_lists_every_file_with_size_and_sha256(ckpts):
    manifest = json.loads((ckpts / "iter_0000006" / fmt.MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(FILES) and manifest["iteration"] == 6
    import hashlib

    p = ckpts / "iter_0000006" / "rng_rank00000.pt"
    assert manifest["files"]["rng_rank00000.pt"] == {"size": 300, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    start = time.perf_counter()
    fmt.hash_file(p, fsync=True)
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_a_save_failing_on_one_rank_fails_on_every_rank(tmp_path):
    """Real DeepSpeed engines on 2 ranks: rank 1's optimizer file hits a full disk, rank 0's writes succeed.
    Every rank raises the same message (no rank hangs in DeepSpeed's closing barrier), the partial tag is
    removed and `latest` still names the previous checkpoint."""
    import torch

    from dist_harness import run_ranks

    ckpt_dir, result = tmp_path / "checkpoints", tmp_path / "result.pt"
    run_ranks(2, "ckpt_cases", "save_fails_on_one_rank", str(ckpt_dir), str(result))
    outcomes = torch.load(result)
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith(f"no space left on {mount_point(tmp_path)} while saving iter_0000002; the previous "
                                  "checkpoint iter_0000001 is intact"), outcomes[0]
    assert fmt.list_tags(ckpt_dir) == ["iter_0000001"] and fmt.read_latest(ckpt_dir).tag == "iter_0000001"
    assert fmt.choose(ckpt_dir).verdict.status == "verified"


def test_te_fp8_state_loads_through_the_real_load_path(tmp_path):
    """Resuming a model.fp8=delayed run: DeepSpeed's load hands each Transformer Engine module its pickled FP8
    state while NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 (TE >= 2.18 refuses it otherwise), and the variable is
    unset again afterwards. A probe module with TE's extra-state protocol stands in for TE (CPU)."""
    import torch
    from dist_harness import run_ranks

    result = tmp_path / "result.pt"
    run_ranks(1, "ckpt_cases", "extra_state_loads_with_te_allowed", str(tmp_path / "ckpt"), str(result))
    got = torch.load(result, weights_only=False)
    assert got["seen"] == [([7, 1], "1")]
    assert got["before"] is None and got["after"] is None


def test_optimizer_steps_go_where_fused_adamw_reads_them():
    """DeepSpeed's universal-checkpoint load puts the step it read into the optimizer state as it is (a CPU
    tensor); torch's fused AdamW reads a float32 step on the parameter's device (as its own load_state_dict would
    place it). place_optimizer_steps moves it there (on CPU only the dtype shows), and the next update equals
    that of an optimizer whose step was never reloaded; a non-fused optimizer keeps its CPU step as it is."""
    import torch

    from megatron_genlip.training.checkpoint import place_optimizer_steps

    def trained(fused):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(16))
        opt = torch.optim.AdamW([p], lr=1e-2, fused=fused)
        for _ in range(3):
            p.grad = torch.randn(16)
            opt.step()
        return p, opt

    p_ref, ref = trained(True)
    p, opt = trained(True)
    opt.state[p]["step"] = torch.tensor(3.0, dtype=torch.float64)  # as the universal load leaves it
    assert place_optimizer_steps(opt) == 1 and place_optimizer_steps(opt) == 0
    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].device == p.device
    g = torch.randn(16)
    for q, o in ((p_ref, ref), (p, opt)):
        q.grad = g.clone()
        o.step()
    assert torch.equal(p, p_ref)
    _, plain = trained(False)
    step = next(iter(plain.state.values()))["step"]
    assert place_optimizer_steps(plain) == 0 and next(iter(plain.state.values()))["step"] is step
