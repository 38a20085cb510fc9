"""The learning-rate schedule, a pure function of the step."""

import itertools

import pytest

from src.core.config import Config
from src.core.schedule import lr_factor


def schedule(**changes) -> Config:
    return Config({"type": "constant", "warmup_steps": 0, "final_lr_fraction": 0.0, "total_steps": None, **changes})


def test_warmup_then_cosine_down_to_the_final_fraction_and_no_further():
    cosine = schedule(type="cosine", warmup_steps=4, final_lr_fraction=0.1)
    factors = [lr_factor(step, cosine, 100) for step in range(103)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[100] == pytest.approx(0.1) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert factors[52] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway between the warmup's end and the end


def test_linear_and_constant():
    assert lr_factor(50, schedule(type="linear"), 100) == pytest.approx(0.5)
    assert lr_factor(100, schedule(type="linear", final_lr_fraction=0.2), 100) == pytest.approx(0.2)
    assert [lr_factor(step, schedule(), 10) for step in (0, 5, 50)] == [1.0, 1.0, 1.0]
