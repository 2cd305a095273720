"""The TP-aware RNG tracker (megatron_genlip/parallel/rng.py): Megatron's stream semantics on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

from dist_harness import run_ranks
from megatron_genlip.model.layers import DropPath
from megatron_genlip.parallel import rng, state


@pytest.fixture
def seeded():
    state.ensure_initialized(1)
    rng.model_parallel_seed(11, dp_rank=0)
    return rng.get_tracker()


def test_installed_as_megatrons_tracker_and_megatron_seeding_works(seeded):
    assert get_cuda_rng_tracker() is seeded
    assert set(seeded.get_states()) == {rng.DATA_PARALLEL, rng.TENSOR_PARALLEL, "expert-parallel-rng"}
    model_parallel_cuda_manual_seed(123)  # megatron's own call runs on CPU with our tracker
    with seeded.fork():
        got = torch.rand(4)
    assert torch.equal(got, torch.rand(4, generator=torch.Generator().manual_seed(123 + 2718)))  # TP rank 0


def test_fork_restores_the_outer_state_and_streams_continue(seeded):
    outer = torch.get_rng_state()
    with seeded.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)  # the default (replicated) stream did not move
    with seeded.fork(rng.TENSOR_PARALLEL):
        b = torch.rand(3)
    g = torch.Generator().manual_seed(11 + 2718)
    assert torch.equal(a, torch.rand(3, generator=g)) and torch.equal(b, torch.rand(3, generator=g))
    with seeded.fork(rng.TENSOR_PARALLEL):  # nested: the inner stream runs, the outer keeps its place
        c = torch.rand(2)
        with seeded.fork(rng.DATA_PARALLEL):
            d = torch.rand(2)
        e = torch.rand(2)
    assert torch.equal(torch.cat((c, e)), torch.rand(4, generator=g))
    assert torch.equal(d, torch.rand(2, generator=torch.Generator().manual_seed(11)))
    assert torch.equal(torch.get_rng_state(), outer)


def test_drop_path_refuses_a_per_tp_rank_stream(seeded):
    """DropPath draws from the default generators (no generator argument: compiled blocks keep one graph); the
    model checks once per training forward, outside the blocks, that no per-TP-rank stream is forked."""
    from conftest import small_model_config
    from megatron_genlip.model.genlip import build_model
    from tp_cases import packed_batch

    model, batch = build_model(small_model_config(drop_path_rate=0.5), seed=0).train(), packed_batch()
    with seeded.fork(rng.TENSOR_PARALLEL), pytest.raises(RuntimeError, match="model-parallel-rng"):
        model(batch)
    with seeded.fork(rng.DATA_PARALLEL):  # replicated too: allowed
        model(batch)
    with pytest.raises(RuntimeError, match="model-parallel-rng"), seeded.fork(rng.TENSOR_PARALLEL):
        rng.check_replicated()
    x = torch.ones(4, 8, 2)
    with seeded.fork(rng.DATA_PARALLEL):
        DropPath(0.5).train()(x)


def _drop_and_dropout(w: torch.Tensor) -> torch.Tensor:
    """DropPath on the replicated stream plus a dropout-like mask drawn inside fork("model-parallel-rng")."""
    x = w.expand(6, 16, 5)
    with rng.get_tracker().fork():
        keep = torch.rand(6, 16, 5) > 0.5
    return (DropPath(0.5).train()(x) * keep).square().sum()


def test_checkpoint_recomputation_replays_drop_path_and_tracker_streams(seeded):
    """rng.checkpoint reproduces both streams in recomputation (gradients equal bitwise); plain
    torch.utils.checkpoint replays only the default generator, so the forked mask differs there."""
    grads = {}
    for how in ("plain", "rng.checkpoint", "torch.checkpoint"):
        rng.model_parallel_seed(5, dp_rank=0)
        w = torch.linspace(0.5, 1.5, 5, requires_grad=True)
        if how == "plain":
            loss = _drop_and_dropout(w)
        elif how == "rng.checkpoint":
            loss = rng.checkpoint(_drop_and_dropout, w)
        else:
            loss = torch.utils.checkpoint.checkpoint(_drop_and_dropout, w, use_reentrant=False)
        loss.backward()
        grads[how] = (float(loss.detach()), w.grad)
    assert grads["rng.checkpoint"][0] == grads["plain"][0]
    assert torch.equal(grads["rng.checkpoint"][1], grads["plain"][1])
    assert not torch.equal(grads["torch.checkpoint"][1], grads["plain"][1])


@pytest.mark.slow
def test_streams_across_tp_and_dp_ranks(tmp_path):
    """2 ranks as TP=2, then as DP=2: the replicated stream and DropPath decisions are identical over TP and
    differ over DP; the tensor-parallel stream differs over TP; seeds are Megatron's (base + 2718 + tp_rank)."""
    out = tmp_path / "streams.pt"
    run_ranks(2, "sp_cases", "rng_streams", str(out))
    r = torch.load(out, weights_only=False)
    tp0, tp1 = r["tp2"]
    assert (tp0["tp_rank"], tp1["tp_rank"], tp0["dp_rank"], tp1["dp_rank"]) == (0, 1, 0, 0)
    assert torch.equal(tp0["replicated"], tp1["replicated"])
    assert torch.equal(tp0["data_parallel"], tp1["data_parallel"])
    assert torch.equal(tp0["drop_path_kept"], tp1["drop_path_kept"])
    assert not torch.equal(tp0["tensor_parallel"], tp1["tensor_parallel"])
    dp0, dp1 = r["dp2"]
    assert (dp0["dp_rank"], dp1["dp_rank"], dp0["base"], dp1["base"]) == (0, 1, 7, 1007)
    assert not torch.equal(dp0["replicated"], dp1["replicated"])
    assert not torch.equal(dp0["drop_path_kept"], dp1["drop_path_kept"])
    assert not torch.equal(dp0["tensor_parallel"], dp1["tensor_parallel"])
    assert all(x["matches_megatron_seeds"] for x in r["tp2"] + r["dp2"])
    assert 0 < int(tp0["drop_path_kept"].sum()) < 32  # DropPath(0.5) on 32 rows really drew


def test_building_a_model_or_a_probe_leaves_the_cuda_generators_alone(monkeypatch):
    """Weights are drawn on the CPU; seeding for them must not reseed the CUDA generators, which fork_rng(devices=[])
    does not restore: a model built mid-run (ZeRO-3's evaluation copy) or an attentive probe would otherwise put
    DropPath's CUDA stream in the same state on every data-parallel rank. torch.manual_seed reseeds them through
    torch.cuda.manual_seed_all (queued lazily on a CPU-only machine), which is recorded here."""
    from conftest import small_model_config
    from megatron_genlip.evaluation.attentive_probe import train_attentive_probe
    from megatron_genlip.model.genlip import build_model

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("one", seed)))
    cpu_before = torch.random.get_rng_state()
    a = build_model(small_model_config(), seed=0)
    b = build_model(small_model_config(), seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # still seeded per component
    g = torch.Generator().manual_seed(0)
    train_attentive_probe(torch.randn(8, 4, 16, generator=g), torch.arange(8) % 2, 2, 2, epochs=1, lr=1e-3,
                          weight_decay=0.0, batch_size=4)
    assert calls == []
    assert torch.equal(torch.random.get_rng_state(), cpu_before)  # and the CPU generator is restored
