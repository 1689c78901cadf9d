"""Tests for genrerank.metrics.classification: auc, gauc, logloss."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from genrerank.metrics import auc, gauc, logloss


def pad_junk(arrays, mask, rng, extra_cols=3, extra_rows=2, nan=True):
    """Append padded columns and fully padded rows filled with junk (NaN or huge values)."""
    b, n = mask.shape
    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        big = np.empty((b + extra_rows, n + extra_cols), dtype=np.float64)
        junk = rng.normal(scale=1e6, size=big.shape)
        if nan:
            junk[rng.random(big.shape) < 0.5] = np.nan
        big[:] = junk
        big[:b, :n] = a
        out.append(big)
    m = np.zeros((b + extra_rows, n + extra_cols), dtype=bool)
    m[:b, :n] = mask
    return out, m


def sklearn_gauc(scores, labels, mask, weighting="uniform"):
    vals, weights = [], []
    for s, y, m in zip(scores, labels, mask, strict=True):
        if len(np.unique(y[m])) == 2:
            vals.append(roc_auc_score(y[m], s[m]))
            weights.append(m.sum())
    if not vals:
        return math.nan, 0
    w = None if weighting == "uniform" else weights
    return float(np.average(vals, weights=w)), len(vals)


# --------------------------------------------------------------------------- auc


def test_auc_hand_computed():
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4,
    # lost 0.35<0.4 -> 3/4.
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half.
    assert auc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)
    # pos {2, 1}, neg {1, 0}: 2>1, 2>0, 1=1 (1/2), 1>0 -> 3.5 / 4
    assert auc([2, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.875)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tied", [False, True])
def test_auc_matches_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    shape = (40, 13)
    scores = rng.integers(0, 6, shape).astype(float) if tied else rng.normal(size=shape)
    labels = (rng.random(shape) < 0.3).astype(int)
    mask = rng.random(shape) < 0.8
    expected = roc_auc_score(labels[mask], scores[mask])
    assert auc(scores, labels, mask) == pytest.approx(expected, abs=1e-12)
    assert auc(scores, labels) == pytest.approx(
        roc_auc_score(labels.ravel(), scores.ravel()), abs=1e-12
    )


def test_auc_accepts_1d_and_bool_labels():
    rng = np.random.default_rng(1)
    s = rng.normal(size=50)
    y = rng.random(50) < 0.5
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_auc_padding_invariance():
    rng = np.random.default_rng(2)
    scores, labels = rng.normal(size=(20, 7)), rng.integers(0, 2, (20, 7))
    mask = rng.random((20, 7)) < 0.7
    (ps, pl), pm = pad_junk([scores, labels], mask, rng)
    assert auc(ps, pl, pm) == pytest.approx(auc(scores, labels, mask), rel=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_auc_single_class_raises(labels):
    with pytest.raises(ValueError, match="one class"):
        auc([0.1, 0.2, 0.3], labels)


def test_auc_single_class_after_masking_raises():
    with pytest.raises(ValueError, match="one class"):
        auc([0.1, 0.2, 0.3], [0, 1, 0], [True, False, True])


def test_auc_validation_errors_name_argument():
    with pytest.raises(ValueError, match="labels"):
        auc(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="mask"):
        auc(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="scores"):
        auc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="scores"):
        auc([0.1, np.inf], [0, 1])
    with pytest.raises(ValueError, match="labels"):
        auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="labels"):
        auc([0.1, 0.2], [-1, 1])
    with pytest.raises(ValueError, match="labels"):
        auc([0.1, 0.2], [0, 0.5])
    with pytest.raises(ValueError, match="mask"):
        auc([0.1, 0.2], [0, 1], [0, 2])


def test_torch_inputs_match_numpy():
    rng = np.random.default_rng(3)
    s, y = rng.normal(size=(6, 5)), rng.integers(0, 2, (6, 5))
    m = rng.random((6, 5)) < 0.8
    ts = torch.tensor(s, requires_grad=True)
    tm = torch.tensor(m)
    assert auc(ts, torch.tensor(y), tm) == auc(s, y, m)
    assert gauc(ts, torch.tensor(y), tm) == gauc(s, y, m)
    p = 1 / (1 + np.exp(-s))
    assert logloss(torch.tensor(p), torch.tensor(y), tm) == logloss(p, y, m)
    # bfloat16 has no numpy dtype: it must still work (values are exact in bf16 here).
    assert auc(torch.tensor([0.5, 1.0, 2.0], dtype=torch.bfloat16), [0, 1, 1]) == 1.0


def test_import_does_not_import_torch():
    code = "import sys, genrerank.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@settings(deadline=None, max_examples=50, derandomize=True)
@given(
    st.lists(
        st.tuples(st.integers(-3, 3), st.booleans()),
        min_size=2,
        max_size=30,
    ).filter(lambda xs: len({y for _, y in xs}) == 2)
)
def test_auc_property_sklearn_and_monotone_invariance(pairs):
    s = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs])
    value = auc(s, y)
    assert value == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # AUC depends only on the order of the scores.
    assert auc(np.exp(s) * 3 + 1, y) == pytest.approx(value, abs=1e-12)
    assert auc(-s, y) == pytest.approx(1 - value, abs=1e-12)


# -------------------------------------------------------------------------- gauc


def test_gauc_hand_computed():
    scores = np.array([[0.9, 0.1, 0.5, 0.0], [0.3, 0.3, 0.2, 0.0], [0.5, 0.4, 0.3, 0.2]])
    labels = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    # row 0: positive 0.9 beats both negatives -> 1.0 (3 valid items)
    # row 1: positive 0.3 ties the only negative 0.3 -> 0.5 (2 valid items)
    # row 2: no positive -> skipped
    assert gauc(scores, labels, mask) == pytest.approx(0.75)
    assert gauc(scores, labels, mask, return_count=True) == (pytest.approx(0.75), 2)
    # impressions: (3 * 1.0 + 2 * 0.5) / 5 = 0.8
    assert gauc(scores, labels, mask, weighting="impressions") == pytest.approx(0.8)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighting", ["uniform", "impressions"])
def test_gauc_matches_per_request_sklearn(seed, weighting):
    rng = np.random.default_rng(seed)
    shape = (60, 9)
    scores = rng.integers(0, 4, shape).astype(float)  # many ties
    labels = (rng.random(shape) < 0.25).astype(int)
    mask = rng.random(shape) < 0.75
    expected, count = sklearn_gauc(scores, labels, mask, weighting)
    value, used = gauc(scores, labels, mask, weighting=weighting, return_count=True)
    assert used == count > 0
    assert value == pytest.approx(expected, abs=1e-12)


def test_gauc_no_qualifying_request_is_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, count = gauc(np.ones((3, 4)), np.zeros((3, 4)), return_count=True)
        assert math.isnan(value) and count == 0
        # single-item requests can never have both classes
        assert math.isnan(gauc([[0.3], [0.7]], [[1], [0]]))
        # empty batch
        assert math.isnan(gauc(np.zeros((0, 4)), np.zeros((0, 4))))


def test_gauc_padding_invariance():
    rng = np.random.default_rng(5)
    scores, labels = rng.normal(size=(30, 8)), rng.integers(0, 2, (30, 8))
    mask = rng.random((30, 8)) < 0.7
    (ps, pl), pm = pad_junk([scores, labels], mask, rng)
    for w in ("uniform", "impressions"):
        value, count = gauc(scores, labels, mask, weighting=w, return_count=True)
        assert gauc(ps, pl, pm, weighting=w, return_count=True) == (
            pytest.approx(value, rel=1e-12),
            count,
        )


def test_gauc_validation():
    with pytest.raises(ValueError, match="weighting"):
        gauc(np.zeros((2, 2)), np.zeros((2, 2)), weighting="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        gauc(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        gauc(np.zeros((2, 2)), np.full((2, 2), 3))


# ----------------------------------------------------------------------- logloss


def test_logloss_hand_computed():
    # -(ln 0.9 + ln(1 - 0.2)) / 2
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert logloss([0.9, 0.2], [1, 0]) == pytest.approx(expected)
    # clipping: a certain wrong prediction costs -ln(eps), not infinity
    assert logloss([0.0], [1]) == pytest.approx(-math.log(1e-7))
    assert logloss([1.0], [0], eps=1e-3) == pytest.approx(-math.log(1e-3))
    # soft label 0.5 against p = 0.5: ln 2
    assert logloss([0.5], [0.5]) == pytest.approx(math.log(2))


@pytest.mark.parametrize("seed", range(4))
def test_logloss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    shape = (25, 11)
    probs = rng.uniform(1e-4, 1 - 1e-4, shape)
    labels = rng.integers(0, 2, shape)
    mask = rng.random(shape) < 0.8
    expected = log_loss(labels[mask], probs[mask], labels=[0, 1])
    assert logloss(probs, labels, mask) == pytest.approx(expected, rel=1e-12)


def test_logloss_padding_invariance_and_edges():
    rng = np.random.default_rng(6)
    probs, labels = rng.uniform(size=(10, 5)), rng.integers(0, 2, (10, 5))
    mask = rng.random((10, 5)) < 0.6
    (pp, pl), pm = pad_junk([probs, labels], mask, rng)
    assert logloss(pp, pl, pm) == pytest.approx(logloss(probs, labels, mask), rel=1e-12)
    assert math.isnan(logloss(probs, labels, np.zeros_like(mask)))
    # a single class is fine for log-loss
    assert logloss([0.2, 0.4], [0, 0]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_logloss_validation():
    with pytest.raises(ValueError, match="probs"):
        logloss([0.5, 1.5], [0, 1])  # logits passed by mistake
    with pytest.raises(ValueError, match="probs"):
        logloss([0.5, np.nan], [0, 1])
    with pytest.raises(ValueError, match="labels"):
        logloss([0.5, 0.5], [0, 2])
    with pytest.raises(ValueError, match="labels"):
        logloss([0.5, 0.5], [0, 1, 1])
    with pytest.raises(ValueError, match="eps"):
        logloss([0.5], [1], eps=0.7)
