"""Transformer Engine layer spec (``model.backend=te``), with optional FP8 (``model.fp8=delayed|current|mxfp8``).

Imported only when CUDA is available (``spec.get_layer_spec``): TE cannot be imported on a CPU-only machine.
NOT TESTED ON A GPU YET (written against the TE 2.x API; see the notes below and the project README).

* ``model.te_fused=true`` (the default): LN1 and the q|gate|k|v projections are one ``te.LayerNormLinear``
  (:class:`TENormLinears`, one GEMM over the four projections, ``parameters_split``), LN2 and the SwiGLU MLP one
  ``te.LayerNormMLP`` (:class:`TENormMLP`, ``activation="swiglu"``, fc2 row-parallel inside it); with FP8 the norm
  and SwiGLU kernels write the next GEMM's FP8 input themselves (no separate cast). o stays a ``te.Linear``. The
  parameters keep the model's names (``model/te_fused.py``: the fused modules read the block's
  ``LinearParams``/``NormParams``), so checkpoints, resharding and the HF export are the same as with the local
  backend; the fused modules' FP8 scaling state (``_extra_state``) is dropped when a checkpoint without it is
  loaded and vice versa (``te_fused.drop_foreign_fused_state`` / ``allow_missing_extra_state``). Costs of reading
  shared parameters: the holders are separate tensors (DeepSpeed's ZeRO-1/2 flattening interleaves weights and
  biases in name order), so TE concatenates q|gate|k|v (and gate|up) on each forward and saves that copy for
  backward: (4 d^2 + 2 d f) / TP weight elements per block not recomputed (~57 MB bf16 at g/16, TP=1).
  TE options that write ``.grad``/``.main_grad`` on the parameters themselves (``delay_wgrad_compute``,
  ``fuse_wgrad_accumulation``) and TE's CUDA graphs (which list ``parameters()``) do not work with shared
  parameters; none is used. ``model.te_fused=false``: the separate modules below.
* Block projections (``model.te_fused=false``): ``te.pytorch.Linear`` with ``parallel_mode="column"`` (q, gate, k, v, fc1, gate_fc) or
  ``"row"`` (o, fc2), ``tp_group``/``tp_size`` from the layer's process group and ``sequence_parallel`` from
  megatron-core's ``ModelParallelConfig``. Weights are initialised like megatron-core's CPU initialisation
  (fp32 master weight from ``init_method``, the rank's slice copied in), so a te model starts from the same
  weights as the local backend with the same seed.
* Norms: ``te.pytorch.LayerNorm`` (``ln_post``; the blocks' too when not fused). Text embedding: megatron-core ``VocabParallelEmbedding`` (TE has none).
* LM head (the spec's ``lm_head``): megatron-core ``ColumnParallelLinear`` in bf16, as in the local spec (the
  vocab-parallel cross-entropy consumes its shard).
* Attention: the ``model.attention`` kernel (FlexAttention with the prefix-LM BlockMask, or dense SDPA).
* FP8: the blocks run inside ONE ``te.autocast`` region (TE >= 2.x; ``te.fp8_autocast`` on older versions) with
  the recipe of ``model.fp8``, entered by the model around its block loop (the spec's ``fp8_region``): with
  delayed scaling the amax reduction runs once when the region exits, not once per projection. A recomputed
  block (activation checkpointing) runs in backward, outside that region: ``recompute.run_block`` enters the region
  around each checkpointed block, in forward and in the recomputation alike, so the recomputed forward uses the
  same recipe (one reduction per block then). Each projection still opens the region itself when none is active
  (a direct call, e.g. a test). The amax reduction group is megatron-core's tensor+data-parallel group. Embeddings,
  LM head, attention and norms stay bf16. FP8 runs in training only: evaluation, feature extraction and caption
  decoding run these modules in bf16 (TE's FP8 GEMMs need a multiple of 8 rows, which decoding steps are not;
  ``config._fp8_shape_errors`` checks the training rows and widths at start-up). A checkpointed block is
  recomputed by ``torch.utils.checkpoint`` (not TE's checkpoint), which would quantize the recomputation with the
  scales that delayed scaling updated when the forward's region closed: ``config`` refuses ``model.fp8=delayed``
  with activation checkpointing; ``current`` scaling derives each scale from the tensor itself and recomputes
  exactly. Transformer Engine is not in requirements.txt and has no wheel on PyPI (a source build needs nvcc and
  cuDNN): a CUDA machine without it gets a ConfigError from ``spec.get_layer_spec`` saying so.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import torch
import torch.distributed as dist
import transformer_engine.pytorch as te
from megatron.core import parallel_state

from megatron_genlip.compat import initialize_affine_weight_cpu
from megatron_genlip.config import ConfigError, ModelConfig
from megatron_genlip.model.attention import get_attention
from megatron_genlip.model.fp8 import require_fp8_hardware
from megatron_genlip.model.layers import GatedSelfAttention, SwiGLU
from megatron_genlip.model.rope import apply_rotary
from megatron_genlip.model.te_fused import (LinearParams, NormParams, SharedParameters, SwiGLUStack,
                                            allow_missing_extra_state)
from megatron_genlip.parallel import state


def _recipe(cfg: ModelConfig):
    from transformer_engine.common import recipe

    if cfg.fp8 == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=1024, amax_compute_algo="max")
    if cfg.fp8 == "current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    if cfg.fp8 == "mxfp8":
        if torch.cuda.get_device_capability() < (10, 0):
            raise ConfigError(f"model.fp8=mxfp8 needs a Blackwell GPU (compute capability >= 10.0); "
                              f"{torch.cuda.get_device_name()} has {torch.cuda.get_device_capability()}. "
                              "Use model.fp8=delayed or current.")
        return recipe.MXFP8BlockScaling()
    raise ConfigError(f"model.fp8={cfg.fp8!r} is not a Transformer Engine recipe")


def _fp8_enabled() -> bool:
    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            manager = __import__(module, fromlist=["FP8GlobalStateManager"]).FP8GlobalStateManager
        except (ImportError, AttributeError):
            continue
        return manager.is_fp8_enabled()
    return False


def fp8_autocast_factory(cfg: ModelConfig):
    """A zero-argument callable returning the FP8 autocast context of ``model.fp8`` (TE 2.x ``te.autocast``,
    older TE ``te.fp8_autocast``)."""
    recipe = _recipe(cfg)

    def context():
        if _fp8_enabled():  # an enclosing autocast already chose the recipe
            return contextlib.nullcontext()
        group = parallel_state.get_amax_reduction_group(with_context_parallel=False)
        autocast = getattr(te, "autocast", None)
        if autocast is not None:
            return autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
        return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)

    return context


def _te_device(config):
    return "cpu" if config.use_cpu_initialization else torch.cuda.current_device()


def _no_init(_weight):  # TE draws nothing: the weights are initialised (or dropped, te_fused) by this module
    pass


class _FP8Scoped:
    """Mixin: the module's forward runs in ``fp8_context()`` (the spec's FP8 region) when one is given and the
    module is training (evaluation runs in bf16, as the model's own region does); inside an enclosing region that
    context is a no-op (``fp8_autocast_factory``)."""

    _fp8_context = None

    def forward(self, *args, **kwargs):  # noqa: D102
        if self._fp8_context is None or not self.training:
            return super().forward(*args, **kwargs)
        with self._fp8_context():
            return super().forward(*args, **kwargs)


class _TELinear(_FP8Scoped, te.Linear):
    """te.Linear with the layer-spec signature, megatron-core's initialisation and an optional FP8 scope."""

    parallel_mode = "column"

    def __init__(self, in_features, out_features, *, bias, init_method, config, tp_group, fp8_context=None):
        tp_size = dist.get_world_size(tp_group)
        super().__init__(in_features, out_features, bias=bias, init_method=_no_init,
                         tp_group=tp_group, tp_size=tp_size, parallel_mode=self.parallel_mode,
                         sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
                         device=_te_device(config))
        column = self.parallel_mode == "column"
        with torch.no_grad():
            initialize_affine_weight_cpu(
                self.weight, out_features, in_features, self.weight.shape[0 if column else 1], 0 if column else 1,
                init_method, params_dtype=config.params_dtype, rank=dist.get_rank(tp_group), world_size=tp_size,
                skip_set_tensor_parallel_attributes=True,
            )
        self._fp8_context = fp8_context


class TEColumnLinear(_TELinear):
    parallel_mode = "column"


class TERowLinear(_TELinear):
    parallel_mode = "row"


class TENormLinears(_FP8Scoped, SharedParameters, te.LayerNormLinear):
    """``te.LayerNormLinear``: the block's LN (a :class:`NormParams`) and several column-parallel projections
    (:class:`LinearParams`, in order) as one norm kernel and one GEMM whose output is their outputs side by side
    (``parameters_split``). With FP8 the norm kernel writes the GEMM's FP8 input directly. The parameters stay the
    model's (``SharedParameters``)."""

    def __init__(self, norm: NormParams, linears: dict[str, LinearParams], *, config, tp_group, fp8_context=None):
        tp = state.group_size(tp_group)
        splits = {name: lin.weight.shape[0] * tp for name, lin in linears.items()}  # full output features
        super().__init__(norm.weight.shape[0], sum(splits.values()), eps=norm.eps,
                         sequence_parallel=config.sequence_parallel, tp_group=tp_group, tp_size=tp,
                         init_method=_no_init, bias=True, parallel_mode="column", parameters_split=splits,
                         params_dtype=config.params_dtype, device=_te_device(config))
        # TE names the split parameters "<name>_weight" / "<name>_bias" (weight_names / bias_names, in split order)
        sources = {"layer_norm_weight": norm.weight, "layer_norm_bias": norm.bias}
        for lin, w, b in zip(linears.values(), self.weight_names, self.bias_names, strict=True):
            sources[w], sources[b] = lin.weight, lin.bias
        self.share(sources)
        self.split_sizes = [lin.weight.shape[0] for lin in linears.values()]  # this rank's output columns
        self._fp8_context = fp8_context
        self.register_load_state_dict_post_hook(allow_missing_extra_state)


class TENormMLP(_FP8Scoped, SharedParameters, te.LayerNormMLP):
    """``te.LayerNormMLP`` with ``activation="swiglu"``: LN2, gate|up in one column-parallel GEMM, SwiGLU and the
    row-parallel fc2, with FP8 casts fused into the norm and activation kernels. fc1 is read as the gate and up
    holders stacked per TP rank (:class:`SwiGLUStack`: gate first, TE's convention)."""

    def __init__(self, norm: NormParams, gate_fc: LinearParams, fc1: LinearParams, fc2: LinearParams, *, config,
                 tp_group, fp8_context=None):
        tp = state.group_size(tp_group)
        super().__init__(norm.weight.shape[0], fc1.weight.shape[0] * tp, eps=norm.eps,
                         sequence_parallel=config.sequence_parallel, tp_group=tp_group, tp_size=tp,
                         init_method=_no_init, output_layer_init_method=_no_init, bias=True, activation="swiglu",
                         params_dtype=config.params_dtype, set_parallel_mode=True, device=_te_device(config))
        self.share({"layer_norm_weight": norm.weight, "layer_norm_bias": norm.bias,
                    "fc1_weight": SwiGLUStack(gate_fc, fc1, "weight"), "fc1_bias": SwiGLUStack(gate_fc, fc1, "bias"),
                    "fc2_weight": fc2.weight, "fc2_bias": fc2.bias})
        self._fp8_context = fp8_context
        self.register_load_state_dict_post_hook(allow_missing_extra_state)


class TEFusedSelfAttention(GatedSelfAttention):
    """Gated attention whose LN1 and q|gate|k|v projections run as one :class:`TENormLinears`; ``self.q`` etc. are
    :class:`LinearParams` (the model's names), ``self.o`` a TE row-parallel linear. Its input is the residual
    stream (the block's LN1 is a :class:`NormParams` that passes it through)."""

    def __init__(self, cfg, spec, pconfig, tp_group, layer_idx, norm, fp8_context=None):
        super().__init__(cfg, spec, pconfig, tp_group, layer_idx, norm=norm)
        names = ("q", "gate", "k", "v") if self.gated else ("q", "k", "v")
        self.norm_qkv = TENormLinears(norm, {n: getattr(self, n) for n in names}, config=pconfig, tp_group=tp_group,
                                      fp8_context=fp8_context)
        self._names = names

    def forward(self, x, cos, sin, mask, cache=None):  # noqa: D102
        out = dict(zip(self._names, self.norm_qkv(x).split(self.norm_qkv.split_sizes, dim=-1), strict=True))
        q = apply_rotary(self._heads(out["q"]), cos, sin)
        k = apply_rotary(self._heads(out["k"]), cos, sin)
        attended = self.attend(q, k, self._heads(out["v"]), mask, cache)
        if self.gated:
            attended = attended * torch.sigmoid(out["gate"])
        return self.o(attended)


class TEFusedSwiGLU(SwiGLU):
    """The SwiGLU MLP with LN2 as one :class:`TENormMLP`; fc1, gate_fc and fc2 are :class:`LinearParams`."""

    def __init__(self, cfg, spec, pconfig, tp_group, norm, fp8_context=None):
        super().__init__(cfg, replace(spec, row_linear=functools.partial(LinearParams, parallel_mode="row")), pconfig,
                         tp_group, norm=norm)
        self.norm_mlp = TENormMLP(norm, self.gate_fc, self.fc1, self.fc2, config=pconfig, tp_group=tp_group,
                                  fp8_context=fp8_context)

    def forward(self, x):  # noqa: D102
        return self.norm_mlp(x)


def te_layer_spec(cfg: ModelConfig, local):
    """The ``BackendSpec`` of ``model.backend=te``: TE block projections and norms (fused with
    ``model.te_fused``), the ``local`` spec's LM head."""

    fp8_context = None
    if cfg.fp8 != "none":
        require_fp8_hardware(cfg)
        fp8_context = fp8_autocast_factory(cfg)

    def layer_norm(dim, eps):
        return te.LayerNorm(dim, eps=eps, params_dtype=torch.float32, device="cpu")

    spec = replace(local, column_linear=functools.partial(TEColumnLinear, fp8_context=fp8_context),
                   row_linear=functools.partial(TERowLinear, fp8_context=fp8_context), layer_norm=layer_norm,
                   attention=get_attention(cfg.attention), fp8_region=fp8_context)
    if not cfg.te_fused:
        return spec
    # the block's norms and projections become parameter holders read by the fused modules; ln_post stays layer_norm
    return replace(spec, column_linear=functools.partial(LinearParams, parallel_mode="column"), block_norm=NormParams,
                   self_attention=functools.partial(TEFusedSelfAttention, fp8_context=fp8_context),
                   mlp=functools.partial(TEFusedSwiGLU, fp8_context=fp8_context))
