"""Models for evaluation outside the trainer (``tools/evaluate.py``): an exported Hugging Face folder or a trainer
checkpoint directory -> the trainer's single-device ``GenLIPModel`` with its config and tokenizer, so every
evaluator type runs on it (an HF folder's weights go through the exporter's own key map, ``hf.keys.from_hf``).
A ``--vision-only`` folder has no LM head: it loads as the exported ``GenLIPVisionModel`` (features only:
``linear_probe``, ``attentive_probe``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from megatron_genlip.config import Config


def _config_from_dict(d: dict) -> Config:
    """A Config from a stored config mapping, ignoring fields this version does not know."""
    cfg = Config()
    for section in dataclasses.fields(Config):
        have = getattr(cfg, section.name)
        stored = d.get(section.name) or {}
        if not dataclasses.is_dataclass(have):  # e.g. a list section: kept as stored
            if section.name in d:
                setattr(cfg, section.name, d[section.name])
            continue
        known = {f.name for f in dataclasses.fields(have)} - {"train_blend"}  # evaluation needs no training mixture
        setattr(cfg, section.name, dataclasses.replace(have, **{k: v for k, v in stored.items() if k in known}))
    return cfg


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(cfg: Config, state: dict[str, torch.Tensor], device, dtype):
    from megatron_genlip.model.genlip import build_model

    model = build_model(cfg.model, 1, seed=0)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("_extra_state")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)
    return model.to(device=device, dtype=dtype).eval()


def load_model(hf_folder: str | None = None, checkpoint: str | None = None, iteration: int | None = None,
               device="cpu", dtype: torch.dtype = torch.float32):
    """(model, cfg, tokenizer, identity) where identity = {source, config_hash, step}."""
    from megatron_genlip.data.tokenizer import load_bpe_tokenizer, load_tokenizer

    if (hf_folder is None) == (checkpoint is None):
        raise ValueError("give exactly one of an exported folder (--model) or a checkpoint directory (--load)")
    if checkpoint is not None:
        from megatron_genlip.hf.convert import read_checkpoint

        state, client = read_checkpoint(checkpoint, iteration)
        cfg = _config_from_dict(client["config"])
        tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
        model = _build(cfg, state, device, dtype)
        step = int(client.get("iteration", 0))
        return model, cfg, tokenizer, {"source": str(Path(checkpoint).resolve()), "config_hash": config_hash(cfg),
                                       "step": step}
    from megatron_genlip.hf.convert import load_hf_weights
    from megatron_genlip.hf.keys import from_hf
    from megatron_genlip.hf.official_config import from_official

    folder = Path(hf_folder)
    state, conf = load_hf_weights(folder)
    training = conf.get("genlip_training") or {}
    cfg = _config_from_dict(training.get("config") or {})
    cfg.model = from_official(conf, str(folder / "config.json"))
    ranks = folder / "genlip.tiktoken"
    tokenizer = load_bpe_tokenizer(ranks) if ranks.is_file() else load_tokenizer("qwen")
    specials = folder / "special_tokens.json"
    if specials.is_file():
        cfg.tokenizer.prompt = json.loads(specials.read_text()).get("prompt", cfg.tokenizer.prompt)
    ident = {"source": str(folder.resolve()), "config_hash": config_hash(cfg),
             "step": int(training.get("iteration") or 0)}
    if conf.get("vision_only"):
        from megatron_genlip.hf.modeling_genlip import GenLIPVisionModel

        model = GenLIPVisionModel.from_pretrained(str(folder), dtype=dtype).to(device).eval()
        return model, cfg, tokenizer, ident
    trainer_state = {k: v.float() for k, v in from_hf(state, gated=cfg.model.gated_attention).items()}
    return _build(cfg, trainer_state, device, dtype), cfg, tokenizer, ident
