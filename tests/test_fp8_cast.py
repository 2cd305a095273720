"""torchao FP8 (model.fp8=torchao-tensorwise) casts an input shared by several projections once: q, gate, k, v read
LN1's output, fc1 and gate_fc LN2's (model/fp8.py ``shared_tensorwise_cast``). Run on CPU, where torch 2.13 has
``_scaled_mm`` for float8 (the trainer itself refuses FP8 without an FP8 GPU; this builds the block directly):
the shared cast gives bitwise the block's output and gradients of per-projection casts, with fewer amax
reductions (counted at the aten level)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import small_model_config

pytest.importorskip("torchao.float8")


class AmaxCounter(TorchDispatchMode):
    """Counts the abs-max reductions torchao's dynamic scaling runs (``max(abs(x))``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.amax.default, torch.ops.aten.max.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def build_block(shared: bool):
    from megatron_genlip.model import fp8
    from megatron_genlip.model.layers import TransformerBlock
    from megatron_genlip.model.spec import LOCAL_SPEC, parallel_config
    from megatron_genlip.parallel import state

    cfg = small_model_config(hidden_size=64, ffn_hidden_size=128, fp8="torchao-tensorwise", params_dtype="bfloat16")
    state.ensure_initialized(1)
    spec = fp8.torchao_layer_spec(cfg, LOCAL_SPEC)
    assert spec.shared_input_cast is fp8.shared_tensorwise_cast
    if not shared:
        spec = replace(spec, shared_input_cast=None)
    torch.manual_seed(0)
    return TransformerBlock(cfg, spec, parallel_config(cfg, 1), state.tensor_parallel_group(), 0).to(torch.bfloat16)


def run(block):
    L, B, d, hd = 24, 2, 64, 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(L, B, d, generator=g).to(torch.bfloat16).requires_grad_()
    cos, sin = torch.randn(B, L, hd, generator=g).to(torch.bfloat16), torch.randn(B, L, hd, generator=g).to(torch.bfloat16)
    mask = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    with AmaxCounter() as counter:
        y = block(x, cos, sin, mask)
    forward_amax = counter.count
    y.float().square().sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}, forward_amax


def test_shared_cast_is_bitwise_the_per_projection_cast_with_fewer_amax():
    y0, gx0, g0, n0 = run(build_block(shared=False))
    y1, gx1, g1, n1 = run(build_block(shared=True))
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    # per projection: 8 input casts + 8 weight casts; shared: the inputs of q/gate/k/v and fc1/gate_fc once each
    assert (n0, n1) == (16, 12)
