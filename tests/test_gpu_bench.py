"""benchmarks/gpu_bench.py --dry-run on CPU, and the GPU-only options (te backend, FP8) failing clearly on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_model_config
from megatron_genlip.config import ConfigError, load_config
from megatron_genlip.model.genlip import build_model
from megatron_genlip.model.layers import TransformerBlock
from megatron_genlip.model.spec import LOCAL_SPEC, get_layer_spec, parallel_config
from megatron_genlip.parallel import state

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "gpu_bench.py"
TINY = ROOT / "examples" / "configs" / "tiny.yaml"
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")


@pytest.fixture(scope="module")
def dry_run():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(BENCH), "--dry-run"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_dry_run_checks_kernels_and_runs_every_variant(dry_run):
    text = "\n".join(dry_run)
    header = next(line for line in dry_run if line.startswith("gpu_bench:"))  # after library warnings, if any
    assert "no DeepSpeed engine" in header
    assert any(line.startswith("platform: torch") and "compile off (CPU)" in line for line in dry_run)
    flex = next(line for line in dry_run if line.strip().startswith("flex:"))
    assert "PASS" in flex and "finite True" in flex, flex
    errors = [float(x) for x in re.findall(r"d?[qkvout]+ ([0-9.]+e[-+][0-9]+)", flex)]
    assert len(errors) == 4 and max(errors) <= 1e-5, f"flex vs dense relative errors {errors} (tolerance 1e-5)"
    for model in ("So16", "g16"):
        diff = re.search(rf"^{model}: first-step loss .* relative difference ([0-9.e+-]+)$", text, re.M)
        assert diff and float(diff.group(1)) <= 1e-5, f"{model}: ours vs baseline first loss (tolerance 1e-5)"
    assert "transformer_engine imported: False" in text


@pytest.mark.slow
def test_dry_run_prints_the_table_last(dry_run):
    header = max(i for i, line in enumerate(dry_run) if line.startswith("model ") and "MFU" in line)
    rows = dry_run[header + 2:]
    assert dry_run[header + 1].startswith("-----")
    assert [r.split()[0] for r in rows] == ["So16"] * 3 + ["g16"] * 3, rows
    for r in rows:
        model, rest = r.split(maxsplit=1)
        if "baseline" in rest or "(flex)" in rest:
            assert rest.endswith(" ok") and re.search(r" 0\.\d{4} ", rest), r  # TF/step computed, not timed
        else:
            assert "fp8" in rest and "needs a CUDA GPU" in rest, r


def test_help_describes_every_flag():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    parser = gpu_bench.build_parser()
    help_text = parser.format_help()
    actions = [a for a in parser._actions if a.dest != "help"]
    assert len(actions) >= 15
    for action in actions:
        assert action.option_strings[0] in help_text and action.help, f"{action.option_strings} undocumented"
        if action.nargs != 0:  # a valued flag states its default
            assert "(default %(default)s)" in action.help, f"{action.option_strings[0]}: no default in help"


@CPU_ONLY
def test_te_backend_on_cpu_is_a_clear_error():
    cfg = load_config(TINY, ["model.backend=te"])
    with pytest.raises(ConfigError, match=r"model\.backend='te' needs a CUDA GPU"):
        get_layer_spec(cfg.model)
    assert "transformer_engine" not in sys.modules


@CPU_ONLY
@pytest.mark.parametrize("fp8", ["torchao-tensorwise", "torchao-rowwise"])
def test_fp8_on_cpu_is_a_clear_error(fp8):
    cfg = load_config(TINY, [f"model.fp8={fp8}", "train.precision=bf16"])
    with pytest.raises(ConfigError, match=rf"model\.fp8={fp8} needs a CUDA GPU with FP8 tensor cores"):
        build_model(cfg.model, seed=0)


@pytest.mark.parametrize("overrides, needle", [
    (["model.fp8=current"], r"model\.fp8=current .* needs model\.backend=te"),
    (["model.fp8=torchao-rowwise"], r"model\.fp8=torchao-rowwise needs train\.precision=bf16"),
    (["model.fp8=torchao-rowwise", "train.precision=bf16", "model.backend=te"], r"needs model\.backend=local"),
    (["model.fp8=torchao-tensorwise", "train.precision=bf16", "parallel.tensor_parallel=2"],
     r"needs parallel\.tensor_parallel=1"),
    (["model.fp8=fp4"], r"model\.fp8 must be"),
    (["model.attention=flash"], r"model\.attention must be 'sdpa' or 'flex'"),
    (["model.loss_chunk_size=-1"], r"model\.loss_chunk_size must be >= 0"),
])
def test_fast_path_fields_are_validated(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TINY, overrides)


def test_torchao_spec_converts_only_the_block_projections():
    """torchao float8 conversion (works on CPU): the 8 block projections become Float8Linear, with the weights
    megatron-core's init gives; the LM head stays a plain linear."""
    from torchao.float8.float8_linear import Float8Linear

    from megatron_genlip.model.fp8 import TorchLinear, torchao_layer_spec

    cfg = small_model_config(fp8="torchao-tensorwise")
    spec = torchao_layer_spec(cfg, LOCAL_SPEC)
    pconfig = parallel_config(cfg, 1)
    group = state.tensor_parallel_group()
    torch.manual_seed(3)
    block = TransformerBlock(cfg, spec, pconfig, group, 0)
    torch.manual_seed(3)
    reference = TransformerBlock(cfg, LOCAL_SPEC, pconfig, group, 0)
    projections = {n: type(m) for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in
                   ("q", "gate", "k", "v", "o", "fc1", "gate_fc", "fc2")}
    assert len(projections) == 8 and all(t is Float8Linear for t in projections.values()), projections
    ours, ref = block.state_dict(), reference.state_dict()
    for name, tensor in ref.items():
        if not name.endswith("_extra_state"):
            assert torch.equal(ours[name], tensor), f"{name}: torchao spec init differs from megatron-core's"
    head = spec.lm_head(cfg.text_embed_dim, cfg.vocab_size, bias=False, init_method=lambda w: None,
                        config=pconfig, tp_group=group)
    assert type(head) is TorchLinear
