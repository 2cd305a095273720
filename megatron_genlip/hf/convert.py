"""Checkpoint <-> Hugging Face folder conversion (the logic behind ``tools/convert_checkpoint.py``).

Trainer checkpoint -> full state dict (:func:`read_checkpoint`):
  * ZeRO-3: DeepSpeed's ``zero_to_fp32`` rebuilds the fp32 weights from the per-rank partitions;
  * TP = PP = 1, bf16 training: the same tool reads the fp32 master weights (the module file holds bf16);
  * otherwise: the module files of every TP rank (``mp_rank_XX_model_states.pt``, or per pipeline layer
    ``layer_LL-model_XX-model_states.pt``), pipeline layer names mapped back to the model's names and
    TP shards concatenated along their partition dimension (:mod:`megatron_genlip.parallel.sharding`).
Full state dict -> Hugging Face folder (:func:`write_hf_folder`): the §6 keys (``hf/keys.py``), safetensors
(sharded with an index above a size), ``config.json`` with ``auto_map`` and the modeling code for
``trust_remote_code``, tokenizer (``tokenizer.json`` built from the tiktoken ranks, plus the ranks file),
image-processor config and a model card.
Hugging Face folder -> weights-only trainer checkpoint (:func:`write_weights_only_checkpoint`): the full
weights under trainer names in ``iter_0000000/`` with a marker; the trainer loads them into any layout
(:func:`load_weights_only`) with a fresh optimizer at step 0.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_genlip.config import Config, ConfigError, ModelConfig, TokenizerConfig, resolve_layout
from megatron_genlip.hf.keys import from_hf, to_hf
from megatron_genlip.hf.official_config import (LAYER_SCALE_MIN, LAYER_SCALE_STAND_IN, check_gate_rows,
                                                from_official, kept_fields, model_differences,
                                                official_model_fields, to_official)
from megatron_genlip.parallel.sharding import merge_tp, model_name, split_tp
from megatron_genlip.training import checkpoint as ckpt
from megatron_genlip.training import ckpt_format
from megatron_genlip.training.lock import LOCK_FILE

HF_DIR = Path(__file__).resolve().parent
REMOTE_CODE = ("configuration_genlip.py", "modeling_genlip.py", "image_processing_genlip.py")
WEIGHTS_ONLY_FILE = ckpt_format.WEIGHTS_ONLY_FILE
ENCODER_PREFIXES = ("vision_embeddings.", "visual.", "ln_post.")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint or Hugging Face folder that cannot be converted; the message names the file."""


# --------------------------------------------------------------------------------------------------
# reading trainer checkpoints


def resolve_tag(ckpt_dir: str | Path, iteration: int | None = None) -> Path:
    """The tag directory to read: ``iteration``'s, or the newest one that verifies against its manifest (sizes and
    sha256; ``training/ckpt_format.py``), saying on stderr why newer ones were passed over."""
    try:
        verdict = ckpt_format.resolve(ckpt_dir, iteration, log=lambda text: print(text, file=sys.stderr))
    except ckpt_format.CheckpointFormatError as e:
        raise CheckpointError(str(e)) from None
    return Path(ckpt_dir) / verdict.tag


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file; say which one
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e} (truncated or not a checkpoint file?)") from e


def read_trainer_state(tag: Path) -> dict:
    """The trainer's client state (config, layout, counters) stored with the checkpoint (or the marker of a
    weights-only one): ``training.checkpoint.read_trainer_state``, with errors that name the file."""
    if (tag / ckpt_format.WEIGHTS_ONLY_MARKER).is_file():
        source = tag / ckpt_format.WEIGHTS_ONLY_MARKER
    else:
        try:
            source = ckpt_format.model_states_path(tag)
        except ckpt_format.CheckpointFormatError as e:
            raise CheckpointError(str(e)) from None
    try:
        client = ckpt.read_trainer_state(tag)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file; say which one
        raise CheckpointError(f"cannot read {source}: {type(e).__name__}: {e} "
                              "(truncated or not a checkpoint of this trainer?)") from e
    if not client:
        raise CheckpointError(f"{source} holds no megatron-genlip trainer state")
    return client


def _module_files(tag: Path, tp: int, pp: int, num_layers: int) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, that rank's module state under the single-device model's names."""
    per_rank = []
    for r in range(tp):
        if pp == 1:
            f = tag / ckpt_format.model_states_name(r)
            if not f.is_file():
                raise CheckpointError(f"{f} is missing (checkpoint written at TP={tp})")
            per_rank.append(dict(_torch_load(f)["module"]))
            continue
        files = sorted(glob.glob(str(tag / ckpt_format.pipeline_layer_glob(r))))
        if len(files) != num_layers + 2:
            raise CheckpointError(f"{tag}: expected {num_layers + 2} pipeline layer files for TP rank {r}, "
                                  f"found {len(files)}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            idx = re.search(r"layer_(\d+)-", os.path.basename(f)).group(1)
            state.update({model_name(f"{idx}.{k}", num_layers): v for k, v in _torch_load(Path(f)).items()})
        per_rank.append(state)
    return per_rank


def read_checkpoint(ckpt_dir: str | Path, iteration: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge a trainer checkpoint (any TP/PP/DP/ZeRO layout, or a weights-only one) into one state dict
    with the single-device model's names; returns it with the trainer state (config, layout, counters)."""
    tag = resolve_tag(ckpt_dir, iteration)
    client = read_trainer_state(tag)
    if (tag / ckpt_format.WEIGHTS_ONLY_MARKER).is_file():
        return _load_safetensors(tag / WEIGHTS_ONLY_FILE), client
    if (tag / ckpt_format.UNIVERSAL_MARKER).is_file():  # tools/reshard_checkpoint.py: full fp32 masters in zero/<name>/
        state = _universal_weights(tag, client["config"]["model"]["num_layers"])
        check_against_model(state, model_config(client["config"]), str(tag))
        return state, client
    cfg, layout = client["config"], client["layout"]
    tp, pp, zero = layout["tensor_parallel"], layout["pipeline_parallel"], cfg["parallel"]["zero_stage"]
    master = zero == 3 or (tp == pp == 1 and zero >= 1 and cfg["train"]["precision"] != "fp32")
    if master:
        if tp > 1:
            raise CheckpointError(f"{tag}: ZeRO-3 with TP={tp} cannot be merged by zero_to_fp32; "
                                  "reshard to TP=1 first (tools/reshard_checkpoint.py)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"zero_to_fp32 could not read the ZeRO partitions in {tag}: {e}") from e
    else:
        shards = _module_files(tag, tp, pp, cfg["model"]["num_layers"])
        names = [k for k in shards[0] if not k.endswith("_extra_state")]  # megatron-core's (empty) FP8 metadata
        state = {name: merge_tp(name, [s[name] for s in shards]) for name in names}
    state = {k: v.detach().clone() for k, v in state.items() if not k.endswith("_extra_state")}
    check_against_model(state, model_config(cfg), str(tag))
    return state, client


def _universal_weights(tag: Path, num_layers: int) -> dict[str, torch.Tensor]:
    """The full fp32 master weights of a resharded (DeepSpeed universal) checkpoint, under model names."""
    zero = tag / "zero"
    if not zero.is_dir():
        raise CheckpointError(f"{zero} is missing (incomplete resharded checkpoint)")
    state = {}
    for d in sorted(p for p in zero.iterdir() if p.is_dir()):
        f = d / "fp32.pt"
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (incomplete resharded checkpoint)")
        t = _torch_load(f)
        state[model_name(d.name, num_layers)] = (t["param"] if isinstance(t, dict) else t).detach()
    return state


def model_config(cfg: dict) -> ModelConfig:
    return ModelConfig(**cfg["model"])


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Trainer names and full (TP=1) shapes of a model config: the §6 list mapped to trainer names (no model
    is built, so this works inside a run of any layout; a test checks it against the real model)."""
    meta = {k: torch.empty(s, device="meta") for k, s in expected_hf_shapes(official_model_fields(cfg)).items()}
    return {k: tuple(v.shape) for k, v in from_hf(meta, gated=cfg.gated_attention).items()}


def _check_shapes(state: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], where: str, against: str) -> None:
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = [f"{k}: {tuple(state[k].shape)} != {want[k]}" for k in want if k in state and tuple(state[k].shape) != want[k]]
    if missing or extra or wrong:
        raise CheckpointError(f"{where} does not match {against}: missing {missing[:5]}, unexpected {extra[:5]}, "
                              f"wrong shapes {wrong[:5]}")


def check_against_model(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    _check_shapes(state, expected_shapes(cfg), where, "its model config")


# --------------------------------------------------------------------------------------------------
# Hugging Face folders


def hf_config(cfg: ModelConfig, tokenizer, vision_only: bool, dtype: str, extra: dict | None = None,
              max_position_embeddings: int = 16384, kept: dict | None = None) -> dict:
    """config.json contents: the official schema (``official_config.to_official``; ``kept``: the unused fields of
    the config.json the model was imported from, as they were), then our fields the official schema has no
    equivalent for (``official_config.OUR_FIELDS``)."""
    out = to_official(cfg, dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype], vision_only=vision_only,
                      vision_start_token_id=tokenizer.token_id("<|vision_start|>"),
                      vision_end_token_id=tokenizer.token_id("<|vision_end|>"),
                      max_position_embeddings=max_position_embeddings, kept=kept)
    out.update(text_vocab_size=tokenizer.n_vocab, image_token_id=tokenizer.token_id("<|image_pad|>"),
               eos_token_id=tokenizer.eos_id,
               auto_map={"AutoConfig": "configuration_genlip.GenLIPConfig",
                         "AutoModel": "modeling_genlip.GenLIPAutoModel"})  # picks the class from vision_only
    if extra:
        out["genlip_training"] = extra
    return out


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(text).upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a byte count")
    return int(float(m.group(1)) * {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_size: str | int = "5GB") -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the size."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = state[k].contiguous()
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or corrupt?)") from e


def load_hf_weights(hf_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF-keyed tensors, config.json) of an exported folder; every shard is read and checked."""
    hf_dir = Path(hf_dir)
    conf_file = hf_dir / "config.json"
    if not conf_file.is_file():
        raise CheckpointError(f"{conf_file} is missing (not a Hugging Face model folder)")
    conf = json.loads(conf_file.read_text())
    if conf.get("model_type") != "genlip":
        raise CheckpointError(f"{conf_file}: model_type is {conf.get('model_type')!r}, expected 'genlip'")
    index = hf_dir / "model.safetensors.index.json"
    state: dict[str, torch.Tensor] = {}
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name in sorted(set(weight_map.values())):
            part = _load_safetensors(hf_dir / name)
            want = {k for k, v in weight_map.items() if v == name}
            if set(part) != want:
                raise CheckpointError(f"{hf_dir / name} holds {sorted(set(part) ^ want)[:5]} unlike its index {index}")
            state.update(part)
    else:
        state = _load_safetensors(hf_dir / "model.safetensors")
    return state, conf


def expected_hf_shapes(conf: dict) -> dict[str, tuple[int, ...]]:
    """The §6 key list with shapes, from a config.json mapping (what the official loader expects)."""
    d, f, e, V = conf["hidden_size"], conf["intermediate_size"], conf["text_embed_dim"], conf["vocab_size"]
    C, p = conf["num_channels"], conf["patch_size"]
    q = 2 * d if conf["gated_attention"] else d
    want = {"vision_embeddings.patch_embedding.weight": (d, C, p, p), "vision_embeddings.patch_embedding.bias": (d,),
            "ln_post.weight": (d,), "ln_post.bias": (d,)}
    for i in range(conf["num_hidden_layers"]):
        b = f"visual.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            want[b + n + ".weight"] = want[b + n + ".bias"] = (d,)
        want[b + "self_attn.q_proj.weight"], want[b + "self_attn.q_proj.bias"] = (q, d), (q,)
        for n in ("k_proj", "v_proj", "out_proj"):
            want[b + f"self_attn.{n}.weight"], want[b + f"self_attn.{n}.bias"] = (d, d), (d,)
        for n in ("fc1", "gate_fc"):
            want[b + f"mlp.{n}.weight"], want[b + f"mlp.{n}.bias"] = (f, d), (f,)
        want[b + "mlp.fc2.weight"], want[b + "mlp.fc2.bias"] = (d, f), (d,)
        want[b + "layer_scale1.lambda1"] = want[b + "layer_scale2.lambda1"] = (d,)
    if not conf.get("vision_only"):
        want["embeddings.weight"], want["lm_head.weight"] = (V, e), (V, e)
        if e != d:
            want.update({"in_proj.weight": (d, e), "in_proj.bias": (d,), "proj.weight": (e, d), "proj.bias": (e,)})
    return want


def check_hf_weights(state: dict[str, torch.Tensor], conf: dict, where: str) -> None:
    _check_shapes(state, expected_hf_shapes(conf), where, "its config.json")


def _write_tokenizer(tok_cfg: TokenizerConfig, out: Path) -> None:
    """tokenizer.json (a byte-level BPE rebuilt from the tiktoken ranks, loadable with AutoTokenizer),
    tokenizer_config.json, the ranks file itself and the special-token ids."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from megatron_genlip.data.tokenizer import QWEN2_SPECIAL_TOKENS, QWEN_PAT, QWEN_RANKS_PATH, load_tokenizer, resolve_asset

    tok = load_tokenizer(tok_cfg.kind, tok_cfg.path)
    ranks = QWEN_RANKS_PATH if tok_cfg.kind == "qwen" and tok_cfg.path is None else resolve_asset(tok_cfg.path)
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PAT,
                                extra_special_tokens=list(QWEN2_SPECIAL_TOKENS)).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    shutil.copyfile(ranks, out / "genlip.tiktoken")
    specials = {t: tok.token_id(t) for t in QWEN2_SPECIAL_TOKENS}
    (out / "special_tokens.json").write_text(json.dumps({"pattern": QWEN_PAT, "special_tokens": specials,
                                                         "prompt": tok_cfg.prompt}, indent=2) + "\n")
    if tok_cfg.kind == "qwen":
        for name in ("LICENSE-qwen-tiktoken", "NOTICE-qwen-tiktoken"):
            if (QWEN_RANKS_PATH.parent / name).is_file():
                shutil.copyfile(QWEN_RANKS_PATH.parent / name, out / name)


def _model_card(conf: dict, client: dict, vision_only: bool, files: list[str]) -> str:
    cfg, t, d = client["config"], client["config"]["train"], client["config"]["data"]
    layout = client.get("layout") or client.get("target_layout") or {}
    what = "vision encoder only (patch embedding, blocks, ln_post)" if vision_only else \
        "the full pre-training model (encoder + text embedding + LM head)"
    load = "AutoModel.from_pretrained(path, trust_remote_code=True)"
    return f"""---
library_name: transformers
tags: [genlip, vision-encoder, megatron-genlip]
---
# GenLIP export ({what})

Exported by megatron-genlip `tools/convert_checkpoint.py` from `{client.get('source', '?')}` at step
{client.get('iteration', '?')} ({client.get('samples_seen', 0):.0f} samples, {client.get('tokens_seen', 0):.0f} tokens seen).
Key names and layouts follow the official GenLIP checkpoints (GENLIP_SPEC.md §6): `q_proj` is `[2d, d]`,
query rows first, gate rows second.

## Use
```python
from transformers import AutoModel, AutoTokenizer
model = {load}
features = model.get_image_features(pixel_values, image_grid_thw)  # ln_post output, [N_patches, {conf['hidden_size']}]
```
Image preprocessing: `image_processing_genlip.GenLIPImageProcessor.from_pretrained(path)` (stage {d['stage']}:
{'resize to %dx%d' % (d['image_size'], d['image_size']) if d['stage'] == 1 else 'native aspect ratio, smart_resize'},
bilinear, mean = std = 0.5, 16x16 patches in row-major order). For MLLMs read `ln_post` features, not `proj`.

## Model
{conf['num_hidden_layers']} layers, width {conf['hidden_size']}, {conf['num_attention_heads']} heads, SwiGLU
{conf['intermediate_size']}, interleaved M-RoPE {conf['rope_scaling']['mrope_section']}, {'gated' if conf['gated_attention'] else 'ungated'} attention, LayerScale
{conf['ls_init_value']}, text_embed_dim {conf['text_embed_dim']}, vocabulary {conf['vocab_size']}.

## Training recipe
- objective: next-token loss on `[image][prompt][caption]` packed rows ({d['seq_length']} tokens), prefix-LM attention
- data: `{d.get('train_data')}` (stage {d['stage']})
- optimizer: AdamW lr {t['lr']} (min {t['min_lr']}), betas ({t['adam_beta1']}, {t['adam_beta2']}), weight decay
  {t['weight_decay']}, clip {t['clip_grad']}, {t['train_steps']} steps, global batch {t['global_batch_size']} rows,
  precision {t['precision']}
- layout: TP={layout.get('tensor_parallel')} PP={layout.get('pipeline_parallel')} DP={layout.get('data_parallel', '-')},
  ZeRO-{cfg['parallel']['zero_stage']}

Files: {', '.join(files)}.
"""


def check_finite(state: dict[str, torch.Tensor], where: str, consequence: str) -> None:
    """Every floating tensor holds finite values only; otherwise a CheckpointError naming each bad tensor with its
    NaN / inf counts (a model with one NaN computes NaN everywhere downstream of it)."""
    bad = []
    for name in sorted(state):
        t = state[name]
        if not t.is_floating_point():
            continue
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(t).sum())
        bad.append(f"{name} ({nan} NaN, {int((~finite).sum()) - nan} inf of {t.numel()} values)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{where} holds non-finite values in {len(bad)} tensor(s): {'; '.join(bad[:5])}{more}; "
                              f"{consequence}")


def imported_fields(client: dict) -> dict:
    """The unused fields of the config.json a checkpoint's weights were imported from (``official_config.kept_fields``):
    stored in a weights-only checkpoint's marker, and found for a run started from one through its ``train.load``
    (a note on stderr when that checkpoint is gone: they cannot be carried then). Empty for anything else."""
    if "official_fields" in client:
        return dict(client["official_fields"] or {})
    load = ((client.get("config") or {}).get("train") or {}).get("load")
    if not load:
        return {}
    load = Path(load)
    for marker in (load / ckpt_format.WEIGHTS_ONLY_MARKER, load / ckpt_format.tag_for(0) / ckpt_format.WEIGHTS_ONLY_MARKER):
        if marker.is_file():
            try:
                return dict(json.loads(marker.read_text()).get("official_fields") or {})
            except (OSError, ValueError, AttributeError) as e:
                print(f"[convert] note: cannot read {marker} ({e}); the fields of the config.json this run was "
                      "imported from that the trainer does not use (e.g. num_patches) are not carried", file=sys.stderr)
                return {}
    if not load.exists():
        print(f"[convert] note: this run started from {load} (train.load), which is gone; if that was an import "
              "(--from-hf), the fields of its config.json that the trainer does not use (e.g. num_patches, "
              "architectures) are not carried", file=sys.stderr)
    return {}


def write_hf_folder(state: dict[str, torch.Tensor], client: dict, save_dir: str | Path, dtype: str = "bf16",
                    vision_only: bool = False, max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """Write the Hugging Face folder of a merged trainer state dict (see the module docstring); a non-empty
    ``save_dir`` only with ``overwrite`` (its model*.safetensors are then replaced)."""
    from megatron_genlip.data.tokenizer import load_tokenizer

    check_save_dir(save_dir, overwrite)
    check_finite(state, f"the checkpoint {client.get('source', '')}".rstrip(), "nothing exported")
    cfg_dict = client["config"]
    mcfg, tok_cfg = model_config(cfg_dict), TokenizerConfig(**cfg_dict["tokenizer"])
    tokenizer = load_tokenizer(tok_cfg.kind, tok_cfg.path)
    hf = {k: v.to(DTYPES[dtype]) for k, v in to_hf(state).items()}
    if vision_only:
        hf = {k: v for k, v in hf.items() if k.startswith(ENCODER_PREFIXES)}
    check_finite(hf, f"the weights cast to {dtype}", "nothing exported")  # bf16 overflows to inf above 3.4e38
    extra = {k: client.get(k) for k in ("source", "iteration", "consumed_samples", "samples_seen", "tokens_seen")}
    extra["config"] = cfg_dict  # the resolved training config: recipe for the card, tokenizer for re-imports
    conf = hf_config(mcfg, tokenizer, vision_only, dtype, extra, cfg_dict["data"]["seq_length"],
                     kept=imported_fields(client))
    check_hf_weights(hf, conf, "the converted state dict")
    if not mcfg.layer_scale_init > LAYER_SCALE_MIN:
        print(f"[convert] note: model.layer_scale_init={mcfg.layer_scale_init} is at or below 1e-6, where the official "
              f"GenLIP class builds no LayerScale; config.json says ls_init_value={LAYER_SCALE_STAND_IN} (an initial "
              "value only) so that it builds LayerScale and loads the trained vectors; the run's init stays in "
              "genlip_training.config.model (an import restores it)", file=sys.stderr)
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in glob.glob(str(out / "model*.safetensors")) + glob.glob(str(out / "model.safetensors.index.json")):
        os.remove(old)
    files = save_safetensors(hf, out, max_shard_size)
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    for name in REMOTE_CODE:
        shutil.copyfile(HF_DIR / name, out / name)
    data = cfg_dict["data"]
    (out / "preprocessor_config.json").write_text(json.dumps({
        "processor_class": "GenLIPImageProcessor", "image_processor_type": "GenLIPImageProcessor",
        "stage": data["stage"], "image_size": data["image_size"], "patch_size": mcfg.patch_size,
        "min_pixels": data["min_pixels"], "max_pixels": data["max_pixels"], "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "resample": "bilinear", "rescale_factor": 1 / 255,
        "background": list(data.get("background", [255, 255, 255])),  # under transparent pixels, as in training
    }, indent=2) + "\n")
    _write_tokenizer(tok_cfg, out)
    (out / "README.md").write_text(_model_card(conf, client, vision_only, files))
    return out


# --------------------------------------------------------------------------------------------------
# Hugging Face folder -> trainer checkpoint (weights only, fresh optimizer)


def _is_tag_dir(path: Path) -> bool:
    """A checkpoint tag directory (``iter_NNNNNNN`` or its ``.partial``) with a checkpoint file in it, or named so
    inside a checkpoints directory (a new folder there would be taken for a checkpoint)."""
    name = path.name[:-len(ckpt_format.PARTIAL_SUFFIX)] if path.name.endswith(ckpt_format.PARTIAL_SUFFIX) else path.name
    if not ckpt_format.TAG_RE.match(name):
        return False
    markers = (ckpt_format.MANIFEST, ckpt_format.WEIGHTS_ONLY_MARKER, ckpt_format.UNIVERSAL_MARKER,
               *ckpt_format.MODEL_STATES_FILES)
    return any((path / m).exists() for m in markers) or _is_checkpoints_dir(path.parent)


def _is_checkpoints_dir(path: Path) -> bool:
    """A directory holding checkpoints: ``latest``, tags or unfinished saves."""
    return path.is_dir() and ((path / ckpt_format.LATEST).is_file() or bool(ckpt_format.list_tags(path))
                              or bool(ckpt_format.list_partials(path)))


def run_output_markers(path: Path) -> list[str]:
    """What makes ``path`` a training run's output directory: its lock file, its training log, its checkpoints."""
    found = [m for m in (LOCK_FILE, "logs/train.jsonl") if (path / m).is_file()]
    if _is_checkpoints_dir(path / "checkpoints"):
        found.append("checkpoints/")
    return found


def check_save_dir(save_dir: str | Path, overwrite: bool = False, writes: str = "hf") -> None:
    """Where a conversion may write (``writes``: "hf" for an export, "checkpoint" for ``--from-hf``): a new or empty
    folder, or a non-empty one with ``overwrite``; never, even with ``overwrite``, a training run's output
    directory (its config.json, logs and checkpoints), a directory holding a run's checkpoints (its ``latest``
    would be repointed: the run would restart at step 0 with a fresh optimizer), a checkpoint tag directory or
    anything inside one (its manifest would no longer match), nor, for an export, any checkpoints directory.
    ``--from-hf`` may redo an import into a directory that holds only weights-only imports."""
    save_dir = Path(save_dir)
    never = "choose another folder (--overwrite never writes there)"
    resolved = save_dir.resolve()
    for p in (resolved, *resolved.parents):
        if _is_tag_dir(p):
            where = "is" if p == resolved else "lies inside"
            raise CheckpointError(f"--save {save_dir} {where} the checkpoint tag directory {p}: writing there would "
                                  f"change a checkpoint (and break its manifest); {never}")
    markers = run_output_markers(resolved)
    if markers:
        raise CheckpointError(f"--save {save_dir} is a training run's output directory ({', '.join(markers)}): "
                              f"writing there would replace the run's config.json and mix with its checkpoints; {never}")
    run_tags = ckpt_format.holds_run_checkpoints(save_dir)
    if run_tags:
        raise CheckpointError(f"--save {save_dir} holds a training run's checkpoints ({', '.join(run_tags[-3:])}): "
                              f"writing there would repoint its 'latest'; {never}")
    imports_only = bool(ckpt_format.list_tags(save_dir)) and writes == "checkpoint"
    if _is_checkpoints_dir(save_dir) and not imports_only:
        why = "a Hugging Face folder does not belong there" if writes == "hf" else "writing there would repoint its 'latest'"
        raise CheckpointError(f"--save {save_dir} is a checkpoints directory ('latest', iter_* tags or unfinished "
                              f"saves): {why}; {never}")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"--save {save_dir} is not empty; pass --overwrite to replace what is there, or choose "
                              "another folder")


def write_weights_only_checkpoint(hf_dir: str | Path, save_dir: str | Path, tp: int = 1, pp: int = 1,
                                  overwrite: bool = False) -> Path:
    """A checkpoint the trainer starts from (``train.load``): the full weights under trainer names, with
    the marker the trainer recognises, a manifest, then ``latest``. ``tp``/``pp`` are checked against the model
    now (heads, widths, vocabulary and layers divisible), so a bad target layout fails here, not on the cluster."""
    check_save_dir(save_dir, overwrite, writes="checkpoint")
    state, conf = load_hf_weights(hf_dir)
    if conf.get("vision_only"):
        raise CheckpointError(f"{Path(hf_dir) / 'config.json'}: a --vision-only export has no text embedding or LM "
                              "head; convert the full model to continue training")
    conf_file = str(Path(hf_dir) / "config.json")
    mcfg = from_official(conf, conf_file)  # the official schema or any of our exports
    if "visual.layers.0.self_attn.q_proj.weight" in state:
        check_gate_rows(state["visual.layers.0.self_attn.q_proj.weight"].shape[0], mcfg, conf_file)
    check_hf_weights(state, official_model_fields(mcfg), str(Path(hf_dir)))
    check_finite(state, str(Path(hf_dir)), "nothing written")
    probe = Config(model=mcfg)
    probe.parallel.tensor_parallel, probe.parallel.pipeline_parallel = tp, pp
    resolve_layout(probe, tp * pp)  # raises ConfigError naming the fields
    trainer_state = {k: v.float().contiguous() for k, v in from_hf(state, gated=mcfg.gated_attention).items()}
    check_against_model(trainer_state, mcfg, str(hf_dir))
    tag = Path(save_dir) / ckpt_format.tag_for(0)
    work = Path(save_dir) / ckpt_format.partial_name(tag.name)  # renamed to `tag` once complete
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    save_file(trainer_state, str(work / WEIGHTS_ONLY_FILE), metadata={"format": "pt"})
    # the source run's config when the folder is one of ours (tokenizer, recipe), else the defaults (Qwen
    # tokenizer, as the official checkpoints); the model section always comes from config.json
    source_cfg = conf.get("genlip_training", {}).get("config") or Config().to_dict()
    source_cfg = dict(source_cfg, model=dataclasses.asdict(mcfg))
    marker = {"weights_only": True, "source": str(Path(hf_dir).resolve()), "iteration": 0,
              "target_layout": {"tensor_parallel": tp, "pipeline_parallel": pp}, "config": source_cfg,
              "official_fields": kept_fields(conf)}  # written back as they were by an export (hf_config)
    (work / ckpt_format.WEIGHTS_ONLY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return ckpt_format.publish(save_dir, tag.name, iteration=0, imported_from=marker["source"])


def load_weights_only(engine, tag_dir: str | Path, model_cfg: ModelConfig) -> None:
    """Copy a weights-only checkpoint into a DeepSpeed engine of any layout (this rank's TP shard, this
    pipeline stage's layers), then refresh the optimizer's fp32 master copy from them. In a bf16 run the masters
    therefore start bf16-rounded (exact for the default bf16 exports). Tested at TP=2 with ZeRO-1 in fp32."""
    from megatron.core import parallel_state

    tag_dir = Path(tag_dir)
    imported = ckpt.read_trainer_state(tag_dir)["config"]["model"]
    differences = model_differences(ModelConfig(**imported), model_cfg)
    if differences:  # same shapes can still be another model (e.g. 24 heads instead of 16)
        raise ConfigError(f"the run's model config describes another model than the weights of {tag_dir} "
                          f"(from {ckpt_format.WEIGHTS_ONLY_MARKER}, i.e. the imported config.json): "
                          f"{'; '.join(differences)}")
    state = _load_safetensors(tag_dir / WEIGHTS_ONLY_FILE)
    check_against_model(state, model_cfg, str(tag_dir / WEIGHTS_ONLY_FILE))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(engine.module.named_parameters())  # PipelineModule names "<layer idx>.<name>" under PP
    names = {name: model_name(name, model_cfg.num_layers) for name in params}
    with _gathered(list(params.values())):
        with torch.no_grad():
            for name, p in params.items():
                shard = split_tp(names[name], state[names[name]], tp, rank)
                if tuple(shard.shape) != tuple(p.shape):
                    raise CheckpointError(f"{tag_dir / WEIGHTS_ONLY_FILE}: {names[name]} has shard shape "
                                          f"{tuple(shard.shape)}, the model {tuple(p.shape)}")
                p.copy_(shard.to(p.dtype))
    if engine.optimizer is not None:
        if not hasattr(engine.optimizer, "refresh_fp32_params"):
            raise CheckpointError(f"{type(engine.optimizer).__name__} cannot refresh its fp32 master weights; the "
                                  f"weights of {tag_dir} would be overwritten by the first step")
        engine.optimizer.refresh_fp32_params()  # masters from the (model-dtype) weights just copied


def _gathered(params):
    """ZeRO-3 partitions parameters; gather them for the copy (a no-op context otherwise)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()
