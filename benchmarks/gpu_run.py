#!/usr/bin/env python3
"""The GPU measurement, as one prepared run on a machine with one NVIDIA GPU and no network (standard library
only until the install phase has run). Phases, most valuable first, each cut at its own budget (seconds at most,
and the least it needs to be worth starting: a phase that no longer fits the --budget is skipped, saying so):

  env          45 / 5    Python, torch, GPU and its memory, Triton, Transformer Engine (said plainly when absent)
  install     120 / 20   the carried wheels installed where THIS interpreter sees them beside its torch (the
                         machine's python3 is itself a venv: a venv made from it would not see its torch), torch
                         pinned to the installed build, so pip can never replace it; --target + PYTHONPATH when
                         the interpreter's site-packages is not writable
  bench_So16  120 / 60   So/16 bf16 training steps (gpu_bench.py): step time, MFU, peak memory against the
                         memory estimate, host synchronisations per step; rows per step from the estimate
  bench_g16   150 / 80   g/16 bf16, then g/16 FP8 (torchao float8): the FP8 / bf16 speed ratio
  calibrate    45 / 20   calibrate.py: the block's GEMMs (traced from the model) replayed and a compiled
                         pointwise kernel timed -> measured eta_gemm and eta_hbm; the cost model's step at the
                         judged and at the measured efficiencies beside the measured So/16 and g/16 steps
  kernels      90 / 40   FlexAttention vs dense SDPA with q, k, v in the model's own layout: output and q/k/v
                         gradients (bf16 tolerance 3e-2 against fp32), forward+backward time; So/16 and g/16 heads
  plan         40 / 10   the trainer's rows and activation checkpointing from the memory estimate (< --gpu-gib)
  data         60 / 15   synthetic 224 px captioned shapes -> an indexed dataset (the So/16 recipe's settings);
                         plan and data start only while the trainer's 90 s can still follow them
  train       150 / 90   the real trainer (deepspeed --num_gpus 1 examples/pretrain_genlip.py, So/16 stage 1):
                         a few steps at the planned size, train.sync_debug (syncs per step), MFU and peak memory
                         from its own log against the estimate; no final checkpoint unless --save-checkpoint
  baseline     60 / 40   So/16 official-style baseline step (dense mask, LM head on all positions)
  train_other 120 / 90   the trainer with the other activation-checkpointing setting

Every measurement is appended to OUT/results.jsonl (flushed and fsynced) as soon as it exists, by this script
and by gpu_bench.py, so a run killed at any point keeps everything measured before; the summary
(OUT/gpu_run_summary.md and .json) is built from that file at the end (or with --summarize OUT). All phase output
goes to OUT/gpu_run.log: four files in all (at most 8 come back from the device machine). ``--dry-run`` runs every
phase on the CPU with tiny shapes (CI), budgets not enforced, the GPU-only measurements (timings, sync debug mode)
replaced by their code paths: the synchronisation counter counts a stand-in warning; with --wheelhouse the
install goes into a venv-like stand-in interpreter made under --work.

  python3 benchmarks/gpu_run.py --wheelhouse .whl --out "$OUT"          # on the GPU machine, ~9 minutes
  python3 benchmarks/gpu_run.py --dry-run --out /tmp/gpu-run             # on CPU
  python3 benchmarks/gpu_run.py --summarize "$OUT"                       # rebuild the summary from results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "examples/configs/stage1-So16.yaml"
# phase -> (seconds it may take at most, seconds it needs at least to be worth starting), in the order they run
BUDGETS = {"env": (45, 5), "install": (120, 20), "bench_So16": (120, 60), "bench_g16": (150, 80),
           "calibrate": (45, 20), "kernels": (90, 40), "plan": (40, 10), "data": (60, 15), "train": (150, 90),
           "baseline": (60, 40), "train_other": (120, 90)}
DRY_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
             "model.num_attention_heads=4", "model.text_embed_dim=64", "model.mrope_section=[3,3,2]",
             "data.seq_length=1024", "data.max_sample_length=1024", "data.pack_buffer_size=64"]
CHECK_IMPORTS = "deepspeed,megatron.core,tiktoken,webdataset,torchao,megatron_genlip"
RESULTS, LOG, SUMMARY_MD, SUMMARY_JSON = "results.jsonl", "gpu_run.log", "gpu_run_summary.md", "gpu_run_summary.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheelhouse", default=None,
                   help="folder made by tools/make_wheelhouse.sh for this Python; install is skipped without it "
                        "(default %(default)s)")
    p.add_argument("--requirements", default="requirements-cluster.txt",
                   help="requirements file the install phase installs from the wheelhouse (default %(default)s)")
    p.add_argument("--install-mode", default="auto", choices=("auto", "interpreter", "target"),
                   help="interpreter: pip installs into this interpreter's own environment, resolving against its "
                        "torch; target: every wheel (torch excepted) into WORK/site, put on PYTHONPATH; auto: "
                        "interpreter when its site-packages is writable (default %(default)s)")
    p.add_argument("--check-imports", default=CHECK_IMPORTS,
                   help="comma-separated modules that must import beside torch after the install "
                        "(default %(default)s)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_run_out"),
                   help="folder for results.jsonl, gpu_run.log and the summary (default: $OUT, else %(default)s)")
    p.add_argument("--work", default="/tmp/genlip-gpu-run",
                   help="scratch folder: data, trainer outputs, stand-in interpreter (default %(default)s)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="wall-clock seconds for everything; each phase also has its own cap (default %(default)s)")
    p.add_argument("--phases", default=",".join(BUDGETS),
                   help="comma-separated phases to run, in the fixed order above (default: all)")
    p.add_argument("--gpu-gib", type=float, default=70.0,
                   help="every phase is sized so that its memory estimate stays under this (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="trainer steps per run (default %(default)s)")
    p.add_argument("--rows", type=int, default=4,
                   help="most 16384-token rows per step (trainer and gpu_bench); fewer when the memory estimate "
                        "says so (default %(default)s)")
    p.add_argument("--train-samples", type=int, default=1200,
                   help="synthetic training samples (rows cycle over epochs) (default %(default)s)")
    p.add_argument("--save-checkpoint", action="store_true",
                   help="let the trainer write its final checkpoint (~11.5 GB at So/16; off: train.save_final=false)")
    p.add_argument("--summarize", default=None, metavar="OUT",
                   help="only rebuild the summary from OUT/results.jsonl, e.g. after a killed run "
                        "(default %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="every phase on CPU with tiny shapes and no timings (default %(default)s)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.rows, args.train_samples = 2, 1, 24
    unknown = set(args.phases.split(",")) - set(BUDGETS)
    if unknown:
        p.error(f"--phases: unknown {sorted(unknown)}; phases are {', '.join(BUDGETS)}")
    return args


def append_record(path: Path, kind: str, **fields) -> dict:
    """One JSON line, flushed and fsynced at once: a run killed later keeps it."""
    record = {"kind": kind, "source": "gpu_run", "time": round(time.time(), 3), **fields}
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return record


def read_records(path: Path) -> list[dict]:
    """The records of a results file; a line cut short by a kill is left out."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


class Run:
    """Phases under one deadline, their output in OUT/gpu_run.log, every result appended to OUT/results.jsonl."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.results_path = self.out / RESULTS
        self.results_path.write_text("")
        self.log = open(self.out / LOG, "w")
        self.python = sys.executable
        self.pythonpath = [str(ROOT)]  # the project (and, in target mode, the installed wheels) for every child
        self.phases: dict[str, dict] = {}
        self.plan: dict = {}
        self.proc: subprocess.Popen | None = None
        self.record("run", dry_run=args.dry_run, budget=args.budget, gpu_gib=args.gpu_gib, argv=sys.argv[1:])

    def record(self, kind: str, **fields) -> dict:
        return append_record(self.results_path, kind, **fields)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[gpu_run {time.monotonic() - self.start:5.0f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def wanted(self, phase: str) -> bool:
        return phase in self.args.phases.split(",")

    def end(self, name: str, status: str, **fields) -> None:
        """A phase's final word: kept for the summary and appended to the results at once."""
        entry = self.phases.setdefault(name, {})
        entry.update(status=status, **fields)
        self.record("phase", phase=name, **entry)

    def fits(self, budget: str, name: str | None = None, reserve: float = 0.0) -> float:
        """The seconds the phase may take now (its cap, or what is left of the budget less 5 s for the summary and
        ``reserve`` for what it prepares), or 0 (recorded as skipped) if that is less than it needs."""
        most, least = BUDGETS[budget]
        name = name or budget
        if self.args.dry_run:  # code paths on a (shared) CPU, not timings: generous, budget not enforced
            return 4.0 * most + 60
        allowed = min(most, self.left() - 5 - reserve)
        if allowed < least:
            self.end(name, f"skipped: {self.left():.0f} s of the budget left, it needs {least} s", budget=most)
            self.say(f"{name}: skipped ({self.left():.0f} s left, needs {least} s)")
            return 0.0
        return allowed

    def child_env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation near the limit
        env["PYTHONPATH"] = os.pathsep.join(self.pythonpath + [p for p in [env.get("PYTHONPATH")] if p])
        return env

    def sh(self, name: str, cmd: list[str], timeout: float, env: dict | None = None, on_line=None) -> tuple[int, str]:
        """Run ``cmd`` (its own process group), its output into the log and to stdout, prefixed by ``name``;
        (exit code, output). At ``timeout`` the whole group is ended: code 124, status 'cut at budget'."""
        self.say(f"{name}: {' '.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''} (at most {timeout:.0f} s)")
        began = time.monotonic()
        proc = self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.child_env(), stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, process_group=0)
        lines = []
        try:
            for line in _lines_until(proc, began + timeout):
                self.log.write(f"[{name}] {line}")
                print(f"[{name}] {line}", end="", flush=True)
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            code = proc.wait(timeout=max(1.0, began + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = 124
        except BaseException:  # SIGTERM/^C of this script: end the child's group too, then go on unwinding
            _kill(proc)
            raise
        finally:
            self.proc = None
        if code == 124 or proc.poll() is None:
            _kill(proc)
            code = 124
            self.log.write(f"[{name}] [gpu_run] cut at its budget of {timeout:.0f} s\n")
        self.log.flush()
        seconds = round(time.monotonic() - began, 1)
        status = "ok" if code == 0 else f"cut at budget ({timeout:.0f} s)" if code == 124 else f"exit {code}"
        self.phases.setdefault(name, {}).update(status=status, seconds=seconds, budget=round(timeout))
        self.say(f"{name}: {status} in {seconds:.0f} s")
        return code, "".join(lines)


def _lines_until(proc: subprocess.Popen, deadline: float):
    """The process's output lines until it ends or ``deadline`` passes (then TimeoutExpired)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, 0)
        if not sel.select(timeout=1.0):
            if proc.poll() is not None:
                return
            continue
        line = proc.stdout.readline()
        if not line:
            return
        yield line


def _kill(proc: subprocess.Popen) -> None:
    """End the phase's whole process group (launchers start ranks of their own)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------------
# env and install

ENV_PROBE = """import importlib.util, json, platform, sys, torch
cuda = torch.cuda.is_available()
print('ENV ' + json.dumps({'python': platform.python_version(), 'executable': sys.executable,
  'venv': sys.prefix != sys.base_prefix, 'torch': torch.__version__, 'cuda': torch.version.cuda,
  'gpu': torch.cuda.get_device_name() if cuda else None,
  'gpu_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
  'triton': importlib.util.find_spec('triton') is not None,
  'transformer_engine': importlib.util.find_spec('transformer_engine') is not None}))
"""

INTERPRETER_PROBE = """import importlib.util, json, os, sys, sysconfig
purelib = sysconfig.get_paths()['purelib']
try:
    import torch
    t = [torch.__version__, torch.__file__]
except Exception as e:
    t = [None, repr(e)]
print('INTERP ' + json.dumps({'executable': sys.executable, 'prefix': sys.prefix, 'venv': sys.prefix != sys.base_prefix,
  'purelib': purelib, 'writable': os.access(purelib, os.W_OK), 'pip': importlib.util.find_spec('pip') is not None,
  'torch': t[0], 'torch_file': t[1]}))
"""


def _tagged(text: str, tag: str) -> dict:
    return next((json.loads(line[len(tag) + 1:]) for line in text.splitlines() if line.startswith(tag + " ")), {})


def phase_env(run: Run) -> None:
    if not run.wanted("env"):
        return
    code, text = run.sh("env", [run.python, "-c", ENV_PROBE], timeout=run.fits("env") or 45)
    info = _tagged(text, "ENV")
    te = info.get("transformer_engine")
    info["transformer_engine_note"] = (
        "installed: its attention kernel (te-arbitrary) is compared with the dense reference in the kernels phase; "
        "TE layers and TE FP8 training steps are not in this 9-minute plan (run gpu_bench.py --backend te)" if te
        else "NOT installed on this machine, so nothing of Transformer Engine (te backend, TE FP8) was measured; "
             "its core wheel (264 MiB) is larger than what one call to the machine can carry")
    run.record("env", **info)
    run.end("env", run.phases["env"]["status"])
    run.say(f"Transformer Engine: {info['transformer_engine_note']}")
    if not info.get("gpu") and not run.args.dry_run:
        raise SystemExit("gpu_run: no CUDA device here; use --dry-run on a CPU machine")
    if info.get("gpu_gib") and run.args.gpu_gib > 0.9 * info["gpu_gib"]:  # a smaller card than planned for
        run.args.gpu_gib = round(0.9 * info["gpu_gib"], 1)
        run.say(f"sizing every phase for {run.args.gpu_gib} GiB (90% of the {info['gpu_gib']} GiB GPU)")


def stand_in_interpreter(run: Run) -> str:
    """Dry run: a venv made from this interpreter (--system-site-packages, so it sees this torch) stands in for
    the device machine's python3, itself a venv holding torch; the install goes into it as it would there."""
    venv = run.work / "interpreter"
    subprocess.run([run.python, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    return str(venv / "bin" / "python")


def install_wheels(run: Run, python: str, wheelhouse: str, requirements: list[str], mode: str = "auto",
                   budget: float = 300.0) -> dict:
    """Install the wheelhouse where ``python`` itself sees it beside its own torch, never into a venv made from
    it (a venv of a venv sees the base interpreter's packages, not the middle one's torch: pip then finds no torch
    for megatron-core and DeepSpeed). Modes: ``interpreter``: ``python -m pip install --no-index --find-links
    WHEELHOUSE -c torch==<its version> REQUIREMENTS`` into its own environment, resolving against its packages;
    ``target``: every wheel but torch with --no-deps into WORK/site, which goes on PYTHONPATH; ``auto``:
    interpreter when its site-packages is writable. torch is never taken from the wheelhouse. The probe, pip and
    the import check share ``budget`` seconds. Returns the install record (``ok`` says whether the checked modules
    import beside the same torch)."""
    began = time.monotonic()

    def left(keep: float = 0.0) -> float:
        return max(5.0, budget - keep - (time.monotonic() - began))

    house = Path(wheelhouse).resolve()
    offline = run.child_env({"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,
                             "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"})
    _, text = run.sh("install_probe", [python, "-c", INTERPRETER_PROBE], timeout=min(60.0, left()), env=offline)
    before = _tagged(text, "INTERP")
    rec = {"python": python, "interpreter": before, "wheelhouse": str(house), "ok": False}
    if not before.get("torch"):
        rec["error"] = f"{python} has no importable torch ({before.get('torch_file')}): nothing to install beside"
        return rec
    if not before.get("pip"):
        rec["error"] = f"{python} has no pip"
        return rec
    if mode == "auto":
        mode = "interpreter" if before.get("writable") else "target"
    rec["mode"] = mode
    torch_wheels = sorted(p.name for p in house.glob("torch-*.whl"))
    if torch_wheels:
        rec["ignored_torch_wheels"] = torch_wheels
    pip = [python, "-m", "pip", "install", "--no-index", "--find-links", str(house), "--no-compile"]
    if mode == "interpreter":
        constraints = run.work / "torch-constraint.txt"
        constraints.write_text(f"torch=={before['torch']}\n")  # the interpreter's own build, never another
        cmd = pip + ["-c", str(constraints)] + requirements
    else:
        site = run.work / "site"
        wheels = sorted(str(p) for p in house.glob("*.whl") if not p.name.startswith("torch-"))
        cmd = pip + ["--no-deps", "--target", str(site)] + wheels
    code, _ = run.sh("install", cmd, timeout=left(keep=30.0), env=offline)  # 30 s kept for the import check
    rec.update(pip_exit=code, seconds=round(time.monotonic() - began, 1))
    if code != 0:
        rec["error"] = f"pip exited {code} (see {LOG})"
        return rec
    if mode == "target":
        run.pythonpath.insert(0, str(run.work / "site"))
        rec["pythonpath"] = list(run.pythonpath)
    modules = [m.strip() for m in run.args.check_imports.split(",") if m.strip()]
    check = (f"import importlib, json, torch\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             f"print('CHECK ' + json.dumps([torch.__version__, torch.__file__]))\n")
    code, text = run.sh("install_check", [python, "-c", check], timeout=left(), env=run.child_env())
    after = _tagged(text, "CHECK")
    rec["imports"] = modules
    rec["torch_after"] = after
    same_torch = after == [before["torch"], before["torch_file"]]
    rec["ok"] = code == 0 and same_torch
    if code != 0:
        rec["error"] = f"{', '.join(modules)} do not all import beside torch (see {LOG})"
    elif not same_torch:
        rec["error"] = f"torch changed: {before['torch']} at {before['torch_file']} -> {after}"
    return rec


def phase_install(run: Run) -> None:
    if not run.wanted("install"):
        return
    if not run.args.wheelhouse:
        run.end("install", "skipped: no --wheelhouse (using this interpreter's packages)")
        run.say("install: skipped (no --wheelhouse)")
        return
    budget = run.fits("install")
    if not budget:
        return
    began = time.monotonic()
    python = stand_in_interpreter(run) if run.args.dry_run else run.python
    requirements = ["-r", str(ROOT / run.args.requirements)]
    rec = install_wheels(run, python, run.args.wheelhouse, requirements, run.args.install_mode, budget)
    run.record("install", **rec)
    status = "ok" if rec["ok"] else f"failed: {rec.get('error')}"
    run.end("install", status, mode=rec.get("mode"), seconds=round(time.monotonic() - began, 1))
    if rec["ok"]:
        run.python = python  # every later phase runs with the interpreter the wheels went into
    else:
        run.say(f"install: {status}; later phases run with the packages this interpreter already has")


# --------------------------------------------------------------------------------------------------
# gpu_bench phases


def bench(run: Run, name: str, flags: list[str]) -> None:
    """One gpu_bench.py process; it appends its own records to the results file as each measurement exists."""
    if not run.wanted(name):
        return
    timeout = run.fits(name)
    if not timeout:
        return
    cmd = [run.python, "benchmarks/gpu_bench.py", "--results", str(run.results_path.resolve()), *flags]
    if run.args.dry_run:
        cmd += ["--dry-run"]
    else:
        cmd += ["--max-seconds", str(int(max(20, timeout - 25))), "--max-rows", str(run.args.rows),
                "--gpu-gib", str(run.args.gpu_gib)]
    run.sh(name, cmd, timeout=timeout)
    run.end(name, run.phases[name]["status"])


def phase_calibrate(run: Run) -> None:
    """calibrate.py: measured eta_gemm / eta_hbm and the cost model's step with them, beside the measured steps."""
    if not run.wanted("calibrate"):
        return
    timeout = run.fits("calibrate")
    if not timeout:
        return
    cmd = [run.python, "benchmarks/calibrate.py", "--results", str(run.results_path.resolve())]
    run.sh("calibrate", cmd + (["--dry-run"] if run.args.dry_run else []), timeout=timeout)
    run.end("calibrate", run.phases["calibrate"]["status"])


def phase_benches_first(run: Run) -> None:
    # issue #23's step, then the step before it (the design's measured speed-up), then FP8 on g/16
    bench(run, "bench_So16", ["--parts", "steps", "--models", "So16", "--variants", "bf16,pre23"])
    bench(run, "bench_g16", ["--parts", "steps", "--models", "g16", "--variants", "bf16,fp8,pre23"])
    phase_calibrate(run)
    bench(run, "kernels", ["--parts", "kernels", "--models", "So16,g16"])


# --------------------------------------------------------------------------------------------------
# data and the real trainer


def phase_data(run: Run) -> dict:
    """Synthetic shards and their indexed dataset (the recipe's tokenizer and image size)."""
    if not (run.wanted("data") and (run.wanted("train") or run.wanted("train_other"))):
        return {}
    timeout = run.fits("data", reserve=BUDGETS["train"][1])  # only if the trainer can still run after it
    if not timeout:
        return {}
    began = time.monotonic()
    shards, prefix = run.work / "shards", run.work / "indexed" / "train"
    workers = str(max(1, min(16, (os.cpu_count() or 2) - 1)))
    code, _ = run.sh("data", [run.python, "tools/make_synthetic_data.py", "--out-dir", str(shards), "--num-train",
                              str(run.args.train_samples), "--num-val", "1", "--image-size", "224", "--image-format",
                              "jpg", "--samples-per-shard", "125"], timeout=timeout)
    status = run.phases["data"]["status"]
    if code == 0:
        overrides = [x for o in (DRY_MODEL if run.args.dry_run else []) for x in ("--set", o)]
        left = timeout if run.args.dry_run else max(5.0, timeout - (time.monotonic() - began))
        code, _ = run.sh("preprocess", [run.python, "tools/preprocess_data.py", "--config", RECIPE, *overrides,
                                        "--input", str(shards / "train-*.tar"), "--output-prefix", str(prefix),
                                        "--workers", workers, "--no-progress"], timeout=left)
        run.end("preprocess", run.phases["preprocess"]["status"])
        status = "ok" if code == 0 else f"failed at preprocess: {run.phases['preprocess']['status']}"
    run.end("data", status, seconds=round(time.monotonic() - began, 1))
    return {"train": str(prefix)} if code == 0 else {}


def _free_port() -> int:
    """A rendezvous port below the ephemeral range (training/ports.py: stdlib only, so this process may import it
    from the checkout whether or not the package is installed into its interpreter)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from megatron_genlip.training.ports import free_port
    return free_port()


def checkpointing_mode(value) -> str:
    """An activation-checkpointing setting as the trainer's mode name (older plans said true/false)."""
    return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else str(value)


def trainer_sets(run: Run, checkpointing, rows: int, out_dir: Path, data: dict | None,
                 fields: list[str]) -> tuple[list[str], list[str]]:
    """The trainer's --set overrides (the So16 stage-1 recipe, synthetic data, no evaluation, no final checkpoint
    unless asked, sync counting on CUDA) and notes on what this trainer could not be asked."""
    notes = []
    sets = [f"data.train_data={data['train'] if data else 'unset'}", "data.valid_data=null",
            f"train.output_dir={out_dir}", f"train.train_steps={run.args.steps}",
            f"train.warmup_steps={min(5, run.args.steps - 1)}", f"train.micro_batch_size={rows}",
            f"train.global_batch_size={rows}", "parallel.data_parallel=1",  # the recipe names its 32 GPUs
            f"train.log_interval={1 if run.args.dry_run else 5}",
            f"train.save_interval={10 * run.args.steps + 1000}",  # no checkpoint on the way
            f"train.activation_checkpointing={checkpointing_mode(checkpointing)}",
            "train.tensorboard=false", "train.progress_bar=never", "data.num_workers=4",
            "data.build_missing_pack_index=true"]  # the recipe expects it built ahead; this small set builds at start
    if not run.args.save_checkpoint:
        if "save_final" in fields:
            sets.append("train.save_final=false")
        else:
            notes.append("this trainer has no train.save_final: it writes its final checkpoint (deleted after)")
    if "sync_debug" in fields and not run.args.dry_run:
        sets.append("train.sync_debug=true")
    elif "sync_debug" in fields:
        notes.append("train.sync_debug is CUDA-only: not set in the dry run")
    else:
        notes.append("this trainer has no train.sync_debug: no synchronisation counts")
    if run.args.dry_run:
        sets += DRY_MODEL + ["data.num_workers=1", "train.peak_tflops=0.1", "train.precision=fp32"]
    return sets, notes


def trainer_command(run: Run, sets: list[str]) -> list[str]:
    launcher = Path(run.python).parent / "deepspeed"
    head = [str(launcher)] if launcher.exists() else [run.python, "-m", "deepspeed.launcher.runner"]
    cmd = head + ["--num_gpus", "1", "--master_port", str(_free_port()), "examples/pretrain_genlip.py",
                  "--config", RECIPE]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def phase_plan(run: Run) -> None:
    """Rows and activation checkpointing of the trainer runs from the memory estimate, and the trainer's fields."""
    # without a plan: one row each, and the fields this trainer is expected to have (an older one refuses them)
    fallback = {"runs": [{"activation_checkpointing": "none", "rows": 1}, {"activation_checkpointing": "full", "rows": 1}],
                "train_fields": ["save_final", "sync_debug"]}
    run.plan = fallback
    if not (run.wanted("plan") and (run.wanted("train") or run.wanted("train_other"))):
        return
    timeout = run.fits("plan", reserve=BUDGETS["data"][1] + BUDGETS["train"][1])  # only if the trainer can follow
    if not timeout:
        return
    sets, _ = trainer_sets(run, "none", 1, run.work / "plan", None, [])
    cmd = [run.python, "benchmarks/gpu_bench.py", "--plan-trainer", RECIPE, "--max-rows", str(run.args.rows),
           "--gpu-gib", str(run.args.gpu_gib)] + [x for s in sets if not s.startswith("data.train_data")
                                                  for x in ("--set", s)]
    code, text = run.sh("plan", cmd, timeout=timeout)
    plan = _tagged(text, "PLAN")
    if code == 0 and plan:
        run.plan = plan
    run.record("plan", **run.plan, fallback=not (code == 0 and plan))
    run.end("plan", run.phases["plan"]["status"], runs=run.plan["runs"], estimate=run.plan.get("estimate"))


class TrainLogFollower:
    """Appends the trainer's log records (train.jsonl) to the results as they appear, so a cut run keeps its
    windows."""

    def __init__(self, run: Run, name: str, path: Path):
        self.run, self.name, self.path, self.offset = run, name, path, 0

    def __call__(self, _line: str = "") -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") in ("train", "platform"):
                self.run.record("trainer_log", phase=self.name, record=rec)


def trainer_numbers(out_dir: Path) -> dict:
    """MFU, throughput, memory and syncs per step from the trainer's own log, past the first (compiling) window."""
    path = out_dir / "logs" / "train.jsonl"
    records = read_records(path)
    windows = [r for r in records if r.get("kind") == "train"]
    platform_line = next((r for r in records if r.get("kind") == "platform"), {})
    steady = windows[1:] if len(windows) > 1 else windows
    if not steady:
        return {}

    def med(key):
        return statistics.median(float(w[key]) for w in steady if w.get(key) is not None)

    keys = ("mfu", "tflops_per_device", "tokens_per_s", "samples_per_s", "s_per_step", "memory_gb", "loss",
            "syncs_per_step")
    numbers = {k: med(k) for k in keys if any(w.get(k) is not None for w in steady)}
    numbers.update(windows=len(windows), steps=max(w["step"] for w in windows),
                   compile=platform_line.get("compile"), first_window_s=windows[0].get("s_per_step"))
    return numbers


def phase_train(run: Run, data: dict, which: str) -> None:
    """``which``: train (the plan's first, most valuable run that fits) or train_other (its second)."""
    if not run.wanted(which):
        return
    index = 0 if which == "train" else 1
    fitting = [r for r in run.plan["runs"] if r.get("rows", 1) >= 1]  # a setting the estimate fits at all
    if index >= len(fitting):
        run.end(which, "skipped: the memory estimate allows no second setting")
        return
    setting = fitting[index]
    ckpt, rows = checkpointing_mode(setting["activation_checkpointing"]), setting["rows"]
    name = f"train_ckpt_{ckpt}"
    if not data:
        run.end(name, "skipped: no data")
        return
    timeout = run.fits(which, name)
    if not timeout:
        return
    out_dir = run.work / name
    sets, notes = trainer_sets(run, ckpt, rows, out_dir, data, run.plan.get("train_fields", []))
    follow = TrainLogFollower(run, name, out_dir / "logs" / "train.jsonl")
    code, text = run.sh(name, trainer_command(run, sets), timeout=timeout, on_line=follow)
    follow()
    numbers = trainer_numbers(out_dir)
    if numbers.get("memory_gb") and setting.get("estimate_gib"):
        numbers["peak_over_estimate"] = numbers["memory_gb"] / setting["estimate_gib"]
    checkpoints = sorted(p.name for p in (out_dir / "checkpoints").glob("iter_*"))
    platform_lines = [line.strip() for line in text.splitlines() if "platform: torch" in line]
    run.record("train", phase=name, activation_checkpointing=ckpt, rows=rows, estimate_gib=setting.get("estimate_gib"),
               numbers=numbers, notes=notes, checkpoints_written=checkpoints)
    run.end(name, run.phases[name]["status"], numbers=numbers, rows=rows, estimate_gib=setting.get("estimate_gib"),
            platform=platform_lines[0] if platform_lines else None, notes=notes, checkpoints_written=checkpoints)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # gigabytes at So16 (if any): only the log is kept


# --------------------------------------------------------------------------------------------------
# summary, from the results file alone


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list | None, rows: list[list]) -> list[str]:
    """Markdown table lines (``header`` None: rows only)."""
    lines = [] if header is None else ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def build_summary(out: Path) -> dict:
    """OUT/gpu_run_summary.md and .json from OUT/results.jsonl (whatever it holds: a killed run's records too)."""
    records = read_records(out / RESULTS)
    head = next((r for r in records if r["kind"] == "run"), {})
    env = next((r for r in records if r["kind"] == "env"), {})
    phases: dict[str, dict] = {}
    for r in records:
        if r["kind"] == "phase":
            phases[r["phase"]] = {k: v for k, v in r.items() if k not in ("kind", "source", "time", "phase")}
    steps = [r for r in records if r["kind"] == "step"]
    kernels = [r for r in records if r["kind"] == "kernel"]
    fp8 = [r for r in records if r["kind"] == "fp8_ratio"]
    design = [r for r in records if r["kind"] == "design_ratio"]
    trainer = [r for r in records if r["kind"] == "train"]
    calibration = [r for r in records if r["kind"] == "calibration"]
    install = next((r for r in records if r["kind"] == "install"), None)
    dry = head.get("dry_run", False)
    seconds = round(records[-1]["time"] - head["time"], 1) if head else None
    summary = {"dry_run": dry, "seconds": seconds, "budget": head.get("budget"), "env": env,
               "transformer_engine": env.get("transformer_engine_note"), "install": install, "phases": phases,
               "steps": steps, "fp8": fp8, "design": design, "kernels": kernels, "trainer": trainer,
               "calibration": calibration,
               "complete": any(r["kind"] == "done" for r in records)}
    lines = [f"# GPU run ({'DRY RUN on CPU, nothing timed' if dry else 'measured'})", "",
             f"environment: {json.dumps({k: v for k, v in env.items() if k not in ('kind', 'source', 'time')})}",
             f"Transformer Engine: {summary['transformer_engine']}",
             f"{seconds} s of a {head.get('budget')} s budget; "
             + ("finished" if summary["complete"] else "NOT finished (killed?): the records up to then"), ""]
    if install:
        lines += [f"install: mode {install.get('mode')}, {'ok' if install.get('ok') else install.get('error')}; torch "
                  f"{install.get('interpreter', {}).get('torch')} kept", ""]
    lines += _table(["phase", "status", "seconds", "budget"],
                    [[k, v.get("status"), v.get("seconds", "-"), v.get("budget", "-")] for k, v in phases.items()])
    lines += ["", "## gpu_bench: training steps (plain single-GPU step, torch AdamW on bf16 parameters; median of "
              "timed steps; estimate: the trainer's, with fp32 master weights and Adam state, so above a bench "
              "step's peak; syncs/step: one more step under torch.cuda.set_sync_debug_mode)", ""]
    lines += _table(["model", "variant", "rows", "ckpt", "s/step", "tokens/s", "samples/s", "TFLOP/s", "MFU",
                     "peak GiB", "estimate GiB", "syncs/step", "status"],
                    [[r["model"], r["variant"], r.get("rows", "-"),
                      checkpointing_mode(r.get("activation_checkpointing", "-")),
                      _f(r.get("step_s"), ".3f"), _f(r.get("tokens_s"), ".0f"), _f(r.get("samples_s"), ".1f"),
                      _f(r.get("tflops"), ".1f"), _pct(r.get("mfu")), _f(r.get("mem_gb"), ".1f"),
                      _f(r.get("estimate_gib"), ".1f"), r.get("syncs_per_step", "-"), r["status"]] for r in steps])
    for r in design:
        lines.append(f"\nissue #23's step ({r['model']}): {r['speedup']:.2f}x the speed of the step before it "
                     f"({r['after_step_s']:.3f} vs {r['before_step_s']:.3f} s/step)")
    for r in fp8:
        lines.append(f"\nFP8 ({r['model']}, {r['fp8']}): {r['speedup']:.2f}x the bf16 speed "
                     f"({r['fp8_step_s']:.3f} vs {r['bf16_step_s']:.3f} s/step)")
    lines += ["", "## cost model calibrated on this device (calibrate.py: the block's traced GEMMs replayed, a "
              "compiled pointwise kernel timed; predictions at the measured step's rows and checkpointing)", ""]
    def s_mfu(p: dict | None) -> str:
        return "-" if not p or not p.get("step_s") else f"{p['step_s']:.3f} ({_pct(p.get('mfu'))})"

    lines += _table(["model", "rows", "eta_gemm", "eta_hbm", "predicted s, MFU (judged)",
                     "predicted (measured eta)", "floor (measured eta)", "measured", "measured / predicted"],
                    [[r["model"], r["rows"], _f(r.get("eta_gemm"), ".3f"), _f(r.get("eta_hbm"), ".2f"),
                      s_mfu(r["judged"]), s_mfu(r["calibrated"]), s_mfu(r.get("calibrated_floor")),
                      s_mfu(r.get("measured")), _f(r.get("measured_over_calibrated"), ".2f")]
                     for r in calibration])
    lines += ["", "## kernels: flex and varlen vs dense SDPA (fp32 reference, real tokens), q/k/v in the model's layout", ""]
    lines += _table(["model", "kernel", "rows x tokens", "layout (q strides)", "out", "dq", "dk", "dv", "tolerance",
                     "pass", "ms", "dense ms"],
                    [[r["model"], r["kernel"], f"{r.get('rows', '-')} x {r.get('seq_length', '-')}",
                      (r.get("layout") or {}).get("q", "-"), *(_f(r.get(f"err_{x}"), ".1e") for x in
                                                              ("out", "dq", "dk", "dv")),
                      _f(r.get("tolerance"), ".0e"), r.get("passed", r.get("status")), _f(r.get("ms"), ".2f"),
                      _f(r.get("dense_ms"), ".2f")] for r in kernels])
    lines += ["", "## trainer (So16 stage-1 recipe, synthetic data, 1 GPU; medians over the log windows after the "
              "first; peak GiB: torch.cuda.max_memory_allocated, the process's RSS on CPU)", ""]
    header = ["activation checkpointing", "steps", "rows", "s/step", "tokens/s", "samples/s", "TFLOP/s", "MFU",
              "peak GiB", "estimate GiB", "syncs/step"]
    rows, notes = [], []
    for r in trainer:
        n = r.get("numbers") or {}
        ckpt = checkpointing_mode(r["activation_checkpointing"])
        rows.append([ckpt, n.get("steps", "-"), r["rows"], _f(n.get("s_per_step"), ".3f"),
                     _f(n.get("tokens_per_s"), ".0f"), _f(n.get("samples_per_s"), ".1f"),
                     _f(n.get("tflops_per_device"), ".1f"), _pct(n.get("mfu")), _f(n.get("memory_gb"), ".1f"),
                     _f(r.get("estimate_gib"), ".1f"), _f(n.get("syncs_per_step"), ".1f")])
        notes += [f"* checkpointing {ckpt}: {note}" for note in r.get("notes") or []]
    lines += _table(header, rows) + ([""] + notes if notes else [])
    lines += ["", "## gpu_bench", "", "(the tables above; every record in results.jsonl; output in gpu_run.log)"]
    (out / SUMMARY_MD).write_text("\n".join(lines) + "\n")
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        build_summary(Path(args.summarize))
        print((Path(args.summarize) / SUMMARY_MD).read_text(), flush=True)
        return 0
    run = Run(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through sh() (ends the child) to the summary
    run.say(f"{'DRY RUN on CPU' if args.dry_run else 'GPU run'}; budget {args.budget:.0f} s; out {run.out}")
    try:
        phase_env(run)
        phase_install(run)
        phase_benches_first(run)
        phase_plan(run)
        data = phase_data(run)
        phase_train(run, data, "train")
        bench(run, "baseline", ["--parts", "steps", "--models", "So16", "--variants", "baseline"])
        phase_train(run, data, "train_other")
        run.record("done", seconds=round(time.monotonic() - run.start, 1))
    finally:
        build_summary(run.out)
        run.log.close()
        print((run.out / SUMMARY_MD).read_text(), flush=True)
    failed = [k for k, v in run.phases.items() if not str(v.get("status", "")).startswith(("ok", "skipped", "cut"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
