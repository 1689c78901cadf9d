"""Reward terms against hand-computed values on a tiny hand-built batch."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.data.dataset import Batch
from genrerank.rewards import REWARD_TERMS, ListSignals, build_term

D1 = 1.0 / math.log2(3.0)  # position weight of slot 1 (slot 0: 1, slot 2: 0.5)


def hand_batch(pad: bool = False) -> Batch:
    """2 requests, N = 4, M = 3. Request 1 has n = 3 and m = 2 (padded). ``pad``: one more
    padded candidate (N = 5) and one more padded position (M = 4)."""
    t, f = True, False
    category = [[1, 1, 2, 3], [2, 2, 2, 0]]
    creator = [[1, 2, 2, 3], [1, 1, 4, 0]]
    cold = [[t, f, f, f], [f, t, f, f]]
    tail = [[f, f, t, t], [f, f, f, f]]
    cand = [[t, t, t, t], [t, t, t, f]]
    exposed = [[0, 2, 1], [1, 0, 0]]
    pos = [[t, t, t], [t, t, f]]
    click = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    like = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    if pad:
        for rows, v in ((category, 0), (creator, 0), (cold, f), (tail, f), (cand, f)):
            for r in rows:
                r.append(v)
        for rows, v in ((exposed, 0), (pos, f), (click, 0.0), (like, 0.0)):
            for r in rows:
                r.append(v)
    n = len(category[0])
    return Batch(
        request_index=torch.tensor([0, 1]),
        user_cat=torch.zeros(2, 1, dtype=torch.long),
        user_dense=torch.zeros(2, 1),
        context_cat=torch.zeros(2, 0, dtype=torch.long),
        context_dense=torch.zeros(2, 0),
        item_cat=torch.zeros(2, n, 1, dtype=torch.long),
        item_dense=torch.zeros(2, n, 1),
        upstream_score=torch.zeros(2, n),
        category=torch.tensor(category),
        creator=torch.tensor(creator),
        is_cold_start=torch.tensor(cold),
        is_long_tail=torch.tensor(tail),
        candidate_mask=torch.tensor(cand),
        exposed=torch.tensor(exposed),
        position_mask=torch.tensor(pos),
        labels={"click": torch.tensor(click), "like": torch.tensor(like)},
    )


def hand_lists(pad: bool = False) -> torch.Tensor:
    """[2, 2, 3]: request 0: the logged list and [3, -, 0]; request 1: the logged list and an
    empty list. ``pad``: one more empty slot per list."""
    lists = torch.tensor([[[0, 2, 1], [3, -1, 0]], [[1, 0, -1], [-1, -1, -1]]])
    if pad:
        lists = torch.cat([lists, torch.full((2, 2, 1), -1)], dim=-1)
    return lists


def hand_signals(pad: bool = False) -> ListSignals:
    lists = hand_lists(pad)
    click = torch.tensor([[[0.5, 0.2, 0.1], [0.4, 0.0, 0.3]], [[0.6, 0.1, 0.0], [0.0] * 3]])
    like = torch.tensor([[[0.2, 0.0, 0.1], [0.1, 0.0, 0.0]], [[0.3, 0.0, 0.0], [0.0] * 3]])
    extra = torch.tensor([[[9.0] * 3] * 2] * 2)  # a signal without gain weight
    values = {"click": click, "like": like, "watch_time": extra}
    if pad:
        values = {s: torch.cat([v, torch.zeros(2, 2, 1)], dim=-1) for s, v in values.items()}
    return ListSignals("hand", values, lists >= 0)


def entropy(*p: float) -> float:
    return -sum(x * math.log(x) for x in p)


GAINS = {"click": 1.0, "like": 1.5}

EXPECTED = {
    "category_diversity": [[entropy(2 / 3, 1 / 3) / math.log(3), 1.0], [0.0, 0.0]],
    "creator_diversity": [[entropy(2 / 3, 1 / 3) / math.log(3), 1.0], [0.0, 0.0]],
    "cold_start_exposure": [[1 / (1 + D1 + 0.5), 0.5 / 1.5], [1 / (1 + D1), 0.0]],
    "long_tail_exposure": [[D1 / (1 + D1 + 0.5), 1 / 1.5], [0.0, 0.0]],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_terms_match_hand_values(name: str) -> None:
    term = build_term(name)
    assert not term.needs_signals
    out = term(hand_batch(), hand_lists(), None)
    assert out.shape == (2, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(EXPECTED[name]))


def test_combined_diversity_and_fairness_are_means() -> None:
    batch, lists = hand_batch(), hand_lists()
    div = build_term("diversity")(batch, lists, None)
    mean = (torch.tensor(EXPECTED["category_diversity"])
            + torch.tensor(EXPECTED["creator_diversity"])) / 2
    torch.testing.assert_close(div, mean)
    only = build_term("diversity", {"fields": ["creator"]})(batch, lists, None)
    torch.testing.assert_close(only, torch.tensor(EXPECTED["creator_diversity"]))
    fair = build_term("fairness")(batch, lists, None)
    mean = (torch.tensor(EXPECTED["cold_start_exposure"])
            + torch.tensor(EXPECTED["long_tail_exposure"])) / 2
    torch.testing.assert_close(fair, mean)


def engagement_expected(c: list[float]) -> torch.Tensor:
    sig = hand_signals()
    gain = GAINS["click"] * sig.values["click"] + GAINS["like"] * sig.values["like"]
    out = torch.zeros(2, 2)
    lists = hand_lists()
    for b in range(2):
        for k in range(2):
            for j in range(3):
                if lists[b, k, j] >= 0:
                    out[b, k] += c[j] * gain[b, k, j]
    return out


@pytest.mark.parametrize(("scroll", "c"), [("own", [1.0, 1.0, 1.0]),
                                           ("dcg", [1.0, D1, 0.5]),
                                           ("geometric", [1.0, 0.5, 0.25])])
def test_engagement_scroll_variants(scroll: str, c: list[float]) -> None:
    term = build_term("engagement", {"gain_weights": GAINS, "scroll": scroll,
                                     "scroll_rate": 0.5})
    assert term.needs_signals
    out = term(hand_batch(), hand_lists(), hand_signals())
    torch.testing.assert_close(out, engagement_expected(c))
    # by hand for one list: request 0, list 0, own = (0.5 + 0.3) + (0.2) + (0.1 + 0.15)
    if scroll == "own":
        assert out[0, 0].item() == pytest.approx(1.25)


def test_engagement_ignores_missing_signals() -> None:
    term = build_term("engagement", {"gain_weights": {"click": 1.0, "purchase": 3.0}})
    out = term(hand_batch(), hand_lists(), hand_signals())
    sig = hand_signals()
    torch.testing.assert_close(out, torch.where(sig.filled, sig.values["click"], 0.0).sum(-1))


@pytest.mark.parametrize("name", sorted(REWARD_TERMS))
def test_padding_changes_nothing(name: str) -> None:
    params = {"gain_weights": GAINS} if name == "engagement" else {}
    term = build_term(name, params)
    plain = term(hand_batch(), hand_lists(), hand_signals())
    padded = term(hand_batch(pad=True), hand_lists(pad=True), hand_signals(pad=True))
    torch.testing.assert_close(padded, plain)
    # Empty list: every term 0.
    assert (plain[1, 1] == 0).all()


def test_unknown_term_and_bad_parameters() -> None:
    with pytest.raises(ValueError, match="known: .*engagement"):
        build_term("novelty")
    with pytest.raises(TypeError, match="accepted: .*scroll"):
        build_term("engagement", {"discount": True})
    with pytest.raises(ValueError, match="accepted: .*geometric"):
        build_term("engagement", {"scroll": "exponential"})
    with pytest.raises(ValueError, match="scroll_rate"):
        build_term("engagement", {"scroll_rate": 1.5})
    with pytest.raises(ValueError, match="subset"):
        build_term("diversity", {"fields": ["genre"]})
    with pytest.raises(ValueError, match="subset"):
        build_term("fairness", {"groups": ["popular"]})
