"""The hierarchical model's plan in numpy: expected counts rounded to the list length."""

from __future__ import annotations

import numpy as np
import pytest

from genrerank.constraints.skeleton import expected_counts_np, plan_from_logits

NEG = -np.inf


def _log(rows: list[list[float]]) -> np.ndarray:
    """``[1, C, K + 1]`` log-probabilities from per-category probabilities (0 = impossible)."""
    with np.errstate(divide="ignore"):
        return np.log(np.array([rows], dtype=np.float64))


def test_expected_counts_are_rounded_to_the_length() -> None:
    # E = (2.0, 1.0, 1.0) for a list of 4: exactly those counts.
    lp = _log([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    assert expected_counts_np(lp, [4]).tolist() == [[2, 1, 1]]
    # E = (1.2, 0.95, 0.95) rescaled to 6: (2.32, 1.84, 1.84) -> 2, 2, 2 (largest remainders).
    lp = _log([[0.0, 0.8, 0.2, 0.0], [0.1, 0.85, 0.05, 0.0], [0.1, 0.85, 0.05, 0.0]])
    assert expected_counts_np(lp, [6]).tolist() == [[2, 2, 2]]


def test_a_category_never_gets_more_items_than_its_candidates() -> None:
    # Category 0 has one candidate (counts above 1 impossible) but the largest expectation.
    lp = _log([[0.0, 1.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.8, 0.1, 0.1, 0.0]])
    assert expected_counts_np(lp, [3]).tolist() == [[1, 1, 1]]
    # Fewer candidates than the length: every candidate, the list shorter.
    lp = _log([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    assert expected_counts_np(lp, [2]).tolist() == [[1, 1]]
    assert expected_counts_np(lp, [5]).tolist() == [[1, 1]]


def test_all_zero_expectations_fall_back_to_the_candidates_shares() -> None:
    lp = _log([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    lp[0, 0, 1:] = np.log(1e-30)  # 3 candidates, almost surely none planned
    lp[0, 1, 1] = np.log(1e-30)  # 1 candidate
    out = expected_counts_np(lp, [2])
    assert out.sum() == 2 and out[0, 1] <= 1


def test_random_plans_sum_to_the_length_within_the_candidates() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        b, c, width = 4, int(rng.integers(1, 8)), int(rng.integers(2, 9))
        logits = rng.normal(size=(b, c, width)).astype(np.float32)
        cap = rng.integers(0, width, size=(b, c))
        logits[np.arange(width) > cap[..., None]] = NEG
        lengths = rng.integers(0, width, size=b)
        counts = plan_from_logits(logits, lengths)
        assert (counts >= 0).all() and (counts <= cap).all()
        assert (counts.sum(1) == np.minimum(lengths, cap.sum(1))).all()


def test_unknown_plan_method_is_refused() -> None:
    with pytest.raises(ValueError, match="plan must be one of"):
        plan_from_logits(np.zeros((1, 2, 3), np.float32), [1], "mode")
