"""Layer specs: which classes implement the model's projections, norms, attention kernel and LM head.

The model code is written once, for one device, and asks the spec (a :class:`BackendSpec`) for its building
blocks (the idea of megatron-core's ModuleSpec). Tensor parallelism, the Transformer Engine backend and FP8 are
therefore config changes, never if-branches inside ``forward``. (The class is not called ``LayerSpec``: that is
DeepSpeed's pipeline-stage description, used beside it in ``model/stages.py``.)

Uniform signatures of the spec's classes:
  column_linear(in, out, *, bias, init_method, config, tp_group)  -> y[..., out/TP]   (input replicated)
  row_linear(in, out, *, bias, init_method, config, tp_group)     -> y[..., out]      (input sharded, sums over TP)
  vocab_embedding(vocab, dim, *, init_method, config, tp_group)   -> [..., dim]
  lm_head(dim, vocab, *, bias, init_method, config, tp_group)     -> logits[..., vocab/TP] (column-parallel; never
                                                                     FP8: it stays in the activation dtype); called
                                                                     (x, targets=t, chunk=C): (mean loss, token
                                                                     losses), model/fused_loss.py
  layer_norm(dim, eps)
  shared_input_cast(x, linear) or None                            (x cast once for all projections reading it)
  attention(q, k, v, mask) -> [B, heads, L, head_dim]             (mask: what attention.build_mask returns)
  attention.build_mask(sample_ids, token_kinds) -> mask           (built once per forward, shared by all layers)
  self_attention / mlp / block_norm: the block's sub-modules, or None for the local ones (model/layers.py)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from megatron_genlip import platform
from megatron_genlip.config import FP8_TORCHAO_RECIPES, ConfigError, ModelConfig
from megatron_genlip.model.attention import SdpaAttention, get_attention
from megatron_genlip.model.fused_loss import FusedLossHead
from megatron_genlip.parallel import rng, state


class ColumnLinear(ColumnParallelLinear):
    """megatron-core column-parallel linear returning only the (sharded) output."""

    def __init__(self, in_features, out_features, *, bias, init_method, config, tp_group):
        super().__init__(
            in_features, out_features, config=config, init_method=init_method, bias=bias,
            gather_output=False, tp_group=tp_group,
        )

    def forward(self, x):  # noqa: D102
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """megatron-core row-parallel linear (input sharded over TP, output summed) returning only the output."""

    def __init__(self, in_features, out_features, *, bias, init_method, config, tp_group):
        super().__init__(
            in_features, out_features, config=config, init_method=init_method, bias=bias,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )

    def forward(self, x):  # noqa: D102
        return super().forward(x)[0]

    def _forward_impl(self, input, weight, *args, **kwargs):
        """megatron-core 0.16.1's forward passes ``tp_group=None`` here on every call, and the linear function then
        warns on rank 0 (``get_tensor_model_parallel_group_if_none``) and looks up the default group. The group is
        unused on this path (no sequence-parallel gather, no dgrad all-reduce: the reduction follows it), so the
        layer's own group is passed: same result, no warning, and no graph break under torch.compile (dynamo
        cannot trace ``warnings.warn``)."""
        if kwargs.get("tp_group", 0) is None:
            kwargs["tp_group"] = self.tp_group
        out = super()._forward_impl(input, weight, *args, **kwargs)
        if not self.sequence_parallel and rng.selective_active() and state.group_size(self.tp_group) > 1:
            # megatron-core all-reduces this output in place, through a view that does not share the matmul
            # result's version counter: selective checkpointing's saved matmul output would hold the sum, and the
            # recomputation would add the other ranks' parts again (TP x the true value). A copy keeps it clean.
            out = out.clone()
        return out


class LMHead(FusedLossHead, ColumnLinear):
    """The column-parallel LM head; ``head(x, targets=t, chunk=C)`` is the fused linear + cross-entropy
    (``model/fused_loss.py``)."""


class VocabEmbedding(VocabParallelEmbedding):
    """megatron-core vocab-parallel embedding."""

    def __init__(self, num_embeddings, embedding_dim, *, init_method, config, tp_group):
        super().__init__(num_embeddings, embedding_dim, init_method=init_method, config=config, tp_group=tp_group)


@dataclass(frozen=True)
class BackendSpec:
    """The classes (or factories) of the module docstring; ``lm_head`` is the projection to the vocabulary,
    kept apart from ``column_linear`` so that an FP8 spec converts the block projections and never the head."""

    column_linear: Callable[..., torch.nn.Module]
    row_linear: Callable[..., torch.nn.Module]
    vocab_embedding: Callable[..., torch.nn.Module]
    lm_head: Callable[..., torch.nn.Module]
    layer_norm: Callable[..., torch.nn.Module]
    attention: Callable[..., torch.Tensor]  # a kernel of megatron_genlip.model.attention (has build_mask)
    # shared_input_cast(x, linear) -> x prepared once for every column-parallel projection that reads x (q, gate,
    # k, v read LN1's output; fc1, gate_fc LN2's): an FP8 spec casts it once instead of once per projection
    shared_input_cast: Callable[..., torch.Tensor] | None = None
    # fp8_region() -> the context manager the blocks of one forward run in (Transformer Engine's FP8 autocast:
    # one amax reduction per region), or None
    fp8_region: Callable[[], Any] | None = None
    # the block's attention and MLP classes (None: layers.GatedSelfAttention / layers.SwiGLU), called as
    # cls(cfg, spec, pconfig, tp_group[, layer_idx], norm=<the block's LN before it>): a spec whose modules fuse the
    # norm into the projections (Transformer Engine's LayerNormLinear / LayerNormMLP, model/te_spec.py) replaces
    # them and gives the block a ``block_norm`` that holds LN1's and LN2's parameters and passes its input through
    self_attention: Callable[..., torch.nn.Module] | None = None
    mlp: Callable[..., torch.nn.Module] | None = None
    block_norm: Callable[..., torch.nn.Module] | None = None  # a block's LN1 and LN2 (None: layer_norm)


LOCAL_SPEC = BackendSpec(
    column_linear=ColumnLinear,
    row_linear=RowLinear,
    vocab_embedding=VocabEmbedding,
    lm_head=LMHead,
    layer_norm=torch.nn.LayerNorm,
    attention=SdpaAttention(),
)


def get_layer_spec(cfg: ModelConfig) -> BackendSpec:
    """The spec for ``model.backend`` / ``model.attention`` / ``model.fp8``."""
    if cfg.backend == "te":
        if not platform.current().cuda:
            raise ConfigError(
                "model.backend='te' needs a CUDA GPU and Transformer Engine; this machine has no CUDA device. "
                "Use model.backend=local on CPU."
            )
        try:
            from megatron_genlip.model.te_spec import te_layer_spec  # CUDA only: TE fails to import without it
        except ImportError as e:
            raise ConfigError(
                f"model.backend='te' needs Transformer Engine, which does not import here ({type(e).__name__}: {e}). "
                "It is not in requirements.txt: PyPI has only its source (building it needs nvcc and cuDNN, "
                "`pip install --no-build-isolation transformer_engine[pytorch]`), and NVIDIA's PyTorch containers "
                "ship it built. Or use model.backend=local (FP8 through model.fp8=torchao-tensorwise).") from e
        return te_layer_spec(cfg, LOCAL_SPEC)
    if cfg.fp8 in FP8_TORCHAO_RECIPES:
        from megatron_genlip.model.fp8 import require_fp8_hardware, torchao_layer_spec

        require_fp8_hardware(cfg)
        return torchao_layer_spec(cfg, replace(LOCAL_SPEC, attention=get_attention(cfg.attention)))
    if cfg.attention == LOCAL_SPEC.attention.name:
        return LOCAL_SPEC
    return replace(LOCAL_SPEC, attention=get_attention(cfg.attention))


def parallel_config(cfg: ModelConfig, tensor_parallel: int = 1, sequence_parallel: bool = False) -> ModelParallelConfig:
    """megatron-core's per-layer config: CPU master-weight init, so every TP layout gets the same weights.
    ``sequence_parallel``: the column-parallel layers all-gather their input along the sequence and the
    row-parallel layers reduce-scatter their output (``megatron_genlip.parallel.sequence``)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=getattr(torch, cfg.params_dtype),
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
    )
