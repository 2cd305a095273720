"""Greedy captioning with a KV cache, and image feature extraction (GENLIP_SPEC.md §2.5, §6, §7.8).

Captioning feeds ``[patches][prompt]`` once (prefix-LM mask: the image bidirectional, the prompt causal),
then one token at a time; text positions continue from S + j on all three axes (S = max(gh, gw)) and
decoding stops at ``<|im_end|>``. :func:`generate_captions` decodes many images per forward (the prefixes of
one batch laid out side by side, right-padded when their grids differ, padding masked out of every attention)
and gives the same tokens as :func:`generate_caption` image by image. Feature extraction runs the image tokens
alone with full bidirectional attention and returns the ``ln_post`` output (not ``proj``), which is what an
MLLM projector consumes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_genlip.batch import KIND_IMAGE, KIND_PAD, KIND_TEXT
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


def _next_tokens(model, h_last: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """Greedy choice per row of h_last [B, d] among the tokenizer's ids: [B]."""
    return gather_last_dim(model.head(h_last).float())[..., :n_vocab].argmax(-1)


@torch.no_grad()
def generate_captions(model, tokenizer, images: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]],
                      prompt: str = "Describe the image in detail.", max_new_tokens: int = 64,
                      batch_size: int = 32, progress=None) -> list[list[int]]:
    """Greedy captions of many images, ``batch_size`` images per forward, with a KV cache (GENLIP_SPEC.md §7.8:
    greedy, no beam, stop at ``<|im_end|>``, at most ``max_new_tokens``). Returns one list of generated token ids
    per image, without the final ``<|im_end|>``: the same ids :func:`generate_caption` gives image by image.
    ``progress(done, total)`` is called after each batch."""
    if len(images) != len(grids):
        raise ValueError(f"{len(images)} images but {len(grids)} grids")
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(images), max(1, batch_size)):
            stop = start + max(1, batch_size)
            out += _generate_batch(model, tokenizer, images[start:stop], grids[start:stop], prompt, max_new_tokens)
            if progress is not None:
                progress(len(out), len(images))
    finally:
        model.train(was_training)
    return out


def _generate_batch(model, tokenizer, images, grids, prompt: str, max_new_tokens: int) -> list[list[int]]:
    device = next(model.parameters()).device
    prompt_ids = tokenizer.encode(prompt.strip())
    B, P = len(images), len(prompt_ids)
    lengths = [g[0] * g[1] + P for g in grids]
    L = max(lengths)
    ids = torch.zeros(B, L, dtype=torch.long)
    kinds = torch.full((B, L), KIND_PAD, dtype=torch.long)
    sample_ids = torch.full((B, L), -1, dtype=torch.long)
    positions = torch.zeros(B, 3, L, dtype=torch.long)
    for b, (grid, n) in enumerate(zip(grids, lengths)):
        n_img = grid[0] * grid[1]
        if images[b].shape[0] != n_img:
            raise ValueError(f"image {b}: {images[b].shape[0]} patches do not match grid {tuple(grid)}")
        ids[b, n_img:n] = torch.tensor(prompt_ids, dtype=torch.long)
        kinds[b, :n_img] = KIND_IMAGE
        kinds[b, n_img:n] = KIND_TEXT
        sample_ids[b, :n] = 0
        positions[b, :, :n] = torch.cat((image_positions(*grid), text_positions(grid, P)), dim=1)
    ids, kinds, sample_ids, positions = (t.to(device) for t in (ids, kinds, sample_ids, positions))
    patches = torch.cat([torch.as_tensor(im) for im in images]).to(device)
    cache = KVCache(len(model.layers))
    x = model.embed(ids, kinds, patches)
    h = model.encode(x, positions, sdpa_mask(sample_ids, kinds), cache)  # [L, B, d]
    last = torch.tensor(lengths, device=device) - 1
    tokens = _next_tokens(model, h[last, torch.arange(B, device=device)], tokenizer.n_vocab)
    next_pos = torch.tensor([max(g) + P for g in grids], device=device)
    key_valid = sample_ids >= 0  # [B, L_kv]: padding slots of the prefix stay invisible
    done = [False] * B
    out: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        host = tokens.tolist()
        for b in range(B):
            if not done[b]:
                if host[b] == tokenizer.eos_id:
                    done[b] = True
                else:
                    out[b].append(host[b])
        if all(done) or step == max_new_tokens - 1:
            break
        x = model.embed(tokens[:, None], torch.full((B, 1), KIND_TEXT, device=device), None)
        key_valid = torch.cat((key_valid, torch.ones(B, 1, dtype=torch.bool, device=device)), dim=1)
        h = model.encode(x, next_pos[:, None, None].expand(B, 3, 1), key_valid[:, None, None, :], cache)
        tokens = _next_tokens(model, h[-1], tokenizer.n_vocab)
        next_pos = next_pos + 1
    return out


@torch.no_grad()
def image_features(model, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``ln_post`` features [gh*gw, d] of one image, image tokens only, full bidirectional attention."""
    model.eval()
    n = grid[0] * grid[1]
    device = next(model.parameters()).device
    x = model.vision_embeddings(patches.to(device))[:, None]  # [N, 1, d]
    return model.encode(x, image_positions(*grid)[None].to(device), image_only_mask(n, device))[:, 0]
