"""The tiny model memorises 8 fixed synthetic samples and then captions them exactly (greedy, KV cache)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import overfit_tiny  # noqa: E402

pytestmark = pytest.mark.slow  # trains the tiny model to memorise (a minute)


def test_tiny_overfits_eight_samples_and_reproduces_captions():
    out = overfit_tiny.overfit(num_samples=8, steps=150, verbose=False)
    assert out["losses"][0] > 4.0  # starts near ln(vocab): the model did not know the captions
    assert out["losses"][-1] < 0.01  # near-zero caption loss (nats per labelled token)
    assert out["generated"] == out["references"]
