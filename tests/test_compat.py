"""Canaries of megatron_genlip/compat.py: each shows the stock library behaviour that an entry works around
(it fails once an upgrade makes the entry unnecessary or moves what it touches), and the version guard.
The sequence-parallel gather canary of ``cpu-current-device`` runs on 2 ranks in test_sequence_parallel.py."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest
import torch

from conftest import small_model_config
from dist_harness import run_ranks
from megatron_genlip import compat, platform
from megatron_genlip.model.masks import sdpa_mask
from tp_cases import packed_batch

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only patch")


def test_every_patch_and_private_call_has_a_canary_here():
    source = Path(__file__).read_text()
    for patch in compat.PATCHES:
        assert f'"{patch.name}"' in source, f"no canary for {patch.name}"
    for helper in ("flex_attention_cpu", "ds_to_universal", "stop_loader_workers", "initialize_affine_weight_cpu",
                   "megatron_rng_stream_names"):
        assert f"compat.{helper}" in source, f"no canary for compat.{helper}"


def test_patches_were_applied_once_at_process_start():
    """conftest's platform.initialize() applied what this CPU platform needs; applying again changes nothing."""
    expected = {p.name for p in compat.needed(platform.current())}
    assert compat.applied() == expected
    before = torch.cuda.current_device
    assert compat.apply(platform.current()) == [p.name for p in compat.needed(platform.current())]
    assert torch.cuda.current_device is before


def test_unverified_versions_fail_loudly(monkeypatch):
    with pytest.raises(compat.CompatError, match=r"megatron-core 0\.17\.0 is not a version .* \(0\.16\.1\).*"
                                                 r"tests/test_compat\.py"):
        compat.require("megatron-rng-tracker", "megatron-core", compat.MEGATRON_CORE, "0.17.0")
    compat.require("flex-attention-cpu", "torch", ("2.13",), "2.13.0+cpu")  # a prefix covers its patch releases
    with pytest.raises(compat.CompatError, match="torch 2.14.0"):
        compat.require("flex-attention-cpu", "torch", ("2.13",), "2.14.0")
    monkeypatch.setattr(compat, "library_version", lambda name: "99.0")
    with pytest.raises(compat.CompatError, match="99.0 is not a version"):
        compat.apply(platform.current())  # checked even though the patches are already in place


@CPU_ONLY
def test_cpu_current_device_canary():
    """Stock torch.cuda.current_device raises on a CPU torch, and megatron-core allocates with it (its global
    memory buffer: the SP all-gather buffer); with the patch it is the CPU device."""
    from megatron.core.utils import GlobalMemoryBuffer

    with compat.stock("cpu-current-device"):
        with pytest.raises(AssertionError, match="not compiled with CUDA"):
            torch.cuda.current_device()
        with pytest.raises(AssertionError, match="not compiled with CUDA"):
            GlobalMemoryBuffer().get_tensor((4,), torch.float32, "canary")
    assert GlobalMemoryBuffer().get_tensor((4,), torch.float32, "canary").device.type == "cpu"


@CPU_ONLY
def test_megatron_rng_tracker_canary():
    """megatron-core 0.16.1's own tracker stores CUDA generator states only: stock seeding fails on CPU."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    from megatron_genlip.parallel import rng, state

    state.ensure_initialized(1)
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        CudaRNGStatesTracker().add("x", 1)
    with compat.stock("megatron-rng-tracker"):
        with pytest.raises(AssertionError, match="not compiled with CUDA"):
            model_parallel_cuda_manual_seed(7)
    assert isinstance(get_cuda_rng_tracker(), rng.RNGStatesTracker)  # "megatron-rng-tracker": ours is back
    model_parallel_cuda_manual_seed(7)


def test_megatron_rng_stream_names():
    assert compat.megatron_rng_stream_names() == ("data-parallel-rng", "model-parallel-rng")


@CPU_ONLY
def test_deepspeed_shm_comm_canary():
    """Stock DeepSpeed 0.19.8 judges its shared-memory op buildable here and its CPU communication backend
    builds it when it starts (a ~60 s g++ JIT); with the patch, nothing is built."""
    import deepspeed.ops
    from deepspeed.comm.torch import TorchBackend, build_shm_op

    assert deepspeed.ops._probe_compatible_ops()["deepspeed_shm_comm"] is True
    assert "build_shm_op()" in inspect.getsource(TorchBackend.__init__)
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False  # "deepspeed-shm-comm"
    assert build_shm_op() is None


@pytest.mark.slow
def test_deepspeed_fp32_clip_norm_canary(tmp_path):
    """ZeRO-0 fp32 with clipping: stock DeepSpeed reports no gradient norm; the patched engine reports the
    pre-clip norm ("deepspeed-fp32-clip-norm")."""
    out = tmp_path / "res.pt"
    run_ranks(1, "compat_cases", "fp32_clip_norm", str(out))
    res = torch.load(out, weights_only=False)
    stock_reported, _ = res["stock"]
    patched_reported, true_norm = res["patched"]
    assert stock_reported is None
    assert patched_reported == pytest.approx(true_norm, rel=1e-6) and true_norm > 0.5  # the clip was active


def test_flex_attention_cpu_canary():
    """torch's public flex_attention refuses CPU backward; compat.flex_attention_cpu gives SDPA's output and
    gradients on the same prefix-LM mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from megatron_genlip.model.attention import flex_block_mask

    batch = packed_batch()
    sample_ids, kinds = batch["sample_ids"], batch["token_kinds"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, sample_ids.shape[1], 16, generator=g, requires_grad=True) for _ in range(3))
    block_mask = flex_block_mask(sample_ids, kinds)
    with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
        flex_attention(q, k, v, block_mask=block_mask)
    out = compat.flex_attention_cpu(q, k, v, block_mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(sample_ids, kinds))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_ds_to_universal_canary(tmp_path):
    """The converter's only way in for our universal_checkpoint_info is its private hook, and the stock hook
    keeps whatever info a checkpoint already carries; compat.ds_to_universal swaps it for the call only."""
    from deepspeed.checkpoint import ds_to_universal as converter
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    assert list(inspect.signature(converter.main).parameters) == ["args"]

    class Checkpoint:
        global_state = {UNIVERSAL_CHECKPOINT_INFO: {"universal_checkpoint_version": 0.2}}

        def get_checkpoint_info(self, key):
            return self.global_state.get(key)

    ckpt = Checkpoint()
    converter._inject_missing_state(ckpt)
    assert ckpt.global_state[UNIVERSAL_CHECKPOINT_INFO] == {"universal_checkpoint_version": 0.2}  # not replaced
    stock_hook = converter._inject_missing_state
    args = argparse.Namespace(input_folder=str(tmp_path / "missing"), output_folder=str(tmp_path / "out"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with pytest.raises(Exception):
        compat.ds_to_universal(args, {"universal_checkpoint_version": 0.4})
    assert converter._inject_missing_state is stock_hook  # put back even when the conversion fails


def test_stop_loader_workers_canary():
    """A DataLoader iterator offers no public way to stop its workers; compat.stop_loader_workers does."""
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1)
    it = iter(loader)
    next(it)
    public = [n for n in dir(it) if not n.startswith("_")]
    assert not {"close", "shutdown", "stop"} & set(public), public
    workers = list(it._workers)
    assert all(w.is_alive() for w in workers)
    compat.stop_loader_workers(it)
    assert not any(w.is_alive() for w in workers)
    compat.stop_loader_workers(iter(torch.utils.data.DataLoader([1, 2])))  # single-process: nothing to stop


def test_initialize_affine_weight_cpu_canary():
    """megatron-core keeps its CPU master-weight initialisation private; the wrapper gives the shard that its
    ColumnParallelLinear builds with the same seed."""
    from megatron.core.tensor_parallel import layers

    from megatron_genlip.model.spec import ColumnLinear, parallel_config
    from megatron_genlip.parallel import state

    assert not hasattr(layers, "initialize_affine_weight_cpu")
    init = torch.nn.init.xavier_uniform_
    torch.manual_seed(3)
    ref = ColumnLinear(6, 10, bias=False, init_method=init, config=parallel_config(small_model_config()),
                       tp_group=state.tensor_parallel_group()).weight
    weight = torch.nn.Parameter(torch.empty(10, 6))
    torch.manual_seed(3)
    compat.initialize_affine_weight_cpu(weight, 10, 6, 10, 0, init, params_dtype=torch.float32, rank=0, world_size=1)
    assert torch.equal(weight, ref)
