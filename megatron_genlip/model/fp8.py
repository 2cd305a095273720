"""FP8 training of the transformer-block projections with torchao float8 (``model.fp8=torchao-tensorwise|rowwise``).

torchao converts ``torch.nn.Linear`` modules into ``Float8Linear`` (dynamic scaling: per tensor, or per row
with power-of-2 scales); megatron-core's parallel linears are not ``nn.Linear``, so this path builds the
projections as plain ``nn.Linear`` (:class:`TorchLinear`, same initialisation as megatron-core's CPU init at
TP=1, so weights are identical) and is valid only with ``parallel.tensor_parallel=1`` (checked in
``config.validate_model`` and again when a layer is built). Under tensor parallelism use ``model.backend=te``.

What runs in FP8: q, gate, k, v, o and the SwiGLU fc1/gate_fc/fc2 of every block (the spec's ``column_linear``
and ``row_linear``). The patch and text embeddings and the LM head (the spec's ``lm_head``: a plain
:class:`TorchLinear`) stay in the activation dtype (bf16). Attention, norms and the loss are not affected.

FP8 GEMMs need a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell);
:func:`require_fp8_hardware` refuses anything else with a ConfigError. The module conversion itself
(:func:`torchao_layer_spec`) also works on CPU, which the CPU tests use to check which modules are converted.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_genlip import platform
from megatron_genlip.config import FP8_TE_RECIPES, ConfigError, ModelConfig
from megatron_genlip.model.fused_loss import FusedLossHead

MIN_FP8_CAPABILITY = (8, 9)


def _torchao_float8():
    try:
        import torchao.float8 as float8
    except Exception as e:  # noqa: BLE001 - ImportError or a broken native extension
        raise ConfigError(f"model.fp8=torchao-* needs the torchao package (pip install --no-deps torchao==0.18.0): "
                          f"{type(e).__name__}: {e}") from None
    return float8


def require_fp8_hardware(cfg: ModelConfig) -> None:
    """Refuse FP8 without a CUDA device of compute capability >= 8.9 (or, for torchao recipes, without torchao)."""
    if not platform.current().cuda:
        raise ConfigError(f"model.fp8={cfg.fp8} needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9, "
                          "e.g. H100/H200); this machine has no CUDA device. Use model.fp8=none.")
    cap = torch.cuda.get_device_capability()
    if cap < MIN_FP8_CAPABILITY:
        raise ConfigError(f"model.fp8={cfg.fp8} needs compute capability >= 8.9; {torch.cuda.get_device_name()} "
                          f"has {cap[0]}.{cap[1]}. Use model.fp8=none.")
    if cfg.fp8 not in FP8_TE_RECIPES:
        _torchao_float8()


class TorchLinear(torch.nn.Linear):
    """``nn.Linear`` with the layer-spec signature, initialised exactly like megatron-core's linears at TP=1
    (fp32 master weight from ``init_method``, cast to the parameter dtype; zero bias)."""

    def __init__(self, in_features, out_features, *, bias, init_method, config, tp_group=None):
        if config.tensor_model_parallel_size != 1:
            raise ConfigError(f"model.fp8=torchao-* builds plain nn.Linear projections: it needs "
                              f"parallel.tensor_parallel=1 (got {config.tensor_model_parallel_size})")
        super().__init__(in_features, out_features, bias=bias, dtype=config.params_dtype)
        with torch.no_grad():
            master = torch.empty(out_features, in_features, dtype=torch.float32)
            init_method(master)
            self.weight.copy_(master.to(config.params_dtype))
            if self.bias is not None:
                self.bias.zero_()

    def reset_parameters(self) -> None:
        """No nn.Linear default init (it would draw from the RNG): ``__init__`` initialises from ``init_method``."""


class TorchLMHead(FusedLossHead, TorchLinear):
    """The LM head of the torchao path: a plain bf16 ``nn.Linear`` with the fused loss (``model/fused_loss.py``)."""


def float8_config(cfg: ModelConfig):
    """torchao's Float8LinearConfig for ``model.fp8`` (torchao-tensorwise | torchao-rowwise)."""
    return _torchao_float8().Float8LinearConfig.from_recipe_name(cfg.fp8.removeprefix("torchao-"))


def shared_tensorwise_cast(x: torch.Tensor, linear) -> torch.Tensor:
    """``x`` cast to FP8 once, exactly as ``linear`` (a torchao ``Float8Linear``) casts its input (tensorwise
    dynamic scaling: one amax over the tensor, the same scale and bits), for every projection reading ``x``.
    torchao's matmul takes an input already cast as is (``tensor_already_casted_to_fp8``), in forward and, as the
    saved input of the weight gradient, in backward; the cast itself passes the gradient through to ``x``."""
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    c = linear.config
    return hp_tensor_to_float8_dynamic(x, c.cast_config_input.target_dtype, linear.linear_mm_config,
                                       gemm_input_role=GemmInputRole.INPUT,
                                       round_scales_to_power_of_2=c.round_scales_to_power_of_2)


def torchao_layer_spec(cfg: ModelConfig, base):
    """``base`` (a ``BackendSpec``) with torchao Float8Linear block projections and a plain bf16 LM head; under
    ``torchao-tensorwise`` the input shared by q/gate/k/v (and by fc1/gate_fc) is cast once
    (:func:`shared_tensorwise_cast`). ``torchao-rowwise`` casts per projection: its weight gradient needs the input
    scaled along the other axis, which a shared forward cast cannot provide."""
    float8 = _torchao_float8()
    config = float8_config(cfg)

    def float8_linear(in_features, out_features, **kw) -> torch.nn.Module:
        return float8.convert_to_float8_training(TorchLinear(in_features, out_features, **kw), config=config)

    shared = shared_tensorwise_cast if cfg.fp8 == "torchao-tensorwise" else None
    return replace(base, column_linear=float8_linear, row_linear=float8_linear, lm_head=TorchLMHead,
                   shared_input_cast=shared)
