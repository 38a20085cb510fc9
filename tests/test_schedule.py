"""The learning-rate schedule, a pure function of the step."""

import itertools

import pytest
from helpers import QUICK_RUN, logged_values, run_directory

from src.core.config.validation import Config
from src.core.training.schedule import lr_factor, zero_lr_extension


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


def test_an_extension_beyond_a_schedule_that_decayed_to_zero_is_warned_about():
    decayed = schedule(type="cosine", final_lr_fraction=0.0)
    warning = zero_lr_extension(decayed, 100, 150)
    assert "the 50 steps after it train at lr 0" in warning and "ended at step 100" in warning
    assert zero_lr_extension(schedule(type="linear"), 100, 101) is not None
    assert zero_lr_extension(decayed, 100, 100) is None  # not extended
    assert zero_lr_extension(schedule(type="cosine", final_lr_fraction=0.1), 100, 150) is None  # trains on at 10%
    assert zero_lr_extension(schedule(), 100, 150) is None  # constant
    warming = schedule(type="cosine", warmup_steps=120)  # still warming up at the end: the zero comes later
    assert zero_lr_extension(warming, 100, 121) is None
    assert "the 9 steps after it" in zero_lr_extension(warming, 100, 130)


def test_resume_with_more_epochs_warns_when_the_extension_trains_at_lr_0(project):
    decayed = (*QUICK_RUN, "--epochs=1", "--scheduler.type=cosine", "--scheduler.warmup_steps=0")
    decayed = (*decayed, "--run_name=decayed")
    assert project.run(*decayed).returncode == 0
    run = run_directory(project, "decayed")
    extended = project.run("--resume", str(run), "--epochs=2")
    assert extended.returncode == 0, extended.stderr
    assert extended.stderr.count("train at lr 0 and change nothing") == 1
    rates = [value for step, _, phase, name, value in logged_values(run) if (phase, name) == ("train", "lr")]
    assert rates[-1] == 0.0  # what the warning said
