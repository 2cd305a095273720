"""Evaluator registry (one module per evaluator type, as big_vision's evaluators).

The config lists evaluators, each with a name, a type, its own interval, its data and options::

    evaluation:
      - {name: val, type: validation_loss}
      - {name: captions, type: captioning, options: {images: 64}}
      - {name: digits_fewshot, type: linear_probe, interval: 500, data: /data/digits, options: {shots: 10}}

``EvaluatorSpec.from_dict`` validates one entry (errors name ``evaluation.<name>.<field>``); ``build_evaluator``
makes the evaluator; the trainer calls ``prepare(ctx)`` at start-up and ``run(model, ctx)`` at each interval and
logs ``result.metrics`` under the evaluator's name. See ``base.py`` for the contract.

Types: ``validation_loss``, ``captioning``, ``linear_probe``, ``attentive_probe``, ``zero_shot``, ``patch_readout``.
"""

from __future__ import annotations

from megatron_genlip.config import ConfigError
from megatron_genlip.evaluation.attentive_probe import AttentiveProbe
from megatron_genlip.evaluation.base import EVALUATOR_TYPES, EvalContext, EvalResult, Evaluator, EvaluatorSpec
from megatron_genlip.evaluation.captioning import Captioning
from megatron_genlip.evaluation.data import EvalDataError
from megatron_genlip.evaluation.features import extract_features
from megatron_genlip.evaluation.linear_probe import LinearProbe
from megatron_genlip.evaluation.patch_readout import PatchReadout
from megatron_genlip.evaluation.validation_loss import ValidationLoss
from megatron_genlip.evaluation.zero_shot import ZeroShot

# the registry (base.EVALUATOR_TYPES) holds every type imported above, each registered by its class
assert set(EVALUATOR_TYPES) == {c.type_name for c in (ValidationLoss, Captioning, LinearProbe, AttentiveProbe, ZeroShot,
                                                      PatchReadout)}


def build_evaluator(spec: EvaluatorSpec, cfg, tokenizer=None) -> Evaluator:
    if spec.type not in EVALUATOR_TYPES:
        raise ConfigError(f"evaluation.{spec.name}.type: {spec.type!r} is not an evaluator type "
                          f"({', '.join(sorted(EVALUATOR_TYPES))})")
    return EVALUATOR_TYPES[spec.type](spec, cfg, tokenizer)


def parse_specs(raw) -> list[EvaluatorSpec]:
    """The config's ``evaluation`` value (a list of entries with ``name``, or a mapping name -> entry) -> specs;
    names must be unique."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        specs = [EvaluatorSpec.from_dict(v, name=k) for k, v in raw.items()]
    elif isinstance(raw, list):
        specs = [EvaluatorSpec.from_dict(v) for v in raw]
    else:
        raise ConfigError(f"evaluation: expected a list of evaluators, got {raw!r}")
    seen = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"evaluation.{s.name}.name: used by two evaluators")
        seen.add(s.name)
    return specs


def default_specs(cfg) -> list[EvaluatorSpec]:
    """Today's evaluation as two evaluators: ``val`` (validation_loss over ``train.eval_rows`` rows) and
    ``captions`` (captioning of ``train.eval_captions`` held-out images), both on ``data.valid_data``; none when
    it is unset; captions only when ``train.eval_captions`` > 0."""
    if not cfg.data.valid_data:
        return []
    specs = [EvaluatorSpec("val", "validation_loss")]
    if cfg.train.eval_captions > 0:
        specs.append(EvaluatorSpec("captions", "captioning"))
    return specs


def build_evaluators(cfg, tokenizer=None, raw=None) -> list[Evaluator]:
    """The evaluators of a run: the config's list (``raw``, e.g. ``cfg.evaluation``) or, when it is empty or None,
    today's two (:func:`default_specs`)."""
    specs = parse_specs(raw) if raw else default_specs(cfg)
    return [build_evaluator(s, cfg, tokenizer) for s in specs]


def due(evaluator: Evaluator, step: int, last_step: int) -> bool:
    """Run at every multiple of the evaluator's interval and at the last step."""
    return step == last_step or (evaluator.interval > 0 and step % evaluator.interval == 0)


def prefixed(name: str, metrics: dict) -> dict:
    """Metrics under the evaluator's prefix for logs / TensorBoard: ``{"name/key": value}``."""
    return {f"{name}/{k}": v for k, v in metrics.items()}


def check_layout(evaluators: list[Evaluator], pipeline_parallel: int) -> None:
    """At start-up: raise ConfigError naming the first evaluator that cannot run at this layout."""
    for ev in evaluators:
        ev.check_layout(pipeline_parallel)


__all__ = ["EVALUATOR_TYPES", "EvalContext", "EvalResult", "EvalDataError", "Evaluator", "EvaluatorSpec",
           "build_evaluator", "build_evaluators", "check_layout", "default_specs", "due", "extract_features",
           "parse_specs", "prefixed"]
