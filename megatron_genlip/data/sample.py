"""One training sample: [patches][prompt][caption][<|im_end|>][\\n] (GENLIP_SPEC.md §2.4-2.5).

No BOS, no role tags, no vision start/end markers. Prompt and caption are stripped and tokenized
separately (plain text, never special tokens) and concatenated. Labels: -100 on image and prompt slots,
the token id on caption, <|im_end|> and "\\n". Positions: image patch (r, c) -> (0, r, c); text token j ->
(S+j, S+j, S+j) with S = max(gh, gw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_genlip.batch import IGNORE_INDEX, KIND_IMAGE, KIND_TEXT


class SampleError(ValueError):
    """A sample that cannot be built (empty caption, malformed conversation, too long)."""


@dataclass
class Sample:
    """Token-level tensors of one sample plus its image patches."""

    input_ids: torch.Tensor  # [T] int64; 0 at image slots
    labels: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] int64
    token_kinds: torch.Tensor  # [T] int64
    patches: torch.Tensor  # [N, 3, p, p] uint8 pixels (the model normalises them) or normalised float32
    grid: tuple[int, int]

    def __len__(self) -> int:
        return self.input_ids.numel()


def image_positions(gh: int, gw: int) -> torch.Tensor:
    """(0, r, c) for each patch in row-major order: [3, gh*gw]."""
    r = torch.arange(gh).repeat_interleave(gw)
    c = torch.arange(gw).repeat(gh)
    return torch.stack((torch.zeros_like(r), r, c))


def text_positions(grid: tuple[int, int], num_text: int) -> torch.Tensor:
    """Text continues from S = max(gh, gw) on all three axes: [3, num_text]."""
    start = max(grid)
    return torch.arange(start, start + num_text).expand(3, num_text).clone()


def _clean(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise SampleError(f"{what} is not text ({type(text).__name__})")
    text = text.strip()
    if not text:
        raise SampleError(f"{what} is empty")
    return text


def parse_conversation(turns: list[dict]) -> list[tuple[str, bool]]:
    """Stage-2 ``conversations`` -> [(text, supervised)]; the <image> tag is dropped (the image comes first)."""
    if not isinstance(turns, list) or not turns:
        raise SampleError("conversations must be a non-empty list")
    pieces = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "value" not in turn or "from" not in turn:
            raise SampleError(f"conversations[{i}] needs 'from' and 'value'")
        role = turn["from"]
        if role in ("user", "human"):
            text = _clean(turn["value"] if isinstance(turn["value"], str) else None, f"conversations[{i}]")
            pieces.append((_clean(text.replace("<image>", ""), f"conversations[{i}]"), False))
        elif role in ("assistant", "gpt"):
            pieces.append((_clean(turn["value"], f"conversations[{i}]"), True))
        else:
            raise SampleError(f"conversations[{i}] has unknown role {role!r}")
    if not any(sup for _, sup in pieces):
        raise SampleError("conversation has no assistant turn")
    return pieces


def tokenize_text(tokenizer, caption: str | None = None, prompt: str = "Describe the image in detail.",
                  conversations: list[dict] | None = None) -> tuple[list[int], list[bool]]:
    """Text token ids of a sample (prompt/conversation, then ``<|im_end|>`` ``\\n``) and their label flags."""
    if conversations is not None:
        pieces = parse_conversation(conversations)
    else:
        pieces = [(_clean(prompt, "prompt"), False), (_clean(caption, "caption"), True)]
    ids: list[int] = []
    flags: list[bool] = []
    for text, supervised in pieces:
        piece = tokenizer.encode(text)
        ids += piece
        flags += [supervised] * len(piece)
    ids += [tokenizer.eos_id, tokenizer.newline_id]
    flags += [True, True]
    return ids, flags


def assemble_sample(patches: torch.Tensor, grid: tuple[int, int], ids: list[int], flags: list[bool],
                    max_length: int | None = None) -> Sample:
    """Lay out [image slots][text] with labels, kinds and 3-axis positions."""
    n_img, n_txt = grid[0] * grid[1], len(ids)
    if patches.shape[0] != n_img:
        raise SampleError(f"{patches.shape[0]} patches do not match grid {tuple(grid)}")
    if max_length is not None and n_img + n_txt > max_length:
        raise SampleError(f"sample of {n_img + n_txt} tokens exceeds the per-sample cap {max_length}")
    t_ids = torch.tensor(ids, dtype=torch.long)
    t_labels = torch.where(torch.tensor(flags, dtype=torch.bool), t_ids, torch.full_like(t_ids, IGNORE_INDEX))
    return Sample(
        input_ids=torch.cat((torch.zeros(n_img, dtype=torch.long), t_ids)),
        labels=torch.cat((torch.full((n_img,), IGNORE_INDEX, dtype=torch.long), t_labels)),
        positions=torch.cat((image_positions(*grid), text_positions(grid, n_txt)), dim=1),
        token_kinds=torch.tensor([KIND_IMAGE] * n_img + [KIND_TEXT] * n_txt, dtype=torch.long),
        patches=patches,
        grid=(int(grid[0]), int(grid[1])),
    )


def build_sample(tokenizer, patches: torch.Tensor, grid: tuple[int, int], caption: str | None = None,
                 prompt: str = "Describe the image in detail.", conversations: list[dict] | None = None,
                 max_length: int | None = None) -> Sample:
    """Assemble one sample from patches and a caption (stage 1) or a conversation (stage 2)."""
    ids, flags = tokenize_text(tokenizer, caption, prompt, conversations)
    return assemble_sample(patches, grid, ids, flags, max_length)
