"""How every trainer parameter is split across tensor-parallel ranks, and merging/splitting full tensors.

The model's names are the single-device names (``layers.3.self_attn.q.weight``, ``lm_head.weight``, ...).
Under TP, megatron-core's column-parallel layers and the vocab-parallel embedding split dim 0 of their
weight (and column biases), row-parallel layers split dim 1 of their weight and keep the bias whole, and
everything else (norms, LayerScale, patch embedding, in_proj/proj) is replicated. The rule is by name, so
tools can merge and split checkpoints without building the model; a test checks it against the
``partition_dim`` attributes megatron-core sets on a real TP=2 model.
"""

from __future__ import annotations

import re

import torch

_DIM0 = re.compile(
    r"(^|\.)(self_attn\.(q|gate|k|v)\.(weight|bias)|mlp\.(fc1|gate_fc)\.(weight|bias)"
    r"|embeddings\.weight|lm_head\.weight)$"
)
_DIM1 = re.compile(r"(^|\.)(self_attn\.o\.weight|mlp\.fc2\.weight)$")


def partition_dim(name: str) -> int | None:
    """The dimension a trainer parameter is split along under tensor parallelism (None: replicated)."""
    if name.startswith("vision_embeddings."):
        return None  # "vision_embeddings.patch_embedding.weight" must not match the text "embeddings.weight"
    if _DIM0.search(name):
        return 0
    if _DIM1.search(name):
        return 1
    return None


def merge_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Full tensor from its TP shards (rank order). Replicated tensors must agree across ranks."""
    dim = partition_dim(name)
    if dim is None:
        for r, s in enumerate(shards[1:], start=1):
            if s.shape != shards[0].shape or not torch.equal(s, shards[0]):
                raise ValueError(f"replicated parameter {name} differs between TP rank 0 and TP rank {r}")
        return shards[0]
    return torch.cat(shards, dim=dim)


def split_tp(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's shard of a full tensor."""
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP={tp}")
    return full.chunk(tp, dim=dim)[rank].clone()


# --------------------------------------------------------------------------------------------------
# names as DeepSpeed sees them, and DeepSpeed universal-checkpoint metadata

#: top-level modules of the pipeline's last stage (HeadStage); every other non-block module is on the first
HEAD_MODULES = ("ln_post", "proj", "lm_head")


def model_name(ds_name: str, num_layers: int) -> str:
    """The single-device model name of a DeepSpeed parameter name: PipelineModule names
    ("<layer index>.<name>": 0 = embeddings, 1..L = blocks, L+1 = head) become model names, model names
    stay as they are."""
    head, _, rest = ds_name.partition(".")
    if not head.isdigit():
        return ds_name
    idx = int(head)
    return rest if idx == 0 or idx == num_layers + 1 else f"layers.{idx - 1}.{rest}"


def pipeline_name(name: str, num_layers: int) -> str:
    """The PipelineModule name of a single-device model name (the inverse of :func:`model_name`)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"{int(parts[1]) + 1}.{'.'.join(parts[2:])}"
    return f"{num_layers + 1 if parts[0] in HEAD_MODULES else 0}.{name}"


def universal_checkpoint_info(ds_names, num_layers: int, version: float = 0.4) -> dict:
    """DeepSpeed's ``universal_checkpoint_info`` for these parameter names (either naming), so that
    ``deepspeed.checkpoint.ds_to_universal`` merges tensor-parallel shards along :func:`partition_dim`:
    replicated parameters are listed as TP-replicated (kept once, checked equal), row-parallel ones as
    row-parallel (concatenated along dim 1); everything else is concatenated along dim 0, DeepSpeed's
    default. Patterns are exact names, so every one of them matches (ds_to_universal's strict check)."""
    replicated, row = [], []
    for name in sorted(set(ds_names)):
        dim = partition_dim(model_name(name, num_layers))
        if dim is None:
            replicated.append(f"^{re.escape(name)}$")
        elif dim == 1:
            row.append(f"^{re.escape(name)}$")
    return {"universal_checkpoint_version": version, "tp_replicated_parameter_patterns": replicated,
            "parameter_with_row_parallelism_patterns": row}
