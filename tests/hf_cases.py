"""Helpers for the Hugging Face export tests: a tiny-config packed batch and the TP=2 trainer logits of a
TP x PP checkpoint computed from that checkpoint's own shards (no merging), on 2 gloo ranks."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from conftest import random_image
from megatron_genlip.config import load_config
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import build_sample
from megatron_genlip.data.tokenizer import load_tokenizer
from trainer_harness import TINY

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


def hf_validation_loss(model, val_prefix: str, rows: int = 4, per_row_mean: bool = False) -> float:
    """A Hugging Face GenLIPModel's loss on the first ``rows`` held-out packed rows of the tiny config, as the
    trainer's evaluation reports it: the token mean over the rows, or (``per_row_mean``, what the pipeline
    engine reports with one row per micro-batch) the mean of per-row token means."""
    from megatron_genlip.data.builder import tokenizer_fingerprint
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
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], pixel_values=b["patches"], position_ids=b["positions"],
                           sample_ids=b["sample_ids"], token_kinds=b["token_kinds"]).logits
        labels = b["labels"][:, 1:].flatten()
        per_row.append(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, reduction="none",
                                                         ignore_index=-100)[labels != -100])
    if per_row_mean:
        return sum(float(t.mean()) for t in per_row) / len(per_row)
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
