"""GenLIP cut into pipeline stages: the model as DeepSpeed ``LayerSpec``s for ``parallel.pipeline``.

Stages: the embeddings (patch + text + in_proj) on the first stage, the transformer blocks split evenly by count
(``partition_method="type:BlockStage"``), ln_post / proj / LM head / loss on the last. The first stage receives
the micro-batch as the tuple ``batch.PIPELINE_INPUTS``; between stages flows a fixed-shape tuple (rows are fixed
length)::

    (hidden [L, B, d], positions [B, 3, L], sample_ids [B, L], token_kinds [B, L], labels [B, L])

so every stage rebuilds its rotary tables and prefix-LM mask from the positions and ids, and the labels reach the
last stage with the activations. Under sequence parallelism the hidden state passed between stages is this
rank's sequence slice [L/TP, B, d]: the first stage's ``SequenceParallel`` scatters after the embeddings, the
last stage's gathers before ln_post (the same wrapper the one-device model holds).

Stage constructors take the tensor-parallel group as an argument (the ``LayerSpec`` carries it) and create no
process group. Parameter names inside each stage equal the single-device model's (``vision_embeddings.*``,
``layer_norm1.*`` of block i, ``ln_post.*``, ...), and every component is initialised from its own RNG stream
(``component_rng``), so a pipeline holds exactly the weights of the one-device model built with the same seed.

Stages are model code, like megatron-core's ``pre_process``/``post_process`` models and torchtitan's per-model
``parallelize.py``: they import ``megatron_genlip.parallel``, which never imports the model.
"""

from __future__ import annotations

import contextlib

import torch
from deepspeed.pipe import LayerSpec, PipelineModule

from megatron_genlip.batch import PIPELINE_INPUTS
from megatron_genlip.config import ModelConfig
from megatron_genlip.model import recompute
from megatron_genlip.model.genlip import EmbeddingMixin, HeadMixin, component_rng
from megatron_genlip.model.layers import TransformerBlock
from megatron_genlip.model.rope import MultimodalRotaryEmbedding
from megatron_genlip.model.spec import get_layer_spec, parallel_config
from megatron_genlip.parallel import rng, state
from megatron_genlip.parallel.pipeline import pipeline_module
from megatron_genlip.parallel.sequence import SequenceParallel, check_supported


def _common(cfg: ModelConfig, tp_group, sequence_parallel: bool = False):
    tensor_parallel = state.group_size(tp_group)
    check_supported(tensor_parallel, sequence_parallel)
    return get_layer_spec(cfg), parallel_config(cfg, tensor_parallel, sequence_parallel), tp_group


class EmbedStage(EmbeddingMixin, torch.nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, seed: int, sequence_parallel: bool = False):
        super().__init__()
        self.sp = SequenceParallel(tp_group, sequence_parallel)
        with component_rng(seed, 0):
            self._build_embedding(cfg, *_common(cfg, tp_group))
        self.to(getattr(torch, cfg.params_dtype))

    def forward(self, inputs: tuple) -> tuple:
        batch = dict(zip(PIPELINE_INPUTS, inputs))
        # full length (image patches scattered into their slots), then this rank's slice under SP
        x = self.sp.scatter(self.embed(batch["input_ids"], batch["token_kinds"], batch["patches"]))
        return x, batch["positions"], batch["sample_ids"], batch["token_kinds"], batch["labels"]


class _MicroBatchTables:
    """Rotary tables and attention mask of the current micro-batch, built once per stage instead of once per
    block: consecutive blocks of a stage receive equal positions/ids/kinds. The key is compared by content
    (O(L)), not identity, because DeepSpeed may receive every micro-batch into the same reused buffers."""

    def __init__(self):
        self.key: tuple | None = None
        self.value: tuple | None = None

    def get(self, block: "BlockStage", positions, sample_ids, token_kinds, dtype) -> tuple:
        key = (positions, sample_ids, token_kinds)
        if self.key is None or self.value[2] is not dtype or not all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.key, key)):
            cos, sin = block.rotary(positions, dtype)
            mask = block.self_attn.kernel.build_mask(sample_ids, token_kinds)  # dense bool (sdpa) or BlockMask (flex)
            self.key, self.value = tuple(t.clone() for t in key), (cos, sin, dtype, mask)
        cos, sin, _, mask = self.value
        return cos, sin, mask


_TABLES = _MicroBatchTables()


class BlockStage(TransformerBlock):
    """One transformer block; its rotary tables and mask come from the tuple it receives (built once per
    micro-batch for all blocks of the stage)."""

    def __init__(self, cfg: ModelConfig, tp_group, seed: int, index: int,
                 activation_checkpointing: bool | str = "none", sequence_parallel: bool = False):
        with component_rng(seed, 1 + index):
            super().__init__(cfg, *_common(cfg, tp_group, sequence_parallel), index)
        self.rotary = MultimodalRotaryEmbedding(cfg.head_dim, cfg.mrope_section, cfg.rope_theta)
        self.activation_checkpointing = activation_checkpointing
        self.fp8_region = get_layer_spec(cfg).fp8_region
        self.to(getattr(torch, cfg.params_dtype))

    def forward(self, inputs: tuple) -> tuple:
        x, positions, sample_ids, token_kinds, labels = inputs
        cos, sin, mask = _TABLES.get(self, positions, sample_ids, token_kinds, x.dtype)
        mode = recompute.normalize(self.activation_checkpointing) if self.training else "none"
        if self.training:
            rng.check_replicated()  # DropPath draws from the default generators, outside any per-rank fork
        # Transformer Engine FP8: the block's autocast region (one per stage block), in training only (as in
        # GenLIPModel.encode: evaluation runs in bf16)
        region = self.fp8_region if self.training else None
        with region() if region is not None else contextlib.nullcontext():
            x = recompute.run_block(self, mode, x, cos, sin, mask, None, region=region,  # RNG replayed
                                    call=super().forward)
        return x, positions, sample_ids, token_kinds, labels


class HeadStage(HeadMixin, torch.nn.Module):
    """ln_post, proj, LM head on labelled positions and the token-mean loss: the pipeline's output."""

    def __init__(self, cfg: ModelConfig, tp_group, seed: int, sequence_parallel: bool = False):
        super().__init__()
        self.sp = SequenceParallel(tp_group, sequence_parallel)
        with component_rng(seed, cfg.num_layers + 1):
            self._build_head(cfg, *_common(cfg, tp_group))  # runs on full length, never split
        self.to(getattr(torch, cfg.params_dtype))

    def forward(self, inputs: tuple) -> torch.Tensor:
        x, _positions, sample_ids, _token_kinds, labels = inputs
        h = self.ln_post(self.sp.gather(x)).transpose(0, 1)
        return self.loss_from_hidden(h, labels, sample_ids).loss


def build_pipeline(cfg: ModelConfig, tensor_parallel: int, pipeline_parallel: int, seed: int,
                   activation_checkpointing: bool | str = "none", sequence_parallel: bool = False) -> PipelineModule:
    """The GenLIP pipeline on megatron-core's groups, which must exist (TP x PP as given)."""
    check_supported(tensor_parallel, sequence_parallel)
    sp, group = sequence_parallel, state.tensor_parallel_group()
    stages = [LayerSpec(EmbedStage, cfg, group, seed, sp)]
    stages += [LayerSpec(BlockStage, cfg, group, seed, i, activation_checkpointing, sp)
               for i in range(cfg.num_layers)]
    stages += [LayerSpec(HeadStage, cfg, group, seed, sp)]
    return pipeline_module(stages, tensor_parallel, pipeline_parallel, partition_method="type:BlockStage")
