"""Per-block compilation (train.compile on CUDA; model/recompute.py ``compile_block``) checked on CPU with the
inductor backend: forward and gradients of the tiny model equal eager ones in every activation-checkpointing mode,
with the dense (sdpa) and the varlen attention,
one graph per mode for micro-batches packed differently (no recompilation), parameter names unchanged; and the fused
loss's element-wise chunk functions compiled equal to eager."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
# fp32 CPU: inductor fuses and reorders the element-wise work (fused layer norms, reductions in other orders)
TOL_LOSS = 1e-5
TOL_GRAD = 1e-4


@pytest.mark.slow
def test_compiled_blocks_equal_eager_without_recompiles():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_cases.py")], capture_output=True, text=True,
                          env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = result["errors"]
    assert len(errors) == 18  # 2 attention kernels x 3 modes x 3 micro-batches
    bad = {k: v for k, v in errors.items() if not (v["loss"] <= TOL_LOSS and v["grad"] <= TOL_GRAD)}
    assert not bad, f"compiled vs eager above loss {TOL_LOSS:g} / gradients {TOL_GRAD:g}: {bad}"
    # really compiled: graphs exist (forward graphs per mode; graph breaks would add more but never a recompile,
    # which error_on_recompile turns into a failure above)
    assert result["unique_graphs"] >= 6, result
    assert result["state_dict_equal_names"]
    # the fused loss's chunk functions compiled (dynamic lengths: one graph per function, no recompile)
    assert result["loss_graphs"] == 3, result
    # an eager block (ZeRO-3) keeps the outputs of the compiled attention under selective checkpointing: its
    # compiled code runs once, in forward (it ran again in backward before attention._compiled wrapped it)
    kept = result["kept_attention"]
    assert kept["selective"] == {"forward_runs": 1, "backward_runs": 0}, kept
    assert kept["none"] == {"forward_runs": 1, "backward_runs": 0} and kept["grad_err"] <= 1e-6, kept
    for rows, err in result["loss_kernels"].items():
        assert err["max"] == 0.0 and err["picked"] <= 1e-6 and err["sum_exp"] <= 1e-6, (rows, err)
        assert err["grad"] <= 1e-2, (rows, err)  # bf16 output: within its rounding


def test_trainer_compiles_every_block_except_under_zero3():
    """The trainer's wiring (training/trainer.py ``compile_blocks``): every transformer block gets its runners, the
    start-up line says how many; ZeRO-3 and train.compile=false leave them uncompiled, saying so. (On this CPU
    process dynamo is forced eager, so the runners run the same ops: the model's output is unchanged.)"""
    import torch

    from conftest import small_model_config
    from megatron_genlip.model import recompute
    from megatron_genlip.model.genlip import build_model
    from megatron_genlip.training.trainer import compile_blocks
    from tp_cases import packed_batch

    batch = packed_batch()
    model = build_model(small_model_config(num_layers=3), seed=0).train()
    expected = model(batch).loss.detach()
    assert "uncompiled" in compile_blocks(model, False, 1) and "ZeRO-3" in compile_blocks(model, True, 3)
    assert "model.backend=te" in compile_blocks(model, True, 1, "te")
    assert not any(hasattr(b, "compiled_runs") for b in recompute.blocks_of(model))
    assert compile_blocks(model, True, 1).startswith("3 transformer blocks compiled")
    assert all(set(b.compiled_runs) == set(recompute.MODES) for b in recompute.blocks_of(model))
    for mode in recompute.MODES:
        model.activation_checkpointing = mode
        assert torch.equal(model(batch).loss.detach(), expected)


def test_pipeline_block_stage_runs_its_compiled_runner():
    """A pipeline stage's block (model/stages.py BlockStage, whose forward takes the pipeline tuple) runs its
    compiled runner in training, built from the transformer block's own forward; evaluation runs eagerly (a
    compiled runner keeps the training shapes). Same output as without runners (dynamo is forced eager here)."""
    import torch

    from conftest import small_model_config
    from megatron_genlip.model import recompute
    from megatron_genlip.model.stages import BlockStage
    from megatron_genlip.parallel import state
    from tp_cases import packed_batch

    state.ensure_initialized(1)
    cfg = small_model_config()
    batch = packed_batch()
    B, L = batch["input_ids"].shape
    x = torch.randn(L, B, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    inputs = (x, batch["positions"], batch["sample_ids"], batch["token_kinds"], batch["labels"])
    eager = BlockStage(cfg, state.tensor_parallel_group(), 0, 0).train()
    staged = BlockStage(cfg, state.tensor_parallel_group(), 0, 0).train()
    recompute.compile_block(staged)
    calls = []
    for mode, run in list(staged.compiled_runs.items()):
        staged.compiled_runs[mode] = (lambda run, mode: lambda *a: (calls.append(mode), run(*a))[1])(run, mode)
    for mode in recompute.MODES:
        eager.activation_checkpointing = staged.activation_checkpointing = mode
        assert torch.equal(staged(inputs)[0], eager(inputs)[0])
    assert calls == list(recompute.MODES)
    staged.eval()
    staged(inputs)
    assert calls == list(recompute.MODES)  # not in evaluation
