"""benchmarks/gpu_bench.py --dry-run on CPU (every measurement in the results file, flex parity in the model's own
q/k/v layout with gradients, the synchronisation counter, rows from the memory estimate), and the GPU-only options
(te backend, FP8) failing clearly on CPU."""

from __future__ import annotations

import json
import os
import re
import warnings
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


def _gpu_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    return gpu_bench


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("gpu-bench") / "results.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--results", str(results)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines(), [json.loads(line) for line in results.read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(bench_run):
    return bench_run[0]


@pytest.mark.slow
def test_dry_run_checks_kernels_and_runs_every_variant(dry_run):
    text = "\n".join(dry_run)
    header = next(line for line in dry_run if line.startswith("gpu_bench:"))  # after library warnings, if any
    assert "no DeepSpeed engine" in header
    assert any(line.startswith("platform: torch") and "compile off (CPU)" in line for line in dry_run)
    for kernel in ("flex", "varlen"):
        line = next(line for line in dry_run if line.strip().startswith(f"{kernel}:"))
        assert "PASS" in line and "finite True" in line, line
        errors = [float(x) for x in re.findall(r"d?[qkvout]+ ([0-9.]+e[-+][0-9]+)", line)]
        assert len(errors) == 4 and max(errors) <= 1e-5, f"{kernel} vs dense relative errors {errors} (tolerance 1e-5)"
    for model in ("So16", "g16"):
        diff = re.search(rf"^{model}: first-step loss .* relative difference ([0-9.e+-]+)$", text, re.M)
        assert diff and float(diff.group(1)) <= 1e-5, f"{model}: ours vs baseline first loss (tolerance 1e-5)"
    assert "transformer_engine imported: False" in text


@pytest.mark.slow
def test_dry_run_prints_the_table_last(dry_run):
    header = max(i for i, line in enumerate(dry_run) if line.startswith("model ") and "MFU" in line)
    rows = dry_run[header + 2:]
    assert dry_run[header + 1].startswith("-----")
    assert [r.split()[0] for r in rows] == ["So16"] * 4 + ["g16"] * 4, rows
    assert "est GiB" in dry_run[header] and "syncs" in dry_run[header]
    for r in rows:
        model, rest = r.split(maxsplit=1)
        if "baseline" in rest or "(flex)" in rest or "(varlen)" in rest:
            assert rest.endswith(" ok") and re.search(r" 0\.\d{4} ", rest), r  # TF/step computed, not timed
        else:
            assert "fp8" in rest and "needs a CUDA GPU" in rest, r


@pytest.mark.slow
def test_dry_run_writes_every_measurement_to_the_results_file(bench_run):
    _, records = bench_run
    steps = [r for r in records if r["kind"] == "step"]
    assert [(r["model"], r["variant"]) for r in steps] == [
        (m, v) for m in ("So16", "g16")
        for v in ("ours fp32 (varlen)", "pre-#23 fp32 (flex)", "ours fp8 (torchao-tensorwise)", "baseline")]
    for r in steps:
        want = "full" if r["variant"].startswith("pre-#23") else "none"  # the step before #23 recomputes blocks
        assert r["rows"] == 2 and r["seq_length"] == 1100 and r["activation_checkpointing"] == want
        if r["status"] == "ok":  # the counter's code path: the stand-in warning of the one counted step
            assert r["syncs_per_step"] == 1 and r["flops"] > 0 and "step_s" not in r, r
    parity = [r for r in records if r["kind"] == "loss_parity"]
    assert [r["model"] for r in parity] == ["So16", "g16"] and all(r["relative_difference"] <= 1e-5 for r in parity)


@pytest.mark.slow
def test_kernel_parity_runs_in_the_models_own_layout_with_gradients(bench_run):
    """q, k, v as the layer hands them to its kernel: [L, B, h*hd] viewed [L, B, h, hd] and permuted to
    [B, h, L, hd], so strides (h*hd, hd, B*h*hd, 1), not contiguous; out and dq, dk, dv within 1e-5 (fp32)."""
    _, records = bench_run
    kernels = [r for r in records if r["kind"] == "kernel"]
    assert [(r["model"], r["kernel"]) for r in kernels] == [("So16", "flex"), ("So16", "varlen"), ("g16", "flex"),
                                                             ("g16", "varlen")]
    for r in kernels:
        B, h, hd = r["rows"], r["heads"], r["head_dim"]
        for name in "qkv":
            assert r["layout"][name] == [h * hd, hd, B * h * hd, 1], (name, r["layout"])
            assert r["contiguous"][name] is False
        errors = [r[f"err_{x}"] for x in ("out", "dq", "dk", "dv")]
        assert r["passed"] and r["finite"] and max(errors) <= r["tolerance"] == 1e-5, r


def test_model_qkv_is_what_the_layer_hands_its_kernel():
    """The captured q, k, v equal a recomputation from the layer's own projections, RoPE and view/permute."""
    gpu_bench = _gpu_bench()
    from megatron_genlip.model.layers import GatedSelfAttention
    from megatron_genlip.model.rope import apply_rotary

    cfg = load_config(gpu_bench.config_path("So16"), gpu_bench.DRY_RUN_SHAPES["So16"] + ["model.num_layers=1"])
    batch = gpu_bench.packed_rows(cfg.model.vocab_size, 600, 2, 0, torch.device("cpu"), mixed_grids=True)
    q, k, v = gpu_bench.model_qkv(cfg, batch, torch.device("cpu"), torch.float32, seed=0)
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        x = model.layers[0].layer_norm1(model.embed(batch["input_ids"], batch["token_kinds"], batch["patches"]))
        cos, sin = model.rotary(batch["positions"], x.dtype)
        attn = model.layers[0].self_attn
        heads = GatedSelfAttention._heads
        want = (apply_rotary(heads(attn, attn.q(x)), cos, sin), apply_rotary(heads(attn, attn.k(x)), cos, sin),
                heads(attn, attn.v(x)))
    for got, ref in zip((q, k, v), want):
        assert got.shape == ref.shape and got.stride() == ref.stride() and torch.equal(got, ref)


def test_sync_counter_counts_the_sync_warnings_only():
    gpu_bench = _gpu_bench()
    counter = gpu_bench.SyncCounter(cuda=False)
    counter.standin()  # outside counting(): nothing is emitted
    with counter.counting():
        counter.standin()
        warnings.warn("an unrelated warning")
        counter.standin()
    assert counter.count == 2 and sum(counter.sites.values()) == 2
    assert all(site.startswith("test_gpu_bench.py:") for site in counter.sites)
    with counter.counting():
        warnings.warn(gpu_bench.SYNC_MESSAGE, UserWarning)  # as torch.cuda.set_sync_debug_mode("warn") words it
    assert counter.count == 1


def test_sync_counter_on_cuda_switches_the_debug_mode_on_and_off(monkeypatch):
    gpu_bench = _gpu_bench()
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counter = gpu_bench.SyncCounter(cuda=True)
    with pytest.raises(RuntimeError):
        with counter.counting():
            counter.standin()  # nothing on CUDA: the real warnings come from torch
            warnings.warn(gpu_bench.SYNC_MESSAGE)
            raise RuntimeError("a failing step still restores the mode")
    assert modes == ["warn", 0] and counter.count == 1


def test_step_records_carry_the_fp8_ratio_and_the_memory_check(monkeypatch, tmp_path):
    """The GPU-only numbers (stubbed here): each variant's record, then the FP8/bf16 speed ratio and the #23 step's
    ratio to the step before it, are appended to the results file as they exist, with the peak memory against the
    estimate; the step before #23 runs eager, fully recomputed, with the reference loss; ours compiled."""
    gpu_bench = _gpu_bench()
    times = {"ours fp32 (varlen)": 1.0, "ours fp8 (torchao-tensorwise)": 0.8, "pre-#23 fp32 (flex)": 1.5}
    seen = []

    def fake_variant(args, cfg, batch, device, all_positions, deadline, peak, ckpt="none", compiled=False):
        before = cfg.model.loss_impl == "reference"
        label = next(label for label in times if (cfg.model.fp8 != "none") == ("fp8" in label)
                     and before == label.startswith("pre-#23"))
        seen.append((label, ckpt, compiled))
        t = times[label]
        return dict(loss=1.0, flops=1e12, step_s=t, tokens_s=1.0, samples_s=1.0 / t, tflops=1.0, mfu=0.5 / t,
                    mem_gb=0.2, syncs_per_step=3, timed=5)

    monkeypatch.setattr(gpu_bench, "run_variant", fake_variant)
    args = gpu_bench.parse_args(["--dry-run", "--models", "g16", "--variants", "bf16,fp8,pre23",
                                 "--results", str(tmp_path / "r.jsonl")])
    results = gpu_bench.Results(args.results, "test")
    rows = gpu_bench.step_rows(args, ["g16"], torch.device("cpu"), False, float("inf"), results)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert seen == [("ours fp32 (varlen)", "none", True), ("pre-#23 fp32 (flex)", "full", False),
                    ("ours fp8 (torchao-tensorwise)", "none", True)]
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["step", "step", "step", "design_ratio", "fp8_ratio"]
    assert records[3]["speedup"] == pytest.approx(1.5) and records[3]["before_mfu"] == pytest.approx(0.5 / 1.5)
    assert records[4]["speedup"] == pytest.approx(1.25) and records[4]["model"] == "g16"
    if "estimate_gib" in records[0]:  # the memory estimate is there
        assert records[0]["peak_over_estimate"] == pytest.approx(0.2 / records[0]["estimate_gib"])


def test_rows_come_from_the_memory_estimate():
    memory = pytest.importorskip("megatron_genlip.training.memory", reason="the memory estimate has not landed yet")
    gpu_bench = _gpu_bench()
    cfg = load_config(gpu_bench.config_path("So16"), ["model.params_dtype=bfloat16"])

    def need(rows, ckpt=False, all_positions=False, c=cfg):
        plan = memory.estimate_memory(c, world_size=1, micro_batch_size=rows, activation_checkpointing=ckpt)
        return gpu_bench.bench_step_bytes(plan, c, all_positions) / 2**30

    plan = gpu_bench.plan_rows(cfg, 0, max_rows=4, gpu_gib=70.0)
    rows = plan["rows"]
    assert 1 <= rows <= 4 and plan["activation_checkpointing"] == "none"
    assert need(rows) == pytest.approx(plan["estimate_gib"]) and plan["estimate_gib"] <= 70.0
    assert rows == 4 or need(rows + 1) > 70.0  # the most rows that fit
    assert plan["estimate_gib"] < plan["trainer_estimate_gib"]  # no fp32 master weights, bf16 Adam state
    assert "activations" in plan["estimate_components_gib"]
    assert gpu_bench.plan_rows(cfg, 3, 4, 70.0)["rows"] == 3  # asked for: as asked, with its estimate
    tiny = gpu_bench.plan_rows(cfg, 0, max_rows=4, gpu_gib=1.0)  # nothing fits: said, not an OOM later
    assert tiny["rows"] == 0 and "not even one row" in tiny["estimate"]
    # the official-style baseline also holds all-position logits: 14 bytes per position and vocabulary entry
    base = load_config(gpu_bench.config_path("So16"), ["model.attention=sdpa", "model.loss_chunk_size=0"])
    bplan = gpu_bench.plan_rows(base, 0, max_rows=4, gpu_gib=70.0, all_positions=True)
    extra = 14 * bplan["rows"] * 16383 * 151936 / 2**30
    assert bplan["estimate_gib"] == pytest.approx(need(bplan["rows"], bplan["activation_checkpointing"], False, base)
                                                  + extra) and bplan["estimate_gib"] <= 70.0
    trainer = gpu_bench.trainer_plan("examples/configs/stage1-So16.yaml", [], 4, 70.0)
    assert [r["activation_checkpointing"] for r in trainer["runs"]] == ["none", "selective", "full"]
    for r in trainer["runs"]:  # the trainer's own estimate, unchanged
        assert 1 <= r["rows"] <= 4 and r["estimate_gib"] <= 70.0
    assert {"sync_debug", "save_final", "save_interval"} <= set(trainer["train_fields"])


def test_variants_run_only_checkpointing_modes_the_trainer_accepts():
    """A variant's planned checkpointing mode is checked by the trainer's config: Transformer Engine refuses
    selective (its GEMMs are outside the dispatcher), so the row runs full; delayed FP8 refuses any
    checkpointing, so the row is refused, not timed."""
    gpu_bench = _gpu_bench()
    te = ["model.backend=te"]
    assert gpu_bench.accepted_checkpointing(TINY, [], "selective")[0] == "selective"
    assert gpu_bench.accepted_checkpointing(TINY, te, "selective")[0] == "full"
    mode, cfg = gpu_bench.accepted_checkpointing(TINY, te, "none")
    assert mode == "none" and cfg.train.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match=r"model\.fp8=delayed with train\.activation_checkpointing=full"):
        gpu_bench.accepted_checkpointing(TINY, te + ["model.fp8=delayed", "train.precision=bf16"], "full")


def test_help_describes_every_flag():
    gpu_bench = _gpu_bench()
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
    (["model.fp8=torchao-tensorwise", "train.precision=bf16", "parallel.zero_stage=3"],
     r"model\.fp8=torchao-tensorwise with parallel\.zero_stage=3: torchao's Float8Linear saves the whole weight"),
    (["model.backend=te", "model.fp8=delayed", "train.precision=bf16", "train.activation_checkpointing=full"],
     r"model\.fp8=delayed with train\.activation_checkpointing=full: a recomputed block would be quantized"),
    (["model.fp8=fp4"], r"model\.fp8 must be"),
    (["model.attention=flash"], r"model\.attention must be 'sdpa', 'flex' or 'varlen'"),
    (["model.loss_chunk_size=-1"], r"model\.loss_chunk_size must be >= 0"),
])
def test_fast_path_fields_are_validated(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TINY, overrides)


def test_fp8_combinations_that_stay_allowed():
    """The refusals above are narrow: delayed scaling without checkpointing, current scaling with full
    checkpointing and torchao under ZeRO-1/2 still load."""
    for sets in (["model.backend=te", "model.fp8=delayed", "train.activation_checkpointing=none"],
                 ["model.backend=te", "model.fp8=current", "train.activation_checkpointing=full"],
                 ["model.fp8=torchao-tensorwise", "parallel.zero_stage=2"]):
        load_config(TINY, sets + ["train.precision=bf16"])


def test_te_backend_without_transformer_engine_is_a_clear_error(monkeypatch):
    """On a CUDA machine without Transformer Engine (it has no PyPI wheel), model.backend=te says how to get it
    instead of failing with a bare ModuleNotFoundError. The CUDA decision is taken here by the platform record;
    transformer_engine really does not import on this machine."""
    import dataclasses
    import importlib.util

    from megatron_genlip import platform

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    cfg = load_config(TINY, ["model.backend=te"])
    monkeypatch.setattr(platform, "_CURRENT", dataclasses.replace(platform.current(), device_type="cuda"))
    assert platform.current().cuda
    with pytest.raises(ConfigError, match=r"model\.backend='te' needs Transformer Engine, which does not import "
                                          r"here \((ModuleNotFound|Import)Error"):
        get_layer_spec(cfg.model)


def test_torchao_spec_converts_only_the_block_projections():
    """torchao float8 conversion (works on CPU): the 8 block projections become Float8Linear, with the weights
    megatron-core's init gives; the LM head stays a plain linear."""
    from torchao.float8.float8_linear import Float8Linear

    from megatron_genlip.model.fp8 import TorchLinear, TorchLMHead, torchao_layer_spec

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
    assert type(head) is TorchLMHead and isinstance(head, TorchLinear)  # plain bf16 nn.Linear + the fused loss
