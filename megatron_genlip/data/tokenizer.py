"""Text tokenizers for GenLIP (GENLIP_SPEC.md §3): the vendored Qwen2 BPE and small self-trained BPEs.

Both kinds are ``tiktoken`` encodings with the Qwen2 pre-tokenization regex and the 22 Qwen2/2.5
special tokens placed right after the mergeable ranks, so the roles (EOS = ``<|im_end|>``, image
placeholder = ``<|image_pad|>``, ...) are the same for every kind; only the ids differ.

* ``load_qwen_tokenizer()`` reads ``assets/qwen.tiktoken`` (151,643 ranks, sha256-pinned, no download),
  giving the real Qwen ids: ``<|endoftext|>`` 151643, ``<|im_end|>`` 151645, ``"\\n"`` 198.
* ``train_bpe()`` learns a byte-level BPE from captions (for tiny test models), ``save_ranks()``
  writes it in tiktoken's format and ``load_bpe_tokenizer()`` reads it back.

Captions are encoded with ``encode_ordinary``: a literal ``<|endoftext|>`` inside a caption is plain
text, never a special token. Special ids are inserted by id (``token_id``).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import regex
import tiktoken

# Qwen2's pre-tokenization regex (HF Qwen2Tokenizer.PRETOKENIZE_REGEX); digits are split one by one.
QWEN_PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2 / Qwen2.5 special tokens in id order; with the Qwen ranks the first one is id 151643.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

QWEN_RANKS_PATH = Path(__file__).resolve().parent / "assets" / "qwen.tiktoken"
QWEN_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

TOKENIZER_KINDS = ("qwen", "bpe")


class GenLIPTokenizer:
    """A ``tiktoken.Encoding`` plus the ids GenLIP's sample template needs.

    Attributes:
        encoding: the wrapped ``tiktoken.Encoding``.
        name: the encoding's name.
        n_vocab: number of ids the encoding can produce (ranks + special tokens).
        eos_id: ``<|im_end|>``, appended after every caption (followed by ``newline_id``).
        newline_id: the id of ``"\\n"``.
        endoftext_id: ``<|endoftext|>``.
        pad_id: 0, the pad id of packed rows (GENLIP_SPEC.md §4.3), not a special token.
    """

    pad_id = 0

    def __init__(self, encoding: tiktoken.Encoding):
        missing = [tok for tok in QWEN2_SPECIAL_TOKENS if tok not in encoding.special_tokens_set]
        if missing:
            raise ValueError(f"encoding {encoding.name!r} lacks the special tokens {missing}")
        self.encoding = encoding
        self.name = encoding.name
        self.n_vocab = encoding.n_vocab
        self.eos_id = self.token_id("<|im_end|>")
        self.endoftext_id = self.token_id("<|endoftext|>")
        self.newline_id = encoding.encode_single_token("\n")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in ``text`` are encoded as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (ints or 0-d tensors); bytes that are not valid UTF-8 become U+FFFD."""
        return self.encoding.decode([int(i) for i in ids])

    def token_id(self, special_token: str) -> int:
        """The id of a special token such as ``"<|image_pad|>"``."""
        if special_token not in self.encoding.special_tokens_set:
            raise KeyError(f"{special_token!r} is not a special token of {self.name!r}; "
                           f"known: {', '.join(QWEN2_SPECIAL_TOKENS)}")
        return self.encoding.encode_single_token(special_token)

    def __repr__(self) -> str:
        return f"GenLIPTokenizer(name={self.name!r}, n_vocab={self.n_vocab})"


# ---------------------------------------------------------------------------------------------------
# Ranks files (tiktoken format: one "base64(token) rank" line per token, ascending rank)


def save_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write ``ranks`` to ``path`` in tiktoken's ``.tiktoken`` format."""
    lines = (base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    Path(path).write_bytes(b"".join(lines))


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` ranks file."""
    return _parse_ranks(_read_file(Path(path)), Path(path))


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"BPE ranks file not found: {path}")
    return path.read_bytes()


def _parse_ranks(data: bytes, source: Path) -> dict[bytes, int]:
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:  # also binascii.Error
            raise ValueError(f"{source}:{lineno}: not a 'base64 rank' line: {line[:80]!r}") from err
    return ranks


def _check_ranks(ranks: dict[bytes, int], source: Path | str) -> None:
    """Special ids are ``len(ranks) + i``: the ranks must be exactly 0..n-1 and cover all 256 bytes."""
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(f"{source}: ranks must be the distinct integers 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{source}: {len(missing)} single bytes have no rank (first: {missing[0]})")


def _build_tokenizer(name: str, ranks: dict[bytes, int], source: Path | str) -> GenLIPTokenizer:
    _check_ranks(ranks, source)
    specials = {tok: len(ranks) + i for i, tok in enumerate(QWEN2_SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name, pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=specials)
    return GenLIPTokenizer(encoding)


# ---------------------------------------------------------------------------------------------------
# Loaders


def load_qwen_tokenizer(path: str | Path | None = None, check_sha256: bool = True) -> GenLIPTokenizer:
    """The Qwen2 tokenizer from the vendored ranks file (or ``path``), sha256-checked by default."""
    path = QWEN_RANKS_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Qwen BPE ranks file not found: {path} (the vendored copy is "
                                f"{QWEN_RANKS_PATH}; megatron_genlip/data/assets/README.md says how to restore it)")
    data = path.read_bytes()
    if check_sha256:
        digest = hashlib.sha256(data).hexdigest()
        if digest != QWEN_RANKS_SHA256:
            raise ValueError(f"{path}: sha256 is {digest}, expected {QWEN_RANKS_SHA256} "
                             "(qwen.tiktoken from the dashscope 2.0.2 wheel)")
    return _build_tokenizer("qwen2", _parse_ranks(data, path), path)


def load_bpe_tokenizer(path: str | Path) -> GenLIPTokenizer:
    """A tokenizer from a ranks file written by ``save_ranks`` (e.g. by tools/train_tokenizer.py)."""
    path = Path(path)
    return _build_tokenizer(f"genlip-bpe-{path.stem}", load_ranks(path), path)


def resolve_asset(path: str | Path) -> Path:
    """A path as given if it exists, else the file of that name among the shipped assets."""
    path = Path(path)
    if not path.exists() and (QWEN_RANKS_PATH.parent / path).exists():
        return QWEN_RANKS_PATH.parent / path
    return path


def load_tokenizer(kind: str, path: str | Path | None = None) -> GenLIPTokenizer:
    """Dispatch on ``kind``: ``"qwen"`` (``path`` None = vendored file) or ``"bpe"`` (``path`` required)."""
    if kind == "qwen":
        return load_qwen_tokenizer(path)
    if kind == "bpe":
        if path is None:
            raise ValueError("tokenizer kind 'bpe' needs a ranks file path (tools/train_tokenizer.py writes one)")
        return load_bpe_tokenizer(resolve_asset(path))
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")


VOCAB_MULTIPLE = 64  # model.vocab_size is divided over tensor-parallel ranks


def padded_vocab_size(n_vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The model vocabulary for a tokenizer of ``n_vocab`` ids: the next multiple of ``multiple``."""
    return -(-n_vocab // multiple) * multiple


def tokenizer_fingerprint(kind: str, path: str | None) -> str:
    """sha256 (16 hex) of the ranks file a tokenizer config resolves to (datasets record it; training checks it)."""
    file = QWEN_RANKS_PATH if path is None else resolve_asset(path)
    return f"{kind}:" + hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16]


def tokenizer_description(tok_cfg) -> str:
    """"the tokenizer (tokenizer.kind=..., tokenizer.path=...)" of a ``TokenizerConfig``, for messages."""
    path = f", tokenizer.path={tok_cfg.path}" if tok_cfg.path else ""
    return f"the tokenizer (tokenizer.kind={tok_cfg.kind}{path})"


def check_vocab_size(tokenizer: GenLIPTokenizer, vocab_size: int, described: str = "the tokenizer") -> None:
    """Every id the tokenizer can produce (ranks and special tokens) must index the model's embedding and LM
    head: a ConfigError naming ``model.vocab_size`` and the value to use (what tools/train_tokenizer.py prints)."""
    if tokenizer.n_vocab <= vocab_size:
        return
    from megatron_genlip.config import ConfigError

    raise ConfigError(
        f"model.vocab_size ({vocab_size}) is smaller than the {tokenizer.n_vocab} ids (ranks and special tokens) "
        f"of {described}: set model.vocab_size={padded_vocab_size(tokenizer.n_vocab)} ({tokenizer.n_vocab} padded to a "
        f"multiple of {VOCAB_MULTIPLE}), e.g. --set model.vocab_size={padded_vocab_size(tokenizer.n_vocab)}")


# ---------------------------------------------------------------------------------------------------
# Byte-level BPE training
#
# tiktoken encodes a pre-tokenized piece by (1) returning its rank directly if the whole piece is a
# token, else (2) starting from single bytes and repeatedly merging the leftmost adjacent pair whose
# concatenation has the lowest rank. The trainer keeps every word segmented exactly that way, so the
# learned ranks reproduce the training-time segmentation under tiktoken. Adding a token with the
# highest rank so far only changes words containing an adjacent pair that concatenates to it (and a
# word equal to it): those are re-merged from their current segmentation, which is where tiktoken's
# greedy procedure stands once every lower-ranked merge is exhausted.


def train_bpe(texts: Iterable[str], vocab_size: int, pat_str: str = QWEN_PAT) -> dict[bytes, int]:
    """Learn byte-level BPE ranks from ``texts``.

    Ranks 0..255 are the single bytes (rank = byte value); each further rank is the most frequent
    adjacent pair of the current segmentation (ties: the smallest bytes), so the result does not
    depend on the order of ``texts``. Training stops at ``vocab_size`` ranks (special tokens come on
    top) or earlier when every distinct word is a single token. Load the result with ``QWEN_PAT``
    (``load_bpe_tokenizer`` does) so that encoding splits text as training did.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the single bytes), got {vocab_size}")
    trainer = _BpeTrainer(_count_words(texts, pat_str))
    while len(trainer.ranks) < vocab_size and trainer.merge_next():
        pass
    return trainer.ranks


def _count_words(texts: Iterable[str], pat_str: str) -> Counter[bytes]:
    """Frequencies of the UTF-8 pre-tokenized pieces (lone surrogates are kept as raw bytes)."""
    pattern = regex.compile(pat_str)
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(piece.encode("utf-8", "surrogatepass") for piece in pattern.findall(text))
    return counts


def _adjacent(parts: list[bytes]) -> Iterator[bytes]:
    """Concatenations of the adjacent pairs of ``parts``."""
    return (left + right for left, right in zip(parts, parts[1:], strict=False))


def _greedy_merge(parts: list[bytes], ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's merge loop: merge the leftmost lowest-ranked adjacent pair until none is a token."""
    parts = list(parts)
    while True:
        best_rank, best_i = None, -1
        for i, pair in enumerate(_adjacent(parts)):
            rank = ranks.get(pair)
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


class _BpeTrainer:
    """Incremental BPE over distinct words, with pair counts keyed by the merged bytes.

    Invariant: no adjacent pair of any word concatenates to an existing token, so every key of
    ``pair_counts`` is a candidate new token.
    """

    def __init__(self, word_counts: Counter[bytes]):
        self.ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        self.word_bytes = sorted(word_counts)
        self.freqs = [word_counts[w] for w in self.word_bytes]
        self.index = {w: i for i, w in enumerate(self.word_bytes)}
        self.words = [[bytes([b]) for b in w] for w in self.word_bytes]
        self.pair_counts: Counter[bytes] = Counter()
        self.where: defaultdict[bytes, set[int]] = defaultdict(set)  # pair -> words containing it
        for i in range(len(self.words)):
            self._add(i, set())
        self.heap = [(-count, pair) for pair, count in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def merge_next(self) -> bool:
        """Add the best pair as the next rank; False when no pair is left."""
        token = self._pop_best()
        if token is None:
            return False
        self.ranks[token] = len(self.ranks)
        affected = set(self.where.get(token, ()))
        if token in self.index:
            affected.add(self.index[token])
        changed: set[bytes] = set()
        for i in affected:
            self._remove(i, changed)
            word = self.word_bytes[i]
            self.words[i] = [word] if word in self.ranks else _greedy_merge(self.words[i], self.ranks)
            self._add(i, changed)
        for pair in changed:
            if self.pair_counts[pair] > 0:
                heapq.heappush(self.heap, (-self.pair_counts[pair], pair))
        return True

    def _pop_best(self) -> bytes | None:
        """Highest count, then smallest bytes; stale heap entries (count changed) are skipped."""
        while self.heap:
            neg_count, pair = heapq.heappop(self.heap)
            if self.pair_counts.get(pair) == -neg_count:
                return pair
        return None

    def _add(self, i: int, changed: set[bytes]) -> None:
        for pair in _adjacent(self.words[i]):
            self.pair_counts[pair] += self.freqs[i]
            self.where[pair].add(i)
            changed.add(pair)

    def _remove(self, i: int, changed: set[bytes]) -> None:
        for pair in _adjacent(self.words[i]):
            self.pair_counts[pair] -= self.freqs[i]
            if self.pair_counts[pair] == 0:
                del self.pair_counts[pair]
            holders = self.where.get(pair)
            if holders is not None:
                holders.discard(i)
                if not holders:
                    del self.where[pair]
            changed.add(pair)
