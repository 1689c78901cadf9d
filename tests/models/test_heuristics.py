import numpy as np
import pytest

from genrerank.models.heuristics import mmr, upstream_order


def test_upstream_order_ignores_padding_and_marks_short_requests() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 99.0], [0.3, 0.2, -5.0, -5.0]])
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    assert upstream_order(scores, mask, 3).tolist() == [[1, 2, 0], [0, 1, -1]]


def test_mmr_zero_diversity_is_upstream_order() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 12))
    cats = rng.integers(0, 3, size=(20, 12))
    mask = rng.random((20, 12)) < 0.8
    assert (mmr(scores, cats, mask, 5, 0.0) == upstream_order(scores, mask, 5)).all()


def test_mmr_spreads_categories_by_hand() -> None:
    # Scores favour category 1 twice; with diversity the runner-up category comes second.
    scores = np.array([[3.0, 2.9, 1.0, 0.0]])
    cats = np.array([[1, 1, 2, 3]])
    mask = np.ones((1, 4), dtype=bool)
    assert mmr(scores, cats, mask, 3, 0.0).tolist() == [[0, 1, 2]]
    assert mmr(scores, cats, mask, 3, 0.8).tolist() == [[0, 2, 3]]


def test_mmr_never_repeats_or_picks_padding() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = rng.integers(1, 10)
        scores = rng.normal(size=(4, n))
        mask = rng.random((4, n)) < 0.7
        lists = mmr(scores, rng.integers(0, 2, (4, n)), mask, 6, rng.random())
        for b, row in enumerate(lists):
            chosen = row[row >= 0]
            assert len(set(chosen)) == len(chosen) == min(6, mask[b].sum())
            assert mask[b, chosen].all()


def test_mmr_rejects_bad_diversity() -> None:
    with pytest.raises(ValueError, match="diversity"):
        mmr(np.zeros((1, 2)), np.zeros((1, 2), int), np.ones((1, 2), bool), 2, 1.5)
