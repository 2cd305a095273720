"""benchmarks/gpu_run.py (the prepared GPU measurement) end to end on CPU with --dry-run: every phase runs with tiny
shapes (gpu_bench --dry-run, the real trainer through the deepspeed launcher with checkpointing on and off) and
the summary names what was measured, what was skipped and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp / "out"), "--work",
                           str(tmp / "work")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return proc.stdout, tmp / "out", tmp / "work"


@pytest.mark.slow
def test_every_phase_ran_or_says_why_not(dry_run):
    _, out, _ = dry_run
    summary = json.loads((out / "gpu_run_summary.json").read_text())
    phases = summary["phases"]
    assert phases["install"]["status"].startswith("skipped: no --wheelhouse")
    for name in ("env", "data", "preprocess", "bench", "train_ckpt_on", "train_ckpt_off"):
        assert phases[name]["status"] == "ok", (name, phases[name])
    assert "NOT installed" in summary["transformer_engine"]  # said plainly: TE was not measured
    assert len(list(out.iterdir())) <= 8  # what one call to the device machine brings back


@pytest.mark.slow
def test_trainer_runs_log_their_mfu_and_platform(dry_run):
    _, out, work = dry_run
    phases = json.loads((out / "gpu_run_summary.json").read_text())["phases"]
    for name in ("train_ckpt_on", "train_ckpt_off"):
        numbers, platform_line = phases[name]["numbers"], phases[name]["platform"]
        assert numbers["steps"] == 2 and numbers["mfu"] > 0 and numbers["tokens_per_s"] > 0, numbers
        assert "device cpu, compile off (CPU)" in platform_line
    for name, on in (("train_ckpt_on", True), ("train_ckpt_off", False)):
        config = json.loads((work / name / "config.json").read_text())
        assert config["train"]["activation_checkpointing"] is on and config["train"]["train_steps"] == 2
        assert config["model"]["attention"] == "flex" and config["data"]["image_size"] == 224  # the So16 recipe
    md = (out / "gpu_run_summary.md").read_text()
    assert "| on | 2 |" in md and "| off | 2 |" in md and "DRY RUN" in md


@pytest.mark.slow
def test_bench_table_is_in_the_summary(dry_run):
    stdout, out, _ = dry_run
    md = (out / "gpu_run_summary.md").read_text()
    assert "## gpu_bench" in md and "So16" in md and "baseline" in md
    assert "Transformer Engine: NOT installed" in stdout


def test_help_describes_every_flag():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--wheelhouse", "--out", "--work", "--budget", "--steps", "--rows", "--train-samples", "--dry-run"):
        assert flag in proc.stdout


def test_phases_that_no_longer_fit_the_budget_are_skipped_and_said(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_run
    finally:
        sys.path.pop(0)
    args = gpu_run.parse_args(["--budget", "100", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    run = gpu_run.Run(args)
    assert 90 < run.fits("install") <= 95  # its share is 120 s, but only 100 s are left (5 kept back)
    assert run.fits("bench", reserve=60) == 0.0  # 35 s is less than the bench needs
    assert run.results["phases"]["bench"]["status"].startswith("skipped: ")
    run.deadline = run.start  # the budget is spent
    assert run.fits("train", "train_ckpt_on") == 0.0
    assert "train_ckpt_on" in run.results["phases"]
