"""Collectives on a backend that serves their tensors (megatron_genlip/parallel/comm.py).

On a GPU cluster the default group is NCCL, which serves CUDA tensors only; every other test runs on gloo, which
serves both devices and so hides a CPU tensor reduced on it. Here the world is registered as ``cuda:gloo``: on
this CPU machine it refuses CPU tensors exactly as NCCL does (``No backend type associated with device type
cpu``), and the trainer's own collectives must still work on it. The static test keeps every tensor collective
in the one module that routes them."""

from __future__ import annotations

import ast
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatron_genlip"
OWNER = PACKAGE / "parallel" / "comm.py"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv"}


def direct_collectives(path: Path) -> list[str]:
    """``file:line name`` of every torch.distributed collective called in ``path`` (through any alias of the
    module, ``torch.distributed.X`` or a name imported from it)."""
    tree = ast.parse(path.read_text())
    module_aliases, function_aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    module_aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    module_aliases.add(a.asname or a.name)
                elif node.module in ("torch.distributed", "torch.distributed.distributed_c10d") \
                        and a.name in COLLECTIVES:
                    function_aliases[a.asname or a.name] = a.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = None
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            base = f.value
            if isinstance(base, ast.Name) and base.id in module_aliases:
                name = f.attr
            elif isinstance(base, ast.Attribute) and base.attr == "distributed" and \
                    isinstance(base.value, ast.Name) and base.value.id == "torch":
                name = f.attr
        elif isinstance(f, ast.Name) and f.id in function_aliases:
            name = function_aliases[f.id]
        if name:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_only_the_comm_module_calls_torch_distributed_collectives():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != OWNER for hit in direct_collectives(path)]
    assert not offenders, "call megatron_genlip.parallel.comm instead:\n" + "\n".join(offenders)
    assert direct_collectives(OWNER), "the owner itself must be seen calling them"


def test_the_scan_sees_every_spelling(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
                   "from torch.distributed import all_gather_object as ago\n"
                   "def f(x):\n    dist.all_reduce(x)\n    torch.distributed.barrier()\n    d2.broadcast(x, 0)\n"
                   "    ago([None], 1)\n    dist.get_rank()\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert direct_collectives(bad) == ["bad.py:6 all_reduce", "bad.py:7 barrier", "bad.py:8 broadcast",
                                       "bad.py:9 all_gather_object"]


def test_served_device_types_are_read_from_the_backend_config(monkeypatch):
    from megatron_genlip.parallel import comm

    for config, types in (("cuda:nccl", {"cuda"}), ("cpu:gloo,cuda:gloo", {"cpu", "cuda"}), ("cuda:gloo", {"cuda"}),
                          ("cpu:gloo,cuda:nccl", {"cpu", "cuda"}), ("ccl", {"cpu", "cuda"})):
        monkeypatch.setattr(comm.dist, "get_backend_config", lambda group=None, c=config: c)
        assert comm.served_device_types() == types, config


def test_sync_counter_counts_only_sync_warnings_and_passes_the_rest_on():
    from megatron_genlip.training.profiling import SYNC_WARNING, SyncCounter

    def other():  # one place in the code that warns at every step
        warnings.warn("something else", UserWarning)

    modes = []
    counter = SyncCounter(True, set_mode=modes.append)  # torch.cuda's mode switch is CUDA-only
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with counter.step():
            for _ in range(3):
                warnings.warn(SYNC_WARNING, UserWarning)
            other()
    assert counter.last == 3 and modes == ["warn", "default"]
    assert [str(w.message) for w in outside] == ["something else"]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        with counter.step():
            other()  # the same place: shown once, not every step
    assert again == [] and counter.last == 0
    with counter.step():  # a step without synchronisation counts zero
        pass
    assert counter.last == 0
    off = SyncCounter(False, set_mode=modes.append)
    with warnings.catch_warnings(record=True), off.step():
        warnings.warn(SYNC_WARNING, UserWarning)
    assert off.last == 0 and modes == ["warn", "default"] * 3  # three enabled steps switched the mode, not the off one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sync_counter_sees_a_real_cuda_sync():
    from megatron_genlip.training.profiling import SyncCounter

    counter = SyncCounter(True)
    x = torch.ones(4, device="cuda")
    with counter.step():
        y = (x * 2).sum()
    assert counter.last == 0
    with counter.step():
        float(y)
    assert counter.last >= 1


# ------------------------------------------------------------------------------------------------------
# the trainer's collectives on a world that serves CUDA tensors only (run in 2 spawned processes)


class _Log:
    def __init__(self):
        self.records = []

    def record(self, kind, step, values):
        self.records.append((kind, step, values))


def _cuda_only_world(rank: int, world: int, store_path: str, results: str) -> None:
    import torch.distributed as dist

    from megatron_genlip.parallel import comm, state
    from megatron_genlip.training import checkpoint as ckpt
    from megatron_genlip.training.errors import NonFiniteError
    from megatron_genlip.training.trainer import Trainer, _loss_terms, _Window

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("cuda:gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    out = {}
    try:  # the reproduction: what NCCL does with a CPU tensor
        dist.all_reduce(torch.ones(1))
        out["plain_all_reduce"] = "accepted"
    except RuntimeError as e:
        out["plain_all_reduce"] = str(e)
    comm.reset()
    try:  # no gloo twin yet: a clear error saying what to call
        comm.all_reduce(torch.ones(1))
    except RuntimeError as e:
        out["no_twin"] = str(e)
    comm.init_host_groups()
    state.ensure_initialized(1, 1)  # megatron-core's groups (and their gloo twins) on the cuda-only world
    state.check_rank_order(1, 1)  # an object collective

    # the step's one agreement: a non-finite loss on rank 1 only, a stop signal on rank 0 only
    trainer = SimpleNamespace(stop_requested=rank == 0, iteration=4, cfg=SimpleNamespace(
        train=SimpleNamespace(nan_policy="skip", train_steps=10, global_batch_size=2, peak_tflops=1.0)),
        step_nonfinite=None, stop_agreed=None, samples_seen=0.0, tokens_seen=0.0, world=world, dp_world=world,
        skipped_steps=0, consumed_samples=8, _step_counts={"samples": 2.0 + rank, "tokens": 100.0},
        platform=SimpleNamespace(pin_memory=False))
    losses = _loss_terms(torch.tensor(float("nan") if rank == 1 else 2.0)) + _loss_terms(torch.tensor(4.0))
    Trainer._decide(trainer, losses, "rows [..]")
    out["decided"] = [trainer.step_nonfinite, trainer.stop_agreed, trainer.samples_seen, trainer.tokens_seen]
    trainer.cfg.train.nan_policy = "stop"
    try:
        Trainer._decide(trainer, losses, "rows [..]")
        out["stop_policy"] = "no error"
    except NonFiniteError as e:
        out["stop_policy"] = str(e)

    # the log window: device loss sums and host counts in one data-parallel reduction
    window = _Window()
    window.stats.update(samples=3.0 + rank, tokens=100.0, slots=128.0, flops=1e9)
    window.add_step(losses, torch.tensor(0.5), 1e-3)
    log = _Log()
    out["window"] = window.summarise(trainer, log)

    # evaluation's reductions (validation sums, captioning's host sums and records; the model's own forward
    # reduces CUDA tensors on a GPU and cannot run on this world on a CPU)
    out["host_sum"] = comm.all_reduce(torch.tensor([float(rank + 1)]), group=state.parallel_state
                                      .get_data_parallel_group()).tolist()
    out["objects"] = comm.all_gather_object({"rank": rank}, group=state.parallel_state.get_data_parallel_group())
    out["any"] = [comm.any_rank(rank == 1), comm.any_rank(False)]
    out["decision"] = ckpt.rank0_decides(lambda: "rank0's choice")
    out["gathered"] = comm.gather_object(rank * 10)
    comm.barrier()
    torch.save(out, f"{results}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_trainer_collectives_run_on_a_world_that_serves_cuda_only(tmp_path):
    import torch.multiprocessing as mp

    results = str(tmp_path / "out")
    mp.spawn(_cuda_only_world, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
    got = [torch.load(f"{results}.{r}", weights_only=False) for r in range(2)]
    for r, out in enumerate(got):
        assert "No backend type associated with device type cpu" in out["plain_all_reduce"], out  # as NCCL
        assert "init_host_groups" in out["no_twin"]
        # rank 1's NaN and rank 0's stop signal reach every rank; the step's counters: 2 + 3 samples, 2 x 100 tokens
        assert out["decided"] == [True, True, 5.0, 200.0], out
        assert "non-finite loss at step 5 (train.nan_policy=stop); rows [..]" in out["stop_policy"]
        w = out["window"]
        # finite losses: rank 0 has 2 + 4, rank 1 has 4 (its NaN dropped): (6 + 4) / 3 micro-batches
        assert w["loss"] == pytest.approx(10 / 3) and w["grad_norm"] == pytest.approx(0.5)
        assert w["samples_per_s"] > 0 and w["packing_efficiency"] == pytest.approx(100 / 128)
        assert out["host_sum"] == [3.0] and out["objects"] == [{"rank": 0}, {"rank": 1}]
        assert out["any"] == [True, False] and out["decision"] == "rank0's choice"
        assert out["gathered"] == ([0, 10] if r == 0 else None)



def test_a_cpu_tensor_on_a_cuda_only_group_is_routed_or_refused_in_process():
    """Fast: in this process's world, a group registered as cuda:gloo (what NCCL is to a CPU tensor) gets a CPU
    tensor: without a gloo twin, our error says what to do (not torch's 'No backend type'); a device-typed check
    routes CPU tensors of a group that serves the CPU straight to it."""
    import torch.distributed as dist

    from megatron_genlip.parallel import comm, state

    state.ensure_initialized(1, 1)
    cuda_only = dist.new_group(ranks=[0], backend="cuda:gloo")
    assert comm.served_device_types(cuda_only) == {"cuda"} and comm.serves(None, "cpu")
    with pytest.raises(RuntimeError, match="has no gloo twin: reduce a device tensor on it instead"):
        comm.all_reduce(torch.ones(1), group=cuda_only)
    assert comm.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]  # the world serves the CPU here: no routing
    assert comm.host_group(None) is None and comm.all_gather_object({"a": 1}) == [{"a": 1}]
