"""Greedy captioning with a KV cache, and image feature extraction (GENLIP_SPEC.md §2.5, §6, §7.8).

Captioning feeds ``[patches][prompt]`` once (prefix-LM mask: the image bidirectional, the prompt causal),
then one token at a time; text positions continue from S + j on all three axes (S = max(gh, gw)) and
decoding stops at ``<|im_end|>``. Feature extraction runs the image tokens alone with full bidirectional
attention and returns the ``ln_post`` output (not ``proj``), which is what an MLLM projector consumes.
"""

from __future__ import annotations

import torch

from megatron_genlip.batch import KIND_IMAGE, KIND_TEXT
from megatron_genlip.data.sample import image_positions, text_positions
from megatron_genlip.model.layers import KVCache
from megatron_genlip.model.masks import image_only_mask, sdpa_mask
from megatron_genlip.parallel.state import gather_last_dim


def _prefix(tokenizer, grid: tuple[int, int], prompt: str) -> dict[str, torch.Tensor]:
    n_img = grid[0] * grid[1]
    prompt_ids = tokenizer.encode(prompt.strip())
    ids = torch.tensor([[0] * n_img + prompt_ids])
    kinds = torch.tensor([[KIND_IMAGE] * n_img + [KIND_TEXT] * len(prompt_ids)])
    positions = torch.cat((image_positions(*grid), text_positions(grid, len(prompt_ids))), dim=1)[None]
    return {"input_ids": ids, "token_kinds": kinds, "positions": positions, "sample_ids": torch.zeros_like(ids)}


def _next_token(model, h_last: torch.Tensor, n_vocab: int) -> int:
    """Greedy choice among the tokenizer's ids (the model's vocabulary is padded beyond them)."""
    logits = gather_last_dim(model.head(h_last).float())[..., :n_vocab]
    return int(logits.argmax(-1))


@torch.no_grad()
def generate_caption(model, tokenizer, patches: torch.Tensor, grid: tuple[int, int],
                     prompt: str = "Describe the image in detail.", max_new_tokens: int = 64,
                     use_cache: bool = True) -> list[int]:
    """Greedy decoding for one image. Returns generated token ids, without the final ``<|im_end|>``."""
    model.eval()
    pre = _prefix(tokenizer, grid, prompt)
    device = next(model.parameters()).device
    pre = {k: v.to(device) for k, v in pre.items()}
    patches = patches.to(device)
    out: list[int] = []
    if use_cache:
        cache = KVCache(len(model.layers))
        x = model.embed(pre["input_ids"], pre["token_kinds"], patches)
        h = model.encode(x, pre["positions"], sdpa_mask(pre["sample_ids"], pre["token_kinds"]), cache)
        token = _next_token(model, h[-1, 0], tokenizer.n_vocab)
        next_pos = int(pre["positions"].max()) + 1
        while token != tokenizer.eos_id and len(out) < max_new_tokens:
            out.append(token)
            ids = torch.tensor([[token]], device=device)
            x = model.embed(ids, torch.full_like(ids, KIND_TEXT), None)
            pos = torch.full((1, 3, 1), next_pos, device=device)
            mask = torch.ones(1, 1, 1, cache.length + 1, dtype=torch.bool, device=device)
            h = model.encode(x, pos, mask, cache)
            token = _next_token(model, h[-1, 0], tokenizer.n_vocab)
            next_pos += 1
        return out
    # reference path: recompute the whole sequence for every new token
    while True:
        ids = torch.cat((pre["input_ids"], torch.tensor([out], dtype=torch.long, device=device)), dim=1)
        kinds = torch.cat((pre["token_kinds"], torch.full((1, len(out)), KIND_TEXT, device=device)), dim=1)
        start = int(pre["positions"].max()) + 1
        extra = torch.arange(start, start + len(out), device=device).expand(1, 3, len(out))
        batch = {"input_ids": ids, "token_kinds": kinds, "positions": torch.cat((pre["positions"], extra), dim=2),
                 "sample_ids": torch.zeros_like(ids), "patches": patches}
        token = _next_token(model, model.final_hidden(batch)[0, -1], tokenizer.n_vocab)
        if token == tokenizer.eos_id or len(out) >= max_new_tokens:
            return out
        out.append(token)


@torch.no_grad()
def image_features(model, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``ln_post`` features [gh*gw, d] of one image, image tokens only, full bidirectional attention."""
    model.eval()
    n = grid[0] * grid[1]
    device = next(model.parameters()).device
    x = model.vision_embeddings(patches.to(device))[:, None]  # [N, 1, d]
    return model.encode(x, image_positions(*grid)[None].to(device), image_only_mask(n, device))[:, 0]
