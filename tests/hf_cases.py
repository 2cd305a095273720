"""Helpers for the Hugging Face export and interop tests: a tiny-config packed batch, the TP=2 trainer logits of a
TP x PP checkpoint computed from that checkpoint's own shards (no merging), on 2 gloo ranks, the converter run
in-process, and GENLIP_SPEC.md §6's per-block keys."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import torch

from conftest import random_image
from megatron_genlip.config import load_config
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import build_sample
from megatron_genlip.data.tokenizer import load_tokenizer
from trainer_harness import ROOT, SHORT, TINY

TOLERANCE = 1e-5  # fp32, relative: the exported model and the trainer differ only in summation order
CONVERT = ROOT / "tools" / "convert_checkpoint.py"
COMMON = SHORT + ["train.train_steps=3", "train.precision=fp32", "train.micro_batch_size=1",
                  "train.global_batch_size=2", "train.eval_rows=4", "train.eval_captions=2", "train.max_new_tokens=6"]
CAPTIONS = ["a red circle at the top left.", "two blue squares.", "a small green star in the center.", "three crosses."]


def tiny_config():
    return load_config(TINY)


def tiny_packed_batch(seq_length: int = 96) -> dict[str, torch.Tensor]:
    """Two packed rows of the tiny config (3x3-patch images, its BPE), with padding at the row ends."""
    cfg = tiny_config()
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    p = cfg.model.patch_size
    samples = [build_sample(tok, random_image((3, 3), 40 + i, p), (3, 3), c) for i, c in enumerate(CAPTIONS)]
    return collate_batch([samples[:2], samples[2:]], seq_length)


def hf_validation_loss(model, val_prefix: str, rows: int = 4) -> float:
    """A Hugging Face GenLIPModel's loss on the first ``rows`` held-out packed rows of the tiny config, as the
    trainer's evaluation reports it at every layout: the token mean over the rows."""
    from megatron_genlip.batch import normalize_pixels
    from megatron_genlip.data.tokenizer import tokenizer_fingerprint
    from megatron_genlip.data.indexed import GenLIPIndexedDataset
    from megatron_genlip.data.packed_dataset import PackedRows
    from megatron_genlip.data.packing import stack_rows

    cfg = tiny_config()
    fp = tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path)
    packed = PackedRows(GenLIPIndexedDataset(val_prefix, cfg.data, fp), cfg.data.seq_length, cfg.data.seed,
                        cfg.data.pack_buffer_size)
    per_row = []
    for r in range(min(rows, packed.rows_in_epoch(0))):
        b = stack_rows([packed[r]])
        pixels = normalize_pixels(b["patches"])  # the loader ships uint8; the HF model takes its processor's floats
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], pixel_values=pixels, position_ids=b["positions"],
                           sample_ids=b["sample_ids"], token_kinds=b["token_kinds"]).logits
        labels = b["labels"][:, 1:].flatten()
        per_row.append(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, reduction="none",
                                                         ignore_index=-100)[labels != -100])
    return float(torch.cat(per_row).mean())


def tp2_logits_from_shards(rank: int, world: int, tag_dir: str, out_file: str) -> None:
    """Rank r builds the TP=2 trainer model and loads TP rank r's files of every pipeline stage as they are."""
    from megatron_genlip.model.genlip import build_model
    from megatron_genlip.parallel import state

    cfg = tiny_config().model
    state.reinitialize(2)
    model = build_model(cfg, 2, seed=0).eval()
    sd = {}
    for f in sorted(Path(tag_dir).glob(f"layer_*-model_{rank:02d}-model_states.pt")):
        idx = int(re.search(r"layer_(\d+)-", f.name).group(1))
        part = torch.load(f, map_location="cpu", weights_only=False)
        prefix = "" if idx in (0, cfg.num_layers + 1) else f"layers.{idx - 1}."
        sd.update({prefix + k: v for k, v in part.items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    with torch.no_grad():
        logits = state.gather_last_dim(model.logits(tiny_packed_batch()))
    if rank == 0:
        torch.save(logits, out_file)


def convert(*args: str, check: bool = True) -> SimpleNamespace:
    """tools/convert_checkpoint.py's main() in this process (its command line, exit code and messages)."""
    tool = runpy.run_path(str(CONVERT))  # a fresh namespace; no __main__ block runs
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = tool["main"](list(args))
    if check and rc != 0:
        raise AssertionError(f"convert failed ({rc}):\n{out.getvalue()}\n{err.getvalue()}")
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


SPEC_BLOCK_KEYS = {  # GENLIP_SPEC.md §6, per block i, with shapes as functions of (d, f)
    "layer_norm1.weight": lambda d, f: (d,), "layer_norm1.bias": lambda d, f: (d,),
    "self_attn.q_proj.weight": lambda d, f: (2 * d, d), "self_attn.q_proj.bias": lambda d, f: (2 * d,),
    "self_attn.k_proj.weight": lambda d, f: (d, d), "self_attn.k_proj.bias": lambda d, f: (d,),
    "self_attn.v_proj.weight": lambda d, f: (d, d), "self_attn.v_proj.bias": lambda d, f: (d,),
    "self_attn.out_proj.weight": lambda d, f: (d, d), "self_attn.out_proj.bias": lambda d, f: (d,),
    "layer_norm2.weight": lambda d, f: (d,), "layer_norm2.bias": lambda d, f: (d,),
    "mlp.fc1.weight": lambda d, f: (f, d), "mlp.fc1.bias": lambda d, f: (f,),
    "mlp.gate_fc.weight": lambda d, f: (f, d), "mlp.gate_fc.bias": lambda d, f: (f,),
    "mlp.fc2.weight": lambda d, f: (d, f), "mlp.fc2.bias": lambda d, f: (d,),
    "layer_scale1.lambda1": lambda d, f: (d,), "layer_scale2.lambda1": lambda d, f: (d,),
}


# --------------------------------------------------------------------------------------------------
# The official GenLIP class (bytedance GenLIP, modeling_genlip.py at db2c226) as far as config.json and the state
# dict go: what ``GenLIPConfig(**conf).save_pretrained()`` writes, and which keys ``GenLIPModel(config)`` holds.

# every attribute the official GenLIPConfig.__init__ sets, with its default (None: derived, see below)
OFFICIAL_CLASS_ATTRIBUTES = {
    "vocab_size": 152064, "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": None, "num_channels": 3, "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 32768, "use_swiglu_ffn": False,
    "ls_init_value": 0.0, "drop_path_rate": 0.0, "gated_attention": False, "layer_norm_eps": 1e-6,
    "spatial_merge_size": 1, "temporal_patch_size": 1, "tokens_per_second": 4, "initializer_range": 0.02,
    "initializer_factor": 1.0, "text_embed_dim": None, "use_llm_head": False, "llm_decoder": None,
    "lm_head_hdsz": 1024, "rms_norm_eps": 1e-05, "use_cache": True, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "attention_dropout": 0.0, "mrope_interleaved": False, "rope_scaling": None,
    "use_liger_kernel": False, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
}
# what save_pretrained writes beyond the hand-written published schema (GENLIP_SPEC.md §6.9) that no earlier
# megatron-genlip version knew (the four)
OFFICIAL_SAVE_ADDS = ("initializer_factor", "lm_head_hdsz", "num_key_value_heads", "rms_norm_eps")
OFFICIAL_LAYER_SCALE_MIN = 1e-6  # the official block builds LayerScale only when ls_init_value > this


def official_save_pretrained(conf: dict, transformers_version: str = "4.51.3") -> dict:
    """The config.json the official trainer writes for ``conf`` (GenLIPConfig(**conf).save_pretrained()):
    every attribute its __init__ sets (unset ones at the class default, num_key_value_heads and text_embed_dim
    derived), ``rope_scaling`` as __init__ rewrites it ("mrope" -> type and rope_type "default"), the extra
    keyword fields it was given (e.g. g/16's num_patches), transformers' version, sorted as json.dumps does."""
    import copy

    out = {**copy.deepcopy(OFFICIAL_CLASS_ATTRIBUTES), **copy.deepcopy(conf)}
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    if out["text_embed_dim"] is None:
        out["text_embed_dim"] = out["hidden_size"]
    scaling = out["rope_scaling"]
    if scaling is not None and "type" in scaling:
        if scaling["type"] == "mrope":
            scaling["type"] = "default"
        scaling["rope_type"] = scaling["type"]
    out["transformers_version"] = transformers_version
    return dict(sorted(out.items()))


def official_state_keys(conf: dict) -> set[str]:
    """The keys of the official GenLIPModel's state dict for a config.json (what a strict load expects):
    LayerScale vectors only when ls_init_value > 1e-6 (nn.Identity otherwise)."""
    from official_configs import official_shapes

    keys = set(official_shapes(conf))
    if not conf.get("ls_init_value", OFFICIAL_CLASS_ATTRIBUTES["ls_init_value"]) > OFFICIAL_LAYER_SCALE_MIN:
        keys = {k for k in keys if ".layer_scale" not in k}
    return keys
