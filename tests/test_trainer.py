"""The DeepSpeed trainer through the real launcher: loss falls, ZeRO parity, exact resume, signals, guards."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from megatron_genlip.training.schedule import learning_rate
from trainer_harness import ROOT, SHORT, TINY, build_test_dataset, command, env, losses, run, train_log

pytestmark = pytest.mark.slow  # trainer runs through the launcher (minutes in all)


def test_launcher_end_to_end_loss_falls_and_lr_follows_schedule(tmp_path, data):
    steps = 40
    proc = run(2, data, tmp_path, SHORT + [f"train.train_steps={steps}", "train.warmup_steps=4",
                                            "train.eval_captions=4", "train.eval_rows=2", "train.profile_steps=[5,7]"],
               runner=True)
    log = train_log(tmp_path)
    assert sorted(log) == list(range(1, steps + 1))
    first = sum(log[s]["loss"] for s in range(1, 4)) / 3
    last = sum(log[s]["loss"] for s in range(steps - 2, steps + 1)) / 3
    assert last < 0.6 * first, (first, last)
    for s in (1, 2, 4, 5, 20, steps):  # the lr after step s is lr(s) of GENLIP_SPEC.md §5
        want = learning_rate(s, 2e-3, 1e-4, 4, steps)
        assert math.isclose(log[s]["lr"], want, rel_tol=1e-9, abs_tol=1e-15), (s, log[s]["lr"], want)
    assert all(log[s]["skipped_steps"] == 0 for s in log)
    assert all(0.5 < log[s]["packing_efficiency"] <= 1.0 and log[s]["tflops_per_device"] > 0 for s in log)
    evals = train_log(tmp_path, "eval")
    assert list(evals) == [steps] and evals[steps]["caption_images"] == 4
    assert "caption_records" not in evals[steps]  # per-image captions go to the contact sheet, not the log
    sheet = tmp_path / "eval" / f"step_{steps:07d}"  # rank 0's contact sheet of the 4 images (both ranks captioned)
    assert sheet.with_suffix(".png").stat().st_size > 0 and (tmp_path / "eval" / "index.html").is_file()
    page = sheet.with_suffix(".html").read_text()
    shown = re.findall(r'alt="held-out image (\d+)"', page)  # the captioning evaluator's seeded sample of 4
    assert len(shown) == len(set(shown)) == 4
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"iter_{steps:07d}"
    assert "==== summary ====" in proc.stdout and "held-out captions" in proc.stdout
    # train.profile_steps=[5,7]: every rank wrote its phase/operator tables and timeline; rank 0 printed its phases
    for rank in (0, 1):
        text = (tmp_path / "profile" / f"rank{rank}.txt").read_text()
        assert text.startswith(f"rank {rank}: optimizer steps 5-7 (3 steps,"), text[:80]
        assert all(f"\n{p} " in text for p in ("data", "forward", "backward", "optimizer", "agree", "other"))
        assert json.loads((tmp_path / "profile" / f"rank{rank}.trace.json").read_text())["traceEvents"]
    assert "profile of steps 5-7" in proc.stdout


def test_zero_stages_with_dp2_match_dp1(tmp_path, data):
    """Same global batch of 4 rows: DP=1 (micro 2 x 2 accumulation) vs DP=2 ZeRO-1/2/3 (micro 2): fp32 losses
    agree to a relative 2e-6 over 4 steps (reduction order is the only difference)."""
    common = SHORT + ["train.train_steps=4", "train.precision=fp32", "train.global_batch_size=4",
                      "train.micro_batch_size=2"]
    run(1, data, tmp_path / "dp1", common + ["parallel.zero_stage=1"])
    ref = losses(tmp_path / "dp1")
    assert len(ref) == 4 and ref[-1] < ref[0]
    for stage in (1, 2, 3):
        run(2, data, tmp_path / f"z{stage}", common + [f"parallel.zero_stage={stage}"])
        got = losses(tmp_path / f"z{stage}")
        assert all(math.isclose(a, b, rel_tol=2e-6) for a, b in zip(got, ref)), (stage, got, ref)


def _launch_and_wait_for(cmd, path: Path, content: str | None, timeout: float = 240) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and (content is None or path.read_text().strip() == content):
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"trainer ended before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {path}")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """30 train samples: ~7 packed rows per epoch, so 16 steps of 4 rows run through more than 8 epochs."""
    return build_test_dataset(tmp_path_factory.mktemp("trainer-small-data"), 30, 8)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, small_data):
    """Killed after the checkpoint of step 11 (epoch >= 5 of a small dataset, several epoch boundaries
    behind and ahead), restarted: every logged value equals the uninterrupted run's."""
    from megatron_genlip.config import load_config
    from megatron_genlip.data.packed_dataset import open_rows

    data = small_data
    steps = ["train.train_steps=16", "train.save_interval=11", "train.precision=fp32"]
    run(2, data, tmp_path / "straight", SHORT + steps)
    reference = train_log(tmp_path / "straight")
    index = open_rows(data["train"], load_config(TINY).data).index
    assert index.locate(11 * 4)[0] >= 5 and index.locate(16 * 4)[0] > index.locate(11 * 4)[0]
    out = tmp_path / "killed"
    cmd = command(2, data, out, SHORT + steps)
    proc = _launch_and_wait_for(cmd, out / "checkpoints" / "latest", "iter_0000011")
    import os

    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to clean up
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text() == "iter_0000011"
    second = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "resumed from" in second.stdout and "at step 11" in second.stdout
    resumed = train_log(out)
    assert sorted(resumed) == sorted(reference)
    for s in reference:  # bitwise: the same float, not merely close
        assert resumed[s]["loss"] == reference[s]["loss"], (s, resumed[s]["loss"], reference[s]["loss"])
        assert resumed[s]["grad_norm"] == reference[s]["grad_norm"]
        assert resumed[s]["lr"] == reference[s]["lr"]


def test_sigterm_saves_a_loadable_checkpoint(tmp_path, data):
    out = tmp_path / "term"
    cmd = command(2, data, out, SHORT + ["train.train_steps=3000", "train.warmup_steps=2"])
    proc = _launch_and_wait_for(cmd, out / "logs" / "train.jsonl", None)
    time.sleep(1.0)
    # what SLURM (scancel --signal / --signal=TERM@t) does: signal every task of the job, i.e. each rank
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "--local_rank" in " ".join(p.cmdline()) and "pretrain_genlip.py" in " ".join(p.cmdline())]
    assert ranks
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "stop signal received" in output, output[-3000:]
    tag = (out / "checkpoints" / "latest").read_text()
    step = int(tag.split("_")[1])
    assert 0 < step < 100000
    resumed = run(2, data, out, SHORT + [f"train.train_steps={step + 2}", "train.warmup_steps=2"])
    assert f"at step {step}" in resumed.stdout
    assert max(train_log(out)) == step + 2


def test_planted_nan_is_skipped(tmp_path, data):
    run(2, data, tmp_path, SHORT + ["train.train_steps=6", "train.inject_nan_steps=[3]", "train.precision=fp32"])
    log = train_log(tmp_path)
    assert [log[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert not math.isfinite(log[3]["grad_norm"])
    assert log[3]["lr"] == log[2]["lr"]  # no optimizer/scheduler step happened
    assert all(math.isfinite(log[s]["loss"]) for s in (4, 5, 6)) and log[6]["loss"] < log[1]["loss"]


def test_planted_nan_stops_the_run_under_stop_policy(tmp_path, data):
    proc = run(2, data, tmp_path, SHORT + ["train.train_steps=6", "train.inject_nan_steps=[3]",
                                           "train.nan_policy=stop"], check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "non-finite loss at step 3" in text and "packed rows" in text


def test_deepspeed_runs_the_shell_script(tmp_path):
    """`deepspeed examples/pretrain_genlip.sh` (the launcher runs the file with Python) trains on the
    embedded data it prepares itself."""
    from trainer_harness import free_port, launcher

    e = env() | {"DATA_DIR": str(tmp_path / "data"), "OUTPUT_DIR": str(tmp_path / "out")}
    cmd = [*launcher(), "--num_gpus", "1", "--master_port", str(free_port()), "examples/pretrain_genlip.sh",
           "--set", "train.train_steps=3", "--set", "train.warmup_steps=1", "--set", "train.eval_captions=2",
           "--set", "train.eval_rows=1", "--set", "train.progress_bar=never"]
    proc = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "==== summary ====" in proc.stdout
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "iter_0000003"


def test_zero0_fp32_reports_the_clipped_gradient_norm(tmp_path, data):
    """ZeRO-0 + fp32 takes DeepSpeed's plain-optimizer path, whose clipping norm DeepSpeed drops: the trainer
    keeps it, so the log shows it and train.nan_policy=stop does not mistake the missing norm for NaN."""
    run(1, data, tmp_path / "z0", SHORT + ["train.train_steps=3", "train.precision=fp32", "parallel.zero_stage=0",
                                          "train.nan_policy=stop"])
    norms = [r["grad_norm"] for r in train_log(tmp_path / "z0").values()]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms), norms


def test_zero0_checkpoint_resumes_at_another_data_parallel_size(tmp_path, data):
    """ZeRO-0 keeps whole optimizer states, so its checkpoint needs no resharding to change DP: DP=2 saved at
    step 2 and resumed on one rank (2x accumulation, same global batch) gives the DP=2 run's steps 3-4 (fp32)."""
    steps = SHORT + ["train.train_steps=4", "train.precision=fp32", "parallel.zero_stage=0", "train.nan_policy=stop",
                     "train.global_batch_size=4", "train.micro_batch_size=2", "train.save_interval=2",
                     "train.keep_last=2"]
    run(2, data, tmp_path / "dp2", steps)
    ref = train_log(tmp_path / "dp2")
    src = tmp_path / "at2"  # train.load resumes the tag `latest` names: a directory holding only step 2
    shutil.copytree(tmp_path / "dp2" / "checkpoints" / "iter_0000002", src / "iter_0000002")
    (src / "latest").write_text("iter_0000002")
    run(1, data, tmp_path / "dp1", steps + [f"train.load={src}"])
    got = train_log(tmp_path / "dp1")
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert math.isclose(got[s]["loss"], ref[s]["loss"], rel_tol=1e-5), (s, got[s]["loss"], ref[s]["loss"])
