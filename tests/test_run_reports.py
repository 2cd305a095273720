"""What a run reports to its user: seconds per step and ETA in every log line, the best validation loss and its
checkpoint (train.keep_best, kept through retention and resume), the overfitting note, Weights & Biases."""

from __future__ import annotations

import json
import sys
import types

import pytest

from megatron_genlip.config import ConfigError, load_config
from megatron_genlip.training import best as best_module
from megatron_genlip.training.best import BEST_FILE, EvalHistory
from megatron_genlip.training.entry import _print_summary
from megatron_genlip.training.entry import main as entry_main
from megatron_genlip.training.metrics import RunLogger, check_wandb, format_duration, format_step, scalars
from trainer_harness import TINY, build_test_dataset, run, train_log


# ---------------------------------------------------------------------------------------------------
# seconds per step and ETA


def test_durations_read_like_a_person_writes_them():
    assert [format_duration(s) for s in (0, 42.4, 59.6, 425, 3599, 4980, 86399, 183600)] == \
        ["0s", "42s", "1m00s", "7m05s", "59m59s", "1h23m", "23h59m", "2d03h"]
    assert format_duration(float("nan")) == "?" and format_duration(-3) == "0s"


def test_the_log_line_ends_with_seconds_per_step_and_eta():
    m = dict(loss=1.0, lr=1e-3, grad_norm=0.5, samples_per_s=10.0, tokens_per_s=100.0, tflops_per_device=1.0,
             mfu=0.5, packing_efficiency=0.9, data_wait_fraction=0.01, skipped_steps=0, memory_gb=1.0,
             s_per_step=1.66, eta_s=1.66 * 3000)
    assert format_step(7, 3007, m).endswith("| mem 1.00 GB | 1.66 s/step | ETA 1h23m")


# ---------------------------------------------------------------------------------------------------
# the best evaluation and the overfitting note


def _history(losses, tags=None):
    h = EvalHistory()
    for i, loss in enumerate(losses):
        h.add(100 * (i + 1), loss, (tags or {}).get(i))
    return h


def test_best_is_the_lowest_finite_loss_and_the_kept_one_has_a_checkpoint():
    h = _history([5.0, float("nan"), 4.0, 4.0, 6.0], {0: "iter_0000100", 3: "iter_0000400"})
    assert h.best() == {"step": 300, "val_loss": 4.0, "checkpoint": None}  # earliest on ties
    assert h.best_checkpointed()["checkpoint"] == "iter_0000400"
    assert h.is_new_best(3.9) and not h.is_new_best(4.0) and not h.is_new_best(float("nan"))
    assert EvalHistory().best() is None and EvalHistory().is_new_best(1e9)


def test_rising_note_needs_two_rises_in_a_row():
    """Three evaluations suffice (a user saw 3.65 -> 5.58 -> 9.43 with no word): two rises in a row."""
    assert best_module.RISING_EVALS == 2
    assert _history([6.0, 5.13, 6.0]).rising() is None  # one rise
    assert _history([3.65, 5.58, 9.43]).rising() == (3.65, 9.43)
    assert _history([6.0, 5.13, 6.0, 8.83]).rising() == (5.13, 8.83)
    assert _history([4.9, 5.13, 5.13, 8.83]).rising() is None  # a flat step breaks the run
    assert _history([5.0, 4.0, float("nan"), 7.0]).rising() is None
    h = _history([4.98, 5.13, 7.0, 8.83], {0: "iter_0000100", 1: "iter_0000200"})
    assert h.rising_note(keep_best=True) == ("validation loss rose for the last 2 evaluations (5.13 -> 8.83): "
                                            "overfitting? best checkpoint: iter_0000100 (validation loss 4.98)")
    assert h.rising_note(keep_best=False) == ("validation loss rose for the last 2 evaluations (5.13 -> 8.83): "
                                             "overfitting? best validation loss 4.98 at step 100 (train.keep_best="
                                             "true keeps the checkpoint of the best evaluation)")
    assert _history([5.0, 4.0]).rising_note(keep_best=True) is None


def test_a_higher_is_better_metric_and_the_first_is_best_note():
    """train.best_metric on an accuracy (mode max): the best is the highest, the note says it fell; when the first
    of several evaluations stays the best, the note says to evaluate more often."""
    h = EvalHistory(key="probe/top1", mode="max")
    for i, v in enumerate([0.6, 0.5, 0.4]):
        h.add(100 * (i + 1), v, None)
    assert h.best()["step"] == 100 and h.is_new_best(0.61) and not h.is_new_best(0.6)
    assert h.rising_note(keep_best=False).startswith("probe/top1 fell for the last 2 evaluations (0.6 -> 0.4)")
    assert "evaluate more often" in h.first_is_best_note() and "at step 100" in h.first_is_best_note()
    assert _history([5.0, 4.0]).first_is_best_note() is None and _history([5.0]).first_is_best_note() is None


def test_best_json_of_another_metric_is_not_read_back(tmp_path):
    h = EvalHistory(key="probe/top1", mode="max")
    h.add(100, 0.5, None)
    h.save(tmp_path, keep_best=False)
    assert json.loads((tmp_path / BEST_FILE).read_text())["metric"] == "probe/top1"
    assert EvalHistory.load(tmp_path, 10**9, key="probe/top1", mode="max").evals == h.evals
    assert EvalHistory.load(tmp_path, 10**9).evals == []  # the run now follows val_loss: a fresh history


def test_the_history_file_survives_a_resume_up_to_its_step(tmp_path):
    (tmp_path / "iter_0000200").mkdir()  # iter_0000100 was deleted by retention since
    h = _history([5.0, 4.0, 3.0], {0: "iter_0000100", 1: "iter_0000200", 2: "iter_0000300"})
    h.save(tmp_path, keep_best=True)
    doc = json.loads((tmp_path / BEST_FILE).read_text())
    assert doc["best_checkpoint"] == "iter_0000300" and doc["best"]["val_loss"] == 3.0
    back = EvalHistory.load(tmp_path, up_to_step=250)  # resumed from step 250: the step-300 evaluation is redone
    assert back.evals == [{"step": 100, "val_loss": 5.0, "checkpoint": None},
                          {"step": 200, "val_loss": 4.0, "checkpoint": "iter_0000200"}]
    assert EvalHistory.load(tmp_path / "absent", 10**9).evals == []
    (tmp_path / BEST_FILE).write_text("{torn")
    assert EvalHistory.load(tmp_path, 10**9).evals == []


def test_the_summary_prints_the_best_checkpoint_and_the_note(capsys):
    note = "validation loss rose for the last 3 evaluations (5.13 -> 8.83): overfitting? best checkpoint: iter_0000400"
    _print_summary({"steps": 900, "stopped_by_signal": False, "skipped_steps": 0, "final_train_loss": 1.5,
                    "best_val_loss": 4.98, "best_val_step": 400, "best_checkpoint": "out/checkpoints/iter_0000400",
                    "val_loss_rising": note, "checkpoint": "c", "train_log": "l", "tensorboard": "t",
                    "output_dir": "out"})
    out = capsys.readouterr().out
    assert "best validation loss 4.9800 at step 400, checkpoint out/checkpoints/iter_0000400\n" in out
    assert f"note: {note}\n" in out


def test_keep_best_needs_a_metric_to_follow():
    """train.keep_best follows train.best_metric (default: the validation loss): without a validation_loss
    evaluator it must be named, and a name that is no evaluator's metric is refused listing what there is."""
    from megatron_genlip.evaluation import build_evaluators
    from megatron_genlip.training.best import resolve_metric

    cfg = load_config(TINY, ["train.keep_best=true", "data.valid_data=null"])
    with pytest.raises(ConfigError, match=r"train.keep_best: no validation_loss evaluator, so train.best_metric"):
        resolve_metric(cfg, build_evaluators(cfg, None, cfg.evaluation))
    cfg = load_config(TINY, ["train.keep_best=true"])
    assert resolve_metric(cfg, build_evaluators(cfg, None, cfg.evaluation)) == ("val_loss", "min", "val/val_loss")
    cfg = load_config(TINY, ["train.best_metric=captions/cider"])
    assert resolve_metric(cfg, build_evaluators(cfg, None, cfg.evaluation)) == ("captions/cider", "max",
                                                                                "captions/cider")
    cfg = load_config(TINY, ["train.best_metric=captions/top1"])
    with pytest.raises(ConfigError, match=r"train.best_metric: 'captions/top1' is not EVALUATOR/METRIC.*captions "
                                          r"\(captioning: exact_match"):
        resolve_metric(cfg, build_evaluators(cfg, None, cfg.evaluation))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_test_dataset(tmp_path_factory.mktemp("reports-data"), 400, 40)


# a constant lr of 0.1 makes the tiny model's validation loss jump around (26.7, 22.4, 80.5, 65.3, ... on CPU
# fp32): the best evaluation is an early one, so retention has to be told to keep it
RUN = ["train.eval_interval=2", "train.save_interval=3", "train.keep_last=1", "train.keep_best=true",
       "train.lr=0.1", "train.min_lr=0.1", "train.warmup_steps=0", "train.eval_captions=0", "train.eval_rows=2",
       "train.log_interval=1"]


@pytest.mark.slow
def test_keep_best_survives_retention_and_resume_and_lines_carry_eta(tmp_path, data):
    """One run of 6 steps, resumed to 12: evaluations at 2, 4, ..., 12, saves at 3, 6, 9, 12 (keep_last=1) and at
    each new best that falls between them. The best checkpoint is never deleted, the history of the first part
    is carried over the resume, and the summary names the best loss and checkpoint."""
    first = run(1, data, tmp_path, RUN + ["train.train_steps=6"])
    part1 = json.loads((tmp_path / "checkpoints" / BEST_FILE).read_text())["evaluations"]
    assert [e["step"] for e in part1] == [2, 4, 6]
    second = run(1, data, tmp_path, RUN + ["train.train_steps=12"])
    assert "resumed from" in second.stdout and "at step 6" in second.stdout

    evals = train_log(tmp_path, "eval")
    assert sorted(evals) == [2, 4, 6, 8, 10, 12]
    losses = {s: evals[s]["val_loss"] for s in evals}
    best_step = min(losses, key=losses.get)
    assert best_step < 12, losses  # the run got worse after its best: retention would have deleted it
    best_tag = f"iter_{best_step:07d}"
    doc = json.loads((tmp_path / "checkpoints" / BEST_FILE).read_text())
    assert [(e["step"], e["val_loss"]) for e in doc["evaluations"]] == sorted(losses.items())
    assert doc["best_checkpoint"] == best_tag and doc["best"]["step"] == best_step
    ckpts = tmp_path / "checkpoints"
    tags = sorted(p.name for p in ckpts.glob("iter_*"))
    assert best_tag in tags and "iter_0000012" in tags
    assert (ckpts / best_tag / "genlip_manifest.json").is_file()  # a complete checkpoint
    assert set(tags) <= {best_tag, "iter_0000009", "iter_0000012"}, tags  # keep_last=1 (+ the last good one)
    saves = [s for s in train_log(tmp_path, "checkpoint")]
    assert best_step in saves  # saved at its evaluation, also when that step is no save_interval step

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_val_loss"] == losses[best_step] and summary["best_val_step"] == best_step
    assert summary["best_checkpoint"] == str(ckpts / best_tag)
    # the note on rising validation loss is the history's (the note's wording and printing are tested on their own)
    assert summary["val_loss_rising"] == EvalHistory(doc["evaluations"]).rising_note(keep_best=True)
    assert summary["val_loss_rising_evaluations"] == best_module.RISING_EVALS
    assert f"best validation loss {losses[best_step]:.4f} at step {best_step}, checkpoint {ckpts / best_tag}" \
        in second.stdout

    # seconds per step and ETA: the window's step time times the steps left, in JSONL and on the console
    log = train_log(tmp_path)
    assert sorted(log) == list(range(1, 13))
    for step, rec in log.items():  # steps 1-6 were logged by the first part, of train.train_steps=6
        assert rec["s_per_step"] > 0
        assert rec["eta_s"] == pytest.approx(rec["s_per_step"] * ((6 if step <= 6 else 12) - step), rel=1e-12)
    assert log[6]["eta_s"] == log[12]["eta_s"] == 0 and log[7]["eta_s"] > 0
    assert f"| {log[3]['s_per_step']:.3g} s/step | ETA {format_duration(log[3]['eta_s'])}" in first.stdout
    assert "| ETA 0s" in second.stdout


# ---------------------------------------------------------------------------------------------------
# Weights & Biases


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError


def test_asking_for_wandb_without_it_fails_at_start_up(no_wandb, capsys):
    check_wandb("")  # not asked: nothing to check
    with pytest.raises(ConfigError, match=r"train.wandb_project is set \('genlip'\) but wandb is not installed: "
                                          r"pip install wandb"):
        check_wandb("genlip")
    with pytest.raises(SystemExit) as exit_:  # the dry run checks it too; the trainer before any work
        entry_main(["--config", str(TINY), "--dry-run", "--set", "train.wandb_project=genlip"])
    assert exit_.value.code == 2 and "pip install wandb" in capsys.readouterr().err


def test_wandb_mode_is_checked():
    with pytest.raises(ConfigError, match="train.wandb_mode must be one of"):
        load_config(TINY, ["train.wandb_mode=offlin"])
    assert load_config(TINY, ["train.wandb_mode=offline"]).train.wandb_mode == "offline"


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def define_metric(self, name, **kw):
        self.calls.append(("define_metric", name, kw))

    def log(self, values):
        self.calls.append(("log", values))

    def finish(self):
        self.calls.append(("finish",))


def fake_wandb(calls):
    module = types.ModuleType("wandb")

    def init(**kw):
        calls.append(("init", kw))
        return FakeRun(calls)

    module.init = init
    return module


def test_run_logger_sends_wandb_the_tensorboard_scalars(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb("genlip")  # installed: no error
    record = {"loss": 2.5, "lr": 1e-3, "grad_norm": float("nan"), "skipped_steps": 0, "tag": "iter_0000001"}
    assert scalars("train", record) == {"train/loss": 2.5, "train/lr": 1e-3, "train/skipped_steps": 0}

    log = RunLogger(tmp_path, True, tensorboard=False, progress_total=None,
                    wandb={"project": "genlip", "mode": "", "config": {"train": {"lr": 0.1}}})
    log.record("train", 7, record)
    log.record("checkpoint", 7, {"tag": "iter_0000007"})  # no numbers: nothing sent
    log.close()
    init = calls[0][1]
    assert calls[0][0] == "init" and init["project"] == "genlip" and init["mode"] is None  # WANDB_MODE decides
    run_id = (tmp_path / "logs" / "wandb_run_id").read_text()
    assert init["id"] == run_id and len(run_id) == 12 and init["resume"] == "allow" and init["dir"] == str(tmp_path)
    assert init["config"] == {"train": {"lr": 0.1}}
    assert ("define_metric", "*", {"step_metric": "step"}) in calls
    logs = [c[1] for c in calls if c[0] == "log"]
    assert logs == [{"train/loss": 2.5, "train/lr": 1e-3, "train/skipped_steps": 0, "step": 7}]
    assert calls[-1] == ("finish",)
    assert json.loads((tmp_path / "logs" / "train.jsonl").read_text().splitlines()[0])["loss"] == 2.5

    calls.clear()  # a restarted run continues the same W&B run; train.wandb_mode overrides the environment
    RunLogger(tmp_path, True, False, None, wandb={"project": "genlip", "mode": "disabled"}).close()
    assert calls[0][1]["id"] == run_id and calls[0][1]["mode"] == "disabled"
    calls.clear()
    RunLogger(tmp_path, False, False, None, wandb={"project": "genlip"}).close()  # other ranks: nothing
    RunLogger(tmp_path, True, False, None, wandb={"project": ""}).close()  # not asked: nothing
    assert calls == []


def test_the_summary_names_another_best_metric(capsys):
    _print_summary({"steps": 10, "stopped_by_signal": False, "skipped_steps": 0, "final_train_loss": 1.0,
                    "best_metric": "probe/top1", "best_value": 0.8, "best_val_step": 5, "best_checkpoint": "ck",
                    "checkpoint": "c", "train_log": "l", "tensorboard": "t", "output_dir": "o"})
    assert "best probe/top1 0.8 at step 5, checkpoint ck\n" in capsys.readouterr().out
