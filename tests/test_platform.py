"""The one platform decision (megatron_genlip/platform.py): pure decisions for fake machines, what this process
decided, the DeepSpeed config read from it, and the scripts that no longer decide for it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_genlip import platform
from megatron_genlip.config import load_config, resolve_layout
from megatron_genlip.platform import Capabilities, PlatformError, decide
from megatron_genlip.training.ds_config import deepspeed_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "configs" / "tiny.yaml"
CPU = Capabilities(torch_version="2.13.0+cpu", cuda=False)
H200 = Capabilities(torch_version="2.11.0+cu130", cuda=True, device_name="NVIDIA H200", compute_capability=(9, 0),
                    triton=True)


def test_cpu_decision_never_compiles():
    for requested in (True, False):
        p = decide(CPU, compile=requested)
        assert (p.device_type, p.compile, p.dynamo_disabled) == ("cpu", False, True)
        assert not (p.pin_memory or p.fused_adamw or p.overlap_comm)
        assert p.optimizer_params() == {"torch_adam": True}


def test_cuda_decision_compiles_and_keeps_dynamo():
    p = decide(H200)
    assert (p.device_type, p.compile, p.dynamo_disabled) == ("cuda", True, False)
    assert p.pin_memory and p.fused_adamw and p.overlap_comm
    assert p.optimizer_params() == {"torch_adam": True, "fused": True}  # torch's fused AdamW, no JIT build
    assert p.zero_settings(2) == {"allgather_bucket_size": int(5e8), "overlap_comm": True,
                                  "contiguous_gradients": True, "reduce_bucket_size": int(5e8)}
    off = decide(H200, compile=False)  # train.compile=false: uncompiled on purpose, dynamo still available
    assert (off.compile, off.dynamo_disabled) == (False, False)
    assert "compile off (train.compile=false)" in off.describe()
    assert "device cuda (NVIDIA H200), compile on, dynamo enabled, pinned memory on" in p.describe()
    assert "ZeRO overlap on at stages 2-3" in p.describe() and "overlap_comm" not in p.zero_settings(1)


def test_cuda_without_triton_or_with_dynamo_disabled_is_a_clear_error():
    no_triton = dataclasses.replace(H200, triton=False)
    with pytest.raises(PlatformError, match="Triton is not importable.*train.compile=false"):
        decide(no_triton)
    assert not decide(no_triton, compile=False).compile
    env_off = dataclasses.replace(H200, dynamo_env_disabled=True)
    with pytest.raises(PlatformError, match="TORCHDYNAMO_DISABLE=1 is set.*Unset it"):
        decide(env_off)
    assert decide(dataclasses.replace(CPU, dynamo_env_disabled=True)).dynamo_disabled


@pytest.mark.parametrize("version, ok", [("2.10.1", False), ("2.11.0", True), ("2.11.0a0+git5e1f4b2", True),
                                         ("2.12.1+cu128", True), ("2.13.0+cpu", True), ("2.14.0", False),
                                         ("3.0.0", False)])
def test_supported_torch_range(version, ok):
    caps = Capabilities(torch_version=version, cuda=False)
    if ok:
        decide(caps)
    else:
        with pytest.raises(PlatformError, match=rf"torch {version} is not supported: .* torch 2\.11 to 2\.13"):
            decide(caps)


def test_this_process_decided_once_and_dynamo_is_off_on_cpu(monkeypatch):
    p = platform.current()
    assert p.torch_version == torch.__version__
    if p.cuda:
        pytest.skip("CUDA machine")
    assert not p.compile and p.dynamo_disabled
    # without start_process's TORCHDYNAMO_DISABLE (a library user who only calls initialize), torch.compile wraps the
    # function in dynamo: the stance alone must keep it eager
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    seen = []

    def f(x):
        # dynamo replays list side effects, so counting calls cannot tell compiled from eager; what the body sees can
        seen.append(torch.compiler.is_compiling())
        return x + 1

    compiled = torch.compile(f, backend="eager")  # under the "default" stance: [True, True]
    compiled(torch.ones(2))
    compiled(torch.ones(2))
    assert seen == [False, False], seen


START = """
import os, sys
from megatron_genlip import platform
print("SET", platform.start_process(), os.environ.get("TORCHDYNAMO_DISABLE"))
import megatron.core
from megatron.core.fusions.fused_bias_geglu import geglu
print("INDUCTOR", "torch._inductor.compile_fx" in sys.modules, "WRAPPED", hasattr(geglu, "_torchdynamo_orig_callable"))
"""


def test_start_process_keeps_import_time_compiles_away_from_inductor():
    """On CPU, platform.start_process() (every entry point's first step) makes megatron-core's import-time
    torch.compile decorators return the plain function, so no process pays for importing inductor (it did:
    torch._inductor.compile_fx was imported and geglu was dynamo's wrapper)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: start_process leaves compile alone")
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    proc = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("SET", "INDUCTOR")))
    assert lines["SET"] == "True 1"
    assert lines["INDUCTOR"] == "False WRAPPED False"


def test_start_process_leaves_a_cuda_machine_alone(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert platform.start_process() is False and "TORCHDYNAMO_DISABLE" not in os.environ


def test_deepspeed_config_reads_the_decision():
    cfg = load_config(TINY, ["parallel.zero_stage=2"])
    layout = resolve_layout(cfg, 2)
    cpu, gpu = deepspeed_config(cfg, layout, decide(CPU)), deepspeed_config(cfg, layout, decide(H200))
    assert cpu["optimizer"]["params"]["torch_adam"] and "fused" not in cpu["optimizer"]["params"]
    assert gpu["optimizer"]["params"]["torch_adam"] and gpu["optimizer"]["params"]["fused"] is True
    assert cpu["zero_optimization"]["overlap_comm"] is False and gpu["zero_optimization"]["overlap_comm"] is True
    assert "overlap_comm" not in deepspeed_config(load_config(TINY, ["parallel.zero_stage=1"]), layout,
                                                  decide(H200))["zero_optimization"]


def test_loader_settings():
    assert decide(H200).pin_memory and not decide(CPU).pin_memory  # the prefetch depth is data.prefetch_factor


def test_scripts_leave_dynamo_to_the_platform_decision():
    files = [ROOT / "examples" / "pretrain_genlip.sh", ROOT / ".ci" / "run", *ROOT.glob("examples/slurm/*.sbatch"),
             *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tools/*")]
    offenders = [str(f.relative_to(ROOT)) for f in files
                 if f.is_file() and f.name != Path(__file__).name and "TORCHDYNAMO_DISABLE" in f.read_text()]
    assert not offenders, offenders


@pytest.mark.slow
def test_dry_run_builds_the_meta_model_without_a_process_group_or_a_patch():
    """--dry-run (meta-device model) in a fresh process: no torch.distributed group, no megatron-core groups,
    no library patch; it prints this machine's platform decision."""
    code = (
        "import torch, torch.distributed as dist\n"
        "from megatron.core import parallel_state\n"
        "from megatron_genlip import compat\n"
        "from megatron_genlip.training.entry import main\n"
        f"info = main(['--config', {str(ROOT / 'examples/configs/stage1-So16.yaml')!r}, '--dry-run'])\n"
        "assert info['parameters']['total'] > 4e8, info['parameters']\n"
        "assert not dist.is_initialized(), 'a process group was created'\n"
        "assert not parallel_state.model_parallel_is_initialized(), 'megatron-core groups were created'\n"
        "assert not compat.applied(), compat.applied()\n"
        "print('PLATFORM', info['platform'])\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PLATFORM platform: torch" in proc.stdout
