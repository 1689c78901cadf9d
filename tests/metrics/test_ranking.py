"""Tests for genrerank.metrics.ranking: ndcg/map/recall/clicks@k and list_gain."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import ndcg_score

from genrerank.metrics import (
    DEFAULT_GAIN_WEIGHTS,
    clicks_at_k,
    list_gain,
    map_at_k,
    ndcg_at_k,
    recall_at_k,
)

LOG2_3 = math.log2(3)
TOPK_METRICS = [ndcg_at_k, map_at_k, recall_at_k, clicks_at_k]


def pad_junk(arrays, mask, rng, extra_cols=3, extra_rows=2):
    """Append padded columns and fully padded rows filled with junk (half NaN)."""
    b, n = mask.shape
    out = []
    for a in arrays:
        big = rng.normal(scale=1e6, size=(b + extra_rows, n + extra_cols))
        big[rng.random(big.shape) < 0.5] = np.nan
        big[:b, :n] = a
        out.append(big)
    m = np.zeros((b + extra_rows, n + extra_cols), dtype=bool)
    m[:b, :n] = mask
    return out, m


def random_batch(seed, shape=(50, 12), levels=4, tie_levels=5, p_valid=0.8):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, tie_levels, shape).astype(float)  # plenty of ties
    labels = rng.integers(0, levels, shape) * (rng.random(shape) < 0.4)
    mask = rng.random(shape) < p_valid
    return scores, labels.astype(float), mask


def ref_topk(scores, labels, mask, k):
    """Per-request (positive flags in ranked top k, #positives): plain-Python reference."""
    rows = []
    for s, y, m in zip(scores, labels, mask, strict=True):
        idx = [i for i in range(len(s)) if m[i]]
        idx.sort(key=lambda i: (-s[i], i))  # ties -> lower index first
        rows.append(([y[i] > 0 for i in idx[:k]], sum(y[i] > 0 for i in idx)))
    return rows


# ---------------------------------------------------------------------- ndcg@k


def test_ndcg_hand_computed():
    scores = [[3.0, 2.0, 1.0]]
    gains = [[0.0, 1.0, 2.0]]
    # Ranked gains 0, 1, 2. DCG = 0/log2(2) + 1/log2(3) + 2/log2(4) = 0.6309 + 1 = 1.6309
    # Ideal order 2, 1, 0:  IDCG = 2/1 + 1/log2(3) + 0 = 2.6309  -> 0.6199
    assert ndcg_at_k(scores, gains, k=3) == pytest.approx((1 / LOG2_3 + 1) / (2 + 1 / LOG2_3))
    # k=2: DCG = 0 + 1/log2(3); IDCG = 2 + 1/log2(3)
    assert ndcg_at_k(scores, gains, k=2) == pytest.approx((1 / LOG2_3) / (2 + 1 / LOG2_3))
    # k=1: the top item has gain 0
    assert ndcg_at_k(scores, gains, k=1) == 0.0
    # perfect ranking
    assert ndcg_at_k([[1.0, 2.0, 3.0]], gains, k=2) == pytest.approx(1.0)


def test_ndcg_ties_are_averaged():
    # Scores tie for the top slot: the tie group's mean gain (1 + 0)/2 goes to rank 1.
    assert ndcg_at_k([[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]], k=1) == pytest.approx(0.5)
    # Group of 3 tied items, gains 3, 0, 0 spread over ranks 1..3 with k = 2:
    # DCG = 1 * (1 + 1/log2 3); IDCG = 3 -> (1 + 1/log2 3) / 3
    assert ndcg_at_k([[5.0, 5.0, 5.0]], [[3.0, 0.0, 0.0]], k=2) == pytest.approx(
        (1 + 1 / LOG2_3) / 3
    )
    # All scores tied: same value whatever the column order.
    a = ndcg_at_k([[0.0] * 4], [[2.0, 0.0, 1.0, 0.0]], k=2)
    b = ndcg_at_k([[0.0] * 4], [[0.0, 1.0, 0.0, 2.0]], k=2)
    assert a == pytest.approx(b)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 12, 50])
def test_ndcg_matches_sklearn_per_request(seed, k):
    scores, labels, mask = random_batch(seed)
    per = ndcg_at_k(scores, labels, mask, k=k, reduce=False)
    assert per.shape == (scores.shape[0],)
    checked = 0
    for i in range(scores.shape[0]):
        s, y = scores[i, mask[i]], labels[i, mask[i]]
        if y.sum() == 0:
            assert math.isnan(per[i])  # undefined: no positive gain
            continue
        if len(y) < 2:  # sklearn refuses single-document requests
            assert per[i] == 1.0
            continue
        assert per[i] == pytest.approx(ndcg_score([y], [s], k=k), abs=1e-12)
        checked += 1
    assert checked > 20
    assert ndcg_at_k(scores, labels, mask, k=k) == pytest.approx(np.nanmean(per))


def test_ndcg_continuous_scores_match_sklearn_batch():
    rng = np.random.default_rng(11)
    scores, labels = rng.normal(size=(40, 10)), rng.integers(0, 3, (40, 10)).astype(float)
    labels[:, 0] = 1.0  # every request defined, so sklearn's batch mean is comparable
    assert ndcg_at_k(scores, labels, k=5) == pytest.approx(
        ndcg_score(labels, scores, k=5), abs=1e-12
    )


def test_ndcg_undefined_requests_excluded():
    scores = np.array([[0.3, 0.2], [0.3, 0.2]])
    labels = np.array([[0.0, 1.0], [0.0, 0.0]])
    per = ndcg_at_k(scores, labels, k=2, reduce=False)
    assert math.isnan(per[1])
    expected = (1 / LOG2_3) / 1.0
    assert per[0] == pytest.approx(expected)
    assert ndcg_at_k(scores, labels, k=2) == pytest.approx(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(ndcg_at_k(scores, np.zeros_like(labels), k=2))


def test_ndcg_single_item_and_k_beyond_list():
    assert ndcg_at_k([[0.1]], [[2.0]], k=1) == 1.0
    assert ndcg_at_k([[0.1]], [[2.0]], k=10) == 1.0
    scores, labels, mask = random_batch(7, shape=(20, 6))
    assert np.array_equal(
        ndcg_at_k(scores, labels, mask, k=6, reduce=False),
        ndcg_at_k(scores, labels, mask, k=100, reduce=False),
        equal_nan=True,
    )


@settings(deadline=None, max_examples=50, derandomize=True)
@given(
    hnp.arrays(np.int64, (3, 7), elements=st.integers(0, 3)),
    hnp.arrays(np.int64, (3, 7), elements=st.integers(0, 3)),
    st.integers(1, 8),
    st.randoms(use_true_random=False),
)
def test_ndcg_property_permutation_invariant_and_bounded(scores, labels, k, rnd):
    perm = list(range(7))
    rnd.shuffle(perm)
    a = ndcg_at_k(scores, labels, k=k, reduce=False)
    b = ndcg_at_k(scores[:, perm], labels[:, perm], k=k, reduce=False)
    np.testing.assert_allclose(a, b, atol=1e-12)  # tie-averaging: column order is irrelevant
    assert np.all((a[~np.isnan(a)] >= -1e-12) & (a[~np.isnan(a)] <= 1 + 1e-12))
    assert np.array_equal(np.isnan(a), labels.sum(axis=1) == 0)


# ------------------------------------------------------------ map / recall / clicks


def test_map_hand_computed():
    scores = [[0.9, 0.8, 0.7, 0.6]]
    labels = [[1, 0, 1, 0]]
    # hits at ranks 1 and 3: AP@4 = (P@1 + P@3) / min(4, 2) = (1 + 2/3) / 2
    assert map_at_k(scores, labels, k=4) == pytest.approx((1 + 2 / 3) / 2)
    # AP@2 = P@1 / min(2, 2) = 1/2
    assert map_at_k(scores, labels, k=2) == pytest.approx(0.5)
    # AP@1 = P@1 / min(1, 2) = 1
    assert map_at_k(scores, labels, k=1) == pytest.approx(1.0)
    # graded labels count as binary (label > 0)
    assert map_at_k(scores, [[3, 0, 0.5, 0]], k=4) == pytest.approx((1 + 2 / 3) / 2)


def test_recall_and_clicks_hand_computed():
    scores = [[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]]
    labels = [[1, 0, 1, 1], [0, 0, 0, 0]]
    # request 0: top-2 = items 0, 1 -> 1 of 3 positives; request 1 has no positives
    np.testing.assert_allclose(recall_at_k(scores, labels, k=2, reduce=False), [1 / 3, np.nan])
    assert recall_at_k(scores, labels, k=2) == pytest.approx(1 / 3)
    assert recall_at_k(scores, labels, k=4) == pytest.approx(1.0)
    # clicks: every request counts, the one without positives as 0
    np.testing.assert_array_equal(clicks_at_k(scores, labels, k=2, reduce=False), [1, 0])
    assert clicks_at_k(scores, labels, k=2) == pytest.approx(0.5)
    assert clicks_at_k(scores, labels, k=10) == pytest.approx(1.5)


def test_stable_tie_break_by_lower_index():
    scores = [[1.0, 1.0, 1.0]]
    labels = [[0, 1, 0]]
    # order 0, 1, 2: the positive sits at rank 2
    assert map_at_k(scores, labels, k=3) == pytest.approx(0.5)
    assert map_at_k(scores, labels, k=1) == 0.0
    assert recall_at_k(scores, labels, k=1) == 0.0
    assert recall_at_k(scores, labels, k=2) == 1.0
    assert clicks_at_k(scores, labels, k=1) == 0.0
    # padding in between does not count as a lower index of a valid item
    assert map_at_k([[1.0, 9.0, 1.0]], [[0, 1, 1]], [[True, False, True]], k=1) == 0.0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 2, 5, 12, 40])
def test_map_recall_clicks_match_reference(seed, k):
    scores, labels, mask = random_batch(seed)
    ref = ref_topk(scores, labels, mask, k)
    exp_map, exp_rec, exp_clk = [], [], []
    for hits, n_pos in ref:
        clicks = sum(hits)
        exp_clk.append(float(clicks))
        if n_pos == 0:
            exp_map.append(np.nan)
            exp_rec.append(np.nan)
            continue
        prec = [sum(hits[: r + 1]) / (r + 1) for r in range(len(hits))]
        exp_map.append(sum(p for p, h in zip(prec, hits, strict=True) if h) / min(k, n_pos))
        exp_rec.append(clicks / n_pos)
    np.testing.assert_allclose(map_at_k(scores, labels, mask, k=k, reduce=False), exp_map)
    np.testing.assert_allclose(recall_at_k(scores, labels, mask, k=k, reduce=False), exp_rec)
    np.testing.assert_allclose(clicks_at_k(scores, labels, mask, k=k, reduce=False), exp_clk)
    assert map_at_k(scores, labels, mask, k=k) == pytest.approx(np.nanmean(exp_map))
    assert recall_at_k(scores, labels, mask, k=k) == pytest.approx(np.nanmean(exp_rec))
    assert clicks_at_k(scores, labels, mask, k=k) == pytest.approx(np.mean(exp_clk))


def test_single_item_and_all_zero_labels():
    assert map_at_k([[0.5]], [[1]], k=1) == 1.0
    assert recall_at_k([[0.5]], [[1]], k=3) == 1.0
    assert clicks_at_k([[0.5]], [[1]], k=3) == 1.0
    zeros = np.zeros((3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(map_at_k(np.ones((3, 4)), zeros, k=2))
        assert math.isnan(recall_at_k(np.ones((3, 4)), zeros, k=2))
        assert math.isnan(ndcg_at_k(np.ones((3, 4)), zeros, k=2))
    assert clicks_at_k(np.ones((3, 4)), zeros, k=2) == 0.0


@pytest.mark.parametrize("metric", TOPK_METRICS)
@pytest.mark.parametrize("k", [1, 4, 30])
def test_topk_padding_invariance(metric, k):
    rng = np.random.default_rng(8)
    scores, labels, mask = random_batch(8, shape=(30, 10))
    (ps, pl), pm = pad_junk([scores, labels], mask, rng)
    base = metric(scores, labels, mask, k=k, reduce=False)
    padded = metric(ps, pl, pm, k=k, reduce=False)
    # equal up to float summation order (BLAS / pairwise sums see longer rows)
    np.testing.assert_allclose(padded[: len(base)], base, rtol=1e-12, atol=1e-12)
    assert np.all(np.isnan(padded[len(base) :]))  # fully padded rows are undefined
    assert metric(ps, pl, pm, k=k) == pytest.approx(metric(scores, labels, mask, k=k), rel=1e-12)


@pytest.mark.parametrize("metric", TOPK_METRICS)
def test_topk_validation(metric):
    s, y = np.zeros((2, 3)), np.ones((2, 3))
    with pytest.raises(ValueError, match="labels"):
        metric(s, np.ones((2, 4)), k=1)
    with pytest.raises(ValueError, match="mask"):
        metric(s, y, np.ones((2, 2), bool), k=1)
    with pytest.raises(ValueError, match="scores"):
        metric(np.array([[0.0, np.nan, 1.0]]), [[1, 0, 0]], k=1)
    with pytest.raises(ValueError, match="labels"):
        metric(s, -y, k=1)
    with pytest.raises(ValueError, match="labels"):
        metric(np.zeros((1, 2)), [[np.nan, 1.0]], k=1)
    with pytest.raises(ValueError, match="2-D"):
        metric(np.zeros(3), np.ones(3), k=1)
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must"):
            metric(s, y, k=bad_k)


@pytest.mark.parametrize("metric", TOPK_METRICS)
def test_topk_torch_inputs(metric):
    scores, labels, mask = random_batch(9, shape=(8, 6))
    expected = metric(scores, labels, mask, k=3, reduce=False)
    got = metric(torch.tensor(scores), torch.tensor(labels), torch.tensor(mask), k=3, reduce=False)
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------- list_gain


def test_list_gain_hand_computed():
    signals = {
        "click": np.array([[1, 0, 1]]),
        "like": np.array([[0, 1, 0]]),
        "long_view": np.array([[1, 1, 0]]),
    }
    # item gains: 1 + 0.8 = 1.8, 1.5 + 0.8 = 2.3, 1.0
    # discounted: 1.8/log2(2) + 2.3/log2(3) + 1.0/log2(4) = 1.8 + 1.4512 + 0.5
    assert list_gain(signals) == pytest.approx(1.8 + 2.3 / LOG2_3 + 0.5)
    assert list_gain(signals, discount=False) == pytest.approx(5.1)
    # a masked slot drops out
    mask = np.array([[True, True, False]])
    assert list_gain(signals, mask, discount=False) == pytest.approx(4.1)
    assert DEFAULT_GAIN_WEIGHTS == {"click": 1.0, "like": 1.5, "long_view": 0.8}


def test_list_gain_weights_and_absent_signals():
    click = np.array([[1.0, 1.0], [0.0, 1.0]])
    # only clicks present: the default like/long_view weights simply contribute nothing
    np.testing.assert_allclose(
        list_gain({"click": click}, reduce=False), [1 + 1 / LOG2_3, 1 / LOG2_3]
    )
    assert list_gain({"click": click}, weights={"click": 2.0, "share": 9.0}) == pytest.approx(
        2 * (1 + 2 / LOG2_3) / 2
    )
    with pytest.raises(ValueError, match="share"):
        list_gain({"click": click, "share": click})
    # explicit weights: a signal without a weight is deliberately ignored
    assert list_gain({"click": click, "share": click}, weights={"click": 1.0}) == list_gain(
        {"click": click}
    )
    # no signals at all: zero gain (mask gives the shape), but the shape must be knowable
    np.testing.assert_array_equal(list_gain({}, np.ones((2, 3), bool), reduce=False), [0, 0])
    with pytest.raises(ValueError, match="mask"):
        list_gain({})


def test_list_gain_padding_invariance_and_validation():
    rng = np.random.default_rng(10)
    shape = (15, 6)
    sig = {name: (rng.random(shape) < 0.3).astype(float) for name in DEFAULT_GAIN_WEIGHTS}
    mask = np.arange(6)[None, :] < rng.integers(1, 7, (15, 1))  # prefix masks: ordered lists
    padded, pm = pad_junk(list(sig.values()), mask, rng)
    psig = dict(zip(sig, padded, strict=True))
    for discount in (True, False):
        base = list_gain(sig, mask, discount=discount, reduce=False)
        got = list_gain(psig, pm, discount=discount, reduce=False)
        np.testing.assert_allclose(got[:15], base, rtol=1e-12, atol=1e-12)
        assert np.all(np.isnan(got[15:]))
        assert list_gain(psig, pm, discount=discount) == pytest.approx(
            list_gain(sig, mask, discount=discount), rel=1e-12
        )
    with pytest.raises(ValueError, match="like"):
        list_gain({"click": np.ones((2, 3)), "like": np.ones((2, 4))})
    with pytest.raises(ValueError, match="click"):
        list_gain({"click": np.array([[np.nan, 1.0]])})
    # torch tensors work too
    assert list_gain({"click": torch.ones(2, 3)}) == list_gain({"click": np.ones((2, 3))})
