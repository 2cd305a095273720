#!/usr/bin/env python3
"""Train a small byte-level BPE tokenizer on captions and write it as a tiktoken ranks file.

The result is loaded with ``tokenizer.kind: bpe`` / ``tokenizer.path: OUTPUT`` (see
megatron_genlip/data/tokenizer.py); the 22 Qwen2 special tokens are added after the learned ranks.

Example:
    python tools/train_tokenizer.py --input captions.txt shards/train-000000.tar \\
        --vocab-size 512 --output tiny.tiktoken
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_genlip.data.tokenizer import (  # noqa: E402
    QWEN2_SPECIAL_TOKENS, VOCAB_MULTIPLE, load_bpe_tokenizer, padded_vocab_size, save_ranks, train_bpe,
)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="caption sources: text files with one caption per line (blank lines skipped) "
                             "and/or webdataset tar shards (.tar/.tar.gz/.tgz), from which each sample's "
                             "json 'caption' is read, or its txt member when the json has none")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="number of BPE ranks: 256 single bytes + merges (>= 256); the tokenizer adds "
                             f"{len(QWEN2_SPECIAL_TOKENS)} special tokens on top")
    parser.add_argument("--output", required=True, metavar="PATH.tiktoken",
                        help="where to write the ranks (tiktoken format: base64 token + rank per line); "
                             "parent folders are created")
    args = parser.parse_args(argv)
    if args.vocab_size < 256:
        parser.error(f"--vocab-size must be at least 256, got {args.vocab_size}")
    return args


def iter_captions(paths: Iterable[str]) -> Iterator[str]:
    """Non-empty, stripped captions from text files and webdataset tar shards."""
    for path in paths:
        if path.endswith(TAR_SUFFIXES):
            yield from tar_captions(path)
        else:
            yield from text_captions(path)


def text_captions(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def tar_captions(path: str) -> Iterator[str]:
    """One caption per sample; members of a sample are consecutive and share the key (webdataset)."""
    with tarfile.open(path, "r:*") as tar:
        key, members = None, {}
        for member in tar:
            member_key, ext = split_key(member.name)
            if not member.isfile() or ext not in ("json", "txt"):
                continue
            if member_key != key:
                yield from sample_caption(members)
                key, members = member_key, {}
            members[ext] = tar.extractfile(member).read()
        yield from sample_caption(members)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's split: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, ext


def sample_caption(members: dict[str, bytes]) -> Iterator[str]:
    """The json 'caption' of a sample if it has one, else its txt member; nothing if neither."""
    caption = None
    if "json" in members:
        meta = json.loads(members["json"])
        caption = meta.get("caption") if isinstance(meta, dict) else None
    if not isinstance(caption, str) and "txt" in members:
        caption = members["txt"].decode("utf-8")
    if isinstance(caption, str) and caption.strip():
        yield caption.strip()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    captions = list(iter_captions(args.input))
    if not captions:
        sys.exit(f"no captions found in {args.input}")

    start = time.perf_counter()
    ranks = train_bpe(captions, args.vocab_size)
    seconds = time.perf_counter() - start
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_ranks(ranks, output)

    tokenizer = load_bpe_tokenizer(output)
    n_bytes = sum(len(c.encode("utf-8")) for c in captions)
    n_tokens = sum(len(tokenizer.encode(c)) for c in captions)
    print(f"captions: {len(captions)} from {len(args.input)} input(s)")
    print(f"vocab size: {tokenizer.n_vocab} ({len(ranks)} ranks + {len(QWEN2_SPECIAL_TOKENS)} special tokens)")
    print(f"merges: {len(ranks) - 256} in {seconds:.2f} s")
    if len(ranks) < args.vocab_size:
        print(f"note: stopped below --vocab-size {args.vocab_size}: every distinct word is already one token")
    print(f"tokens/caption: {n_bytes / len(captions):.1f} before (bytes) -> {n_tokens / len(captions):.1f} after "
          f"({n_bytes / n_tokens:.2f}x fewer)")
    print(f"eos <|im_end|> = {tokenizer.eos_id}, <|image_pad|> = {tokenizer.token_id('<|image_pad|>')}")
    print(f"wrote {output}")
    padded = padded_vocab_size(tokenizer.n_vocab)
    print(f"use in the config: tokenizer.kind=bpe, tokenizer.path={output}, model.vocab_size={padded} "
          f"({tokenizer.n_vocab} ids padded to a multiple of {VOCAB_MULTIPLE}, so tensor parallelism up to "
          f"{VOCAB_MULTIPLE} ranks divides it)")


if __name__ == "__main__":
    main()
