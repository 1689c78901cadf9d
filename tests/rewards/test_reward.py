"""ListReward: weighting, config round trip, empty lists, errors, re-weighting stored terms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from genrerank.data.dataset import Batch
from genrerank.rewards import (
    DEFAULT_REWARD,
    ListReward,
    ListSignals,
    LoggedSignals,
    SignalSource,
    combine,
)
from tests.conftest import tiny_spec
from tests.rewards.test_terms import EXPECTED, GAINS, hand_batch, hand_lists, hand_signals


class HandSource(SignalSource):
    """The hand-made signals of test_terms, counting its calls."""

    name = "hand"
    for_training = True

    def __init__(self) -> None:
        self.calls = 0

    def signals(self, batch: Batch, lists: torch.Tensor) -> ListSignals:
        self.calls += 1
        return hand_signals()


def test_total_is_the_weighted_sum_of_the_terms() -> None:
    weights = {"engagement": 1.0, "category_diversity": 0.5, "long_tail_exposure": 2.0}
    reward = ListReward(weights, {"engagement": {"gain_weights": GAINS}})
    source = HandSource()
    out = reward(hand_batch(), hand_lists(), source)
    assert source.calls == 1 and out.source == "hand" and out.weights == weights
    assert set(out.terms) == set(weights)
    eng = build_expected_engagement()
    torch.testing.assert_close(out.terms["engagement"], eng)
    torch.testing.assert_close(out.terms["category_diversity"],
                               torch.tensor(EXPECTED["category_diversity"]))
    total = eng + 0.5 * torch.tensor(EXPECTED["category_diversity"]) \
        + 2.0 * torch.tensor(EXPECTED["long_tail_exposure"])
    torch.testing.assert_close(out.total[:, 0], total[:, 0])
    torch.testing.assert_close(out.total[0], total[0])
    # the empty list: total -inf, every term 0
    assert out.total[1, 1].item() == -math.inf
    assert all(v[1, 1].item() == 0.0 for v in out.terms.values())
    # re-weighting the stored terms gives the same totals where lists exist
    again = combine(out.terms, weights)
    torch.testing.assert_close(again[0], out.total[0])
    stored = {k: v.numpy() for k, v in out.terms.items()}
    assert isinstance(combine(stored, {"category_diversity": 1.0}), np.ndarray)


def build_expected_engagement() -> torch.Tensor:
    sig = hand_signals()
    gain = sig.values["click"] + 1.5 * sig.values["like"]
    return torch.where(sig.filled, gain, 0.0).sum(-1)


def test_signals_are_fetched_only_when_a_weighted_term_needs_them() -> None:
    reward = ListReward({"engagement": 0.0, "creator_diversity": 1.0},
                        {"engagement": {"gain_weights": GAINS}})
    source = HandSource()
    out = reward(hand_batch(), hand_lists(), source)
    assert source.calls == 0
    assert set(out.terms) == {"creator_diversity"}
    torch.testing.assert_close(out.total[0], torch.tensor(EXPECTED["creator_diversity"][0]))


def test_logged_engagement_with_the_spec_gain_weights() -> None:
    reward = ListReward.from_config(DEFAULT_REWARD, spec=tiny_spec())
    lists = torch.tensor([[[0, 2, 1]], [[1, 0, -1]]])
    out = reward(hand_batch(), lists, LoggedSignals())
    # request 0: clicks at 0 and 2, like at 2; request 1: click and like at 1
    torch.testing.assert_close(out.total, torch.tensor([[3.5], [2.5]]))
    assert out.source == "logged"


def test_config_round_trip_and_with_weights() -> None:
    reward = ListReward({"engagement": 1.0, "diversity": 0.2},
                        {"engagement": {"scroll": "geometric", "scroll_rate": 0.5}},
                        spec=tiny_spec())
    cfg = reward.to_config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["terms"]["engagement"]["gain_weights"] == {"click": 1.0, "like": 1.5}
    again = ListReward.from_config(cfg)
    assert again.to_config() == cfg
    batch, lists = hand_batch(), hand_lists()
    a, b = reward(batch, lists, HandSource()), again(batch, lists, HandSource())
    torch.testing.assert_close(a.total, b.total)
    other = reward.with_weights({"engagement": 2.0, "diversity": 0.0})
    assert other.to_config()["terms"] == cfg["terms"]
    out = other(batch, lists, HandSource())
    torch.testing.assert_close(out.total[0], 2.0 * a.terms["engagement"][0])


def test_errors() -> None:
    with pytest.raises(ValueError, match="known: .*engagement"):
        ListReward({"novelty": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        ListReward({"engagement": -1.0}, spec=tiny_spec())
    with pytest.raises(ValueError, match=">= 0"):
        ListReward({"engagement": float("nan")}, spec=tiny_spec())
    with pytest.raises(ValueError, match="at least one weight above 0"):
        ListReward({"engagement": 0.0, "diversity": 0.0}, spec=tiny_spec())
    with pytest.raises(ValueError, match="unknown key"):
        ListReward.from_config({"weights": {"diversity": 1.0}, "scale": 2})
    with pytest.raises(ValueError, match="spec"):
        ListReward({"engagement": 1.0})
    with pytest.raises(TypeError, match="accepted"):
        ListReward({"diversity": 1.0}, {"diversity": {"field": "category"}})
    with pytest.raises(ValueError, match="no weight"):
        ListReward({"diversity": 1.0}, {"fairness": {}})
    with pytest.raises(ValueError, match="no stored values"):
        combine({"diversity": torch.zeros(2, 2)}, {"fairness": 1.0})
