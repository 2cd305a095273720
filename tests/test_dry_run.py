"""``--dry-run`` sizes a run from the training dataset's stored lengths (exact when the pack index or the whole
dataset can be packed, estimated from a sample otherwise) and checks the tokenizer against model.vocab_size."""

from __future__ import annotations

import pytest

from megatron_genlip.config import BlendSource, load_config
from megatron_genlip.data import row_stats as row_stats_module
from megatron_genlip.data.packed_dataset import open_rows
from megatron_genlip.training.entry import DRY_RUN_SAMPLE, dry_run
from megatron_genlip.training.entry import main as entry_main
from trainer_harness import TINY, build_test_dataset

STEPS = 3000  # tiny.yaml's train.train_steps
ROWS = 4  # tiny.yaml's train.global_batch_size


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """400 synthetic samples of 9 image and ~31 text tokens: ~6 per 256-token row, where the hard-coded
    average sample (196 + 74 tokens) does not even fit one."""
    return build_test_dataset(tmp_path_factory.mktemp("dry-run-data"), 400, 4)


def _dry(tmp_path, data, *overrides):
    return entry_main(["--config", str(TINY), "--dry-run", "--set", f"data.train_data={data['train']}",
                       "--set", f"data.pack_index_dir={tmp_path / 'packs'}", *[a for o in overrides for a in
                                                                                ("--set", o)]])


def _epoch0_rows(tmp_path, data) -> int:
    """Rows of epoch 0 as the trainer builds them."""
    cfg = load_config(TINY, [f"data.pack_index_dir={tmp_path / 'packs'}"])
    rows = open_rows(data["train"], cfg.data)
    rows.ensure(epochs=1, log=lambda *_: None)
    return rows.rows_in_epoch(0)


def test_dry_run_counts_samples_from_the_dataset(tmp_path, data, capsys):
    info = _dry(tmp_path, data)
    out = capsys.readouterr().out
    assert not (tmp_path / "packs").exists()  # the dry run builds nothing
    rows = _epoch0_rows(tmp_path, data)
    assert 60 <= rows <= 75, rows
    assert info["data"]["basis"] == "dataset"
    (st,) = info["data"]["datasets"]
    assert st["exact"] and st["samples"] == 400 and st["rows_per_epoch"] == rows
    assert info["samples_per_row"] == pytest.approx(400 / rows, rel=1e-12)
    assert info["samples_per_step"] == pytest.approx(ROWS * 400 / rows, rel=1e-12)
    hard_coded = ROWS * 256 / sum(DRY_RUN_SAMPLE[1][:2])
    assert info["samples_per_step"] > 5 * hard_coded  # ~24 samples per step, not ~3.8
    assert info["steps_per_epoch"] == pytest.approx(rows / ROWS, rel=1e-12)
    assert info["epochs"] == pytest.approx(STEPS * ROWS / rows, rel=1e-12)
    assert info["data"]["mean_image_tokens"] == 9.0 and 20 < info["data"]["mean_text_tokens"] < 45
    assert info["total_samples"] == pytest.approx(STEPS * ROWS * 400 / rows, rel=1e-12)
    assert f"{400 / rows:.2f} samples per row of 256 tokens" in out
    assert f"{rows} rows per epoch (exact: all 400 samples packed as epoch 0 will be" in out
    assert f"epochs: {rows / ROWS:,.1f} steps per epoch; train.train_steps=3,000 covers {STEPS * ROWS / rows:,.2f}" in out
    assert "samples and FLOPs from the dataset's lengths" in out

    # with the pack index built, its epoch-0 metadata is read: the same numbers
    again = _dry(tmp_path, data)
    (st,) = again["data"]["datasets"]
    assert st["exact"] and st["source"].startswith("pack index epoch 0 in")
    assert again["samples_per_row"] == info["samples_per_row"] and again["epochs"] == info["epochs"]
    assert "(exact: pack index epoch 0 in" in capsys.readouterr().out


def test_large_datasets_are_estimated_from_a_sample_of_lengths(tmp_path, data, monkeypatch):
    exact = _dry(tmp_path, data)["samples_per_row"]
    monkeypatch.setattr(row_stats_module, "SAMPLE_CAP", 100)
    info = _dry(tmp_path, data)
    (st,) = info["data"]["datasets"]
    assert not st["exact"] and st["sampled"] == 100
    assert "packed 100 of the 400 samples" in st["source"]
    assert info["samples_per_row"] != exact and info["samples_per_row"] == pytest.approx(exact, rel=0.15)


def test_a_blend_counts_each_dataset_by_its_share_of_rows(tmp_path, data, capsys):
    cfg = load_config(TINY, [f"data.pack_index_dir={tmp_path / 'packs'}", "data.train_data=null"])
    cfg.data.train_blend = [BlendSource(data=data["train"], weight=1.0), BlendSource(data=data["train"], weight=3.0)]
    info = dry_run(cfg, None)
    rows = _epoch0_rows(tmp_path, data)
    first, second = info["data"]["datasets"]
    assert (first["row_fraction"], second["row_fraction"]) == (0.25, 0.75)
    assert first["steps_per_epoch"] == pytest.approx(rows / (0.25 * ROWS))
    assert second["epochs"] == pytest.approx(STEPS * 0.75 * ROWS / rows)
    assert info["samples_per_row"] == pytest.approx(400 / rows) and "epochs" not in info
    assert "(75.0% of the rows)" in capsys.readouterr().out


def test_without_the_data_the_hard_coded_sample_is_used_and_said(tmp_path, capsys):
    info = entry_main(["--config", str(TINY), "--dry-run", "--set", f"data.train_data={tmp_path / 'absent'}"])
    out = capsys.readouterr().out
    assert info["data"]["basis"] == "hard-coded" and info["data"]["datasets"] == []
    assert info["samples_per_row"] == 256 / 270 and "steps_per_epoch" not in info
    assert f"data: data.train_data: {tmp_path / 'absent'}.json not found: sized with a hard-coded average" in out
    assert "samples and FLOPs from a hard-coded average sample" in out


def test_dry_run_rejects_a_vocabulary_smaller_than_the_tokenizer(tmp_path, capsys):
    """The tiny BPE has 412 ranks + 22 special tokens = 434 ids: 400 is too small; the fix names 448 (434
    padded to a multiple of 64, tools/train_tokenizer.py's rule). The trainer's start-up runs the same check."""
    with pytest.raises(SystemExit) as exit_:
        entry_main(["--config", str(TINY), "--dry-run", "--set", "model.vocab_size=400",
                    "--set", f"data.train_data={tmp_path / 'absent'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "model.vocab_size (400) is smaller than the 434 ids (ranks and special tokens)" in err
    assert "tokenizer.kind=bpe, tokenizer.path=tiny_bpe.tiktoken" in err
    assert "set model.vocab_size=448" in err
    info = entry_main(["--config", str(TINY), "--dry-run", "--set", "model.vocab_size=434",
                       "--set", f"data.train_data={tmp_path / 'absent'}"])
    assert info["tokenizer_ids"] == 434
