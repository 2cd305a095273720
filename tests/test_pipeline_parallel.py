"""Pipeline parallelism (DeepSpeed PipelineModule), alone and with TP and DP: the same losses as one rank."""

from __future__ import annotations

import math

import torch

from dist_harness import run_ranks
from test_trainer import SHORT, data, losses  # noqa: F401  (the module-scoped dataset fixture)
from trainer_harness import run

TOLERANCE = 1e-5  # relative, fp32
COMMON = SHORT + ["train.train_steps=3", "train.precision=fp32", "train.global_batch_size=4", "train.micro_batch_size=2"]


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) == 3 and all(math.isclose(x, y, rel_tol=TOLERANCE) for x, y in zip(a, b))


def test_pp2_and_tp2_pp2_and_dp2_pp2_match_one_rank(tmp_path, data):  # noqa: F811
    run(1, data, tmp_path / "single", COMMON)
    ref = losses(tmp_path / "single")
    assert ref[-1] < ref[0]
    run(2, data, tmp_path / "pp2", COMMON + ["parallel.pipeline_parallel=2"])
    assert same(losses(tmp_path / "pp2"), ref), (losses(tmp_path / "pp2"), ref)
    run(4, data, tmp_path / "tp2pp2", COMMON + ["parallel.pipeline_parallel=2", "parallel.tensor_parallel=2"])
    assert same(losses(tmp_path / "tp2pp2"), ref), (losses(tmp_path / "tp2pp2"), ref)
    run(4, data, tmp_path / "dp2pp2", COMMON + ["parallel.pipeline_parallel=2", "parallel.zero_stage=1",
                                                 "train.activation_checkpointing=true"])
    assert same(losses(tmp_path / "dp2pp2"), ref), (losses(tmp_path / "dp2pp2"), ref)


def test_prefix_lm_isolation_survives_tp2_pp2(tmp_path):
    """A packed row's loss through TP=2 x PP=2 equals the token-weighted mean of its samples' losses run
    alone on one device: the mask, positions and labels really reach every stage (rel err <= 1e-5)."""
    out = tmp_path / "res.pt"
    run_ranks(4, "pp_cases", "packed_row_loss_under_tp_pp", str(out))
    r = torch.load(out)
    assert math.isclose(r["single_packed"], r["alone_combined"], rel_tol=1e-6)
    assert math.isclose(r["pipeline"], r["alone_combined"], rel_tol=TOLERANCE), r
