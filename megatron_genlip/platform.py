"""The one platform decision of a process: what runs where, decided once at start-up and read everywhere else.

The machine is described by :class:`Capabilities` (torch version, CUDA present, device, Triton); the pure
function :func:`decide` turns it and the config's ``train.compile`` into a :class:`Platform`:

=====================  =========================================  =========================================
                       CUDA                                       CPU (development, CI)
=====================  =========================================  =========================================
device                 ``cuda:LOCAL_RANK``                        ``cpu``
compile                on (every transformer block, FlexAttention off: dynamo is switched off for the whole
                       and its block mask are ``torch.compile``d:  process (``torch.compiler.set_stance``
                       model/recompute.py; ``train.compile=false`` ``("force_eager")``), every compile runs eager;
                       turns it off), needs Triton
                                                                  :func:`start_process` makes the libraries'
                                                                  import-time compiles no-ops
DataLoader             pinned memory                               no pinning
optimizer              torch's fused AdamW (``torch_adam`` +      torch's AdamW (for-loop: torch has no CPU foreach)
                       ``fused``: no CUDA toolkit needed, unlike
                       DeepSpeed's JIT-built FusedAdam)
ZeRO-2/3 communication overlapped with backward, 5e8-element      not overlapped (gloo has no streams), same
                       reduce and all-gather buckets              buckets
=====================  =========================================  =========================================

:func:`initialize` makes the decision for this process, applies it (the dynamo stance, then every library patch
of :mod:`megatron_genlip.compat` that this platform needs) and returns it; :func:`current` returns it (and makes
it with the defaults when a library user never called :func:`initialize`). Nothing else in the project asks
``torch.cuda.is_available()`` to choose a behaviour. The supported torch range is checked here too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

SUPPORTED_TORCH = ((2, 11), (2, 13))  # inclusive (major, minor) range of the GPU path and the CPU CI
BUCKET_ELEMENTS = int(5e8)  # DeepSpeed ZeRO reduce / all-gather bucket size (elements), its default


class PlatformError(RuntimeError):
    """This machine cannot run the requested setup; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the machine offers, as a plain value: :meth:`probe` reads it from torch, tests pass fake ones."""

    torch_version: str
    cuda: bool
    device_name: str = ""
    compute_capability: tuple[int, int] | None = None
    triton: bool = False  # importable Triton: what torch.compile's inductor needs on CUDA
    dynamo_env_disabled: bool = False  # TORCHDYNAMO_DISABLE=1 in the environment: every torch.compile is a no-op

    @classmethod
    def probe(cls) -> "Capabilities":
        import torch

        cuda = torch.cuda.is_available()
        return cls(torch_version=torch.__version__, cuda=cuda,
                   device_name=torch.cuda.get_device_name() if cuda else "",
                   compute_capability=tuple(torch.cuda.get_device_capability()) if cuda else None,
                   triton=importlib.util.find_spec("triton") is not None,
                   dynamo_env_disabled=os.environ.get("TORCHDYNAMO_DISABLE") == "1")


@dataclasses.dataclass(frozen=True)
class Platform:
    """The decision (see the module docstring); frozen, made once per process."""

    torch_version: str
    device_type: str  # "cuda" or "cpu"
    device_name: str
    compile: bool  # torch.compile the transformer blocks and the attention kernels (FlexAttention, create_block_mask)
    dynamo_disabled: bool  # every torch.compile in the process runs eagerly
    pin_memory: bool
    fused_adamw: bool
    overlap_comm: bool  # ZeRO-2/3: reduce gradients while backward runs
    bucket_elements: int
    compile_note: str = ""  # why compile is off, when it is

    @property
    def cuda(self) -> bool:
        return self.device_type == "cuda"

    def optimizer_params(self) -> dict:
        """The ``optimizer.params`` entries DeepSpeed reads to choose the Adam implementation."""
        return {"torch_adam": True, "fused": True} if self.fused_adamw else {"torch_adam": True}

    def zero_settings(self, stage: int) -> dict:
        """Communication settings of ``zero_optimization`` for ``stage``."""
        if stage == 0:
            return {}
        settings: dict = {"allgather_bucket_size": self.bucket_elements}
        if stage >= 2:
            settings.update(overlap_comm=self.overlap_comm, contiguous_gradients=True,
                            reduce_bucket_size=self.bucket_elements)
        return settings

    def describe(self) -> str:
        """The one start-up log line."""
        device = f"cuda ({self.device_name})" if self.cuda else "cpu"
        compiled = "on" if self.compile else f"off ({self.compile_note})"
        return (f"platform: torch {self.torch_version}, device {device}, compile {compiled}, "
                f"dynamo {'disabled' if self.dynamo_disabled else 'enabled'}, "
                f"pinned memory {'on' if self.pin_memory else 'off'}, "
                f"AdamW {'torch fused' if self.fused_adamw else 'torch for-loop'}, "
                f"ZeRO overlap {'on at stages 2-3' if self.overlap_comm else 'off'}, "
                f"buckets {self.bucket_elements:.0e} elements")


def torch_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.13.0+cpu' or '2.11.0a0+git1234'."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()))
    except (IndexError, ValueError):
        raise PlatformError(f"cannot read the torch version {version!r}") from None


def check_torch_version(version: str) -> None:
    """Refuse a torch outside :data:`SUPPORTED_TORCH`, saying which versions work."""
    low, high = SUPPORTED_TORCH
    got = torch_minor(version)
    if not low <= got <= high:
        raise PlatformError(
            f"torch {version} is not supported: megatron-genlip runs on torch {low[0]}.{low[1]} to {high[0]}.{high[1]} "
            f"(the library patches of megatron_genlip/compat.py are verified there). Install a torch in that range "
            f"(requirements.txt pins the CPU wheel 2.13.0; a cluster image brings its own CUDA build).")


def decide(caps: Capabilities, compile: bool = True) -> Platform:
    """The platform decision for ``caps``; ``compile`` is ``train.compile`` (only meaningful on CUDA). Pure."""
    check_torch_version(caps.torch_version)
    if caps.cuda and compile and not caps.triton:
        raise PlatformError(
            "train.compile is on (the default on CUDA) but Triton is not importable, and torch.compile needs it for "
            "the FlexAttention kernels: install the triton that matches this torch (CUDA wheels of torch depend on "
            "it), or set train.compile=false (FlexAttention then runs unfused: dense scores, much slower and larger)")
    if caps.cuda and compile and caps.dynamo_env_disabled:
        raise PlatformError(
            "TORCHDYNAMO_DISABLE=1 is set, which silently turns every torch.compile into eager code: FlexAttention "
            "would run unfused (dense scores). Unset it (the platform decision switches dynamo off on CPU by itself), "
            "or set train.compile=false to run uncompiled on purpose")
    if caps.cuda:
        return Platform(torch_version=caps.torch_version, device_type="cuda", device_name=caps.device_name,
                        compile=compile, dynamo_disabled=False, pin_memory=True,
                        fused_adamw=True, overlap_comm=True, bucket_elements=BUCKET_ELEMENTS,
                        compile_note="" if compile else "train.compile=false")
    return Platform(torch_version=caps.torch_version, device_type="cpu", device_name="", compile=False,
                    dynamo_disabled=True, pin_memory=False, fused_adamw=False,
                    overlap_comm=False, bucket_elements=BUCKET_ELEMENTS, compile_note="CPU")


_CURRENT: Platform | None = None


def start_process() -> bool:
    """First thing of a process that will import megatron-core or DeepSpeed (before any such import).

    megatron-core wraps its fusion helpers in ``torch.compile`` when it is imported, and DeepSpeed does the same to
    its Muon optimizer when its ZeRO code is imported; each call imports torch's inductor, ~2 s of CPU in every
    process. Without CUDA the platform decision runs every compile eagerly anyway (:func:`decide`), so here this
    sets ``TORCHDYNAMO_DISABLE=1`` for the process and the processes it starts (launched ranks, DataLoader
    workers): ``torch.compile`` then returns the function itself. Measured on a 2-core CPU: a 1-rank, 3-step run
    of the tiny config takes 8.6 s of CPU instead of 10.5. With CUDA it does nothing. Returns whether it set it."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        return False
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    return True


def compile_on_purpose() -> None:
    """Undo :func:`start_process`'s and the CPU decision's dynamo switch-off in this process, for a process that
    compiles on a CPU on purpose (tests/compile_cases.py checks the compiled blocks with inductor's C++ kernels)."""
    import torch

    os.environ.pop("TORCHDYNAMO_DISABLE", None)
    torch._dynamo.config.disable = False  # read from the environment when torch was imported
    torch.compiler.set_stance("default")


def initialize(compile: bool = True, caps: Capabilities | None = None) -> Platform:
    """Decide for this process and apply the decision: the dynamo stance, then the library patches it needs.
    Entry points call it first thing (trainer, tests' conftest and workers); calling it again re-decides (e.g.
    with the config's ``train.compile``) and re-applies, the patches themselves being applied once."""
    global _CURRENT
    import torch

    from megatron_genlip import compat

    decision = decide(caps or Capabilities.probe(), compile)
    torch.compiler.set_stance("force_eager" if decision.dynamo_disabled else "default")
    compat.apply(decision)
    _CURRENT = decision
    return decision


def current() -> Platform:
    """The decision of this process (made with the defaults on first use if no entry point made it)."""
    return _CURRENT if _CURRENT is not None else initialize()
