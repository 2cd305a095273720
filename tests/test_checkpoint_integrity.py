"""What a weeks-long run survives, through the real launcher: damaged checkpoints, a missing `latest`, a full disk,
a second run on the same folder, the launcher's death, divergence, signals at start-up, resharding the main
job's own layout, converters that verify and refuse to overwrite.

One reference run (the main job's layout: DP=2, ZeRO-1, PP=1, fp32) trains 6 steps and saves at 2, 4 and 6;
each test starts from a copy of its output directory as it was after some step, damages it, resumes, and
compares the next losses with the reference's (bitwise where the layout is the same).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_genlip.training import ckpt_format as fmt
from megatron_genlip.training.lock import RunLock
from trainer_harness import ROOT, TINY, build_test_dataset, command, env, run, run_tool, train_log

pytestmark = pytest.mark.slow  # nearly every test here starts the launcher (minutes in all)

COMMON = ["train.train_steps=6", "train.warmup_steps=1", "train.precision=fp32", "train.log_interval=1",
          "train.save_interval=2", "train.keep_last=3", "train.eval_interval=100000", "train.eval_rows=1",
          "train.eval_captions=1", "train.max_new_tokens=4"]
RESHARD_TOLERANCE = 1e-5  # another layout reduces fp32 sums in another order (measured: identical here)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_test_dataset(tmp_path_factory.mktemp("integrity-data"), 120, 8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("integrity-reference")
    run(2, data, out, COMMON)
    log = train_log(out)
    assert sorted(log) == [1, 2, 3, 4, 5, 6]
    assert fmt.list_tags(out / "checkpoints") == ["iter_0000002", "iter_0000004", "iter_0000006"]
    return {"out": out, "log": log}


def copy_after(reference, dst: Path, step: int) -> Path:
    """The reference's output directory as it was right after step ``step`` was saved (no log, no summary)."""
    shutil.copytree(reference["out"], dst, ignore=shutil.ignore_patterns("logs", "summary.json"))
    for tag in fmt.list_tags(dst / "checkpoints"):
        if fmt.step_of(tag) > step:
            shutil.rmtree(dst / "checkpoints" / tag)
    fmt.write_latest(dst / "checkpoints", fmt.tag_for(step))
    return dst / "checkpoints"


def flip_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x10
    path.write_bytes(bytes(b))


def assert_continues_reference(reference, out: Path, steps: list[int], rel_tol: float = 0.0) -> None:
    log = train_log(out)
    assert sorted(log) == steps, sorted(log)
    for s in steps:
        ref = reference["log"][s]
        for key in ("loss", "grad_norm", "lr"):
            assert math.isclose(log[s][key], ref[key], rel_tol=rel_tol, abs_tol=0.0), (s, key, log[s][key], ref[key])


def test_bit_flipped_model_file_falls_back_to_the_previous_checkpoint(tmp_path, reference, data):
    ck = copy_after(reference, tmp_path / "run", 4)
    flip_byte(ck / "iter_0000004" / "mp_rank_00_model_states.pt")
    proc = run(2, data, tmp_path / "run", COMMON)
    assert "iter_0000004 cannot be used: mp_rank_00_model_states.pt has sha256" in proc.stdout, proc.stdout[-3000:]
    assert f"resumed from {ck / 'iter_0000002'} (the output directory) at step 2" in proc.stdout
    assert_continues_reference(reference, tmp_path / "run", [3, 4, 5, 6])  # bitwise


def test_deleted_latest_and_rng_file(tmp_path, reference, data):
    """`latest` gone: the newest verified checkpoint is resumed (not scratch); a deleted per-rank RNG file is a
    warning from its rank, and the run goes on (DropPath is off here, so the losses stay bitwise the same)."""
    ck = copy_after(reference, tmp_path / "run", 4)
    (ck / "latest").unlink()
    (ck / "iter_0000004" / "rng_rank00001.pt").unlink()
    proc = run(2, data, tmp_path / "run", COMMON)
    assert f"{ck / 'latest'} does not exist" in proc.stdout and "at step 4" in proc.stdout, proc.stdout[-3000:]
    assert "warning: [rank 1]" in proc.stderr and "rng_rank00001.pt is missing" in proc.stderr, proc.stderr[-3000:]
    assert_continues_reference(reference, tmp_path / "run", [5, 6])


def test_restart_of_a_finished_run_keeps_its_summary(tmp_path, reference, data):
    out = tmp_path / "done"
    shutil.copytree(reference["out"], out)
    before = {p: (out / p).read_bytes() for p in ("summary.json", "logs/train.jsonl", "config.json")}
    proc = run(2, data, out, COMMON)  # the layout it ran at: the old trainer rewrote summary.json
    assert f"the run in {out} is finished (step 6 of 6" in proc.stdout and "is kept as it was" in proc.stdout
    assert all((out / p).read_bytes() == b for p, b in before.items())


def test_no_usable_checkpoint_refuses_to_start_unless_allowed(tmp_path, reference, data):
    ck = copy_after(reference, tmp_path / "run", 6)
    for tag in fmt.list_tags(ck):
        f = ck / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[:1000])
    proc = run(1, data, tmp_path / "run", COMMON, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: no checkpoint in {ck} (the output directory) can be resumed from" in proc.stderr
    assert "iter_0000002 cannot be used: zero_pp_rank_1_mp_rank_00_optim_states.pt has 1000 bytes" in proc.stderr
    assert "train.allow_fresh_start=true" in proc.stderr
    proc = run(1, data, tmp_path / "run", COMMON + ["train.allow_fresh_start=true", "train.train_steps=2"])
    assert "train.allow_fresh_start=true: going on without it" in proc.stdout and "started from scratch" in proc.stdout
    assert fmt.choose(ck).tag == "iter_0000002"  # the new run's checkpoint replaced the damaged one


def test_consecutive_skipped_steps_stop_the_run(tmp_path, data):
    out = tmp_path / "diverged"
    proc = run(1, data, out, ["train.train_steps=8", "train.warmup_steps=1", "train.save_interval=2",
                              "train.global_batch_size=2", "train.inject_nan_steps=[3,4,5]",
                              "train.max_consecutive_skips=3", "train.eval_interval=100000", "train.log_interval=1"], check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "steps 3-5 were all skipped" in proc.stderr and "train.max_consecutive_skips=3" in proc.stderr
    assert f"last good checkpoint is {out / 'checkpoints' / 'iter_0000002'}" in proc.stderr
    assert "move the newer iter_0000004 out of" in proc.stderr
    assert max(train_log(out)) == 5 and "Traceback" not in proc.stderr


def _mount_namespace() -> list[str] | None:
    """A command prefix that runs its command in a private mount namespace (root, or an unprivileged user
    namespace), or None where neither is allowed."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        try:
            ok = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                                capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return prefix
    return None


def test_disk_full_during_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, reference, data):
    """A real full disk: the output directory on a tmpfs with room for one checkpoint and a half."""
    prefix = _mount_namespace()
    if prefix is None:
        pytest.skip("mounting a small tmpfs needs root or unprivileged user namespaces")
    tag_bytes = sum(f.stat().st_size for f in (reference["out"] / "checkpoints" / "iter_0000002").iterdir())
    out = tmp_path / "small"
    out.mkdir()
    script = ('mount -t tmpfs -o size=$SIZE tmpfs "$OUT" && "$@"; rc=$?; echo "latest=$(cat $OUT/checkpoints/latest)";'
              ' ls "$OUT/checkpoints"; exit $rc')
    cmd = [*prefix, "sh", "-c", script, "sh", *command(2, data, out, COMMON)]
    proc = subprocess.run(cmd, env=dict(env(), SIZE=str(tag_bytes * 3 // 2 + (256 << 10)), OUT=str(out)), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"error: no space left on {out} while saving iter_0000004; the previous checkpoint iter_0000002 is "
            "intact") in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "basic_ios" not in proc.stderr.split("error: no space left")[1]
    assert "latest=iter_0000002" in proc.stdout and "iter_0000004" not in proc.stdout.split("latest=")[1]


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "--local_rank" in " ".join(p.cmdline()) and "pretrain_genlip.py" in " ".join(p.cmdline())]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_one_writer_and_no_orphans_after_the_launcher_dies(tmp_path, data):
    """A second run on a live run's folder is refused, naming the holder; kill -9 of the first run's deepspeed
    launcher ends its ranks (each saves at the end of its step) within 30 s, which frees the folder."""
    out = tmp_path / "busy"
    first = subprocess.Popen(command(2, data, out, COMMON + ["train.train_steps=3000", "train.save_interval=100000"],
                                     runner=True),
                             env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "logs" / "train.jsonl").is_file():
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.2)
        ranks = _ranks(first)
        rank0 = next(p for p in ranks if "--local_rank=0" in p.cmdline())
        second = run(1, data, out, COMMON, check=False)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"is in use by another run (host {os.uname().nodename}, pid {rank0.pid}" in second.stderr
        helper = [p for p in psutil.Process(first.pid).children() if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        start = time.time()
        while _alive(ranks + helper) and time.time() - start < 30:
            time.sleep(0.2)
        assert not _alive(ranks + helper), f"still running 30 s after the launcher died: {_alive(ranks + helper)}"
        print(f"ranks gone {time.time() - start:.1f} s after kill -9 of the launcher")
        RunLock(out).acquire().release()
        assert fmt.choose(out / "checkpoints").tag is not None  # they checkpointed on their way out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)


SPIN = """
import sys
from megatron_genlip.data import pack_index
from megatron_genlip.training.entry import main

def spin(*args, **kwargs):  # a start-up stuck while building pack-index epoch 0 (under its lock)
    open(sys.argv[-1], "w").close()
    while True:
        pass

pack_index.build_epoch = spin
main(sys.argv[1:-1])
"""


def test_sigterm_during_start_up_ends_the_process(tmp_path, data):
    """A start-up stuck in a loop (here: packing, the last thing before the first step) still ends on SIGTERM,
    at once and with 128 + 15, as if killed: there is nothing to save yet."""
    marker = tmp_path / "spinning"
    proc = subprocess.Popen([sys.executable, "-c", SPIN, "--config", str(TINY), "--set", f"data.train_data={data['train']}",
                             "--set", f"data.valid_data={data['val']}", "--set", f"train.output_dir={tmp_path / 'out'}",
                             "--set", "data.seed=99", str(marker)], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.is_file():
            if proc.poll() is not None or time.time() > deadline:  # never reached the patched build
                proc.kill()
                raise AssertionError(f"the start-up never reached the pack-index build: {proc.communicate()}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM during start-up: exiting before the first step" in err and "Traceback" not in err


def convert(*args: str) -> tuple[int, str, str]:
    """tools/convert_checkpoint.py's main() in this process: (exit code, stdout, stderr)."""
    tool = runpy.run_path(str(ROOT / "tools" / "convert_checkpoint.py"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = tool["main"](list(args))
    return rc, out.getvalue(), err.getvalue()


def test_converter_verifies_and_never_overwrites(tmp_path, reference):
    ck = copy_after(reference, tmp_path / "run", 6)
    flip_byte(ck / "iter_0000006" / "mp_rank_00_model_states.pt")
    hf = tmp_path / "hf"
    rc, _, err = convert("--load", str(ck), "--save", str(hf), "--dtype", "fp32")
    assert rc == 0 and "iter_0000006 cannot be used: mp_rank_00_model_states.pt has sha256" in err, err
    assert json.loads((hf / "config.json").read_text())["genlip_training"]["iteration"] == 4
    rc, _, err = convert("--load", str(ck), "--iteration", "6", "--save", str(tmp_path / "x"))
    assert rc == 2 and "iter_0000006 cannot be used" in err and "newest one that verifies is iter_0000004" in err
    assert not (tmp_path / "x").exists()
    rc, _, err = convert("--load", str(ck), "--save", str(hf))
    assert rc == 2 and f"--save {hf} is not empty; pass --overwrite" in err, err
    assert convert("--load", str(ck), "--save", str(hf), "--overwrite")[0] == 0
    latest = (ck / "latest").read_text()
    rc, _, err = convert("--from-hf", str(hf), "--save", str(ck))
    assert rc == 2 and "holds a training run's checkpoints" in err and (ck / "latest").read_text() == latest, err
    assert convert("--from-hf", str(hf), "--save", str(tmp_path / "init"))[0] == 0
    assert fmt.choose(tmp_path / "init").verdict.status == "verified"


def test_reshard_main_job_layout_resumes_at_one_rank(tmp_path, reference, data):
    """DP=2 ZeRO-1 PP=1 (the main job's layout, whose module files hold megatron-core's None `_extra_state`)
    -> universal -> one rank (2x accumulation): the reference's steps 5-6 within 1e-5."""
    new = tmp_path / "universal"
    run_tool("reshard_checkpoint.py", ["--load", str(reference["out"] / "checkpoints"), "--iteration", "4",
                                       "--save", str(new), "--tp", "1", "--pp", "1", "--dp", "1"])
    assert fmt.choose(new).verdict.status == "verified"
    proc = run(1, data, tmp_path / "run", COMMON + [f"train.load={new}"])
    assert "at step 4 (resharded from TP=1 x PP=1 x DP=2, ZeRO-1)" in proc.stdout
    assert_continues_reference(reference, tmp_path / "run", [5, 6], rel_tol=RESHARD_TOLERANCE)


def test_reshard_tensor_parallel_source_without_pipeline(tmp_path, data):
    """TP=2 PP=1 -> universal -> one rank: the source's steps 3-4 within 1e-5."""
    common = ["train.train_steps=4", "train.warmup_steps=1", "train.precision=fp32", "train.save_interval=2",
              "train.log_interval=1",
              "train.eval_interval=100000", "train.eval_rows=1", "train.eval_captions=1", "train.max_new_tokens=4"]
    src = tmp_path / "tp2"
    run(2, data, src, common + ["parallel.tensor_parallel=2"])
    source = {"log": train_log(src)}
    new = tmp_path / "universal"
    run_tool("reshard_checkpoint.py", ["--load", str(src / "checkpoints"), "--iteration", "2", "--save", str(new),
                                       "--tp", "1", "--pp", "1"])
    proc = run(1, data, tmp_path / "run", common + [f"train.load={new}"])
    assert "at step 2 (resharded from TP=2 x PP=1 x DP=1, ZeRO-1)" in proc.stdout
    assert_continues_reference(source, tmp_path / "run", [3, 4], rel_tol=RESHARD_TOLERANCE)


def test_resume_on_another_data_stream_is_refused_unless_allowed(tmp_path, reference, data):
    """A resume whose packing settings differ from the checkpoint's would read other rows at the same consumed row
    count: refused before any state is loaded, naming the field and both values; data.allow_new_stream=true
    continues (and says so), from the checkpoint's consumed row count."""
    out = tmp_path / "run"
    copy_after(reference, out, 4)
    proc = run(2, data, out, COMMON + ["data.seed=99"], check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "data.seed: 1234 -> 99" in proc.stderr and "data.allow_new_stream=true" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "logs").exists()
    proc = run(2, data, out, COMMON + ["data.seed=99", "data.allow_new_stream=true"])
    assert "continuing at consumed row 16 of a new data stream (data.seed: 1234 -> 99)" in proc.stdout
    assert sorted(train_log(out)) == [5, 6]
