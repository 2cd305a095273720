"""Every patch of the libraries we build on, and every call into their private parts, in one module.

Each entry names the stock behaviour it works around and the library versions it was verified on; an
unverified version fails loudly (:class:`CompatError`, saying what to do) instead of patching blindly.
``tests/test_compat.py`` holds one canary per entry that shows the stock behaviour: it fails when an upgrade
makes the entry unnecessary or moves what it touches.

Process-wide patches, applied once at start-up by :func:`apply` (called from ``platform.initialize``):

* ``cpu-current-device`` (CPU only): megatron-core allocates sequence-parallel buffers, rotary tables and
  its global memory buffer with ``device=torch.cuda.current_device()`` (~30 call sites), which raises "Torch not
  compiled with CUDA enabled" on a CPU torch; ``torch.cuda.current_device`` returns the CPU device instead.
* ``megatron-rng-tracker``: megatron-core's ``CudaRNGStatesTracker`` keeps CUDA generator states only and fails
  on CPU; ``parallel.rng.RNGStatesTracker`` (CPU and CUDA states) becomes the tracker
  ``get_cuda_rng_tracker()`` returns, on every platform, so the streams behave the same on CPU and GPU.
* ``deepspeed-shm-comm`` (CPU only): DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op
  (~60 s, needs g++) when its communication backend starts; it only serves inference, so it is marked
  incompatible and training uses plain gloo (ENGINES_ON_CPU.md §1.2).
* ``deepspeed-fp32-clip-norm``: with ZeRO-0 and fp32, ``DeepSpeedEngine.clip_fp32_gradients`` clips but drops
  the norm it computed (``get_global_grad_norm()`` stays None, which the NaN policy would read as non-finite);
  the replacement keeps it.

Private calls made in one place, version-checked when called:

* :func:`flex_attention_cpu`: torch's public ``flex_attention`` refuses CPU inputs that require grad; this calls
  the higher-order op it dispatches to, whose eager implementation has a backward (CPU only; on CUDA the
  model uses the public API).
* :func:`ds_to_universal`: DeepSpeed's converter with our ``universal_checkpoint_info`` (its only hook for it is
  the private ``_inject_missing_state``, which keeps whatever info a checkpoint has).
* :func:`stop_loader_workers`: a DataLoader iterator has no public way to stop its workers now.
* :func:`initialize_affine_weight_cpu`: megatron-core's CPU master-weight initialisation, for the TE layers.
* :func:`megatron_rng_stream_names`: megatron-core's names of its data- and tensor-parallel RNG streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from megatron_genlip.platform import Platform

MEGATRON_CORE = ("0.16.1",)
DEEPSPEED = ("0.19.8",)
TORCH_SUPPORTED = ("2.11", "2.12", "2.13")  # = platform.SUPPORTED_TORCH
TORCH_FLEX_CPU = ("2.13",)  # the CPU CI's torch; the private flex signatures differ between releases


class CompatError(RuntimeError):
    """A library version that a patch was not verified on."""


def library_version(distribution: str) -> str:
    return importlib.metadata.version(distribution)


def require(patch: str, distribution: str, verified: tuple[str, ...], version: str | None = None) -> None:
    """Raise unless ``distribution``'s version (or ``version``) is one of ``verified`` (a release, or a prefix
    such as "2.13" for every 2.13.x)."""
    got = version if version is not None else library_version(distribution)
    base = got.split("+")[0]
    if not any(base == v or base.startswith(v + ".") for v in verified):
        raise CompatError(
            f"{patch}: {distribution} {got} is not a version this workaround was verified on ({', '.join(verified)}). "
            f"Install a verified version, or run `python -m pytest tests/test_compat.py` with this one: if the canary "
            f"of '{patch}' still shows the stock behaviour, add the version in megatron_genlip/compat.py; if it "
            f"fails, the library changed and the workaround must be revisited.")


# ------------------------------------------------------------------------------------------------------
# process-wide patches


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    distribution: str
    verified: tuple[str, ...]
    cpu_only: bool
    install: Callable[[], None]


_STOCK: dict[str, list[tuple[object, str, object]]] = {}  # patch -> [(owner, attribute or key, stock value)]
_MISSING = object()


def _get(owner, key):
    return owner.get(key, _MISSING) if isinstance(owner, dict) else getattr(owner, key, _MISSING)


def _set(owner, key, value) -> None:
    if isinstance(owner, dict):
        owner[key] = value
    else:
        setattr(owner, key, value)


def _replace(patch: str, owner, key: str, value) -> None:
    """Set ``owner.key`` (or ``owner[key]``) to ``value``, remembering the stock value for :func:`stock`."""
    _STOCK.setdefault(patch, []).append((owner, key, _get(owner, key)))
    _set(owner, key, value)


def _cpu_current_device() -> "torch.device":  # noqa: F821
    import torch

    return torch.device("cpu")


def _install_cpu_current_device() -> None:
    import torch

    _replace("cpu-current-device", torch.cuda, "current_device", _cpu_current_device)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_genlip.parallel.rng import DATA_PARALLEL, TENSOR_PARALLEL, RNGStatesTracker

    if megatron_rng_stream_names() != (DATA_PARALLEL, TENSOR_PARALLEL):
        raise RuntimeError(f"megatron-core names its RNG streams {megatron_rng_stream_names()}, not "
                           f"{(DATA_PARALLEL, TENSOR_PARALLEL)}: update megatron_genlip/parallel/rng.py")
    _replace("megatron-rng-tracker", mcore_random, "_CUDA_RNG_STATE_TRACKER", RNGStatesTracker())
    _replace("megatron-rng-tracker", mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)


def _install_shm_comm_off() -> None:
    import deepspeed.ops

    _replace("deepspeed-shm-comm", deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)


def _clip_fp32_gradients_keeping_norm(engine) -> None:
    """``DeepSpeedEngine.clip_fp32_gradients`` (0.19.8: one call of ``clip_grad_norm_``) that keeps the norm."""
    from deepspeed.runtime.utils import clip_grad_norm_

    engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                               max_norm=engine.gradient_clipping(), mpu=engine.mpu)


def _install_fp32_clip_norm() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    _replace("deepspeed-fp32-clip-norm", DeepSpeedEngine, "clip_fp32_gradients", _clip_fp32_gradients_keeping_norm)


PATCHES = (
    Patch("cpu-current-device", "megatron-core", MEGATRON_CORE, True, _install_cpu_current_device),
    Patch("megatron-rng-tracker", "megatron-core", MEGATRON_CORE, False, _install_rng_tracker),
    Patch("deepspeed-shm-comm", "deepspeed", DEEPSPEED, True, _install_shm_comm_off),
    Patch("deepspeed-fp32-clip-norm", "deepspeed", DEEPSPEED, False, _install_fp32_clip_norm),
)


def needed(platform: "Platform") -> list[Patch]:
    """The process-wide patches ``platform`` needs."""
    return [p for p in PATCHES if not (p.cpu_only and platform.cuda)]


def apply(platform: "Platform") -> list[str]:
    """Apply (once) every patch ``platform`` needs, after checking each library's version; returns their names."""
    names = []
    for patch in needed(platform):
        require(patch.name, patch.distribution, patch.verified)
        if patch.name not in _STOCK:
            patch.install()
        names.append(patch.name)
    return names


def applied() -> frozenset[str]:
    return frozenset(_STOCK)


@contextlib.contextmanager
def stock(patch: str):
    """Put the stock values back while the block runs (canary tests show the stock behaviour with it)."""
    entries = _STOCK.get(patch, [])
    current = [(owner, key, _get(owner, key)) for owner, key, _ in entries]
    for owner, key, value in entries:
        if value is _MISSING:
            delattr(owner, key) if not isinstance(owner, dict) else owner.pop(key, None)
        else:
            _set(owner, key, value)
    try:
        yield
    finally:
        for owner, key, value in current:
            _set(owner, key, value)


# ------------------------------------------------------------------------------------------------------
# private calls, version-checked where they are made


def flex_attention_cpu(q, k, v, block_mask):
    """FlexAttention on CPU with autograd (torch's public function refuses CPU backward): the higher-order op it
    dispatches to, with the identity score_mod and default kernel options, exactly what the public function
    runs after its argument checks. Materialises the scores: for tests and small runs."""
    import torch

    require("flex-attention-cpu", "torch", TORCH_FLEX_CPU, torch.__version__)
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop
    from torch.nn.attention.flex_attention import _apply_kernel_options, _identity

    options = _apply_kernel_options(q, k, v, False, None)
    out, _lse, _max = flex_attention_hop(q, k, v, _identity, block_mask.as_tuple(), q.shape[-1] ** -0.5, options)
    return out


def ds_to_universal(args, info: dict) -> None:
    """Run ``deepspeed.checkpoint.ds_to_universal.main(args)`` with ``info`` as the checkpoint's
    ``universal_checkpoint_info`` (set even when the checkpoint carries an older one; needs
    ``args.inject_missing_state``). The converter's private hook is replaced for the call only."""
    from deepspeed.checkpoint import ds_to_universal as converter
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    require("ds-to-universal-info", "deepspeed", DEEPSPEED)

    def inject(ds_checkpoint) -> None:
        ds_checkpoint.global_state[UNIVERSAL_CHECKPOINT_INFO] = info

    stock_hook = converter._inject_missing_state
    converter._inject_missing_state = inject
    try:
        converter.main(args)
    finally:
        converter._inject_missing_state = stock_hook


def stop_loader_workers(iterator) -> None:
    """Stop a DataLoader iterator's worker processes now (they ignore the trainer's stop signals, so they are
    never signalled); a single-process iterator has none."""
    import torch

    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        require("dataloader-stop-workers", "torch", TORCH_SUPPORTED, torch.__version__)
        shutdown()


def initialize_affine_weight_cpu(weight, output_size: int, input_size: int, per_partition_size: int,
                                 partition_dim: int, init_method, **kwargs):
    """megatron-core's CPU initialisation of a tensor-parallel weight shard (full fp32 master from
    ``init_method``, this rank's slice copied in), used for Transformer Engine layers."""
    from megatron.core.tensor_parallel import layers

    require("initialize-affine-weight-cpu", "megatron-core", MEGATRON_CORE)
    return layers._initialize_affine_weight_cpu(weight, output_size, input_size, per_partition_size, partition_dim,
                                                init_method, **kwargs)


def megatron_rng_stream_names() -> tuple[str, str]:
    """megatron-core's names of the data-parallel and tensor-parallel RNG streams."""
    from megatron.core.tensor_parallel import random as mcore_random

    require("megatron-rng-stream-names", "megatron-core", MEGATRON_CORE)
    return mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME
