import math

import numpy as np
import pytest

from genrerank.data.simulator import Simulator
from genrerank.evaluation.online import evaluate_online, headroom_captured


def test_headroom_captured_by_hand() -> None:
    assert headroom_captured(1.5, 1.0, 2.0) == pytest.approx(0.5)
    assert headroom_captured(0.5, 1.0, 2.0) == pytest.approx(-0.5)
    assert math.isnan(headroom_captured(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def small_world():
    sim = Simulator("kuaishou", seed=3)
    state, logged, _ = sim.logged(np.arange(64))
    return sim, state, logged


def test_references_sit_at_zero_and_one(small_world) -> None:
    sim, state, logged = small_world
    upper, _ = sim.upper_bound(state, beam_width=4)
    reports = {r.policy: r for r in evaluate_online(
        sim, state, {"log": logged, "ub": upper}, logged, beam_width=4)}
    assert reports["log"].headroom_captured == pytest.approx(0.0)
    assert reports["ub"].headroom_captured == pytest.approx(1.0)
    assert reports["ub"].expected_gain > reports["log"].expected_gain
    assert 0.0 <= reports["log"].cold_start_share <= 1.0
    assert reports["log"].requests == 64


def test_empty_slots_add_nothing(small_world) -> None:
    sim, state, logged = small_world
    shorter = logged.copy()
    shorter[:, -1] = -1
    gains = {r.policy: r.expected_gain for r in evaluate_online(
        sim, state, {"full": logged, "short": shorter}, logged, beam_width=2)}
    assert gains["short"] < gains["full"]
    expected = sim.expected_gain(state, logged[:, :-1]).mean()
    assert gains["short"] == pytest.approx(expected)
