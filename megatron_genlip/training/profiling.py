"""Where a training step's time goes: ``train.profile_steps: [FIRST, LAST]`` records optimizer steps FIRST..LAST
(1-based, inclusive) with ``torch.profiler`` on every rank.

The trainer labels the phases of a step with :func:`phase` (``genlip/data``, ``genlip/forward``, ``genlip/backward``,
``genlip/optimizer``, ``genlip/agree``; ``genlip/pipeline_step`` for a whole pipeline-parallel step), so the
result reads at two levels:

- ``OUTPUT_DIR/profile/rank{R}.txt``: the phases (total and per step, share of the profiled wall time, and the
  wall time outside every phase: logging, checkpoints, evaluation in the window) and the operators sorted by their
  own CPU (and, on CUDA, device) time;
- ``OUTPUT_DIR/profile/rank{R}.trace.json``: the timeline, for https://ui.perfetto.dev or chrome://tracing.

Rank 0 prints its phase table when the window closes. Outside the window the labels cost one no-op context per
phase (a few microseconds per step).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import torch

PHASE_PREFIX = "genlip/"
PHASES = ("data", "forward", "backward", "optimizer", "agree", "pipeline_step")


def phase(name: str):
    """A labelled region of the training step (shows up in the profile as ``genlip/<name>``)."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


class StepProfiler:
    """Starts ``torch.profiler`` before step ``first`` and writes the results after step ``last``."""

    def __init__(self, steps: list[int], out_dir: str | Path, rank: int, on_cuda: bool, say=print):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.dir = Path(out_dir) / "profile"
        self.rank = rank
        self.on_cuda = on_cuda
        self.say = say
        self.prof = None
        self.started = 0.0

    def before_step(self, next_step: int) -> None:
        """Called before optimizer step ``next_step`` (1-based) runs."""
        if self.prof is None and self.first <= next_step <= self.last:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.on_cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.first = next_step  # a run resumed inside the window profiles what is left of it
            self.started = time.perf_counter()

    def after_step(self, step: int, stopping: bool = False) -> None:
        """Called after optimizer step ``step``; closes the window at ``last`` (or when the run stops early)."""
        if self.prof is None or (step < self.last and not stopping):
            return
        if self.on_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        steps = step - self.first + 1
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"rank{self.rank}.trace.json"
        prof.export_chrome_trace(str(trace))
        averages = prof.key_averages()
        table = phase_table(averages, wall, steps, self.on_cuda)
        sort = "self_cuda_time_total" if self.on_cuda else "self_cpu_time_total"
        ops = averages.table(sort_by=sort, row_limit=30)
        header = f"rank {self.rank}: optimizer steps {self.first}-{step} ({steps} steps, {wall:.3f} s wall)\n"
        (self.dir / f"rank{self.rank}.txt").write_text(header + "\n" + table + "\n\noperators by own time:\n" + ops)
        if self.rank == 0:
            self.say(f"profile of steps {self.first}-{step} ({1000 * wall / steps:.1f} ms/step wall):\n{table}\n"
                     f"operators and timeline: {self.dir}/rank*.txt, rank*.trace.json (open in ui.perfetto.dev)")


def phase_totals(averages) -> dict[str, float]:
    """Seconds of CPU wall time inside each ``genlip/*`` label."""
    out = {}
    for e in averages:
        if e.key.startswith(PHASE_PREFIX):
            out[e.key[len(PHASE_PREFIX):]] = out.get(e.key[len(PHASE_PREFIX):], 0.0) + e.cpu_time_total / 1e6
    return out


def phase_table(averages, wall: float, steps: int, on_cuda: bool) -> str:
    """The phases as a fixed-width table; 'other' is the profiled wall time outside every phase."""
    totals = phase_totals(averages)
    rows = [(name, totals[name]) for name in PHASES if name in totals]
    # a pipeline step pulls its micro-batches itself: "data" is then inside "pipeline_step", not beside it
    nested = "data" if "pipeline_step" in totals else None
    rows.append(("other", max(0.0, wall - sum(v for k, v in totals.items() if k != nested))))
    lines = [f"{'phase':<14}{'total s':>10}{'ms/step':>10}{'share':>8}"]
    for name, seconds in rows:
        lines.append(f"{name:<14}{seconds:>10.3f}{1000 * seconds / steps:>10.2f}{100 * seconds / wall:>7.1f}%")
    if nested:
        lines.append("(data is part of pipeline_step: the pipeline schedule loads its micro-batches itself)")
    if on_cuda:
        lines.append("(CPU-side times: on CUDA a phase ends when its kernels are queued; the operator table has device "
                     "times)")
    return "\n".join(lines)


SYNC_WARNING = "called a synchronizing CUDA operation"  # c10::cuda::warn_or_error_on_sync's TORCH_WARN text


class SyncCounter:
    """``train.sync_debug``: counts the host synchronisations of the CUDA stream inside each training step.

    ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA operation (``.item()``, ``.tolist()``,
    a pageable copy to the host, ``torch.nonzero``, ...) issue a warning; the warnings raised inside :meth:`step`
    are counted (``last``: the last step's count) and not shown. Collectives are not covered by torch's check."""

    def __init__(self, enabled: bool, set_mode=None):
        self.enabled = enabled
        self.last = 0
        self._shown: set = set()
        self._set_mode = set_mode or (lambda mode: torch.cuda.set_sync_debug_mode(mode))

    @contextlib.contextmanager
    def step(self):
        if not self.enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._set_mode("warn")
            try:
                yield
            finally:
                self._set_mode("default")
        self.last = sum(SYNC_WARNING in str(w.message) for w in caught)
        for w in caught:  # anything else raised in the step is shown as usual: once per place, as Python would
            key = (str(w.message), w.category, w.filename, w.lineno)
            if SYNC_WARNING not in key[0] and key not in self._shown:
                self._shown.add(key)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
