"""Parallel primitives on megatron-core's groups: process groups and topology (``state``), RNG streams (``rng``),
sequence parallelism (``sequence``), tensor-parallel split rules (``sharding``), the DeepSpeed pipeline
(``pipeline``). Nothing here imports ``megatron_genlip.model`` or ``megatron_genlip.data``: the model builds on
these primitives, as megatron-core's transformer builds on its ``tensor_parallel`` (tests/test_layering.py)."""
