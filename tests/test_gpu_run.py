"""benchmarks/gpu_run.py (the prepared GPU measurement) on CPU.

* end to end with --dry-run: every phase runs with tiny shapes (gpu_bench --dry-run per phase, the memory plan,
  the real trainer through the deepspeed launcher with checkpointing off and on, no final checkpoint); every
  measurement lands in OUT/results.jsonl, the summary is built from it, at most 8 files come back;
* the install phase against an interpreter that is itself a venv, as on the device machine (its python3 is a venv
  holding torch): a venv made from it does not see its packages (the bug), the install into the interpreter
  itself (or --target + PYTHONPATH) does, and torch is never taken from the wheelhouse;
* a run killed mid-way keeps its earlier records and its summary says so; budgets cut and skip phases."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.py"


def _gpu_run():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_run
    finally:
        sys.path.pop(0)
    return gpu_run


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-run")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp / "out"), "--work",
                           str(tmp / "work")], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return proc.stdout, tmp / "out", tmp / "work"


@pytest.mark.slow
def test_every_phase_ran_or_says_why_not(dry_run):
    _, out, _ = dry_run
    summary = json.loads((out / "gpu_run_summary.json").read_text())
    phases = summary["phases"]
    assert phases["install"]["status"].startswith("skipped: no --wheelhouse")
    for name in ("env", "bench_So16", "bench_g16", "calibrate", "kernels", "plan", "data", "preprocess",
                 "train_ckpt_none", "baseline", "train_ckpt_selective"):
        assert phases[name]["status"] == "ok", (name, phases[name])
    # the order of value: So16, g16 (bf16 then FP8), kernels, then the trainer; the baseline after it
    order = [r["phase"] for r in _records(out) if r["kind"] == "phase"]
    assert order.index("bench_So16") < order.index("bench_g16") < order.index("calibrate") < \
        order.index("kernels") < order.index("train_ckpt_none") < order.index("baseline") < \
        order.index("train_ckpt_selective"), order
    assert "NOT installed" in summary["transformer_engine"]  # said plainly: TE was not measured
    assert summary["complete"] is True
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files  # what one call to the device machine brings back


@pytest.mark.slow
def test_every_measurement_is_a_record_of_the_results_file(dry_run):
    _, out, _ = dry_run
    records = _records(out)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "run" and kinds[-1] == "done"
    steps = [r for r in records if r["kind"] == "step"]
    # So16: #23's step, the step before it; g16: the same, then FP8; then the baseline's own phase
    assert [(r["model"], r["variant"].split()[0]) for r in steps] == [
        ("So16", "ours"), ("So16", "pre-#23"), ("g16", "ours"), ("g16", "pre-#23"), ("g16", "ours"),
        ("So16", "baseline")], steps
    assert steps[4]["status"].startswith("skipped: model.fp8=torchao-tensorwise needs a CUDA GPU"), steps[4]
    for r in (steps[0], steps[1], steps[2], steps[3], steps[5]):  # the sync counter's code path: one warning per step
        assert r["status"] == "ok" and r["syncs_per_step"] == 1 and list(r["sync_sites"]) == [
            next(iter(r["sync_sites"]))] and r["sync_sites"][next(iter(r["sync_sites"]))] == 1, r
        assert next(iter(r["sync_sites"])).startswith("gpu_bench.py:"), r
    kernels = [r for r in records if r["kind"] == "kernel"]
    assert [(r["model"], r["kernel"]) for r in kernels] == [("So16", "flex"), ("So16", "varlen"), ("g16", "flex"),
                                                            ("g16", "varlen")] and all(r["passed"] for r in kernels), kernels
    assert {r["kind"] for r in records} >= {"env", "phase", "step", "kernel", "plan", "trainer_log", "train",
                                            "calibration"}
    # the cost model calibrated after the steps, pricing each model's step as gpu_bench ran it
    for c in (r for r in records if r["kind"] == "calibration"):
        ran = next(s for s in steps if s["model"] == c["model"] and s["variant"].startswith("ours"))
        assert (c["rows"], c["design"]["checkpointing"]) == (ran["rows"], ran["activation_checkpointing"]), c
        assert c["gemms"] and c["skipped_flop_share"] == 0 and c["calibrated"]["step_s"] > 0
    assert [r["model"] for r in records if r["kind"] == "calibration"] == ["So16", "g16"]
    # the trainer's log windows were appended while it ran, not only its final numbers
    assert len([r for r in records if r["kind"] == "trainer_log" and r["phase"] == "train_ckpt_none"]) >= 2


@pytest.mark.slow
def test_phases_are_sized_from_the_memory_estimate(dry_run):
    pytest.importorskip("megatron_genlip.training.memory", reason="the memory estimate has not landed yet")
    _, out, _ = dry_run
    records = _records(out)
    plan = next(r for r in records if r["kind"] == "plan")
    assert plan["fallback"] is False
    assert [r["activation_checkpointing"] for r in plan["runs"]] == ["none", "selective", "full"]  # fastest first
    for run in plan["runs"]:
        assert run["rows"] == 1 and 0 < run["estimate_gib"] < 70 and "activations" in run["estimate_components_gib"]
    for r in records:
        if r["kind"] == "step" and r["status"] == "ok":
            assert r["estimate_gib"] > 0 and r["rows"] >= 1, r
    trainer = [r for r in records if r["kind"] == "train"]
    assert [(t["activation_checkpointing"], t["rows"]) for t in trainer] == [("none", 1), ("selective", 1)]
    assert all(t["estimate_gib"] == p["estimate_gib"] for t, p in zip(trainer, plan["runs"]))


@pytest.mark.slow
def test_trainer_runs_log_their_mfu_and_write_no_checkpoint(dry_run):
    _, out, work = dry_run
    phases = json.loads((out / "gpu_run_summary.json").read_text())["phases"]
    for name in ("train_ckpt_none", "train_ckpt_selective"):
        numbers, platform_line = phases[name]["numbers"], phases[name]["platform"]
        assert numbers["steps"] == 2 and numbers["mfu"] > 0 and numbers["tokens_per_s"] > 0, numbers
        assert "device cpu, compile off (CPU)" in platform_line
        assert phases[name]["checkpoints_written"] == []  # train.save_final=false: no multi-GB checkpoint
        assert any("sync_debug is CUDA-only" in n for n in phases[name]["notes"]), phases[name]["notes"]
    for name, mode in (("train_ckpt_none", "none"), ("train_ckpt_selective", "selective")):
        config = json.loads((work / name / "config.json").read_text())
        assert config["train"]["activation_checkpointing"] == mode and config["train"]["train_steps"] == 2
        assert config["train"]["save_final"] is False and config["train"]["save_interval"] > 2
        assert config["model"]["attention"] == "varlen" and config["data"]["image_size"] == 224  # the So16 recipe
    md = (out / "gpu_run_summary.md").read_text()
    assert "| none | 2 |" in md and "| selective | 2 |" in md and "DRY RUN" in md


@pytest.mark.slow
def test_summary_holds_the_bench_and_kernel_tables(dry_run):
    stdout, out, _ = dry_run
    md = (out / "gpu_run_summary.md").read_text()
    assert "## gpu_bench" in md and "| So16 | baseline |" in md and "| g16 | ours fp32 (varlen) |" in md
    assert "| So16 | flex | 2 x 700 |" in md and "| g16 | flex | 2 x 700 |" in md
    assert "| So16 | varlen | 2 x 700 |" in md and "| g16 | varlen | 2 x 700 |" in md
    assert "## cost model calibrated on this device" in md and "| So16 | 2 |" in md and "| g16 | 2 |" in md
    assert "Transformer Engine: NOT installed" in stdout
    log = (out / "gpu_run.log").read_text()
    assert "[bench_So16] gpu_bench: DRY RUN" in log and "[train_ckpt_none]" in log


@pytest.mark.slow
def test_a_killed_run_keeps_its_records_and_says_so(dry_run, tmp_path):
    """A truncated results file (a run killed during the trainer, a line cut in half) still gives a summary with
    everything measured before, marked as not finished."""
    gpu_run = _gpu_run()
    _, out, _ = dry_run
    lines = (out / "results.jsonl").read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "trainer_log")
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:17])
    summary = gpu_run.build_summary(tmp_path)
    assert summary["complete"] is False and len(summary["steps"]) == 5 and len(summary["kernels"]) == 4
    assert "NOT finished" in (tmp_path / "gpu_run_summary.md").read_text()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--summarize", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "| So16 | ours fp32 (varlen) |" in proc.stdout


@pytest.mark.slow
def test_sigterm_ends_the_phase_and_writes_the_summary(tmp_path):
    """SIGTERM while a phase runs: its process group is ended, the records so far stay, the summary is written."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--phases", "env,bench_So16,bench_g16",
                             "--out", str(out), "--work", str(tmp_path / "work")], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # until the first training-step measurement is in the file
            if (out / "results.jsonl").is_file() and '"kind": "step"' in (out / "results.jsonl").read_text():
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stdout[-3000:]
    summary = json.loads((out / "gpu_run_summary.json").read_text())
    assert summary["complete"] is False and summary["steps"][0]["model"] == "So16"
    assert "bench_g16" not in summary["phases"] or summary["phases"]["bench_g16"].get("status") != "ok"


def test_help_describes_every_flag():
    gpu_run = _gpu_run()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--wheelhouse", "--requirements", "--install-mode", "--check-imports", "--out", "--work",
                 "--budget", "--phases", "--gpu-gib", "--steps", "--rows", "--train-samples", "--save-checkpoint",
                 "--summarize", "--dry-run"):
        assert flag in proc.stdout
    for phase in gpu_run.BUDGETS:  # the docstring's plan names every phase with its budget
        most, least = gpu_run.BUDGETS[phase]
        assert f"{phase} " in proc.stdout and f"{most} / {least}" in proc.stdout, phase


def test_phases_that_no_longer_fit_the_budget_are_skipped_and_said(tmp_path):
    gpu_run = _gpu_run()
    args = gpu_run.parse_args(["--budget", "100", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    run = gpu_run.Run(args)
    assert 90 < run.fits("install") <= 95  # its cap is 120 s, but only 100 s are left (5 kept for the summary)
    run.deadline = run.start + 60
    assert run.fits("bench_g16") == 0.0  # 55 s is less than the 80 s it needs
    assert run.phases["bench_g16"]["status"].startswith("skipped: ")
    run.deadline = run.start  # the budget is spent
    assert run.fits("train", "train_ckpt_none") == 0.0
    skipped = [r for r in _records(tmp_path / "out") if r["kind"] == "phase"]
    assert [r["phase"] for r in skipped] == ["bench_g16", "train_ckpt_none"]  # in the results file at once


def test_a_phase_past_its_budget_is_cut(tmp_path):
    gpu_run = _gpu_run()
    args = gpu_run.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    run = gpu_run.Run(args)
    began = time.monotonic()
    code, text = run.sh("sleepy", [sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(60)"],
                        timeout=2)
    assert code == 124 and "hi" in text and time.monotonic() - began < 20
    assert run.phases["sleepy"]["status"] == "cut at budget (2 s)"


class _FakeClock:
    """time for gpu_run with a monotonic clock that only the fake phases advance."""

    def __init__(self):
        self.t = 1000.0

    def monotonic(self):
        return self.t

    def time(self):
        return time.time()


def _fake_gpu_machine(monkeypatch, gpu_run, share: float) -> list:
    """Every phase 'runs' on a CUDA machine for ``share`` of the seconds it is given; the calls are returned."""
    clock, calls = _FakeClock(), []
    monkeypatch.setattr(gpu_run, "time", clock)
    monkeypatch.setattr(gpu_run.signal, "signal", lambda *a: None)

    def sh(self, name, cmd, timeout, env=None, on_line=None):
        calls.append((name, cmd, timeout, clock.t - 1000.0))
        clock.t += share * timeout
        self.phases.setdefault(name, {}).update(status="ok", seconds=share * timeout, budget=round(timeout))
        text = {"env": 'ENV {"gpu": "NVIDIA H100 80GB HBM3", "gpu_gib": 79.2, "transformer_engine": false}',
                "plan": 'PLAN {"runs": [{"activation_checkpointing": false, "rows": 2, "estimate_gib": 63.1}, '
                        '{"activation_checkpointing": true, "rows": 4, "estimate_gib": 27.8}], '
                        '"train_fields": ["save_final", "sync_debug"]}'}.get(name, "")
        return 0, text

    monkeypatch.setattr(gpu_run.Run, "sh", sh)
    return calls


@pytest.mark.parametrize("share", [1.0, 0.55])
def test_the_time_plan_keeps_the_budget_and_the_order_of_value(tmp_path, monkeypatch, share):
    """On a (simulated) GPU machine: phases run most valuable first, each within its own cap and within the
    --budget; when every phase takes its whole cap the trainer is what goes, when they take 55% all of it runs."""
    gpu_run = _gpu_run()
    calls = _fake_gpu_machine(monkeypatch, gpu_run, share)
    assert gpu_run.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    names = [c[0] for c in calls]
    for name, _, timeout, began in calls:
        cap = gpu_run.BUDGETS.get(name, gpu_run.BUDGETS["train"] if name.startswith("train") else (9e9, 0))[0]
        assert timeout <= cap and began + timeout <= 540 - 5 + 1e-6, (name, timeout, began)
    valuable = ["env", "bench_So16", "bench_g16", "calibrate", "kernels"]
    assert names[:5] == valuable
    phases = json.loads((tmp_path / "out" / "gpu_run_summary.json").read_text())["phases"]
    if share == 1.0:
        assert "train_ckpt_none" not in names and phases["train_ckpt_none"]["status"].startswith("skipped: ")
    else:
        assert names[5:] == ["plan", "data", "preprocess", "train_ckpt_none", "baseline", "train_ckpt_full"], names
    by_name = {c[0]: c[1] for c in calls}
    assert by_name["bench_So16"][-6:] == ["--max-seconds", "95", "--max-rows", "4", "--gpu-gib", "70.0"]
    assert "--variants" in by_name["bench_g16"] and "bf16,fp8,pre23" in by_name["bench_g16"]
    assert "bf16,pre23" in by_name["bench_So16"]
    if share < 1.0:
        train = by_name["train_ckpt_none"]
        sets = [train[i + 1] for i, a in enumerate(train) if a == "--set"]
        for want in ("train.sync_debug=true", "train.save_final=false", "train.micro_batch_size=2",
                     "train.activation_checkpointing=none"):
            assert want in sets, (want, sets)


def test_an_older_trainer_is_not_asked_for_fields_it_lacks(tmp_path):
    gpu_run = _gpu_run()
    run = gpu_run.Run(gpu_run.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]))
    sets, notes = gpu_run.trainer_sets(run, True, 4, tmp_path / "t", {"train": "x"}, [])
    assert not [s for s in sets if "save_final" in s or "sync_debug" in s]
    assert any("no train.save_final" in n for n in notes) and any("no train.sync_debug" in n for n in notes)
    run.args.save_checkpoint = True
    sets, _ = gpu_run.trainer_sets(run, True, 4, tmp_path / "t", {"train": "x"}, ["save_final", "sync_debug"])
    assert "train.save_final=false" not in sets and "train.sync_debug=true" in sets


# --------------------------------------------------------------------------------------------------
# the install phase against an interpreter that is itself a venv


def _wheel(house: Path, name: str, version: str, requires: tuple[str, ...] = (), code: str = "") -> Path:
    """A pure-Python wheel written directly (no build backend, no network)."""
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                   for r in requires)
    files = {f"{name}.py": code or f"VERSION = {version!r}\n", f"{info}/METADATA": meta,
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if name == "torch":  # a stand-in torch: a package that would shadow the real one if it were ever installed
        files = {"torch/__init__.py": "__version__ = 'wheelhouse'\n", **{k: v for k, v in files.items()
                                                                         if k != "torch.py"}}
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(t)}" for n, t in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    house.mkdir(parents=True, exist_ok=True)
    path = house / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, t in files.items():
            z.writestr(n, t)
    return path


def _py(python: str, code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env or {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def _offline() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHONPATH"))}
    return dict(env, PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
                PIP_NO_CACHE_DIR="1")


@pytest.mark.slow
def test_install_goes_where_the_venv_interpreter_sees_it_beside_its_torch(tmp_path):
    """The device machine's python3 is a venv P holding torch. Stand-in here: P, a venv of this interpreter, holds
    ``image_pkg`` (what torch is there: installed in P itself); ``genlip_probe`` in the wheelhouse needs it (as
    megatron-core and DeepSpeed need torch) and torch, and the wheelhouse also carries a stand-in torch wheel."""
    gpu_run = _gpu_run()
    _wheel(tmp_path / "image", "image_pkg", "1.0")
    house = tmp_path / "wheelhouse"
    _wheel(house, "genlip_probe", "1.0", ("image_pkg>=1.0", "torch"))
    _wheel(house, "torch", "99.0")
    (tmp_path / "req.txt").write_text("genlip_probe\n")
    p_dir, v_dir = tmp_path / "P", tmp_path / "V"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(p_dir)], check=True,
                   timeout=120)
    p_py = str(p_dir / "bin" / "python")
    subprocess.run([p_py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(tmp_path / "image"),
                    "image_pkg"], check=True, env=_offline(), timeout=120)
    assert _py(p_py, "import image_pkg, torch").returncode == 0
    # P's own torch (this interpreter's, or its base's when the tests themselves run inside a venv)
    own_torch = _py(p_py, "import torch; print(torch.__version__); print(torch.__file__)").stdout.split()

    # the bug: a venv made from P with --system-site-packages does not see P's packages, and pip there finds none
    subprocess.run([p_py, "-m", "venv", "--system-site-packages", "--without-pip", str(v_dir)], check=True,
                   timeout=120)
    v_py = str(v_dir / "bin" / "python")
    assert _py(v_py, "import image_pkg").returncode != 0
    pip_v = subprocess.run([v_py, "-m", "pip", "install", "--no-index", "--find-links", str(house), "-r",
                            str(tmp_path / "req.txt")], capture_output=True, text=True, env=_offline(), timeout=120)
    assert pip_v.returncode != 0 and "image_pkg" in pip_v.stdout + pip_v.stderr

    # the install into P itself, as gpu_run does it
    for mode in ("interpreter", "target"):
        args = gpu_run.parse_args(["--dry-run", "--check-imports", "genlip_probe,image_pkg", "--out",
                                   str(tmp_path / mode / "out"), "--work", str(tmp_path / mode / "work")])
        run = gpu_run.Run(args)
        rec = gpu_run.install_wheels(run, p_py, str(house), ["-r", str(tmp_path / "req.txt")], mode)
        assert rec["ok"] and rec["mode"] == mode, rec
        assert rec["interpreter"]["venv"] is True and rec["ignored_torch_wheels"] == ["torch-99.0-py3-none-any.whl"]
        assert rec["torch_after"] == own_torch  # the interpreter's own torch, untouched
        env = run.child_env()
        env.pop("PYTHONUNBUFFERED")
        probe = _py(p_py, "import genlip_probe, image_pkg, torch; print('SEEN', genlip_probe.__file__, torch.__file__)",
                    env)
        assert probe.returncode == 0, probe.stderr
        seen = probe.stdout.split()[1:]
        assert seen[0].startswith(str(p_dir if mode == "interpreter" else tmp_path / mode / "work" / "site")), seen
        assert seen[1] == own_torch[1]
    site_packages = list(p_dir.glob("lib/python*/site-packages"))[0]
    assert not list(site_packages.glob("torch*")), "torch must never come from the wheelhouse"
    assert not list((tmp_path / "target" / "work" / "site").glob("torch*"))


@pytest.mark.slow
def test_dry_run_installs_into_a_venv_like_stand_in_interpreter(tmp_path):
    """--dry-run --wheelhouse: the install phase goes into a venv made from this interpreter (standing in for the
    machine's), the later phases run with that interpreter."""
    house = tmp_path / "wheelhouse"
    _wheel(house, "genlip_probe", "1.0", ("torch",))
    _wheel(house, "torch", "99.0")
    (tmp_path / "req.txt").write_text("genlip_probe\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--wheelhouse", str(house), "--requirements",
                           str(tmp_path / "req.txt"), "--check-imports", "genlip_probe,megatron_genlip", "--phases",
                           "env,install", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    install = next(r for r in _records(out) if r["kind"] == "install")
    assert install["ok"] and install["mode"] == "interpreter" and install["interpreter"]["venv"] is True, install
    assert install["python"] == str(tmp_path / "work" / "interpreter" / "bin" / "python")
    assert list((tmp_path / "work" / "interpreter").glob("lib/python*/site-packages/genlip_probe.py"))
    summary = json.loads((out / "gpu_run_summary.json").read_text())
    assert summary["phases"]["install"]["status"] == "ok" and "bench_So16" not in summary["phases"]
