"""Parameters of Transformer Engine's fused modules under the model's own names (``model.backend=te``,
``model.te_fused=true``); importable without Transformer Engine, so the CPU tests exercise it.

TE's ``LayerNormLinear`` (LN1 + the q|gate|k|v projections) and ``LayerNormMLP`` (LN2 + gate_fc|fc1 + SwiGLU +
fc2) compute a norm and the GEMMs after it in one module, but they own their parameters under their own names
(``layer_norm_weight``, ``q_weight``, ``fc1_weight`` = gate and up stacked). Checkpoints, resharding, the HF
export and the optimizer state all use the model's names (``layer_norm1.weight``, ``self_attn.q.weight``,
``mlp.gate_fc.weight``...), and the local backend's modules hold exactly those tensors. So here the model's names
stay the owners:

* :class:`LinearParams` / :class:`NormParams` hold a projection's or a norm's parameters under the local names and
  shapes, initialised like megatron-core's CPU initialisation (same values as the local backend for the same seed,
  same tensor-parallel attributes). They compute nothing: a :class:`NormParams` (the spec's ``block_norm``) passes
  its input through, because the fused module that reads that input next applies the norm.
* :class:`SharedParameters` is mixed into a TE module: its own parameters are dropped, and every read of one of
  TE's parameter names (TE reads them with ``getattr(self, name)``: ``_get_weight_tensors``, the bias and norm
  arguments of its forward) returns the model's tensor instead; a stacked one (LayerNormMLP's ``fc1_weight``) is
  concatenated on each read, so the gradient flows back into both halves. The TE module then has no parameters of
  its own, so ``named_parameters()``, ``state_dict()`` and DeepSpeed see each tensor once, under the model's name.

ZeRO-3 gathers a module's own parameters around its forward; the holders' forward never runs, so ZeRO-3 cannot
serve a fused module (``config.resolve_layout`` refuses the combination).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_genlip.compat import initialize_affine_weight_cpu
from megatron_genlip.parallel import state


class SharedParameters:
    """Mixin for a ``torch.nn.Module`` (first in the bases): ``share({own name: tensor or callable})`` removes the
    module's own parameters of those names; reading one of them afterwards returns the given tensor (a callable
    is called on every read: a stacked copy built from the model's parameters)."""

    def share(self, sources: dict) -> None:
        params = self.__dict__["_parameters"]
        for name in sources:
            if name not in params:
                raise KeyError(f"{type(self).__name__} has no parameter {name!r} to share "
                               f"(its parameters: {', '.join(params) or 'none'})")
            del params[name]
        self.__dict__["_shared_sources"] = dict(sources)

    def __getattr__(self, name):
        sources = self.__dict__.get("_shared_sources")
        if sources is not None and name in sources:
            value = sources[name]
            return value if isinstance(value, torch.Tensor) else value()
        return super().__getattr__(name)

    def reset_parameters(self, *args, **kwargs):
        """After :meth:`share`, a no-op: the holders own (and initialised) the parameters. TE's own version would
        re-tag them with tensor-parallel attributes they already carry, which TE refuses."""
        if "_shared_sources" not in self.__dict__:
            return super().reset_parameters(*args, **kwargs)
        return None


# the state-dict keys of the fused modules' own state (TE's FP8 scaling metadata, ``_extra_state``), relative to a
# block: a checkpoint written with model.te_fused=true has them, one written without does not
FUSED_EXTRA_STATE = ("self_attn.norm_qkv._extra_state", "mlp.norm_mlp._extra_state")


def drop_foreign_fused_state(module, state_dict, prefix, *args) -> None:
    """Load pre-hook of a block without fused modules: a checkpoint of a ``model.te_fused`` run carries their FP8
    scaling state, which this block has no place for; it is dropped (the parameters are the same tensors)."""
    names = {n for n, _ in module.named_modules()}
    for key in FUSED_EXTRA_STATE:
        if key.rsplit(".", 1)[0] not in names:
            state_dict.pop(prefix + key, None)


def allow_missing_extra_state(module, incompatible_keys) -> None:
    """Load post-hook of a fused module: a checkpoint written without it (local backend, model.te_fused=false)
    has no FP8 scaling state for it; it starts fresh, as it would in a new run (the parameters are the holders')."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.endswith(FUSED_EXTRA_STATE)]


class LinearParams(torch.nn.Module):
    """The parameters of one column- (``parallel_mode="column"``: weight [out/TP, in], bias [out/TP]) or
    row-parallel (weight [out, in/TP], bias [out], replicated) projection, named and initialised as the local
    backend's megatron-core layer of the same place. ``_extra_state`` is kept (None) as megatron-core's and TE's
    layers write it, so a checkpoint has the same keys with either backend."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, init_method, config, tp_group,
                 parallel_mode: str = "column"):
        super().__init__()
        tp, rank = state.group_size(tp_group), state.group_rank(tp_group)
        column = parallel_mode == "column"
        if parallel_mode not in ("column", "row"):
            raise ValueError(f"parallel_mode must be 'column' or 'row', got {parallel_mode!r}")
        local = (out_features // tp, in_features) if column else (out_features, in_features // tp)
        self.weight = torch.nn.Parameter(torch.empty(local, dtype=config.params_dtype))
        initialize_affine_weight_cpu(self.weight, out_features, in_features, local[0 if column else 1],
                                     0 if column else 1, init_method, params_dtype=config.params_dtype, rank=rank,
                                     world_size=tp)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(local[0], dtype=config.params_dtype))
            if column:
                set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        else:
            self.bias = None

    def get_extra_state(self):  # noqa: D102 - the key megatron-core's layers write (None)
        return None

    def set_extra_state(self, state):  # noqa: D102
        pass

    def forward(self, x):  # noqa: D102
        raise RuntimeError("LinearParams only holds a projection's parameters; its fused module computes it")


class NormParams(torch.nn.Module):
    """A LayerNorm's ``weight`` (ones) and ``bias`` (zeros); its forward passes the input through: the fused
    module that reads this input next applies the norm."""

    def __init__(self, dim: int, eps: float, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(dim, dtype=dtype))

    def forward(self, x):  # noqa: D102
        return x


class SwiGLUStack:
    """What LayerNormMLP reads as ``fc1_weight`` / ``fc1_bias`` (``attr`` = "weight" / "bias"): the gate and up
    holders' tensors stacked by :func:`swiglu_stack` on every read (an object, not a closure: a deep copy of the
    model then stacks the copied holders)."""

    def __init__(self, gate: LinearParams, up: LinearParams, attr: str):
        self.gate, self.up, self.attr = gate, up, attr

    def __call__(self) -> torch.Tensor | None:
        return swiglu_stack(getattr(self.gate, self.attr), getattr(self.up, self.attr))


def swiglu_stack(gate: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor | None:
    """LayerNormMLP's ``fc1`` weight or bias of one TP rank: TE's gated activations apply the activation to the
    FIRST half of fc1's output (``ops/basic/swiglu.py``: SwiGLU(a, b) = SiLU(a) * b, "the opposite convention" of
    torch's GLU), so the rank's gate rows come first, then its up (the model's ``fc1``) rows."""
    if gate is None:
        return None
    return torch.cat((gate, up), dim=0)
