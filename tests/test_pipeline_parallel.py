"""Pipeline parallelism (DeepSpeed PipelineModule), alone and with TP and DP: the same losses as one rank."""

from __future__ import annotations

import math

import pytest
import torch

from dist_harness import run_ranks
from trainer_harness import SHORT, losses, run

TOLERANCE = 1e-5  # relative, fp32
COMMON = SHORT + ["train.train_steps=3", "train.precision=fp32", "train.global_batch_size=4", "train.micro_batch_size=2"]


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) == 3 and all(math.isclose(x, y, rel_tol=TOLERANCE) for x, y in zip(a, b))


@pytest.mark.slow
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


@pytest.mark.slow
def test_prefix_lm_isolation_survives_tp2_pp2(tmp_path):
    """A packed row's loss through TP=2 x PP=2 equals the token-weighted mean of its samples' losses run
    alone on one device: the mask, positions and labels really reach every stage (rel err <= 1e-5)."""
    out = tmp_path / "res.pt"
    run_ranks(4, "pp_cases", "packed_row_loss_under_tp_pp", str(out))
    r = torch.load(out)
    assert math.isclose(r["single_packed"], r["alone_combined"], rel_tol=1e-6)
    assert math.isclose(r["pipeline"], r["alone_combined"], rel_tol=TOLERANCE), r


def test_stage_builds_rotary_tables_and_mask_once_per_micro_batch():
    """The blocks of a stage share one mask per micro-batch; a new micro-batch written into the same buffers
    (DeepSpeed reuses its receive buffers) gets a freshly built mask, equal to a direct build."""
    from conftest import small_model_config
    from megatron_genlip.model.masks import sdpa_mask
    from megatron_genlip.model.stages import _TABLES, BlockStage
    from megatron_genlip.parallel import state

    state.reinitialize(1)
    cfg = small_model_config()
    blocks = [BlockStage(cfg, state.tensor_parallel_group(), 0, i) for i in range(2)]
    positions = torch.arange(12).expand(1, 3, 12).clone()
    sample_ids = torch.tensor([[0] * 5 + [1] * 5 + [-1] * 2])
    kinds = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 1, 0, 0, -1, -1]])
    first = _TABLES.get(blocks[0], positions, sample_ids, kinds, torch.float32)
    assert _TABLES.get(blocks[1], positions, sample_ids, kinds, torch.float32)[2] is first[2]
    sample_ids[0, 5:10] = 0  # the next micro-batch in the same buffer: one sample
    kinds[0, 5:8] = 0
    again = _TABLES.get(blocks[1], positions, sample_ids, kinds, torch.float32)
    assert again[2] is not first[2] and torch.equal(again[2], sdpa_mask(sample_ids, kinds))
    x = torch.randn(12, 1, cfg.hidden_size)
    out = blocks[0]((x, positions, sample_ids, kinds, None))[0]
    cos, sin = blocks[0].rotary(positions, x.dtype)
    assert torch.equal(out, super(BlockStage, blocks[0]).forward(x, cos, sin, sdpa_mask(sample_ids, kinds)))
