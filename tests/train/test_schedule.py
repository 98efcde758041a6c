import pytest

from blueberry.spec import TrainSpec
from blueberry.train.schedule import lr_factor


def test_warmup_then_cosine_to_floor_in_optimizer_steps():
    spec = TrainSpec(steps=100, warmup_fraction=0.1, min_lr_ratio=0.1)
    factors = [lr_factor(step, spec) for step in range(100)]
    assert factors[0] == pytest.approx(0.1)  # the first update already learns (reference: LR 0)
    assert factors[9] == pytest.approx(1.0)  # warmup is 10 optimizer steps, not micro-steps
    assert factors[10] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)  # decays all the way to the floor
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_constant_schedule():
    spec = TrainSpec(steps=10, schedule="constant")
    assert {lr_factor(step, spec) for step in range(10)} == {1.0}
