"""Helpers for tests that run the real trainer through the real ``deepspeed`` launcher."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_genlip.training.ports import free_port  # outside the ephemeral range (no connection takes it)

ROOT = Path(__file__).parent.parent
ENTRY = ROOT / "examples" / "pretrain_genlip.py"
TINY = ROOT / "examples" / "configs" / "tiny.yaml"


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def build_test_dataset(tmp: Path, num_train: int, num_val: int) -> dict[str, str]:
    """Synthetic shards (seed 11) indexed with the tiny config: {"train": prefix, "val": prefix}."""
    from megatron_genlip.config import load_config
    from megatron_genlip.data.builder import build_indexed_dataset
    from megatron_genlip.data.synthetic import write_shards

    cfg = load_config(TINY)
    out = {}
    for split, n in (("train", num_train), ("val", num_val)):
        shards = write_shards(str(tmp / "shards"), split, n, 100, seed=11)
        build_indexed_dataset(shards, str(tmp / split), cfg, progress=False)
        out[split] = str(tmp / split)
    return out


def launcher() -> list[str]:
    """The ``deepspeed`` console script installed next to this Python (the real launcher)."""
    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def node_launcher(nproc: int) -> list[str]:
    """DeepSpeed's per-node launcher (``deepspeed.launcher.launch``) for ``nproc`` local ranks, called the way the
    ``deepspeed`` runner calls it on a single node, minus the runner's own start-up (~4 s of imports per launch:
    the runner only resolves the hostfile and then starts this)."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def command(nproc: int, data: dict, out_dir: str | Path, overrides: list[str], runner: bool = False) -> list[str]:
    """The deepspeed launch of the trainer on the test dataset ``data`` ({"train": prefix, "val": prefix}).

    ``runner``: through the ``deepspeed`` console script (what users type), for tests of the runner's own
    behaviour (its process tree, its command line); otherwise through the per-node launcher it starts."""
    sets = [f"data.train_data={data['train']}", f"data.valid_data={data['val']}", f"train.output_dir={out_dir}",
            "train.progress_bar=never", "train.tensorboard=false", "data.num_workers=1", *overrides]
    if runner:
        cmd = [*launcher(), "--num_gpus", str(nproc), "--master_port", str(free_port())]
    else:
        cmd = node_launcher(nproc)
    cmd += [str(ENTRY), "--config", str(TINY)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run(nproc: int, data: dict, out_dir: str | Path, overrides: list[str], timeout: int = 300,
        check: bool = True, runner: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(nproc, data, out_dir, overrides, runner), env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def train_log(out_dir: str | Path, kind: str = "train") -> dict[int, dict]:
    """step -> the last record of that kind (a resumed run's records replace the killed run's)."""
    records: dict[int, dict] = {}
    path = Path(out_dir) / "logs" / "train.jsonl"
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            records[rec["step"]] = rec
    return records


def run_tool(script: str, args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``python tools/<script> ARGS`` from the repository root (one process, no launcher)."""
    e = env()
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], env=e, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# overrides for short test runs: a log line per step, no evaluation or save unless a test asks for one; the
# evaluation every run ends with is one held-out row and one 4-token caption (the tiny config's 16 rows and 64
# captions of up to 48 tokens take ~15 s of a 2-rank launch, ~30 s of a 1-rank one); later overrides win
SHORT = ["train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=100000", "train.save_interval=100000",
         "train.eval_rows=1", "train.eval_captions=1", "train.max_new_tokens=4"]


def losses(out_dir) -> list[float]:
    """The logged training losses of a run, in step order."""
    log = train_log(out_dir)
    return [log[s]["loss"] for s in sorted(log)]
