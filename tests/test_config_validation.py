"""Every config field is checked at start-up: errors name the field and come without a traceback."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_genlip.config import TOKENIZER_KINDS, ConfigError, load_config
from megatron_genlip.training.entry import main as entry_main
from trainer_harness import ENTRY, ROOT, TINY, build_test_dataset, env


@pytest.mark.parametrize("override, needle", [
    ("train.global_batch_size=0", "train.global_batch_size must be >= 1, got 0"),
    ("train.global_batch_size=-4", "train.global_batch_size must be >= 1, got -4"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1"),
    ("train.save_interval=0", "train.save_interval must be >= 1"),
    ("train.log_interval=0", "train.log_interval must be >= 1"),
    ("train.eval_interval=0", "train.eval_interval must be >= 1"),
    ("train.train_steps=0", "train.train_steps must be >= 1"),
    ("model.num_attention_heads=0", "model.num_attention_heads must be >= 1"),
    ("model.hidden_size=0", "model.hidden_size must be >= 1"),
    ("model.num_layers=-1", "model.num_layers must be >= 1"),
    ("data.seed=-1", "data.seed must be >= 0"),
    ("train.seed=-2", "train.seed must be >= 0"),
    ("train.warmup_steps=-3", "train.warmup_steps must be >= 0"),
    ("train.train_steps=50", "train.warmup_steps must be shorter than train.train_steps (50)"),
    ("train.profile_steps=[5]", "train.profile_steps must be [] or [FIRST, LAST]"),
    ("train.profile_steps=[6,5]", "train.profile_steps must be [] or [FIRST, LAST]"),
    ("train.profile_steps=[0,5]", "train.profile_steps must be [] or [FIRST, LAST]"),
    ("train.clip_grad=-1", "train.clip_grad must be >= 0"),
    ("train.lr=inf", "train.lr must be a finite number, got inf"),
    ("train.lr=.nan", "train.lr must be a finite number, got nan"),
    ("train.min_lr=-1e-5", "train.min_lr must be within [0, train.lr"),
    ("train.adam_beta2=1.5", "train.adam_beta2 must be in [0, 1)"),
    ("data.pack_buffer_size=0", "data.pack_buffer_size must be >= 1"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.seq_length=8", "data.seq_length must be > 9"),
    ("data.stage=3", "data.stage must be 1 or 2"),
    ("data.image_size=50", "data.image_size must be a positive multiple of model.patch_size (16)"),
    ("tokenizer.kind=sentencepiece", "tokenizer.kind must be one of qwen, bpe"),
    ("tokenizer.path=null", "tokenizer.path must be set for tokenizer.kind=bpe"),
    ("train.keep_last=-1", "train.keep_last must be >= 0"),
    ("train.max_consecutive_skips=-1", "train.max_consecutive_skips must be >= 0"),
    ("train.activation_checkpointing=sometimes", "train.activation_checkpointing must be one of none, selective, full"),
    ("model.loss_impl=liger", "model.loss_impl must be one of fused, reference"),
])
def test_each_bad_value_names_its_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert needle in str(err.value), str(err.value)


def test_checkpointing_modes_and_their_older_spelling():
    assert [load_config(TINY, [f"train.activation_checkpointing={v}"]).train.activation_checkpointing
            for v in ("true", "false", "none", "selective", "full")] == ["full", "none", "none", "selective", "full"]
    # Transformer Engine's GEMMs run outside torch's dispatcher: selective checkpointing would recompute them all
    with pytest.raises(ConfigError, match="with model.backend=te use train.activation_checkpointing=full or none"):
        load_config(TINY, ["model.backend=te", "train.activation_checkpointing=selective"])


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.global_batch_size=0", "data.seed=-1", "train.lr=inf"])
    text = str(err.value)
    assert all(f in text for f in ("train.global_batch_size", "data.seed", "train.lr")), text


def test_tokenizer_kinds_match_the_tokenizer_module():
    from megatron_genlip.data.tokenizer import TOKENIZER_KINDS as loader_kinds

    assert tuple(TOKENIZER_KINDS) == tuple(loader_kinds)


def test_entry_point_prints_the_field_without_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        entry_main(["--config", str(TINY), "--set", "train.eval_interval=0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "train.eval_interval must be >= 1" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_test_dataset(tmp_path_factory.mktemp("validation-data"), 24, 4)


@pytest.mark.parametrize("override, needle", [
    ("data.train_data=/nonexistent/train", "data.train_data: /nonexistent/train.json not found"),
    ("data.image_size=64", "data.train_data: dataset"),
    ("data.stage=2", "data.stage: dataset 1 vs config 2"),
    ("data.seq_length=20", "is longer than data.seq_length (20): raise data.seq_length to at least"),
    ("tokenizer.path=missing.tiktoken", "tokenizer.path: "),
])
def test_trainer_data_checks_name_the_field(data, override, needle):
    """The trainer's start-up checks of the files the config names (datasets, tokenizer), without processes."""
    from megatron_genlip.training.trainer import Trainer

    cfg = load_config(TINY, [f"data.train_data={data['train']}", f"data.valid_data={data['val']}", override])
    with pytest.raises(ConfigError) as err:
        Trainer._build_data(SimpleNamespace(cfg=cfg, rank=0))
    assert needle in str(err.value), str(err.value)
    if override.startswith("data.image_size"):
        assert "data.image_size: dataset 48 vs config 64" in str(err.value)


@pytest.mark.slow
def test_missing_data_fails_at_start_up_without_traceback(tmp_path):
    """Through the real entry point (one process, no launcher): exit status 2, the field, no traceback."""
    proc = subprocess.run([sys.executable, str(ENTRY), "--config", str(TINY), "--set", "data.train_data=/nonexistent/x",
                           "--set", f"train.output_dir={tmp_path}"], env=env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "configuration error: data.train_data: /nonexistent/x.json not found" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_unbuilt_pack_index_with_building_off_names_the_command(tmp_path, data):
    """data.build_missing_pack_index=false and epoch 0 not built: exit 2 naming tools/build_pack_index.py, no
    traceback (it was one), nothing trained."""
    proc = subprocess.run([sys.executable, str(ENTRY), "--config", str(TINY), "--set", f"data.train_data={data['train']}",
                           "--set", "data.valid_data=null", "--set", "data.build_missing_pack_index=false",
                           "--set", f"data.pack_index_dir={tmp_path / 'packs'}", "--set", f"train.output_dir={tmp_path}"],
                          env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data error: the pack index in" in proc.stderr and "lacks epoch 0" in proc.stderr, proc.stderr[-3000:]
    assert "tools/build_pack_index.py" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(tmp_path.glob("checkpoints/iter_*"))


@pytest.mark.parametrize("extra, code, stream, needle", [
    (["--dry-run"], 0, "stdout", "per step: 4 rows x 256"),
    (["--set", "train.eval_interval=0"], 2, "stderr", "train.eval_interval must be >= 1"),
    (["--help"], 0, "stdout", "--dry-run"),
])
def test_launcher_entry_keeps_exit_status_output_and_exit_handlers(tmp_path, extra, code, stream, needle):
    """examples/pretrain_genlip.py ends with os._exit (no interpreter teardown): the status of main's exits, the
    buffered output of a pipe and the atexit handlers survive it."""
    marker = tmp_path / "atexit-ran"
    script = (f"import atexit, pathlib, sys; atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes'); "
              f"sys.argv = [{str(ENTRY)!r}] + {['--config', str(TINY), *extra]!r}; "
              f"import runpy; runpy.run_path({str(ENTRY)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], env=env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert needle in getattr(proc, stream), (proc.stdout[-1000:], proc.stderr[-1000:])
    assert marker.read_text() == "yes"
