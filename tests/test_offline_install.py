"""Offline (air-gapped) install: a wheelhouse built for this Python by tools/make_wheelhouse.sh installs with
``pip install --no-index --find-links WHEELHOUSE -r requirements-cluster.txt`` into a fresh environment that has
only torch (as a cluster image would), and the trainer then runs one step through the deepspeed launcher.

Slow (a fresh venv, the CPU torch wheel from disk, ~40 wheels): marked ``slow``; everything lives under the
test's tmp folder (pip's cache is off)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_harness import ROOT, build_test_dataset, command, launcher

pytestmark = pytest.mark.slow
MAX_MIB = 64


def _env(tmp: Path, offline: bool) -> dict:
    """The environment of the fresh venv's commands: no PYTHONPATH (the install must provide everything), caches
    under tmp; offline: no pip configuration at all (no index, no extra find-links), only the wheelhouse."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    if offline:
        e = {k: v for k, v in e.items() if not k.startswith("PIP_")}
        e.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    e.update(PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", TORCH_EXTENSIONS_DIR=str(tmp / "ext"),
             XDG_CACHE_HOME=str(tmp / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def _run(cmd: list[str], env: dict, timeout: int, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    print(f"{time.monotonic() - start:6.1f} s  {' '.join(Path(c).name if '/' in c else c for c in cmd[:5])}")
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


def test_offline_install_from_a_wheelhouse_then_one_training_step(tmp_path):
    house, venv = tmp_path / "wheelhouse", tmp_path / "venv"
    online = _env(tmp_path, offline=False)
    built = _run(["bash", str(ROOT / "tools" / "make_wheelhouse.sh"), str(house), "--max-mib", str(MAX_MIB)],
                 dict(os.environ, PIP_NO_CACHE_DIR="1"), timeout=300)
    wheels = sorted(p.name for p in house.glob("*.whl"))
    assert not [w for w in wheels if w.startswith("torch-")], "the wheelhouse must not carry torch"
    assert any(w.startswith("deepspeed-0.19.8-py3-none-any") for w in wheels), wheels  # built from the sdist
    size = sum(p.stat().st_size for p in house.glob("*.whl"))
    assert size <= MAX_MIB * 2**20 and f"{len(wheels)} wheels" in built.stdout

    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], online, timeout=120)
    py = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "-q"]  # this pip, installing into the venv
    # the CPU torch wheel on disk, by its exact local version: never a (CUDA) torch from an index
    _run(pip + ["--only-binary", "torch", f"torch=={torch.__version__}"], online, 300)
    offline = _env(tmp_path, offline=True)
    _run(pip + ["--no-index", "--find-links", str(house), "-r", "requirements-cluster.txt"], offline, timeout=300)
    probe = _run([py, "-c", "import torch, megatron_genlip as m; print('WHERE', torch.__version__, torch.__file__, "
                            "m.__file__)"], offline, 120).stdout
    where = next(line for line in probe.splitlines() if line.startswith("WHERE ")).split()[1:]
    assert where[0] == torch.__version__ and where[1].startswith(str(venv)) and where[2].startswith(str(ROOT))

    data = build_test_dataset(tmp_path / "data", 40, 8)
    cmd = command(1, data, tmp_path / "run", ["train.train_steps=1", "train.warmup_steps=0", "train.eval_rows=2",
                                                "train.eval_captions=1", "train.max_new_tokens=4"], runner=True)
    cmd = [str(venv / "bin" / "deepspeed")] + cmd[len(launcher()):]
    out = _run(cmd, offline, timeout=300).stdout
    assert "platform: torch" in out and "device cpu, compile off (CPU), dynamo disabled" in out, out[-2000:]
    assert re.search(r"step\s+1/1 \| loss", out) and "==== summary ====" in out, out[-2000:]
