"""Transformer Engine's fused modules under the model's names (model/te_fused.py, ``model.te_fused``).

TE cannot run on a CPU, so the TE classes themselves (model/te_spec.py) are not built here. What is tested is
everything they rest on: the parameter holders give the model exactly the local backend's parameters (names,
values, tensor-parallel attributes, at TP=1 and TP=2), a TE-style module reading shared parameters sees the
model's tensors and sends its gradients to them (also after a deep copy), the fc1 stacking follows TE's SwiGLU
convention, and the one layout the holders cannot serve (ZeRO-3) is refused at start-up.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import small_model_config
from dist_harness import run_ranks
from megatron_genlip.config import ConfigError, load_config, resolve_layout
from megatron_genlip.model.te_fused import (FUSED_EXTRA_STATE, LinearParams, NormParams, SharedParameters, SwiGLUStack,
                                            allow_missing_extra_state, swiglu_stack)

TINY = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny.yaml"


def holder_spec():
    """The TE fused spec's parameter side on CPU: every block norm and projection a holder (in the TE spec, o is a
    real te.Linear; its row holder twin here is fc2's class)."""
    from megatron_genlip.model.spec import LOCAL_SPEC

    return replace(LOCAL_SPEC, column_linear=functools.partial(LinearParams, parallel_mode="column"),
                   row_linear=functools.partial(LinearParams, parallel_mode="row"), block_norm=NormParams)


def build_pair(tp: int):
    """(local model, model with holder blocks), same config and seed, on megatron-core's TP group of size tp."""
    from megatron_genlip.model import genlip

    cfg = small_model_config()
    local = genlip.build_model(cfg, tp, seed=3)
    original = genlip.get_layer_spec
    genlip.get_layer_spec = lambda c: holder_spec()
    try:
        held = genlip.build_model(cfg, tp, seed=3)
    finally:
        genlip.get_layer_spec = original
    return local, held


def compare_models(local, held) -> list[str]:
    problems = []
    ls, hs = local.state_dict(), held.state_dict()
    if list(ls) != list(hs):
        problems.append(f"state_dict keys differ: {sorted(set(ls) ^ set(hs))}")
    for name, value in ls.items():
        other = hs.get(name)
        if isinstance(value, torch.Tensor) and (other is None or other.shape != value.shape
                                                or not torch.equal(other, value)):
            problems.append(f"{name}: holder value differs")
    lp, hp = dict(local.named_parameters()), dict(held.named_parameters())
    if list(lp) != list(hp):
        problems.append("named_parameters order differs")
    for name, p in lp.items():
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if getattr(p, attr, None) != getattr(hp[name], attr, None):
                problems.append(f"{name}.{attr}: {getattr(p, attr, None)} != {getattr(hp[name], attr, None)}")
    return problems


def test_holders_give_the_local_models_parameters_at_tp1():
    local, held = build_pair(1)
    assert compare_models(local, held) == []
    block = held.layers[0]
    assert isinstance(block.layer_norm1, NormParams) and isinstance(block.self_attn.gate, LinearParams)
    x = torch.randn(3, 2, held.cfg.hidden_size)
    assert block.layer_norm2(x) is x  # the fused module that reads it applies the norm
    assert not isinstance(held.ln_post, NormParams)  # ln_post is not a block norm: it stays a LayerNorm
    with pytest.raises(RuntimeError, match="only holds a projection's parameters"):
        block.mlp.fc1(x)


def holders_match_at_tp2(rank: int, world: int) -> None:
    from megatron_genlip.parallel import state

    state.reinitialize(2)
    local, held = build_pair(2)
    problems = compare_models(local, held)
    assert problems == [], problems
    q = held.layers[0].self_attn.q.weight
    assert q.shape[0] == held.cfg.hidden_size // 2 and q.tensor_model_parallel and q.partition_dim == 0
    fc2 = held.layers[0].mlp.fc2
    assert fc2.weight.partition_dim == 1 and not getattr(fc2.bias, "tensor_model_parallel", False)


def test_holders_give_the_local_models_shards_at_tp2():
    run_ranks(2, "test_te_fused", "holders_match_at_tp2")


class TEBase(torch.nn.Module):
    """Parameters under Transformer Engine's names, read with getattr as TE's modules read them, and a
    reset_parameters that (like TE's, on shared tensors) must not run once they are shared."""

    def __init__(self, d: int, f: int):
        super().__init__()
        for name, shape in (("layer_norm_weight", (d,)), ("layer_norm_bias", (d,)), ("q_weight", (d, d)),
                            ("q_bias", (d,)), ("fc1_weight", (2 * f, d)), ("fc1_bias", (2 * f,))):
            self.register_parameter(name, torch.nn.Parameter(torch.full(shape, 7.0)))

    def reset_parameters(self):
        raise RuntimeError("TE-style reset of its own parameters")

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias)
        q = torch.nn.functional.linear(h, self.q_weight, self.q_bias)
        return torch.nn.functional.linear(q, self.fc1_weight, self.fc1_bias)


class TEStyle(SharedParameters, TEBase):
    """As the TE classes of model/te_spec.py: the mixin first, the TE module after it."""


class Owner(torch.nn.Module):
    def __init__(self, d=6, f=5):
        super().__init__()
        from megatron_genlip.model.spec import parallel_config

        cfg = small_model_config()
        common = dict(bias=True, init_method=torch.nn.init.normal_, config=parallel_config(cfg, 1), tp_group=None)
        self.norm = NormParams(d, 1e-6)
        self.q, self.gate, self.up = LinearParams(d, d, **common), LinearParams(d, f, **common), \
            LinearParams(d, f, **common)
        self.fused = TEStyle(d, f)
        self.fused.share({"layer_norm_weight": self.norm.weight, "layer_norm_bias": self.norm.bias,
                          "q_weight": self.q.weight, "q_bias": self.q.bias,
                          "fc1_weight": SwiGLUStack(self.gate, self.up, "weight"),
                          "fc1_bias": SwiGLUStack(self.gate, self.up, "bias")})

    def reference(self, x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], self.norm.weight, self.norm.bias)
        q = torch.nn.functional.linear(h, self.q.weight, self.q.bias)
        w = torch.cat((self.gate.weight, self.up.weight))
        return torch.nn.functional.linear(q, w, torch.cat((self.gate.bias, self.up.bias)))


def test_shared_parameters_read_and_train_the_models_tensors():
    torch.manual_seed(0)
    owner = Owner()
    fused = owner.fused
    assert list(dict(fused.named_parameters())) == []  # TE's own parameters are gone: nothing counted twice
    assert fused.q_weight is owner.q.weight and fused.layer_norm_bias is owner.norm.bias
    assert torch.equal(fused.fc1_weight, torch.cat((owner.gate.weight, owner.up.weight)))
    # each tensor once, under the model's name; the holders write megatron-core's (None) extra state
    assert list(owner.state_dict()) == ["norm.weight", "norm.bias"] + [
        f"{m}.{k}" for m in ("q", "gate", "up") for k in ("weight", "bias", "_extra_state")]
    x = torch.randn(4, 6)
    fused(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in owner.named_parameters()}
    owner.zero_grad()
    owner.reference(x).square().sum().backward()
    for n, p in owner.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=0, msg=n)  # the same graph: bitwise
    # a deep copy (e.g. an evaluation copy) reads its own holders, not the original's
    twin = copy.deepcopy(owner)
    assert twin.fused.q_weight is twin.q.weight and twin.fused.q_weight is not owner.q.weight
    with torch.no_grad():
        twin.gate.weight.add_(1.0)
    assert torch.equal(twin.fused.fc1_weight[:5], twin.gate.weight)
    assert not torch.equal(twin.fused.fc1_weight[:5], owner.gate.weight)


def test_sharing_an_unknown_parameter_names_what_exists():
    module = TEStyle(2, 2)
    with pytest.raises(KeyError, match="no parameter 'k_weight'.*layer_norm_weight"):
        module.share({"k_weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("tp", [1, 2])
def test_fc1_stack_follows_te_swiglu_convention(tp):
    """TE's gated activations: SwiGLU(a, b) = SiLU(a) * b on the first and second half of fc1's output
    (transformer_engine/pytorch/ops/basic/swiglu.py). Each TP rank stacks its own gate and up rows."""
    torch.manual_seed(1)
    d, f = 8, 12
    x = torch.randn(5, d, dtype=torch.float64)
    gate_w, up_w = torch.randn(f, d, dtype=torch.float64), torch.randn(f, d, dtype=torch.float64)
    gate_b, up_b = torch.randn(f, dtype=torch.float64), torch.randn(f, dtype=torch.float64)
    local = torch.nn.functional.silu(x @ gate_w.T + gate_b) * (x @ up_w.T + up_b)  # layers.SwiGLU before fc2
    parts = []
    for r in range(tp):
        rows = slice(r * f // tp, (r + 1) * f // tp)
        h = x @ swiglu_stack(gate_w[rows], up_w[rows]).T + swiglu_stack(gate_b[rows], up_b[rows])
        a, b = h.chunk(2, dim=-1)
        parts.append(torch.nn.functional.silu(a) * b)
    torch.testing.assert_close(torch.cat(parts, dim=-1), local, rtol=0, atol=1e-12)
    assert swiglu_stack(None, None) is None


def test_zero3_with_fused_te_modules_is_refused_naming_the_fields():
    cfg = load_config(TINY, ["model.backend=te", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="model.te_fused=true and parallel.zero_stage=3"):
        resolve_layout(cfg, 1)
    resolve_layout(load_config(TINY, ["model.backend=te", "model.te_fused=false", "parallel.zero_stage=3"]), 1)
    resolve_layout(load_config(TINY, ["parallel.zero_stage=3"]), 1)  # the local backend is unaffected


def test_reset_after_sharing_leaves_the_holders_alone():
    module = TEStyle(2, 2)
    with pytest.raises(RuntimeError, match="TE-style reset"):
        module.reset_parameters()  # before sharing: the module's own
    owner = Owner()
    before = owner.q.weight.clone()
    owner.fused.reset_parameters()
    assert torch.equal(owner.q.weight, before)


class WithFP8State(torch.nn.Module):
    """A module with TE-style extra state (FP8 scaling metadata) and one parameter of its own."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(2))
        self.state = "fresh"
        self.register_load_state_dict_post_hook(allow_missing_extra_state)

    def get_extra_state(self):
        return {"amax": 3.0}

    def set_extra_state(self, state):
        self.state = state


def test_fused_fp8_state_loads_across_te_fused_settings():
    """A checkpoint of a te_fused run into a block without fused modules and the reverse: the FP8 scaling state is
    dropped or starts fresh, everything else still loads strictly."""
    from megatron_genlip.model.layers import TransformerBlock
    from megatron_genlip.model.spec import LOCAL_SPEC, parallel_config
    from megatron_genlip.parallel import state

    cfg = small_model_config()
    state.ensure_initialized(1)
    block = TransformerBlock(cfg, LOCAL_SPEC, parallel_config(cfg, 1), state.tensor_parallel_group(), 0)
    saved = dict(block.state_dict())
    block.load_state_dict({**saved, **{k: {"amax": 3.0} for k in FUSED_EXTRA_STATE}}, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key.*stray"):
        block.load_state_dict({**saved, "self_attn.stray._extra_state": None}, strict=True)
    # the reverse: a fused module (here at the fused modules' place) loads a checkpoint without its state
    holder = torch.nn.Module()
    holder.self_attn = torch.nn.Module()
    holder.self_attn.norm_qkv = WithFP8State()
    holder.load_state_dict({"self_attn.norm_qkv.scale": torch.full((2,), 2.0)}, strict=True)
    assert holder.self_attn.norm_qkv.state == "fresh" and float(holder.self_attn.norm_qkv.scale[0]) == 2.0
    holder.load_state_dict(holder.state_dict(), strict=True)
    assert holder.self_attn.norm_qkv.state == {"amax": 3.0}
    with pytest.raises(RuntimeError, match="Missing key.*scale"):
        holder.load_state_dict({}, strict=True)  # a missing parameter is still an error


def test_memory_plan_counts_the_weight_copy_te_saves():
    """TE's fused modules save the concatenated q|gate|k|v and gate|up weights they read (model/te_spec.py)."""
    from megatron_genlip.training.memory import layer_activation_bytes

    base = ["model.backend=te", "parallel.tensor_parallel=2"]
    cfg = load_config(TINY, base)
    m = cfg.model
    weights = (4 * m.hidden_size ** 2 + 2 * m.hidden_size * m.ffn_hidden_size) // 2
    unfused = layer_activation_bytes(load_config(TINY, base + ["model.te_fused=false"]), 2)
    assert layer_activation_bytes(cfg, 2) - unfused == weights * 4  # fp32 activations in the tiny config
    fp8 = load_config(TINY, base + ["model.fp8=current", "train.precision=bf16"])
    fp8_unfused = load_config(TINY, base + ["model.fp8=current", "train.precision=bf16", "model.te_fused=false"])
    assert layer_activation_bytes(fp8, 2) - layer_activation_bytes(fp8_unfused, 2) == weights * (2 + 1)
