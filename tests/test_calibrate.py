"""benchmarks/calibrate.py on CPU: the GEMMs it replays are the traced block's, operand for operand; it prices what
gpu_bench ran; its calibrated prediction is the cost model's at the measured efficiencies. No timing assertions
(on a CPU the measured efficiencies are meaningless; only the code paths and the bookkeeping are checked)."""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_genlip.config import ModelConfig
from megatron_genlip.training import cost

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, text_embed_dim=64,
                   vocab_size=448, mrope_section=[3, 3, 2], drop_path_rate=0.1)


@pytest.fixture(scope="module")
def calibrate():
    spec = importlib.util.spec_from_file_location("calibrate", ROOT / "benchmarks" / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # it puts benchmarks/ on sys.path for gpu_bench itself
    return module


def test_block_gemms_are_the_traced_block_operand_for_operand(calibrate):
    """Every GEMM FLOP of block 1 (forward, backward, no recomputation under selective checkpointing) is in a
    replayed group; each group, replayed on operands rebuilt from the traced views, gives the traced output shape,
    and the rebuilt operands keep the traced strides (the weight-gradient GEMMs' transposed operands)."""
    batch = cost.stage1_batch(rows=2, seq_length=1024, vocab_size=TINY.vocab_size, buffer_size=32, seed=1)
    trace = cost.trace_step(TINY, batch, checkpointing="selective", loss_impl="fused", attention="varlen")
    groups, skipped = calibrate.block_gemms(trace)
    traced = [op for op in trace.ops if op.kind == "gemm" and op.region == "block.1"]
    assert skipped == 0.0 and sum(g["count"] for g in groups) == len(traced)
    assert sum(g["count"] * g["flops"] for g in groups) == pytest.approx(sum(op.flops for op in traced), rel=1e-12)
    assert {"fwd", "bwd"} <= set().union(*(g["phases"] for g in groups))
    transposed = 0
    replayed = collections.Counter()
    for g in groups:
        tensors = [calibrate.operand(v, torch.device("cpu")) for v in g["views"]]
        replayed[(g["op"], tuple((tuple(t.shape), tuple(t.stride()), str(t.dtype)) for t in tensors))] += g["count"]
        out = getattr(torch.ops.aten, g["op"]).default(*tensors)
        assert tuple(out.shape) == tuple(g["out_shape"]), g
        transposed += any(not t.is_contiguous() for t in tensors)
    # the operands as rebuilt, GEMM for GEMM, are the traced ones (shape, strides, dtype)
    assert replayed == collections.Counter((op.name, tuple((r.view[1], r.view[2], r.view[3]) for r in op.reads))
                                           for op in traced)
    assert transposed > 0


def test_operand_rebuilds_broadcast_and_transposed_views(calibrate):
    bias = calibrate.operand((0, (8, 5), (0, 1), "torch.bfloat16"), torch.device("cpu"))
    assert bias.shape == (8, 5) and bias.stride() == (0, 1) and bias.dtype == torch.bfloat16
    assert torch.equal(bias[0], bias[7])  # one row, broadcast
    wt = calibrate.operand((0, (6, 4), (1, 6), "float32"), torch.device("cpu"))
    assert wt.stride() == (1, 6) and wt.t().is_contiguous()


def test_the_measured_step_is_the_last_ours_step_of_the_model(calibrate, tmp_path):
    path = tmp_path / "results.jsonl"
    records = [{"kind": "step", "model": "So16", "variant": "ours bf16 (varlen)", "status": "ok", "step_s": 2.0,
                "rows": 2, "activation_checkpointing": "none"},
               {"kind": "step", "model": "So16", "variant": "pre-#23 bf16 (flex)", "status": "ok", "step_s": 5.0},
               {"kind": "step", "model": "g16", "variant": "ours bf16 (varlen)", "status": "ok", "step_s": 4.0},
               {"kind": "step", "model": "So16", "variant": "ours fp8 (torchao-tensorwise)", "status": "ok",
                "step_s": 1.5},
               {"kind": "step", "model": "So16", "variant": "ours bf16 (flex)", "status": "OOM", "rows": 4}]
    path.write_text("\n".join(json.dumps(r) for r in records) + '\n{"kind": "step", "model": "So16", "vari')
    step = calibrate.measured_step(str(path), "So16")
    assert step["step_s"] == 2.0 and step["rows"] == 2
    assert calibrate.measured_step(str(path), "L16") is None and calibrate.measured_step(None, "So16") is None


def test_calibrated_prediction_is_the_cost_model_at_the_measured_efficiencies(calibrate, tmp_path):
    """calibrate() prices the step gpu_bench ran (its rows, checkpointing and kernel) twice: the block GEMMs'
    seconds scale exactly as judged eta_gemm / measured eta_gemm (kernel gaps apart) and the element-wise
    seconds as judged eta_hbm / measured eta_hbm."""
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"kind": "step", "model": "So16", "variant": "ours fp32 (varlen)", "status": "ok",
                                   "rows": 2, "activation_checkpointing": "full"}) + "\n")
    args = calibrate.build_parser().parse_args(["--dry-run", "--results", str(results), "--reps", "1",
                                                "--warmup", "1"])
    c = calibrate.calibrate("So16", args, torch.device("cpu"))
    assert c["rows"] == 2 and c["design"]["checkpointing"] == "full" and c["design"]["attention"] == "varlen"
    assert c["measured"]["step_s"] is None and "measured_over_calibrated" not in c  # a dry run times nothing
    a = cost.Assumptions()
    # block GEMM seconds = L x block FLOPs / (peak x eta) + kernels x gap: only the first term moves with eta
    flops = c["num_layers"] * c["block_gemm_flops"]
    moved = c["calibrated"]["components_s"]["block GEMMs"] - c["judged"]["components_s"]["block GEMMs"]
    assert moved == pytest.approx(flops / c["peak_bf16"] * (1 / c["eta_gemm"] - 1 / a.eta_gemm), rel=1e-9)
    # element-wise seconds = bytes / (HBM x eta) + kernels x gap
    ew = next(n for n in c["judged"]["components_s"] if n.startswith("block element-wise"))
    moved = c["calibrated"]["components_s"][ew] - c["judged"]["components_s"][ew]
    assert moved == pytest.approx(c["block_elementwise_bytes"] / c["hbm_bytes_per_s"]
                                  * (1 / c["eta_hbm"] - 1 / a.eta_hbm), rel=1e-9)
    assert c["calibrated_floor"]["step_s"] < c["calibrated"]["step_s"]
