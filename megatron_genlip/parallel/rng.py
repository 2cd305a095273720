"""Random streams with Megatron's tensor-parallel semantics, on CPU as well as CUDA.

Two kinds of stream (Megatron's ``model_parallel_cuda_manual_seed``):

* the **replicated** ("default" / "data-parallel") stream: torch's default generators (CPU, and CUDA when
  present), seeded with ``seed + 1000 * dp_rank``. It is identical on every rank of a tensor-parallel group
  and differs between data-parallel ranks. Everything whose decision must agree over a TP group draws from it:
  DropPath drops a whole packed row, so under sequence parallelism the TP ranks holding the sequence shards of
  one row must drop it together. Because it *is* torch's default generator, the trainer's checkpoints
  (``torch.get_rng_state``) resume it exactly and ``torch.utils.checkpoint`` replays it in recomputation.
* the **tensor-parallel** stream ``"model-parallel-rng"``: seeded with ``base + 2718 + tp_rank``, different on
  every TP rank, for randomness on *sharded* activations (e.g. attention dropout on a rank's heads). It lives in
  the tracker below and is used inside ``tracker.fork()``; Megatron also registers ``"data-parallel-rng"``
  (seeded like the default stream) and ``"expert-parallel-rng"``.

megatron-core's ``CudaRNGStatesTracker`` stores CUDA generator states only and fails on a CPU-only torch
(``torch.cuda.get_rng_state``: "Torch not compiled with CUDA enabled", ENGINES_ON_CPU.md §2.4). The
:class:`RNGStatesTracker` here stores the CPU generator state (and the current CUDA device's, when CUDA is
available) per stream and swaps them in ``fork``. It is the object megatron-core's ``get_cuda_rng_tracker()``
returns on every platform (installed at start-up by ``compat``'s ``megatron-rng-tracker`` patch, which also checks
the megatron-core version whose tracker attributes the subclass relies on), so megatron code that forks the
tracker works unchanged.

Activation checkpointing: :func:`checkpoint` is ``torch.utils.checkpoint`` (non-reentrant; it replays the
default generators) plus a replay of the tracker's streams, so draws inside ``fork()`` are reproduced too.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker


DEFAULT = "default-rng"  # megatron's name for "no fork active": torch's default generators
# megatron-core's stream names (its private _DATA_PARALLEL_RNG_TRACKER_NAME / _MODEL_PARALLEL_RNG_TRACKER_NAME):
# compat's megatron-rng-tracker patch checks them against the installed megatron-core before installing the tracker
DATA_PARALLEL, TENSOR_PARALLEL = "data-parallel-rng", "model-parallel-rng"
REPLICATED_STREAMS = (DEFAULT, DATA_PARALLEL)  # identical on all ranks of a TP group
DP_SEED_STRIDE = 1000  # replicated seed = seed + 1000 * data-parallel rank (the trainer's historical rule)


def _cuda() -> bool:
    """Whether there are CUDA generators whose states a stream must carry."""
    return torch.cuda.is_available()


def _current_states() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if _cuda() else None}


def _set_current_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])


class RNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron-core's tracker with CPU (and CUDA) generator states: ``add(name, seed)`` creates a stream,
    ``fork(name)`` swaps it into torch's default generators for the ``with`` block and stores its advanced
    state on exit; the outer state is restored. ``get_states``/``set_states`` (inherited) snapshot the streams."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")  # megatron's messages and exception types
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        cpu = torch.Generator().manual_seed(seed).get_state()
        cuda = None
        if _cuda():
            outer = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(outer)
        self.states_[name] = {"cpu": cpu, "cuda": cuda}

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer, outer_name = _current_states(), self._current_state_name
        if outer_name != DEFAULT:  # nested fork: the enclosing stream keeps its progress
            self.states_[outer_name] = outer
        _set_current_states(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = _current_states()
            _set_current_states(self.states_[outer_name] if outer_name != DEFAULT else outer)
            self._current_state_name = outer_name

    @property
    def current_stream(self) -> str:
        return self._current_state_name


def get_tracker() -> RNGStatesTracker:
    """megatron-core's global tracker (``get_cuda_rng_tracker()``), which the platform decision made an
    :class:`RNGStatesTracker` (``platform.initialize``, which every entry point and every model build runs
    first; this module does not import the platform, which imports the patches that import it)."""
    tracker = get_cuda_rng_tracker()
    if not isinstance(tracker, RNGStatesTracker):
        raise RuntimeError(f"megatron-core's RNG tracker is a {type(tracker).__name__}, not the project's "
                           "RNGStatesTracker: call megatron_genlip.platform.initialize() first (it installs it), "
                           "and nothing may replace it afterwards")
    return tracker


def replicated_seed(seed: int, dp_rank: int) -> int:
    return seed + DP_SEED_STRIDE * dp_rank


def model_parallel_seed(seed: int, dp_rank: int | None = None) -> int:
    """Seed every stream (call after the process groups exist). ``dp_rank`` defaults to megatron-core's
    data-parallel rank. Returns the replicated stream's seed.

    Default generators (CPU and all CUDA devices) <- ``base = seed + 1000 * dp_rank``; then megatron-core's own
    ``model_parallel_cuda_manual_seed(base)`` on our tracker: "data-parallel-rng" <- base, "model-parallel-rng"
    <- base + 2718 + tp_rank, "expert-parallel-rng" <- base + 1024 + 100 * ep_rank + etp_rank.
    """
    if dp_rank is None:
        dp_rank = parallel_state.get_data_parallel_rank()
    base = replicated_seed(seed, dp_rank)
    torch.manual_seed(base)
    get_tracker()
    mcore_random.model_parallel_cuda_manual_seed(base)
    return base


def replicated_generator(device: torch.device | str | None = None) -> torch.Generator:
    """The generator of the replicated stream for ``device``: torch's default generator. Raises if called
    inside ``fork()`` of a per-TP-rank stream, where the default generator holds that stream instead."""
    current = get_tracker().current_stream
    if current not in REPLICATED_STREAMS:
        raise RuntimeError(f"a draw that must agree over the tensor-parallel group (e.g. DropPath) ran inside "
                           f"get_cuda_rng_tracker().fork({current!r}), a stream that differs per TP rank")
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def check_replicated() -> None:
    """Raise when a per-TP-rank stream is forked (draws of the replicated stream, e.g. DropPath, must agree over
    the tensor-parallel group and come from torch's default generators)."""
    replicated_generator()


def _tracker_replay():
    """``context_fn`` for torch.utils.checkpoint: remember the tracker's streams when the forward runs and
    rewind them to that point around the recomputation (then put back where backward found them)."""
    tracker = get_tracker()
    at_forward: dict = {}

    @contextlib.contextmanager
    def forward():
        at_forward.update(tracker.get_states())
        yield

    @contextlib.contextmanager
    def recompute():
        now = tracker.get_states()
        tracker.set_states(dict(at_forward))
        try:
            yield
        finally:
            tracker.set_states(now)

    return forward(), recompute()


_selective_depth = 0  # > 0 while a selectively checkpointed function runs (its forward or its recomputation)


def selective_active() -> bool:
    """Whether the running code is inside a selectively checkpointed function, eagerly (``model/spec.py``'s
    RowLinear then keeps the matmul output that selective checkpointing saved away from megatron-core's in-place
    tensor-parallel all-reduce)."""
    return _selective_depth > 0


def _in_selective_scope(function):
    def run(*args):
        global _selective_depth
        _selective_depth += 1
        try:
            return function(*args)
        finally:
            _selective_depth -= 1

    return run


def checkpoint(function, *args, policy=None):
    """Non-reentrant activation checkpointing that replays every stream: torch's default generators (torch
    does that) and the tracker's forked streams (``_tracker_replay``). ``policy``: a selective-checkpointing
    policy (``torch.utils.checkpoint.create_selective_checkpoint_contexts``'s argument: the outputs of the ops it
    saves are kept from the forward, everything else is recomputed); None recomputes the whole function."""
    if policy is None:
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=_tracker_replay)

    def contexts():
        saving, replaying = torch.utils.checkpoint.create_selective_checkpoint_contexts(policy)
        forward, recompute = _tracker_replay()
        return _both(saving, forward), _both(replaying, recompute)

    return torch.utils.checkpoint.checkpoint(_in_selective_scope(function), *args, use_reentrant=False,
                                             context_fn=contexts)


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield
