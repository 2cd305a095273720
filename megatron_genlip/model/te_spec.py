"""Transformer Engine layer spec (``model.backend=te``), with optional FP8 (``model.fp8=delayed|current|mxfp8``).

Imported only when CUDA is available (``spec.get_layer_spec``): TE cannot be imported on a CPU-only machine.
NOT TESTED ON A GPU YET (written against the TE 2.x API; see the notes below and the project README).

* Block projections: ``te.pytorch.Linear`` with ``parallel_mode="column"`` (q, gate, k, v, fc1, gate_fc) or
  ``"row"`` (o, fc2), ``tp_group``/``tp_size`` from the layer's process group and ``sequence_parallel`` from
  megatron-core's ``ModelParallelConfig``. Weights are initialised like megatron-core's CPU initialisation
  (fp32 master weight from ``init_method``, the rank's slice copied in), so a te model starts from the same
  weights as the local backend with the same seed.
* Norms: ``te.pytorch.LayerNorm``. Text embedding: megatron-core ``VocabParallelEmbedding`` (TE has none).
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
  LM head, attention and norms stay bf16. Caveat: with ``train.activation_checkpointing`` the block is recomputed
  by ``torch.utils.checkpoint`` (not ``te.checkpoint``), so delayed scaling records the recomputed forward's amax
  a second time; ``current`` scaling has no history and is unaffected.
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


class _TELinear(te.Linear):
    """te.Linear with the layer-spec signature, megatron-core's initialisation and an optional FP8 scope."""

    parallel_mode = "column"

    def __init__(self, in_features, out_features, *, bias, init_method, config, tp_group, fp8_context=None):
        tp_size = dist.get_world_size(tp_group)
        super().__init__(in_features, out_features, bias=bias, init_method=lambda w: None,
                         tp_group=tp_group, tp_size=tp_size, parallel_mode=self.parallel_mode,
                         sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
                         device="cpu" if config.use_cpu_initialization else torch.cuda.current_device())
        column = self.parallel_mode == "column"
        with torch.no_grad():
            initialize_affine_weight_cpu(
                self.weight, out_features, in_features, self.weight.shape[0 if column else 1], 0 if column else 1,
                init_method, params_dtype=config.params_dtype, rank=dist.get_rank(tp_group), world_size=tp_size,
                skip_set_tensor_parallel_attributes=True,
            )
        self._fp8_context = fp8_context

    def forward(self, x):  # noqa: D102
        if self._fp8_context is None:
            return super().forward(x)
        with self._fp8_context():
            return super().forward(x)


class TEColumnLinear(_TELinear):
    parallel_mode = "column"


class TERowLinear(_TELinear):
    parallel_mode = "row"


def te_layer_spec(cfg: ModelConfig, local):
    """The ``BackendSpec`` of ``model.backend=te``: TE block projections and norms, the ``local`` spec's LM head."""

    fp8_context = None
    if cfg.fp8 != "none":
        require_fp8_hardware(cfg)
        fp8_context = fp8_autocast_factory(cfg)

    def layer_norm(dim, eps):
        return te.LayerNorm(dim, eps=eps, params_dtype=torch.float32, device="cpu")

    return replace(local, column_linear=functools.partial(TEColumnLinear, fp8_context=fp8_context),
                   row_linear=functools.partial(TERowLinear, fp8_context=fp8_context), layer_norm=layer_norm,
                   attention=get_attention(cfg.attention), fp8_region=fp8_context)
