"""The evaluator contract: spec (from the YAML), context (from the trainer or the CLI), result, base class.

An evaluator is built once from its :class:`EvaluatorSpec` (``build_evaluator``), reads its data once
(:meth:`Evaluator.prepare`, which the trainer may call at start-up so bad data fails before training) and is run
at its own interval (:meth:`Evaluator.run`). ``run`` is collective over the data-parallel group: every rank of the
group calls it, each works on its share (image ``i`` belongs to rank ``i % dp_world``), the shares are reduced with
``megatron_genlip.parallel.comm`` and every rank returns the same :class:`EvalResult`. Tensor-parallel peers hold the
same images and compute the same numbers (they are not in the data-parallel group).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from megatron_genlip.config import ConfigError
from megatron_genlip.parallel import comm


# type name -> Evaluator subclass: every subclass with a ``type_name`` registers itself when its module is imported
# (the package's __init__ imports them all), so this module needs none of them
EVALUATOR_TYPES: dict[str, type] = {}


@dataclass
class EvalResult:
    metrics: dict[str, float]  # identical on every rank
    records: list[dict] = field(default_factory=list)  # per-image detail (contact sheet), identical on every rank


@dataclass
class EvalContext:
    device: torch.device | str = "cpu"
    dp_rank: int = 0
    dp_world: int = 1
    dp_group: Any = None  # process group for comm calls (None with dp_world == 1: no collectives at all)
    tokenizer: Any = None
    prompt: str = "Describe the image in detail."
    step: int = 0
    seed: int = 0
    pipeline_loss: Callable | None = None  # validation_loss under PP: loader of packed batches -> mean loss
    progress: Callable[[str, int, int], None] | None = None  # optional (what, done, total) callback (the CLI's bar)

    # --- collectives over the data-parallel group (no-ops on one rank) -------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dp_world > 1:
            comm.all_reduce(tensor, group=self.dp_group)
        return tensor

    def all_gather_object(self, obj) -> list:
        if self.dp_world > 1:
            return comm.all_gather_object(obj, group=self.dp_group)
        return [obj]

    def agree(self, obj):
        """The data-parallel group's first rank's ``obj`` on every rank (e.g. metrics of a probe every rank fit)."""
        return self.all_gather_object(obj)[0]

    def mine(self, n: int) -> range:
        """Indices 0..n-1 this rank handles."""
        return range(self.dp_rank, n, self.dp_world)

    def tick(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)


@dataclass
class EvaluatorSpec:
    """One entry of the config's evaluator list."""

    name: str
    type: str
    interval: int = 0  # steps between runs; 0 = train.eval_interval
    data: str | None = None
    options: dict = field(default_factory=dict)

    FIELDS = ("name", "type", "interval", "data", "options")

    @classmethod
    def from_dict(cls, d: dict, name: str | None = None) -> "EvaluatorSpec":
        """Validate one entry (``name`` given when the YAML is a mapping name -> entry). Raises ConfigError naming
        ``evaluation.<name>.<field>``."""
        if not isinstance(d, dict):
            raise ConfigError(f"evaluation.{name or '?'}: expected a mapping, got {d!r}")
        d = dict(d)
        if name is not None:
            if "name" in d and d["name"] != name:
                raise ConfigError(f"evaluation.{name}.name: {d['name']!r} differs from the entry's key {name!r}")
            d["name"] = name
        nm = d.get("name")
        if not isinstance(nm, str) or not nm or not nm.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"evaluation.{nm!r}.name: a non-empty name of letters, digits, '_' or '-' is needed")
        where = f"evaluation.{nm}"
        unknown = sorted(set(d) - set(cls.FIELDS))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field (fields: {', '.join(cls.FIELDS)})")
        tp = d.get("type")
        if tp not in EVALUATOR_TYPES:
            raise ConfigError(f"{where}.type: {tp!r} is not an evaluator type ({', '.join(sorted(EVALUATOR_TYPES))})")
        interval = d.get("interval", 0)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ConfigError(f"{where}.interval: expected an integer >= 0 (0 = train.eval_interval), got {interval!r}")
        data = d.get("data")
        if data is not None and not isinstance(data, str):
            raise ConfigError(f"{where}.data: expected a path string, got {data!r}")
        options = d.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.options: expected a mapping, got {options!r}")
        options = EVALUATOR_TYPES[tp].check_options(options, where)
        return cls(nm, tp, interval, data, options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce_option(value, default, where: str):
    """Check ``value`` against the type of its default (int/float/bool/str/list/None-able)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


class Evaluator:
    """Base class. Subclasses set ``type_name``, ``OPTIONS`` (option -> default; a default of None accepts any
    value) and implement :meth:`prepare` / :meth:`run`."""

    type_name = ""
    OPTIONS: dict[str, Any] = {}
    needs_full_model = True  # False: runs through a pipeline engine (validation_loss)
    metric_keys: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.type_name:
            EVALUATOR_TYPES[cls.type_name] = cls

    def __init__(self, spec: EvaluatorSpec, cfg, tokenizer=None):
        self.spec = spec
        self.name = spec.name
        self.interval = spec.interval or cfg.train.eval_interval
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.options = {**self.OPTIONS, **spec.options}
        self.prepared = False

    @classmethod
    def check_options(cls, options: dict, where: str) -> dict:
        out = {}
        for key, value in options.items():
            if key not in cls.OPTIONS:
                raise ConfigError(f"{where}.options.{key}: unknown option of type {cls.type_name} "
                                  f"(options: {', '.join(sorted(cls.OPTIONS)) or 'none'})")
            out[key] = _coerce_option(value, cls.OPTIONS[key], f"{where}.options.{key}")
        cls.validate_options({**cls.OPTIONS, **out}, where)
        return out

    @classmethod
    def validate_options(cls, options: dict, where: str) -> None:
        """Per-type range checks (raise ConfigError naming ``{where}.options.<key>``)."""

    def check_layout(self, pipeline_parallel: int) -> None:
        """Raise ConfigError when this evaluator cannot run at the layout."""
        if pipeline_parallel > 1 and self.needs_full_model:
            raise ConfigError(f"evaluation.{self.name} (type {self.type_name}) needs the whole model on one rank and "
                              f"cannot run with parallel.pipeline_parallel={pipeline_parallel}; remove it, or run it "
                              "on an exported checkpoint with tools/evaluate.py")

    def prepare(self, ctx: EvalContext) -> None:
        self.prepared = True

    def run(self, model, ctx: EvalContext) -> EvalResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, interval={self.interval}, data={self.spec.data!r})"


def require_module(module: str, package: str, who: str) -> None:
    """A clear error at prepare time when an optional dependency of an evaluator is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{who} needs the package {package} (pip install -r requirements.txt)")


def need(ok: bool, where: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {rule}")


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """Per example, whether its label is among the top-k scores (k capped at the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, scores.shape[-1])
        top = scores.topk(kk, dim=-1).indices
        out[k] = (top == labels[:, None]).any(-1)
    return out


def sample_order(total: int, n: int, seed: int) -> list[int]:
    """``min(n, total)`` distinct indices of ``0..total-1`` drawn at random over the whole range with a fixed seed
    (the first ``n`` of ``numpy.random.default_rng(seed).permutation(total)``), in draw order: every prefix is a
    random sample of the whole range too. The same arguments give the same indices on every rank, at every
    evaluation and after a resume. (Held-out sets are often stored in key order, one category after another:
    the first ``n`` would all come from the first categories.)"""
    if total <= 0 or n <= 0:
        return []
    return np.random.default_rng(seed).permutation(total)[:n].tolist()


def check_seed_option(o: dict, where: str) -> None:
    """The ``seed`` option of the evaluators that sample images: None (the run's seed) or an integer >= 0."""
    s = o.get("seed")
    need(s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 0), f"{where}.options.seed",
         "an integer >= 0 (or null: the run's seed, train.seed / tools/evaluate.py --seed)")
