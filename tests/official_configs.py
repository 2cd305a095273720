"""The three official GenLIP config.json files as published (GENLIP_SPEC.md §6.9, read from the official
repository's ``configs/model_configs/genlip/genlip_{l16,so16,g16}_224.json`` at db2c226), and folders laid out
like the released checkpoints (official-schema config.json, bf16 safetensors shards with an index, no code).
Nothing here comes from megatron-genlip's own code: key names and shapes are those of GENLIP_SPEC.md §6
(``SPEC_BLOCK_KEYS``, the per-block list the export tests check against)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_cases import SPEC_BLOCK_KEYS

_COMMON = {
    "model_type": "genlip", "num_channels": 3, "num_attention_heads": 16, "patch_size": 16, "attention_dropout": 0.0,
    "hidden_act": "silu", "use_swiglu_ffn": True, "ls_init_value": 0.1, "initializer_range": 0.02,
    "torch_dtype": "bfloat16", "vocab_size": 151936, "max_position_embeddings": 16384, "use_llm_head": False,
    "llm_decoder": None, "use_liger_kernel": True, "tokens_per_second": 2, "spatial_merge_size": 1,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "gated_attention": True,
    "mrope_interleaved": True, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
PUBLISHED = {
    "L16": {**_COMMON, "architectures": ["GenLIP"], "num_hidden_layers": 24, "hidden_size": 1152,
            "intermediate_size": 2752, "drop_path_rate": 0.1, "text_embed_dim": 1024,
            "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}},
    "So16": {**_COMMON, "architectures": ["GenLIPModel"], "num_hidden_layers": 27, "hidden_size": 1152,
             "intermediate_size": 3072, "drop_path_rate": 0.1, "text_embed_dim": 1152,
             "rope_scaling": {"type": "mrope", "mrope_section": [12, 12, 12]}},
    "g16": {**_COMMON, "architectures": ["GenLIPModel"], "num_hidden_layers": 40, "hidden_size": 1536,
            "intermediate_size": 4096, "drop_path_rate": 0.2, "text_embed_dim": 1024,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 16, 16]}, "num_patches": 196},
}

def published(name: str, **changes) -> dict:
    """A deep copy of a published config with ``changes`` applied."""
    return {**copy.deepcopy(PUBLISHED[name]), **changes}


def official_shapes(conf: dict, gated_rows: bool | None = None) -> dict[str, tuple[int, ...]]:
    """The §6 key list of ``conf`` with shapes (``gated_rows`` overrides whether q_proj holds gate rows)."""
    d, f, e, V = conf["hidden_size"], conf["intermediate_size"], conf["text_embed_dim"], conf["vocab_size"]
    gated = conf["gated_attention"] if gated_rows is None else gated_rows
    p, C = conf["patch_size"], conf["num_channels"]
    shapes = {"vision_embeddings.patch_embedding.weight": (d, C, p, p), "vision_embeddings.patch_embedding.bias": (d,),
              "ln_post.weight": (d,), "ln_post.bias": (d,), "embeddings.weight": (V, e), "lm_head.weight": (V, e)}
    if e != d:
        shapes.update({"in_proj.weight": (d, e), "in_proj.bias": (d,), "proj.weight": (e, d), "proj.bias": (e,)})
    for i in range(conf["num_hidden_layers"]):
        shapes.update({f"visual.layers.{i}.{k}": s(d, f) for k, s in SPEC_BLOCK_KEYS.items()})
        if not gated:  # q_proj without the gate rows
            q = f"visual.layers.{i}.self_attn.q_proj."
            shapes.update({q + "weight": (d, d), q + "bias": (d,)})
    return shapes


def write_official_folder(folder: Path, conf: dict, seed: int = 0, shards: int = 2,
                          gated_rows: bool | None = None) -> dict[str, torch.Tensor]:
    """config.json + random bf16 weights split over ``shards`` files with model.safetensors.index.json, as the
    released checkpoints are laid out (no modeling code, no auto_map). LayerScale vectors hold 0.1 + noise and
    norms 1 + noise so that a wrong load is visible. Returns the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for k, shape in sorted(official_shapes(conf, gated_rows).items()):
        base = 0.1 if "lambda1" in k else 1.0 if ("norm" in k and k.endswith("weight")) else 0.0
        weights[k] = (base + 0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    names = sorted(weights)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[s * per:(s + 1) * per]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(conf, indent=2))
    return weights
