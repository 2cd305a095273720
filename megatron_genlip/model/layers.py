"""The GenLIP transformer block (GENLIP_SPEC.md §2.7-2.8), written for one device.

Activations are sequence-first, [L, B, d] (megatron-core's layout, so sequence parallelism can shard
dim 0). Projections come from the layer spec; under tensor parallelism every column-parallel output and
the attention heads are local shards and the row-parallel output projections sum them.

    x <- x + DropPath(gamma1 * GatedAttn(LN1(x)))
    x <- x + DropPath(gamma2 * SwiGLU(LN2(x)))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron_genlip.config import ModelConfig
from megatron_genlip.model.rope import apply_rotary
from megatron_genlip.model.te_fused import drop_foreign_fused_state
from megatron_genlip.parallel import sequence

if TYPE_CHECKING:  # annotations only: the TE spec (imported by spec.py) subclasses this module's classes
    from megatron_genlip.model.spec import BackendSpec


def normal_init(std: float):
    def init(w: torch.Tensor) -> None:
        torch.nn.init.normal_(w, mean=0.0, std=std)

    return init


def xavier_uniform_init(fan_in: int, fan_out: int):
    """Xavier-uniform with the fans of the *full* matrix (q_proj's gate half shares q's fan_out = 2d)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))

    def init(w: torch.Tensor) -> None:
        torch.nn.init.uniform_(w, -bound, bound)

    return init


class DropPath(torch.nn.Module):
    """Stochastic depth per packed row (batch element); rescales kept rows by 1/keep.

    The keep/drop decisions come from the replicated random stream (torch's default generator of the device,
    ``rng.replicated_generator``), identical on the ranks of a tensor-parallel group: under sequence parallelism
    each rank holds a slice of every row, and all slices of a row must be dropped together. The model checks once
    per forward that no per-rank stream is forked (``rng.check_replicated``), outside any compiled block: a draw
    with an explicit generator argument would break the block's graph under ``torch.compile``."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, B, d]
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((1, x.shape[1], 1), dtype=x.dtype, device=x.device)
        mask.bernoulli_(keep)  # the default generator of x's device: the replicated stream (checked by the model)
        return x * mask / keep


class LayerScale(torch.nn.Module):
    """Per-channel learned scale, initialised to ``init``. The parameter is named ``lambda1`` as in the HF keys."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.lambda1 = torch.nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class KVCache:
    """Per-layer keys/values (after RoPE) for incremental decoding: [B, heads, L_past, head_dim]."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        self.layers[layer] = (k, v)
        return k, v

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]


class GatedSelfAttention(torch.nn.Module):
    """MHA with an elementwise sigmoid output gate. q_proj (d -> 2d) is held as two column-parallel
    projections, ``q`` (first contiguous half) and ``gate`` (second half), so TP splits both by heads
    consistently; export concatenates them back into q_proj."""

    def __init__(self, cfg: ModelConfig, spec: BackendSpec, pconfig: ModelParallelConfig, tp_group, layer_idx: int,
                 norm: torch.nn.Module | None = None):
        super().__init__()  # norm: the block's LN1 (its output is this module's input here; a fused spec uses it)
        d, tp = cfg.hidden_size, pconfig.tensor_model_parallel_size
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.local_heads = cfg.num_attention_heads // tp
        self.gated = cfg.gated_attention
        col = dict(bias=True, config=pconfig, tp_group=tp_group)
        q_init = xavier_uniform_init(d, 2 * d if self.gated else d)
        self.q = spec.column_linear(d, d, init_method=q_init, **col)
        if self.gated:
            self.gate = spec.column_linear(d, d, init_method=q_init, **col)
        self.k = spec.column_linear(d, d, init_method=xavier_uniform_init(d, d), **col)
        self.v = spec.column_linear(d, d, init_method=xavier_uniform_init(d, d), **col)
        self.o = spec.row_linear(d, d, init_method=xavier_uniform_init(d, d), **col)
        self.kernel = spec.attention
        self.input_cast = spec.shared_input_cast

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [L, B, h*hd] -> [B, h, L, hd]
        L, B, _ = x.shape
        return x.view(L, B, self.local_heads, self.head_dim).permute(1, 2, 0, 3)

    def attend(self, q, k, v, mask, cache: KVCache | None) -> torch.Tensor:
        """The KV cache and the attention kernel on q, k (after RoPE) and v, each [B, h, L, hd]: [L, B, h*hd]."""
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.kernel(q, k, v, mask)  # [B, h, L, hd]
        return out.permute(2, 0, 1, 3).flatten(2)  # [L, B, h*hd], head-major (full L also under SP)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        if self.input_cast is not None:  # one FP8 cast of LN1's output for q, gate, k and v
            x = self.input_cast(x, self.q)
        q = apply_rotary(self._heads(self.q(x)), cos, sin)
        k = apply_rotary(self._heads(self.k(x)), cos, sin)
        out = self.attend(q, k, self._heads(self.v(x)), mask, cache)
        if self.gated:
            out = out * torch.sigmoid(self.gate(x))
        return self.o(out)


class SwiGLU(torch.nn.Module):
    """W2( SiLU(W_gate u) * (W1 u) ), fc1 and gate_fc column-parallel, fc2 row-parallel."""

    def __init__(self, cfg: ModelConfig, spec: BackendSpec, pconfig: ModelParallelConfig, tp_group,
                 norm: torch.nn.Module | None = None):
        super().__init__()  # norm: the block's LN2 (see GatedSelfAttention)
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        common = dict(bias=True, init_method=normal_init(cfg.init_std), config=pconfig, tp_group=tp_group)
        self.fc1 = spec.column_linear(d, f, **common)
        self.gate_fc = spec.column_linear(d, f, **common)
        self.fc2 = spec.row_linear(f, d, **common)
        self.input_cast = spec.shared_input_cast

    def forward(self, x):
        if self.input_cast is not None:  # one FP8 cast of LN2's output for fc1 and gate_fc
            x = self.input_cast(x, self.fc1)
        return self.fc2(torch.nn.functional.silu(self.gate_fc(x)) * self.fc1(x))


class TransformerBlock(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, spec: BackendSpec, pconfig: ModelParallelConfig, tp_group, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size
        attention, mlp = spec.self_attention or GatedSelfAttention, spec.mlp or SwiGLU
        norm = spec.block_norm or spec.layer_norm
        self.layer_norm1 = norm(d, eps=cfg.layernorm_eps)
        self.self_attn = attention(cfg, spec, pconfig, tp_group, layer_idx, norm=self.layer_norm1)
        self.layer_scale1 = LayerScale(d, cfg.layer_scale_init)
        self.layer_norm2 = norm(d, eps=cfg.layernorm_eps)
        self.mlp = mlp(cfg, spec, pconfig, tp_group, norm=self.layer_norm2)
        self.layer_scale2 = LayerScale(d, cfg.layer_scale_init)
        self.drop_path = DropPath(cfg.drop_path_rate)
        # a checkpoint of a model.te_fused run also holds the fused modules' FP8 state: dropped where they are absent
        self.register_load_state_dict_pre_hook(drop_foreign_fused_state)
        if pconfig.sequence_parallel:  # norms, LayerScale, row-parallel biases see a sequence slice
            sequence.reduce_replicated_grads(self, tp_group)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        x = x + self.drop_path(self.layer_scale1(self.self_attn(self.layer_norm1(x), cos, sin, mask, cache)))
        x = x + self.drop_path(self.layer_scale2(self.mlp(self.layer_norm2(x))))
        return x
