"""Trainer pieces that need no processes: layout validation, dry runs, the lr formula, activation
checkpointing, the DeepSpeed config."""

from __future__ import annotations

import math
from pathlib import Path

from unittest import mock

import pytest
import torch

from conftest import random_image, small_model_config
from megatron_genlip import platform
from megatron_genlip.config import ConfigError, load_config, resolve_layout
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import build_sample
from megatron_genlip.model.genlip import build_model
from megatron_genlip.training.ds_config import deepspeed_config
from megatron_genlip.training.entry import main as entry_main
from megatron_genlip.training.schedule import learning_rate

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "examples/configs").glob("*.yaml"))
TINY = ROOT / "examples/configs/tiny.yaml"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_dry_runs(config, capsys):
    info = entry_main(["--config", str(config), "--dry-run"])
    assert info["parameters"]["total"] > 0 and info["train_steps"] > 0
    assert '"train_micro_batch_size_per_gpu"' in capsys.readouterr().out


def test_so16_stage1_dry_run_is_8b_samples(capsys):
    info = entry_main(["--config", str(ROOT / "examples/configs/stage1-So16.yaml"), "--dry-run"])
    assert abs(info["total_samples"] / 8e9 - 1) < 0.01
    assert abs(info["total_flops"] / 6.87e21 - 1) < 0.01  # PERFORMANCE.md §1.5
    assert info["deepspeed_config"]["train_batch_size"] == 512 and info["layout"]["data_parallel"] == 32
    assert "8.000B samples" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, world, needles", [
    ([], 3, ["train.global_batch_size (4)", "data-parallel size (3)"]),
    (["parallel.tensor_parallel=2"], 3, ["world size 3", "parallel.tensor_parallel (2)"]),
    (["parallel.data_parallel=4"], 2, ["parallel.data_parallel (4)"]),
    (["train.global_batch_size=6"], 4, ["train.global_batch_size (6)", "train.micro_batch_size (2)"]),
    (["parallel.pipeline_parallel=2", "parallel.zero_stage=2"], 2, ["parallel.zero_stage=2", "pipeline"]),
    (["parallel.tensor_parallel=3"], 3, ["model.num_attention_heads (4)", "model.ffn_hidden_size (352)"]),
    (["model.num_layers=3", "parallel.pipeline_parallel=2"], 2, ["model.num_layers (3)"]),
    (["train.precision=fp16"], 2, ["train.precision", "fp16 is not offered"]),
    (["train.nan_policy=ignore"], 2, ["train.nan_policy"]),
    (["parallel.zero_stage=0"], 2, ["train.nan_policy=skip", "parallel.zero_stage"]),
    # FP8 GEMM shapes (config._fp8_shape_errors): Transformer Engine needs rows % 8, torch._scaled_mm rows % 16
    (["model.backend=te", "model.fp8=current", "train.precision=bf16", "data.seq_length=252",
      "train.micro_batch_size=1", "train.global_batch_size=2"], 2,
     ["model.fp8=current", "data.seq_length (252) x train.micro_batch_size (1) = 252 token rows", "multiple of 8"]),
    (["model.fp8=torchao-tensorwise", "train.precision=bf16", "data.seq_length=264", "train.micro_batch_size=1",
      "train.global_batch_size=2"], 2, ["= 264 token rows per GEMM, which must be a multiple of 16"]),
    (["model.backend=te", "model.fp8=current", "train.precision=bf16", "parallel.tensor_parallel=2",
      "parallel.sequence_parallel=true", "data.seq_length=264", "train.micro_batch_size=1",
      "train.global_batch_size=1"], 2, ["/ parallel.tensor_parallel (2, sequence parallel) = 132 token rows"]),
    (["model.backend=te", "model.fp8=current", "train.precision=bf16", "parallel.tensor_parallel=2",
      "model.ffn_hidden_size=336", "train.global_batch_size=2"], 2,
     ["model.ffn_hidden_size / parallel.tensor_parallel (2) = 168 must be a multiple of 16"]),
])  # a warmup as long as the run is refused by load_config already (tests/test_config_validation.py)
def test_bad_layouts_fail_naming_the_fields(overrides, world, needles):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as err:
        resolve_layout(cfg, world)
    for n in needles:
        assert n in str(err.value), (n, str(err.value))


def test_fp8_shapes_that_the_gemms_take_pass():
    """The same rules accept the shipped recipe's shapes and the tiny config's (no false alarms)."""
    for fp8 in (["model.backend=te", "model.fp8=current", "train.activation_checkpointing=full"],
                ["model.fp8=torchao-tensorwise"]):
        resolve_layout(load_config(TINY, fp8 + ["train.precision=bf16"]), 2)
        so16 = load_config(ROOT / "examples/configs/stage1-So16.yaml", fp8 + ["train.precision=bf16"])
        resolve_layout(so16, so16.parallel.data_parallel * so16.parallel.tensor_parallel
                       * so16.parallel.pipeline_parallel)
    resolve_layout(load_config(TINY, ["model.backend=te", "model.fp8=current", "train.precision=bf16",
                                      "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]), 2)


def test_layout_and_deepspeed_config():
    cfg = load_config(TINY, ["train.global_batch_size=8", "parallel.zero_stage=2", "train.precision=bf16"])
    layout = resolve_layout(cfg, 2)
    assert (layout.data_parallel, layout.grad_accumulation) == (2, 2)
    ds = deepspeed_config(cfg, layout, platform.current())
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    opt = ds["optimizer"]["params"]
    assert opt["betas"] == [0.9, 0.95] and opt["eps"] == 1e-8 and opt["weight_decay"] == 0.01
    assert ds["gradient_clipping"] == 1.0 and opt["torch_adam"] is True
    assert opt.get("fused", False) is platform.current().fused_adamw


def test_learning_rate_formula_at_chosen_steps():
    peak, low, W, N = 1e-3, 1e-6, 100, 1000
    assert learning_rate(0, peak, low, W, N) == 0.0
    assert learning_rate(50, peak, low, W, N) == pytest.approx(5e-4, rel=1e-12)
    assert learning_rate(100, peak, low, W, N) == pytest.approx(peak, rel=1e-12)
    assert learning_rate(550, peak, low, W, N) == pytest.approx(low + (peak - low) * 0.5, rel=1e-12)
    assert learning_rate(1000, peak, low, W, N) == pytest.approx(low, rel=1e-12)
    s = 777
    assert learning_rate(s, peak, low, W, N) == pytest.approx(
        low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (s - W) / (N - W))), rel=1e-12)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_activation_checkpointing_replays_drop_path(qwen_tokenizer, attention):
    """With DropPath active, recomputation in backward drops the same rows: loss and every gradient of full and
    selective checkpointing equal no checkpointing bitwise (same ops, same order, same RNG draws); selective
    checkpointing really saves GEMM/attention outputs and recomputes the element-wise rest (counted)."""
    from megatron_genlip.model import recompute as rc

    cfg = small_model_config(drop_path_rate=0.5, num_layers=3, attention=attention)
    rows = [[build_sample(qwen_tokenizer, random_image((2, 3), r), (2, 3), f"caption number {r} is here.")]
            for r in range(6)]
    batch = collate_batch(rows, 40)
    results, decisions = [], []

    policy_of = rc.selective_policy

    def counting(ctx, op, *args, **kwargs):
        policy = policy_of(ctx, op, *args, **kwargs)
        decisions.append(policy)
        return policy

    for mode in ("none", "full", "selective", True):
        model = build_model(cfg, seed=0).train()
        model.activation_checkpointing = mode
        torch.manual_seed(123)
        with mock.patch.object(rc, "selective_policy", counting):
            out = model(batch)
            out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    l0, g0 = results[0]
    for loss, grads in results[1:]:
        assert torch.equal(l0, loss)
        assert all(torch.equal(g0[n], grads[n]) for n in g0)
    saved = sum(d == rc.CheckpointPolicy.MUST_SAVE for d in decisions)
    # per block: q, gate, k, v, o, fc1, gate_fc, fc2 (addmm/mm) + the attention kernel; the rest recomputed
    assert saved == 3 * 9, saved
    assert len(decisions) - saved > 3 * 20
    # and DropPath really was active: a different seed changes the loss
    model = build_model(cfg, seed=0).train()
    torch.manual_seed(124)
    assert not torch.equal(model(batch).loss.detach(), l0)


def test_step_profiler_records_only_its_window_and_accounts_for_the_wall_time(tmp_path):
    """train.profile_steps=[2,3] of a 5-step loop: the phase table covers steps 2-3 only (the phases' totals and
    'other' add up to the window's wall time), the timeline and operator table are written, rank 0 prints."""
    from megatron_genlip.training.profiling import StepProfiler, phase

    printed = []
    prof = StepProfiler([2, 3], tmp_path, rank=0, on_cuda=False, say=printed.append)
    w = torch.randn(64, 64, requires_grad=True)
    calls = {"forward": 0}
    for step in range(1, 6):
        prof.before_step(step)
        with phase("forward"):
            loss = (torch.randn(32, 64) @ w).square().mean()
            calls["forward"] += 1
        with phase("backward"):
            loss.backward()
        prof.after_step(step)
        assert (prof.prof is not None) == (step == 2)  # open during the window only
    text = (tmp_path / "profile" / "rank0.txt").read_text()
    assert text.startswith("rank 0: optimizer steps 2-3 (2 steps,")
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:6] if line.split()}
    assert set(rows) >= {"forward", "backward", "other"}, text
    wall = float(text.split(" s wall)")[0].rsplit(", ", 1)[1])
    assert math.isclose(sum(float(rows[k][1]) for k in ("forward", "backward", "other")), wall, abs_tol=2e-3)
    assert (tmp_path / "profile" / "rank0.trace.json").stat().st_size > 0
    assert "aten::mm" in text and len(printed) == 1 and "profile of steps 2-3" in printed[0]


def test_phase_table_does_not_count_data_twice_under_a_pipeline_step():
    """With pipeline parallelism the schedule pulls the micro-batches inside genlip/pipeline_step: 'other' is the
    wall time outside the pipeline step, not outside pipeline step + data (which would go negative and read 0)."""
    from types import SimpleNamespace

    from megatron_genlip.training.profiling import phase_table

    events = [SimpleNamespace(key="genlip/pipeline_step", cpu_time_total=0.8e6),
              SimpleNamespace(key="genlip/data", cpu_time_total=0.3e6),
              SimpleNamespace(key="genlip/agree", cpu_time_total=0.05e6)]
    rows = {line.split()[0]: line.split() for line in phase_table(events, 1.0, 10, on_cuda=False).splitlines()}
    assert float(rows["other"][1]) == pytest.approx(0.15) and float(rows["data"][1]) == pytest.approx(0.3)


def test_stream_changes_name_every_setting_that_moves_the_data_stream():
    """A resume compares the checkpoint's resolved config and dataset fingerprint with the run's: each stream
    setting that differs is named with both values; settings that do not decide the stream are ignored."""
    from megatron_genlip.training.trainer import STREAM_FIELDS, stream_changes

    saved = load_config(TINY, [])
    assert stream_changes(saved.to_dict(), "fp", saved, "fp") == []
    now = load_config(TINY, ["data.seq_length=512", "data.seed=7", "train.global_batch_size=8", "train.lr=0.5",
                             "data.num_workers=0"])
    assert stream_changes(saved.to_dict(), "fp", now, "fp") == [
        f"data.seq_length: {saved.data.seq_length!r} -> 512", f"data.seed: {saved.data.seed!r} -> 7",
        f"train.global_batch_size: {saved.train.global_batch_size!r} -> 8"]
    assert stream_changes(saved.to_dict(), "old", saved, "new")[0].startswith("dataset: old -> new")
    # a checkpoint written before a stream field existed had its default then
    older = saved.to_dict()
    del older["data"]["jpeg_draft"]
    assert stream_changes(older, "fp", saved, "fp") == []
    assert stream_changes(older, "fp", load_config(TINY, ["data.jpeg_draft=true"]), "fp") == [
        "data.jpeg_draft: False -> True"]
    assert len(STREAM_FIELDS) == len(set(STREAM_FIELDS))


def test_a_batch_that_breaks_the_contract_stops_the_run_naming_the_rule(qwen_tokenizer):
    """The trainer checks the first micro-batch of a run (and of an evaluation) against batch.PackedBatch: a
    label on an image slot, or rows of another length than data.seq_length, is a BadBatch (exit 2) naming it."""
    from megatron_genlip.training.errors import BadBatch, check_batch

    rows = [[build_sample(qwen_tokenizer, random_image((2, 3), 0), (2, 3), "a caption.")]]
    batch = collate_batch(rows, 40)
    check_batch(batch, "ok", seq_length=40, patch_size=16)
    with pytest.raises(BadBatch, match="rows of 40 slots, not seq_length 64") as err:
        check_batch(batch, "the first training micro-batch (packed rows [3])", seq_length=64)
    assert err.value.exit_code == 2 and "packed rows [3]" in str(err.value)
    bad = dict(batch, labels=batch["labels"].clone())
    bad["labels"][0, 0] = 7  # slot 0 is an image slot
    with pytest.raises(BadBatch, match="labels on image slots"):
        check_batch(bad, "held-out row 0")


def test_one_optimizer_step_advances_the_data_position_by_the_global_batch(tmp_path, monkeypatch):
    """The real step (Trainer._train_step on a real one-rank DeepSpeed engine, gradient accumulation 2): after two
    steps the data position is 2 x global_batch_size rows, exactly the rows the step pulled from the loader, and
    the checkpointed counters hold the samples and real tokens of those rows, counted here from the rows
    themselves (sample ids)."""
    import deepspeed

    from megatron_genlip.data.tokenizer import load_tokenizer
    from megatron_genlip.parallel import state
    from megatron_genlip.training.schedule import build_scheduler
    from megatron_genlip.training.trainer import Trainer, _Window

    cfg = load_config(TINY, ["train.micro_batch_size=1", "train.global_batch_size=2", "train.warmup_steps=1",
                             "train.train_steps=4", f"train.output_dir={tmp_path}"])
    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets; DeepSpeed asserts it
    state.ensure_initialized(1, 1)
    here = platform.initialize(compile=False)
    layout = resolve_layout(cfg, 1)
    assert layout.grad_accumulation == 2
    model = build_model(cfg.model, 1, seed=0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                           config=deepspeed_config(cfg, layout, here),
                                           lr_scheduler=lambda opt: build_scheduler(opt, cfg.train))
    tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    served = []

    def loader():
        for r in range(100):
            n = 1 + r % 3  # 1-3 samples per row
            rows = [[build_sample(tok, random_image((3, 3), 10 * r + j), (3, 3), f"a red circle {j}.")
                     for j in range(n)]]
            batch = collate_batch(rows, cfg.data.seq_length)
            batch["row_index"] = torch.tensor([r])
            served.append(batch)
            yield batch

    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.engine, trainer.layout, trainer.device = cfg, engine, layout, torch.device("cpu")
    trainer.pipelined, trainer.dp_world, trainer.stop_requested, trainer.platform = False, 1, False, here
    trainer.iteration = trainer.consumed_samples = trainer.skipped_steps = trainer.consecutive_skips = 0
    trainer.samples_seen = trainer.tokens_seen = 0.0
    trainer._step_counts, trainer._batch_checked = {"samples": 0.0, "tokens": 0.0}, False
    batches, window = loader(), _Window()
    for _ in range(2):
        trainer._train_step(batches, window)
    assert trainer.iteration == 2 and len(served) == 4
    assert trainer.consumed_samples == 2 * cfg.train.global_batch_size == len(served)
    sids = [b["sample_ids"] for b in served]
    assert trainer.samples_seen == sum(int(s.max()) + 1 for s in sids) == 1 + 2 + 3 + 1
    assert trainer.tokens_seen == sum(int((s >= 0).sum()) for s in sids)
