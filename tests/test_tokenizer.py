"""Tokenizer layer: the vendored Qwen2 BPE, the byte-level BPE trainer and tools/train_tokenizer.py."""

import hashlib
import importlib.util
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import tiktoken

from megatron_genlip.data import tokenizer as tok_mod
from megatron_genlip.data.tokenizer import (
    QWEN2_SPECIAL_TOKENS,
    QWEN_PAT,
    QWEN_RANKS_PATH,
    QWEN_RANKS_SHA256,
    load_bpe_tokenizer,
    load_qwen_tokenizer,
    load_ranks,
    load_tokenizer,
    save_ranks,
    train_bpe,
)

REPO = Path(__file__).resolve().parents[1]

SUBJECTS = ["a cat", "two dogs", "a red car", "an old man", "a young woman", "three small birds",
            "a wooden table", "the city skyline", "a bowl of fresh fruit", "a child in a yellow coat"]
VERBS = ["sitting on", "standing next to", "running across", "lying under", "looking at", "parked beside"]
PLACES = ["a green sofa", "the sandy beach", "a snowy mountain", "a busy street", "the kitchen counter"]
DETAILS = ["The lighting is soft and warm.", "The photo was taken at night.", "It is slightly blurry.",
           "Trees and a cloudy sky fill the background.", "The colors are vivid."]
SYLLABLES = ["ka", "lo", "mer", "tin", "sa", "vo", "rin", "del", "qu", "bra", "zen", "ol", "fi", "gar", "ny"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    def town() -> str:  # thousands of distinct made-up words, so 512 ranks do not exhaust the corpus
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()

    return [f"The image shows {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)} in {town()}. "
            f"{rng.choice(DETAILS)} Frame {rng.randint(0, 9999)}." for _ in range(n)]


@pytest.fixture(scope="module")
def captions():
    return make_captions(2000)


@pytest.fixture(scope="module")
def bpe_ranks(captions):
    return train_bpe(captions, 512)


# --------------------------------------------------------------------------------------------------
# Qwen


def test_vendored_asset_is_pinned():
    assert hashlib.sha256(QWEN_RANKS_PATH.read_bytes()).hexdigest() == QWEN_RANKS_SHA256


def test_qwen_known_ids(qwen_tokenizer):
    assert qwen_tokenizer.encode("Hello world") == [9707, 1879]
    assert qwen_tokenizer.encode("\n") == [198]
    assert qwen_tokenizer.newline_id == 198
    assert qwen_tokenizer.eos_id == qwen_tokenizer.token_id("<|im_end|>") == 151645
    assert qwen_tokenizer.endoftext_id == qwen_tokenizer.token_id("<|endoftext|>") == 151643
    assert qwen_tokenizer.token_id("<|vision_start|>") == 151652
    assert qwen_tokenizer.token_id("<|vision_end|>") == 151653
    assert qwen_tokenizer.token_id("<|image_pad|>") == 151655
    assert qwen_tokenizer.token_id("<|file_sep|>") == 151664
    assert qwen_tokenizer.n_vocab == 151665
    assert qwen_tokenizer.pad_id == 0
    assert qwen_tokenizer.name == "qwen2"


def test_qwen_special_tokens_in_id_order(qwen_tokenizer):
    assert len(QWEN2_SPECIAL_TOKENS) == 22
    assert [qwen_tokenizer.token_id(t) for t in QWEN2_SPECIAL_TOKENS] == list(range(151643, 151665))


def test_qwen_digits_split_one_by_one(qwen_tokenizer):
    assert qwen_tokenizer.encode("12345") == [16, 17, 18, 19, 20]


def test_literal_special_token_in_caption_is_text(qwen_tokenizer):
    caption = "A sign that reads <|endoftext|> and <|im_end|> on a wall."
    ids = qwen_tokenizer.encode(caption)
    assert not set(ids) & {qwen_tokenizer.token_id(t) for t in QWEN2_SPECIAL_TOKENS}
    assert max(ids) < 151643
    assert qwen_tokenizer.decode(ids) == caption


def test_qwen_chinese_english_round_trip(qwen_tokenizer):
    caption = "一只橘色的猫 sits on a 木制 table，旁边有 3 cups of tea. 🍵"
    ids = qwen_tokenizer.encode(caption)
    assert len(ids) < len(caption.encode("utf-8"))
    assert qwen_tokenizer.decode(ids) == caption


def test_token_id_rejects_ordinary_text(qwen_tokenizer):
    with pytest.raises(KeyError, match="not a special token"):
        qwen_tokenizer.token_id("hello")


def test_qwen_sha256_mismatch_names_file_and_hash(tmp_path):
    changed = tmp_path / "qwen.tiktoken"
    changed.write_bytes(QWEN_RANKS_PATH.read_bytes() + b"eHl6eHl6eHl6 151643\n")  # one extra rank
    with pytest.raises(ValueError, match=QWEN_RANKS_SHA256) as err:
        load_qwen_tokenizer(changed)
    assert str(changed) in str(err.value)
    unchecked = load_qwen_tokenizer(changed, check_sha256=False)
    assert unchecked.endoftext_id == 151644
    assert unchecked.encode("xyzxyzxyz") == [151643]


def test_qwen_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.tiktoken"):
        load_qwen_tokenizer(tmp_path / "nowhere.tiktoken")


def test_load_tokenizer_dispatch(tmp_path, bpe_ranks):
    assert load_tokenizer("qwen", None).eos_id == 151645
    path = tmp_path / "tiny.tiktoken"
    save_ranks(bpe_ranks, path)
    assert load_tokenizer("bpe", str(path)).n_vocab == len(bpe_ranks) + 22
    with pytest.raises(ValueError, match="needs a ranks file"):
        load_tokenizer("bpe", None)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer("sentencepiece", None)


# --------------------------------------------------------------------------------------------------
# BPE trainer


def test_bpe_ranks_start_with_bytes_and_are_dense(bpe_ranks):
    assert len(bpe_ranks) == 512
    assert all(bpe_ranks[bytes([b])] == b for b in range(256))
    assert sorted(bpe_ranks.values()) == list(range(512))


def test_bpe_merges_most_frequent_pair_first():
    # pieces: "hug", " hug" x2, " pug", " pun": "ug" occurs 4 times, then "hug" 3 times.
    ranks = train_bpe(["hug hug hug pug pun"], 258)
    assert ranks[b"ug"] == 256
    assert ranks[b"hug"] == 257


def test_bpe_ties_broken_by_smallest_bytes():
    # pieces "ab" and " cd": the pairs "ab", " c", "cd" all occur once; b" c" sorts first.
    assert list(train_bpe(["ab cd"], 259))[256:] == [b" c", b" cd", b"ab"]


def test_bpe_is_deterministic_and_order_independent(captions, bpe_ranks):
    shuffled = list(captions)
    random.Random(1).shuffle(shuffled)
    assert train_bpe(captions, 512) == bpe_ranks
    assert train_bpe(shuffled, 512) == bpe_ranks


def test_bpe_training_segmentation_matches_tiktoken(captions):
    trainer = tok_mod._BpeTrainer(tok_mod._count_words(captions, QWEN_PAT))
    while len(trainer.ranks) < 400 and trainer.merge_next():
        pass
    encoding = tiktoken.Encoding("t", pat_str=QWEN_PAT, mergeable_ranks=trainer.ranks, special_tokens={})
    for word, parts in zip(trainer.word_bytes, trainer.words, strict=True):
        assert encoding.encode_ordinary(word.decode("utf-8")) == [trainer.ranks[p] for p in parts]


def test_bpe_stops_when_every_word_is_one_token():
    texts = ["the cat sat on the mat", "the cat ran"]
    ranks = train_bpe(texts, 10_000)
    assert len(ranks) < 10_000
    encoding = tiktoken.Encoding("t", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens={})
    assert [len(encoding.encode_ordinary(t)) for t in texts] == [6, 3]


def test_bpe_compresses_training_captions(tmp_path, captions, bpe_ranks):
    path = tmp_path / "tiny.tiktoken"
    save_ranks(bpe_ranks, path)
    tokenizer = load_bpe_tokenizer(path)
    n_bytes = sum(len(c.encode("utf-8")) for c in captions)
    n_tokens = sum(len(tokenizer.encode(c)) for c in captions)
    assert n_bytes / n_tokens > 3.0  # 512 ranks give about 3.6x on this corpus


def test_bpe_round_trips_unseen_text(tmp_path, bpe_ranks):
    path = tmp_path / "tiny.tiktoken"
    save_ranks(bpe_ranks, path)
    tokenizer = load_bpe_tokenizer(path)
    texts = ["The image shows a cat.", "一只猫 🐈 on ÅSTRÖM's sofa\t\x00\x7f\r\n  end",
             "literal <|endoftext|> stays text", "", "   ", "12345.678e-9"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert all(i < len(bpe_ranks) for i in ids)
        assert tokenizer.decode(ids) == text


def test_bpe_tokenizer_special_ids_follow_ranks(tmp_path, bpe_ranks):
    path = tmp_path / "tiny.tiktoken"
    save_ranks(bpe_ranks, path)
    assert load_ranks(path) == bpe_ranks
    tokenizer = load_bpe_tokenizer(path)
    n = len(bpe_ranks)
    assert tokenizer.endoftext_id == n
    assert tokenizer.eos_id == tokenizer.token_id("<|im_end|>") == n + 2
    assert tokenizer.token_id("<|vision_start|>") == n + 9
    assert tokenizer.token_id("<|image_pad|>") == n + 12
    assert tokenizer.n_vocab == n + 22
    assert tokenizer.newline_id == ord("\n")
    assert tokenizer.name == "genlip-bpe-tiny"


def test_bpe_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe(["abc"], 255)


def test_load_ranks_reports_bad_line(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(b"AA== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        load_ranks(path)


def test_load_bpe_rejects_ranks_with_gaps(tmp_path, bpe_ranks):
    path = tmp_path / "gap.tiktoken"
    save_ranks({**bpe_ranks, b"zzzz": len(bpe_ranks) + 5}, path)
    with pytest.raises(ValueError, match="distinct integers"):
        load_bpe_tokenizer(path)


# --------------------------------------------------------------------------------------------------
# tools/train_tokenizer.py


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"part/sample{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cli_reads_text_and_shards_and_trains(tmp_path, capsys, cli, captions):
    text_file = tmp_path / "captions.txt"
    text_file.write_text("\n".join(captions[:1500]) + "\n\n", encoding="utf-8")
    shard = tmp_path / "shard-000000.tar"
    write_shard(shard, [
        {"jpg": b"\xff\xd8", "json": json.dumps({"caption": " json caption "}).encode(), "txt": b"ignored"},
        {"jpg": b"\xff\xd8", "txt": b"txt caption\n"},
        {"jpg": b"\xff\xd8", "json": b'{"id": 3}', "txt": b"fallback caption"},
        {"jpg": b"\xff\xd8", "json": b'{"id": 4}'},
    ])
    assert list(cli.iter_captions([str(shard)])) == ["json caption", "txt caption", "fallback caption"]

    output = tmp_path / "out" / "tiny.tiktoken"
    cli.main(["--input", str(text_file), str(shard), "--vocab-size", "300", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "captions: 1503 from 2 input(s)" in printed
    assert "vocab size: 322 (300 ranks + 22 special tokens)" in printed
    assert "merges: 44" in printed
    assert "tokens/caption:" in printed
    assert f"tokenizer.path={output}, model.vocab_size=384 (322 ids padded to a multiple of 64" in printed
    assert len(load_ranks(output)) == 300


def test_cli_help_explains_every_flag(capsys, cli):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for flag in ("--input", "--vocab-size", "--output", "webdataset", "json"):
        assert flag in printed
