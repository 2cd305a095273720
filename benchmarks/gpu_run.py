#!/usr/bin/env python3
"""The GPU measurement, as one prepared run on a machine with one NVIDIA GPU and no network (standard library
only until the install phase has run):

  1. env       Python, torch, GPU, Triton, Transformer Engine (measured only where it is installed: said plainly)
  2. install   a venv that sees the image's torch (--system-site-packages), then
               ``pip install --no-index --find-links WHEELHOUSE -r requirements-cluster.txt``
  3. data      synthetic 224 px captioned shapes -> an indexed dataset with the So16 recipe's data settings
  4. bench     ``benchmarks/gpu_bench.py``: flex vs dense parity, So16 and g16 steps on 16384-token rows, bf16 and
               torchao FP8, MFU, peak memory, ratio to the official-style baseline
  5. train     the real trainer, ``deepspeed --num_gpus 1 examples/pretrain_genlip.py``, So16 stage-1 recipe on
               the synthetic data, 30 steps with activation checkpointing on, then off; MFU from its own log

Every phase runs under a share of one wall-clock budget (--budget, default 540 s = 9 minutes); a phase that no
longer fits is reported as skipped. Logs and a summary (``gpu_run_summary.md``, ``gpu_run_summary.json``) are
written to --out (``$OUT`` on the device machine: at most 8 files come back). ``--dry-run`` runs every phase on
the CPU with tiny shapes, no timings and no budget (CI), installing only as a pip dry run when --wheelhouse is
given.

  python3 benchmarks/gpu_run.py --wheelhouse wheelhouse --out "$OUT"          # on the GPU machine
  python3 benchmarks/gpu_run.py --dry-run --out /tmp/gpu-run                  # on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "examples/configs/stage1-So16.yaml"
# phase -> (share of the budget it may take at most, seconds it needs at least to be worth starting)
PHASES = {"install": (120, 20), "data": (90, 10), "bench": (240, 60), "train": (130, 45)}
DRY_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
             "model.num_attention_heads=4", "model.text_embed_dim=64", "model.mrope_section=[3,3,2]",
             "data.seq_length=1024", "data.max_sample_length=1024", "data.pack_buffer_size=64"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheelhouse", default=None,
                   help="folder made by tools/make_wheelhouse.sh for this Python; install is skipped without it "
                        "(default %(default)s)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_run_out"),
                   help="folder for logs and the summary (default: $OUT, else %(default)s)")
    p.add_argument("--work", default="/tmp/genlip-gpu-run",
                   help="scratch folder: venv, data, trainer outputs (default %(default)s)")
    p.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for everything (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="trainer steps per run (default %(default)s)")
    p.add_argument("--rows", type=int, default=4,
                   help="16384-token rows per trainer step (micro-batch; no accumulation) (default %(default)s)")
    p.add_argument("--train-samples", type=int, default=2000,
                   help="synthetic training samples (rows cycle over epochs) (default %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="every phase on CPU with tiny shapes and no timings (default %(default)s)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.rows, args.train_samples = 2, 1, 24
    return args


class Run:
    """Phases under one deadline, each logged to OUT/<phase>.log, results collected for the summary."""

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
        self.python = sys.executable
        self.results: dict = {"dry_run": args.dry_run, "phases": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        print(f"[gpu_run {time.monotonic() - self.start:5.0f} s] {text}", flush=True)

    def fits(self, phase: str, name: str | None = None, reserve: float = 0.0) -> float:
        """The seconds ``phase`` may take now, keeping ``reserve`` seconds for later phases, or 0 (recorded as
        skipped) if it no longer fits."""
        most, least = PHASES[phase]
        if self.args.dry_run:  # code paths on a (shared) CPU, not timings: generous, budget not enforced
            return 4.0 * most
        allowed = min(most, self.left() - 5 - reserve)
        if allowed < least:
            self.results["phases"][name or phase] = {"status": f"skipped: {self.left():.0f} s of the budget left"}
            self.say(f"{name or phase}: skipped ({self.left():.0f} s left)")
            return 0.0
        return allowed

    def sh(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        """Run ``cmd``, tee its output to OUT/<name>.log; (exit code, output). A timeout kills it (code 124)."""
        self.say(f"{name}: {' '.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''} (at most {timeout:.0f} s)")
        began = time.monotonic()
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        with open(self.out / f"{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, process_group=0)  # its own group (killable), same session
            lines = []
            try:
                for line in _lines_until(proc, began + timeout):
                    log.write(line)
                    lines.append(line)
                code = proc.wait(timeout=max(1.0, began + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = 124
            if code == 124 or proc.poll() is None:
                _kill(proc)
                code = 124
                log.write(f"\n[gpu_run] killed after {timeout:.0f} s\n")
        seconds = time.monotonic() - began
        self.results["phases"].setdefault(name, {}).update(status="ok" if code == 0 else f"exit {code}",
                                                           seconds=round(seconds, 1))
        self.say(f"{name}: {'ok' if code == 0 else f'exit code {code}'} in {seconds:.0f} s")
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
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------------
# phases


def phase_env(run: Run) -> None:
    probe = ("import importlib.util, json, platform, sys, torch\n"
             "cuda = torch.cuda.is_available()\n"
             "print('ENV ' + json.dumps({'python': platform.python_version(), 'torch': torch.__version__,\n"
             "  'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if cuda else None,\n"
             "  'triton': importlib.util.find_spec('triton') is not None,\n"
             "  'transformer_engine': importlib.util.find_spec('transformer_engine') is not None}))\n")
    code, text = run.sh("env", [run.python, "-c", probe], timeout=60)
    info = next((json.loads(line[4:]) for line in text.splitlines() if line.startswith("ENV ")), {})
    run.results["env"] = info
    if not info.get("gpu") and not run.args.dry_run:
        raise SystemExit("gpu_run: no CUDA device here; use --dry-run on a CPU machine")
    te = info.get("transformer_engine")
    run.results["transformer_engine"] = (
        "installed: its attention kernel (te-arbitrary) is compared with the dense reference in the bench phase; "
        "TE layers and TE FP8 training steps are not in this 9-minute plan (run gpu_bench.py --backend te)" if te else
        "NOT installed on this machine, so nothing of Transformer Engine (te backend, TE FP8) was measured; "
        "its core wheel (264 MiB) is larger than what one call to the machine can carry")
    run.say(f"Transformer Engine: {run.results['transformer_engine']}")


def phase_install(run: Run) -> None:
    """A venv over the image's packages (torch, Triton stay the image's), the wheelhouse installed offline."""
    wheelhouse = run.args.wheelhouse
    if not wheelhouse:
        run.results["phases"]["install"] = {"status": "skipped: no --wheelhouse (using this interpreter's packages)"}
        run.say("install: skipped (no --wheelhouse)")
        return
    house = str(Path(wheelhouse).resolve())
    offline = dict(os.environ, PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
                   PIP_NO_CACHE_DIR="1")
    pip = [run.python, "-m", "pip", "install", "--no-index", "--find-links", house, "-r", "requirements-cluster.txt"]
    if run.args.dry_run:  # resolve against the wheelhouse and this interpreter, install nothing
        run.sh("install", pip + ["--dry-run", "--ignore-installed", "--no-deps"], timeout=run.fits("install"))
        return
    venv = run.work / "venv"
    timeout = run.fits("install")
    if not timeout:
        return
    code, _ = run.sh("venv", [run.python, "-m", "venv", "--system-site-packages", str(venv)], timeout=60)
    if code == 0:
        run.python = str(venv / "bin" / "python")
        pip[0] = run.python
        run.sh("install", pip + ["-q"], timeout=timeout, env=offline)


def phase_data(run: Run) -> dict:
    """Synthetic shards and their indexed dataset (the recipe's tokenizer and image size)."""
    timeout = run.fits("data")
    if not timeout:
        return {}
    shards, prefix = run.work / "shards", run.work / "indexed" / "train"
    workers = str(max(1, min(16, (os.cpu_count() or 2) - 1)))
    code, _ = run.sh("data", [run.python, "tools/make_synthetic_data.py", "--out-dir", str(shards), "--num-train",
                              str(run.args.train_samples), "--num-val", "1", "--image-size", "224", "--image-format",
                              "jpg", "--samples-per-shard", "125"], timeout=timeout)
    if code != 0:
        return {}
    overrides = [x for o in (DRY_MODEL if run.args.dry_run else []) for x in ("--set", o)]
    code, _ = run.sh("preprocess", [run.python, "tools/preprocess_data.py", "--config", RECIPE, *overrides,
                                    "--input", str(shards / "train-*.tar"), "--output-prefix", str(prefix),
                                    "--workers", workers, "--no-progress"], timeout=max(10.0, run.fits("data")))
    return {"train": str(prefix)} if code == 0 else {}


def phase_bench(run: Run) -> None:
    timeout = run.fits("bench", reserve=2 * PHASES["train"][0] * 0.8)  # the trainer runs come after it
    if not timeout:
        return
    cmd = [run.python, "benchmarks/gpu_bench.py"]
    # dry run: So16 only (tests/test_gpu_bench.py dry-runs both models)
    cmd += ["--dry-run", "--models", "So16"] if run.args.dry_run else ["--max-seconds", str(int(timeout - 30))]
    code, text = run.sh("bench", cmd, timeout=timeout)
    # the table comes last; a run cut short still printed one line per variant
    table = text[text.rfind("\nsummary"):] if "\nsummary" in text else "\n".join(text.splitlines()[-40:])
    run.results["bench_table"] = table.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(run: Run, data: dict, checkpointing: bool, out_dir: Path) -> list[str]:
    """The real trainer through the deepspeed launcher: the So16 stage-1 recipe, synthetic data, no evaluation."""
    rows = run.args.rows
    sets = [f"data.train_data={data['train']}", "data.valid_data=null", f"train.output_dir={out_dir}",
            f"train.train_steps={run.args.steps}", f"train.warmup_steps={min(5, run.args.steps - 1)}",
            f"train.micro_batch_size={rows}",
            f"train.global_batch_size={rows}", f"train.log_interval={1 if run.args.dry_run else 5}",
            "train.save_interval=1000000", f"train.activation_checkpointing={str(checkpointing).lower()}",
            "train.tensorboard=false", "train.progress_bar=never", "data.num_workers=4",
            "data.build_missing_pack_index=true"]  # the recipe expects it built ahead; this small set builds at start
    if run.args.dry_run:
        sets += DRY_MODEL + ["data.num_workers=1", "train.peak_tflops=0.1", "train.precision=fp32"]
    launcher = Path(run.python).parent / "deepspeed"
    head = [str(launcher)] if launcher.exists() else [run.python, "-m", "deepspeed.launcher.runner"]
    cmd = head + ["--num_gpus", "1", "--master_port", str(_free_port()), "examples/pretrain_genlip.py",
                  "--config", RECIPE]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def trainer_numbers(out_dir: Path, dry_run: bool) -> dict:
    """MFU, throughput and memory from the trainer's own log (train.jsonl), past the first (compiling) window."""
    path = out_dir / "logs" / "train.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    windows = [r for r in records if r.get("kind") == "train"]
    platform_line = next((r for r in records if r.get("kind") == "platform"), {})
    steady = windows[1:] if len(windows) > 1 else windows
    if not steady:
        return {}

    def med(key):
        return statistics.median(float(w[key]) for w in steady)

    keys = ("mfu", "tflops_per_device", "tokens_per_s", "samples_per_s", "s_per_step", "memory_gb", "loss")
    numbers = {k: med(k) for k in keys if k in steady[0]}
    numbers.update(windows=len(windows), steps=max(w["step"] for w in windows),
                   compile=platform_line.get("compile"), first_window_s=windows[0].get("s_per_step"))
    return numbers


def phase_train(run: Run, data: dict) -> None:
    for checkpointing in (True, False):
        name = f"train_ckpt_{'on' if checkpointing else 'off'}"
        timeout = run.fits("train", name, reserve=PHASES["train"][1] if checkpointing else 0.0)
        if not timeout or not data:
            if not data:
                run.results["phases"][name] = {"status": "skipped: no data"}
            continue
        out_dir = run.work / name
        code, text = run.sh(name, trainer_command(run, data, checkpointing, out_dir), timeout=timeout)
        numbers = trainer_numbers(out_dir, run.args.dry_run)
        platform_lines = [line for line in text.splitlines() if "platform: torch" in line]
        run.results["phases"][name].update(numbers=numbers, platform=platform_lines[0].strip() if platform_lines
                                           else None)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # gigabytes at So16; only the log is kept


def write_summary(run: Run) -> None:
    r = run.results
    r["seconds"] = round(time.monotonic() - run.start, 1)
    lines = [f"# GPU run ({'DRY RUN on CPU, nothing timed' if r['dry_run'] else 'measured'})", "",
             f"environment: {json.dumps(r.get('env', {}))}", f"Transformer Engine: {r.get('transformer_engine')}",
             f"total {r['seconds']:.0f} s of a {run.args.budget:.0f} s budget", "", "| phase | status | seconds |",
             "|---|---|---|"]
    lines += [f"| {k} | {v.get('status')} | {v.get('seconds', '-')} |" for k, v in r["phases"].items()]
    lines += ["", "## trainer (So16 stage-1 recipe, synthetic data, 1 GPU; medians over the log windows after the first)",
              "", "| activation checkpointing | steps | s/step | tokens/s | samples/s | TFLOP/s | MFU | peak GB |",
              "|---|---|---|---|---|---|---|---|"]
    for ckpt in ("on", "off"):
        n = r["phases"].get(f"train_ckpt_{ckpt}", {}).get("numbers") or {}
        if n:
            lines.append(f"| {ckpt} | {n['steps']} | {n.get('s_per_step', 0):.3f} | {n.get('tokens_per_s', 0):.0f} | "
                         f"{n.get('samples_per_s', 0):.1f} | {n.get('tflops_per_device', 0):.1f} | "
                         f"{100 * n.get('mfu', 0):.1f}% | {n.get('memory_gb', 0):.1f} |")
        else:
            lines.append(f"| {ckpt} | - | - | - | - | - | - | - |")
    lines += ["", "## gpu_bench", "", "```", r.get("bench_table") or "(no table)", "```"]
    (run.out / "gpu_run_summary.md").write_text("\n".join(lines) + "\n")
    (run.out / "gpu_run_summary.json").write_text(json.dumps(r, indent=1))
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)
    run.say(f"{'DRY RUN on CPU' if args.dry_run else 'GPU run'}; budget {args.budget:.0f} s; out {run.out}")
    phase_env(run)
    phase_install(run)
    data = phase_data(run)
    phase_bench(run)
    phase_train(run, data)
    write_summary(run)
    failed = [k for k, v in run.results["phases"].items() if not str(v.get("status", "")).startswith(("ok", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
