"""Pipeline parallelism: a DeepSpeed ``PipelineModule`` on megatron-core's process groups, for any stage list.

What is split into stages is the model's business (``model/stages.py`` cuts GenLIP into embedding, block and head
stages); this module only puts the stages on DeepSpeed's pipeline with a topology whose rank order equals
megatron-core's (``state.deepspeed_topology``). The rules the stages follow for DeepSpeed:

* every tensor passed between stages has a constant shape (rows are fixed length), and labels reach the last
  stage inside that tuple; every stage sees the same micro-batch stream;
* under sequence parallelism each TP rank sends its own sequence slice to the same TP rank of the next stage, so
  DeepSpeed's activation partitioning over the TP group (``pipeline.pipe_partitioned``, which assumes replicated
  activations) must be off (the trainer does so).

Like every module of ``megatron_genlip.parallel``, this one imports nothing from ``megatron_genlip.model``.
"""

from __future__ import annotations

from deepspeed.pipe import PipelineModule

from megatron_genlip.parallel import state


def pipeline_module(stages: list, tensor_parallel: int, pipeline_parallel: int,
                    partition_method: str) -> PipelineModule:
    """``stages`` (DeepSpeed ``LayerSpec``s) over ``pipeline_parallel`` stages; megatron-core's groups must exist
    with ``tensor_parallel`` ranks per tensor-parallel group."""
    group_size = state.group_size(state.tensor_parallel_group())
    if group_size != tensor_parallel:
        raise RuntimeError(f"megatron-core's tensor-parallel group has {group_size} ranks, "
                           f"not tensor_parallel={tensor_parallel}")
    return PipelineModule(layers=stages, num_stages=pipeline_parallel, loss_fn=None,
                          topology=state.deepspeed_topology(tensor_parallel, pipeline_parallel),
                          partition_method=partition_method, activation_checkpoint_interval=0)
