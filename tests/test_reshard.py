"""Changing the parallel layout of a checkpoint: tools/reshard_checkpoint.py (DeepSpeed universal checkpoints)
and the trainer's start-up check, through the real launcher.

One TP=2 x PP=2 run (4 ranks, fp32) trains 4 steps and saves at steps 2 and 4; its steps 3 and 4 are the
reference. The step-2 checkpoint is resharded and resumed at other layouts: step 3's loss checks the weights,
step 4's loss and gradient norm check the Adam moments and step (zeroing the moments in the converted
checkpoint changes step 4's loss by a relative 1e-3), the lr checks the schedule.
"""

from __future__ import annotations

import json
import math
import re
import shlex

import pytest
import torch

from dist_harness import run_ranks
from megatron_genlip.parallel import sharding
from megatron_genlip.training import reshard as rs
from trainer_harness import build_test_dataset, run, run_tool, train_log

# fp32 sums are reduced in another order at another layout (TP all-reduces, DP averaging): measured differences
# are 0 to 4e-8 relative; 1e-5 is far below what a wrong optimizer state does (1e-3)
TOLERANCE = 1e-5
COMMON = ["train.train_steps=4", "train.warmup_steps=1", "train.precision=fp32", "train.global_batch_size=4",
          "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=100000", "train.save_interval=2",
          "train.keep_last=2", "train.eval_rows=1", "train.eval_captions=1", "train.max_new_tokens=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """120 train samples (about 24 packed rows: 4 steps use 16) and 8 held-out ones, indexed."""
    return build_test_dataset(tmp_path_factory.mktemp("reshard-data"), 120, 8)


@pytest.fixture(scope="module")
def source(tmp_path_factory, data):
    """The TP=2 x PP=2 run: its checkpoint directory and its log (steps 1-4)."""
    out = tmp_path_factory.mktemp("reshard-source")
    run(4, data, out, COMMON + ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
    log = train_log(out)
    assert sorted(log) == [1, 2, 3, 4] and log[4]["loss"] < log[1]["loss"]
    return {"ckpt": out / "checkpoints", "log": log}


def _resume_matches(source, log: dict, stdout: str) -> None:
    assert "resumed from" in stdout and "at step 2 (resharded from TP=2 x PP=2 x DP=1, ZeRO-1)" in stdout
    assert sorted(log) == [3, 4]
    ref = source["log"]
    for s in (3, 4):
        assert math.isclose(log[s]["loss"], ref[s]["loss"], rel_tol=TOLERANCE), (s, log[s]["loss"], ref[s]["loss"])
        assert math.isclose(log[s]["grad_norm"], ref[s]["grad_norm"], rel_tol=TOLERANCE), s
        assert math.isclose(log[s]["lr"], ref[s]["lr"], rel_tol=1e-12), (s, log[s]["lr"], ref[s]["lr"])
        assert log[s]["consumed_samples"] == ref[s]["consumed_samples"] == 4 * s


@pytest.mark.slow
def test_tp2_pp2_to_one_rank_zero2(tmp_path, source, data):
    new = tmp_path / "tp1pp1"
    proc = run_tool("reshard_checkpoint.py", ["--load", str(source["ckpt"]), "--iteration", "2", "--save", str(new),
                                              "--tp", "1", "--pp", "1", "--dp", "1"])
    assert "[4/4] wrote" in proc.stdout and (new / "latest").read_text() == "iter_0000002"
    marker = json.loads((new / "iter_0000002" / "genlip_universal.json").read_text())
    assert marker["source_layout"] == {"tensor_parallel": 2, "pipeline_parallel": 2, "data_parallel": 1,
                                       "zero_stage": 1}
    # full tensors with PP=1 names: the row-parallel o_proj was merged along dim 1, a norm kept once
    zero = new / "iter_0000002" / "zero"
    assert torch.load(zero / "layers.0.self_attn.o.weight" / "fp32.pt")["param"].shape == (128, 128)
    assert torch.load(zero / "layers.3.layer_norm1.weight" / "exp_avg.pt")["param"].shape == (128,)
    assert torch.load(zero / "lm_head.weight" / "exp_avg_sq.pt")["param"].shape == (448, 96)
    out = tmp_path / "run"
    resumed = run(1, data, out, COMMON + [f"train.load={new}", "parallel.zero_stage=2"])
    _resume_matches(source, train_log(out), resumed.stdout)


@pytest.mark.slow
def test_tp2_pp2_to_dp2_zero1(tmp_path, source, data):
    new = tmp_path / "dp2"
    run_tool("reshard_checkpoint.py", ["--load", str(source["ckpt"]), "--iteration", "2", "--save", str(new),
                                       "--tp", "1", "--pp", "1", "--dp", "2"])
    out = tmp_path / "run"
    resumed = run(2, data, out, COMMON + [f"train.load={new}", "parallel.zero_stage=1"])
    _resume_matches(source, train_log(out), resumed.stdout)


@pytest.mark.slow
def test_other_layout_without_resharding_fails_at_start_up(tmp_path, source, data):
    """A plain checkpoint at another layout stops the run before DeepSpeed loads anything, naming both layouts
    and a conversion command that works as printed."""
    proc = run(1, data, tmp_path / "run", COMMON + [f"train.load={source['ckpt']}"], check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert "configuration error: checkpoint" in err and "ZeRORuntimeException" not in err
    assert "written at TP=2 x PP=2 x DP=1, ZeRO-1 but this run is TP=1 x PP=1 x DP=1, ZeRO-1" in err
    command = re.search(r"python (tools/reshard_checkpoint\.py .*)", err).group(1)
    assert command == (f"tools/reshard_checkpoint.py --load {source['ckpt']} --iteration 4 --save "
                       f"{source['ckpt']}-tp1pp1dp1 --tp 1 --pp 1 --dp 1")
    args = shlex.split(command)[1:]
    args[args.index("--save") + 1] = str(tmp_path / "converted")  # the source's directory is shared by the tests
    run_tool("reshard_checkpoint.py", args)
    assert (tmp_path / "converted" / "latest").read_text() == "iter_0000004"


@pytest.mark.slow
def test_resharded_checkpoint_exports_the_same_weights(tmp_path, source):
    """A resharded (universal) checkpoint is a valid export source: its fp32 masters, merged by DeepSpeed,
    equal the weights merged from the original TP=2 x PP=2 module files (fp32 run: module weights = masters)."""
    from megatron_genlip.hf.convert import read_checkpoint

    new = tmp_path / "tp1pp1"
    rs.reshard(source["ckpt"], new, 1, 1, iteration=2)
    merged, _ = read_checkpoint(source["ckpt"], 2)
    universal, client = read_checkpoint(new, 2)
    assert client["iteration"] == 2 and sorted(universal) == sorted(merged)
    diff = {k: float((universal[k] - merged[k]).abs().max()) for k in merged}
    assert max(diff.values()) == 0.0, {k: v for k, v in diff.items() if v}


@pytest.mark.slow
def test_tool_errors_name_the_problem(tmp_path, source):
    with pytest.raises(rs.ReshardError, match=r"iter_0000003 does not exist \(checkpoints in .*: iter_0000002, "
                                              r"iter_0000004\)"):
        rs.reshard(source["ckpt"], tmp_path / "x", 1, 1, iteration=3)
    with pytest.raises(rs.ReshardError, match=r"model.num_attention_heads \(4\) not divisible by "
                                              r"parallel.tensor_parallel \(3\)"):
        rs.reshard(source["ckpt"], tmp_path / "x", 3, 1)
    with pytest.raises(rs.ReshardError, match=r"no checkpoint in .* can be used \(it holds no iter_\* checkpoint\)"):
        rs.reshard(tmp_path, tmp_path / "x", 1, 1)
    assert not (tmp_path / "x").exists()
    assert rs.universal_target_problem(1, 2) is None and rs.universal_target_problem(3, 1) is None
    assert "zero_stage >= 1" in rs.universal_target_problem(0, 1)
    assert "tensor_parallel=1" in rs.universal_target_problem(3, 2)
    text = run_tool("reshard_checkpoint.py", ["--help"]).stdout
    for flag in ("--load", "--iteration", "--save", "--tp", "--pp", "--dp", "--workers"):
        assert flag in text


@pytest.mark.slow
def test_fp8_scaling_state_is_refused_unless_dropped(tmp_path, source):
    """A checkpoint whose pipeline layer file holds Transformer Engine's FP8 scaling state (model.fp8=delayed) is
    refused, naming the file, the key and the flag, and nothing is written; with drop_fp8_history it converts,
    and the marker counts what was dropped."""
    import shutil

    from megatron_genlip.training import ckpt_format as fmt

    ckpt = tmp_path / "ckpt"
    tag = ckpt / "iter_0000002"
    shutil.copytree(source["ckpt"] / "iter_0000002", tag)
    fmt.write_latest(ckpt, "iter_0000002")
    layer = tag / "layer_01-model_00-model_states.pt"
    state = torch.load(layer, weights_only=False)
    key = next(k for k in state if k.endswith(".weight")).rsplit(".", 1)[0] + "._extra_state"
    state[key] = _te_extra_state()
    torch.save(state, layer)
    manifest = fmt.read_manifest(tag)
    info = {k: v for k, v in manifest.items() if k not in ("format", "version", "tag", "algorithm", "written",
                                                           "host", "files")}
    fmt.write_manifest(tag, fmt.manifest_files(tag), **info)  # a checkpoint that verifies, as a TE run writes it
    with pytest.raises(rs.ReshardError, match=rf"FP8 scaling state .* 1 module\(s\), e.g. {re.escape(key)} in "
                                              rf"{layer.name}.*--drop-fp8-history"):
        rs.reshard(ckpt, tmp_path / "refused", 1, 1)
    assert not (tmp_path / "refused").exists()
    lines = []
    out = rs.reshard(ckpt, tmp_path / "dropped", 1, 1, log=lines.append, drop_fp8_history=True)
    assert any("dropping the FP8 scaling state of 1 module(s)" in line for line in lines)
    assert json.loads((out / "genlip_universal.json").read_text())["fp8_history_dropped"] == 1


@pytest.mark.slow
def test_partition_dim_matches_megatron_core_tp2_model(tmp_path):
    """sharding.partition_dim agrees with the attributes megatron-core sets on a real TP=2 model, and
    split_tp/merge_tp round-trip its shards into the TP=1 model's weights exactly."""
    out = tmp_path / "res.pt"
    run_ranks(2, "reshard_cases", "partition_dims_match_megatron", str(out))
    r = torch.load(out)
    assert r["num_params"] > 20
    assert r["sharded"] and all(attr == ours for attr, ours in r["sharded"].values()), r["sharded"]
    assert {d for d, _ in r["sharded"].values()} == {0, 1}
    assert all(ours is None for _, ours in r["replicated"]), r["replicated"]
    assert r["split_mismatch"] == [] and r["merge_mismatch"] == []


def _te_extra_state(delayed: bool = True) -> torch.Tensor:
    """What Transformer Engine's get_extra_state returns (transformer_engine/pytorch/module/base.py): its pickled
    FP8 metadata as a uint8 tensor, with the amax history and scales for delayed scaling; TE < 2.18 pickles the
    recipe and the extra variables alone for a stateless recipe (>= 2.18: an empty tensor)."""
    import pickle

    state = {"recipe": "Float8CurrentScaling()", "extra_fp8_variables": {"num_gemms": 3}}
    if delayed:
        state.update(scale_fwd=torch.ones(3), amax_history_fwd=torch.zeros(16, 3), scale_bwd=torch.ones(2),
                     amax_history_bwd=torch.zeros(16, 2), recipe="DelayedScaling()")
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8).clone()


def test_fp8_history_is_found_and_kept_out_of_the_converter(tmp_path):
    """fp8_history finds delayed scaling's state in _extra_state tensors of the model-state files (PP=1: in
    ``module``; one copy per TP rank) and of the pipeline layer files, per module; not TE's empty tensor (>= 2.18)
    nor its stateless pickle (< 2.18) of current scaling, nor megatron-core's None. The converter's staged view
    drops every _extra_state from ``module`` (ds_to_universal would write each as a float "parameter") and keeps
    the weights."""
    w = torch.ones(4, 4)
    te = {"a.weight": w, "a._extra_state": _te_extra_state(), "b._extra_state": torch.empty(0, dtype=torch.uint8),
          "d._extra_state": _te_extra_state(delayed=False)}
    torch.save({"module": te, "param_shapes": []}, tmp_path / "mp_rank_00_model_states.pt")  # tensors only, as TE's
    torch.save({"module": {"a.weight": w, "a._extra_state": _te_extra_state(), "c._extra_state": None}},
               tmp_path / "mp_rank_01_model_states.pt")  # TP rank 1: the same module, and a local layer
    torch.save({"module": None}, tmp_path / "mp_rank_02_model_states.pt")  # a pipeline run's
    torch.save({"x.weight": w, "x._extra_state": _te_extra_state()}, tmp_path / "layer_01-model_00-model_states.pt")
    torch.save({"optimizer": 1}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert rs.fp8_history(tmp_path) == {"x._extra_state": ["layer_01-model_00-model_states.pt"],
                                        "a._extra_state": ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]}
    corrupt = torch.frombuffer(bytearray(b"\x80\x04garbage"), dtype=torch.uint8)
    assert rs._holds_delayed_scaling_state(corrupt)  # unreadable: refused, never dropped silently
    staged = rs._stage_source(tmp_path, tmp_path.parent / "staged")
    for name in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"):
        module = torch.load(staged / name, weights_only=False)["module"]
        assert list(module) == ["a.weight"] and torch.equal(module["a.weight"], w)
    assert (staged / "layer_01-model_00-model_states.pt").is_symlink()
    assert (staged / "mp_rank_02_model_states.pt").is_symlink()
    assert rs.fp8_history(staged) == {"x._extra_state": ["layer_01-model_00-model_states.pt"]}


def test_names_and_universal_patterns():
    from deepspeed.checkpoint import constants

    names = ["vision_embeddings.patch_embedding.weight", "embeddings.weight", "in_proj.bias",
             "layers.0.self_attn.o.weight", "layers.0.self_attn.o.bias", "layers.1.mlp.fc1.weight", "ln_post.weight",
             "proj.weight", "lm_head.weight"]
    piped = [sharding.pipeline_name(n, 2) for n in names]
    assert piped == ["0.vision_embeddings.patch_embedding.weight", "0.embeddings.weight", "0.in_proj.bias",
                     "1.self_attn.o.weight", "1.self_attn.o.bias", "2.mlp.fc1.weight", "3.ln_post.weight",
                     "3.proj.weight", "3.lm_head.weight"]
    assert [sharding.model_name(n, 2) for n in piped] == names
    info = sharding.universal_checkpoint_info(piped, 2)
    assert info[constants.UNIVERSAL_CHECKPOINT_VERSION_KEY] == constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE
    assert info[constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] == [r"^1\.self_attn\.o\.weight$"]
    assert info[constants.TP_REPLICATED_PARAMETER_PATTERNS] == [
        r"^0\.in_proj\.bias$", r"^0\.vision_embeddings\.patch_embedding\.weight$", r"^1\.self_attn\.o\.bias$",
        r"^3\.ln_post\.weight$", r"^3\.proj\.weight$"]
