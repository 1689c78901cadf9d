"""Tests for genrerank.metrics.beyond_accuracy: entropy, ILD, exposure share, Gini."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics.pairwise import cosine_similarity

from genrerank.metrics import (
    category_entropy,
    creator_entropy,
    creator_exposure_gini,
    exposure_share,
    intra_list_diversity,
    list_entropy,
)

LOG2_3 = math.log2(3)


def pad_junk(arrays, mask, rng, extra_cols=3, extra_rows=2, nan=True):
    """Append padded columns (at the end: positions keep their meaning) and fully padded
    rows, filled with junk: NaN for float inputs, huge random ids otherwise."""
    b, n = mask.shape
    out = []
    for a in arrays:
        a = np.asarray(a)
        shape = (b + extra_rows, n + extra_cols) + a.shape[2:]
        if np.issubdtype(a.dtype, np.floating):
            big = rng.normal(scale=1e6, size=shape)
            if nan:
                big[rng.random(shape) < 0.5] = np.nan
        else:
            big = rng.integers(-(10**9), 10**9, shape).astype(a.dtype)
        big[:b, :n] = a
        out.append(big)
    m = np.zeros((b + extra_rows, n + extra_cols), dtype=bool)
    m[:b, :n] = mask
    return out, m


def random_lists(seed, shape=(40, 10), n_values=5, p_valid=0.8):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, n_values, shape)
    mask = rng.random(shape) < p_valid
    return values, mask


def ref_entropy(values, mask, base=2.0, normalize=False):
    out = []
    for v, m in zip(values, mask, strict=True):
        items = list(v[m])
        n = len(items)
        if n == 0:
            out.append(np.nan)
            continue
        h = -sum(c / n * math.log(c / n) for c in Counter(items).values())
        if normalize:
            out.append(h / math.log(n) if n > 1 else 0.0)
        else:
            out.append(h / math.log(base))
    return np.array(out)


# ---------------------------------------------------------------------- entropy


def test_entropy_hand_computed():
    # [1, 1, 2, 3]: p = 1/2, 1/4, 1/4 -> H = 0.5*1 + 2 * 0.25*2 = 1.5 bits
    assert list_entropy([[1, 1, 2, 3]]) == pytest.approx(1.5)
    # normalised by log2(4) = 2
    assert list_entropy([[1, 1, 2, 3]], normalize=True) == pytest.approx(0.75)
    assert list_entropy([[1, 1, 2, 3]], base=math.e) == pytest.approx(1.5 * math.log(2))
    assert list_entropy([[5, 5, 5]]) == 0.0
    assert list_entropy([[4, 7, 9]], normalize=True) == pytest.approx(1.0)
    assert list_entropy([[4, 7, 9]]) == pytest.approx(LOG2_3)
    # single item: 0, also normalised (defined as 0)
    assert list_entropy([[3]]) == 0.0
    assert list_entropy([[3]], normalize=True) == 0.0
    # mean over lists: (1.5 + 0) / 2; the masked-out 9 does not count
    values = [[1, 1, 2, 3], [7, 7, 9, 0]]
    mask = [[True] * 4, [True, True, False, False]]
    assert list_entropy(values, mask) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("normalize", [False, True])
def test_entropy_matches_reference(seed, normalize):
    values, mask = random_lists(seed)
    mask[0] = False  # an empty list: NaN, excluded
    mask[1] = False
    mask[1, 3] = True  # a single-item list
    per = list_entropy(values, mask, normalize=normalize, reduce=False)
    expected = ref_entropy(values, mask, normalize=normalize)
    np.testing.assert_allclose(per, expected, atol=1e-12)
    assert list_entropy(values, mask, normalize=normalize) == pytest.approx(np.nanmean(expected))


def test_entropy_wrappers_and_edges():
    values, mask = random_lists(4)
    expected = list_entropy(values, mask, normalize=True)
    assert category_entropy(values, mask, normalize=True) == expected
    assert creator_entropy(values, mask, normalize=True) == expected
    # negative ids and float-coded ids (e.g. from a float tensor) work too
    assert list_entropy(-values, mask) == pytest.approx(list_entropy(values, mask))
    assert list_entropy(values.astype(float), mask) == pytest.approx(list_entropy(values, mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(list_entropy(values, np.zeros_like(mask)))
    with pytest.raises(ValueError, match="base"):
        list_entropy(values, base=1)
    with pytest.raises(ValueError, match="mask"):
        list_entropy(values, mask[:, :3])
    with pytest.raises(ValueError, match="values"):
        list_entropy(values[0])


# -------------------------------------------------------- intra-list diversity


def test_ild_categorical_hand_computed():
    # pairs (a,b): 1-1 same, 1-2 diff, 1-2 diff -> 2/3
    assert intra_list_diversity([[1, 1, 2]]) == pytest.approx(2 / 3)
    assert intra_list_diversity([[1, 2, 3]]) == 1.0
    assert intra_list_diversity([[4, 4]]) == 0.0
    # lists with < 2 valid items are excluded: (2/3 + 1) / 2
    features = [[1, 1, 2], [5, 6, 0], [8, 0, 0]]
    mask = [[True, True, True], [True, True, False], [True, False, False]]
    np.testing.assert_allclose(
        intra_list_diversity(features, mask, reduce=False), [2 / 3, 1.0, np.nan]
    )
    assert intra_list_diversity(features, mask) == pytest.approx(5 / 6)


def test_ild_embeddings_hand_computed():
    emb = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    # cos = 0, 1/sqrt2, 1/sqrt2 -> mean(1 - cos) = (1 + 2 * (1 - 1/sqrt2)) / 3
    expected = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert intra_list_diversity(emb) == pytest.approx(expected)
    # scale invariant, and identical directions give 0
    assert intra_list_diversity(emb * [[[3.0], [0.5], [7.0]]]) == pytest.approx(expected)
    assert intra_list_diversity(np.ones((1, 4, 3))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_ild_embeddings_match_pairwise_cosine(seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(30, 8, 5))
    mask = rng.random((30, 8)) < 0.7
    per = intra_list_diversity(emb, mask, reduce=False)
    for i in range(30):
        x = emb[i, mask[i]]
        if len(x) < 2:
            assert math.isnan(per[i])
            continue
        sim = cosine_similarity(x)
        iu = np.triu_indices(len(x), k=1)
        assert per[i] == pytest.approx(np.mean(1 - sim[iu]), abs=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_ild_categorical_matches_pair_count(seed):
    values, mask = random_lists(seed, n_values=3)
    per = intra_list_diversity(values, mask, reduce=False)
    for i in range(len(values)):
        v = values[i, mask[i]]
        pairs = [(a, b) for j, a in enumerate(v) for b in v[j + 1 :]]
        expected = np.mean([a != b for a, b in pairs]) if pairs else np.nan
        np.testing.assert_allclose(per[i], expected, atol=1e-12)


def test_ild_edges():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(intra_list_diversity([[1], [2]]))
        assert math.isnan(intra_list_diversity(np.ones((2, 1, 3))))
    with pytest.raises(ValueError, match="zero-norm"):
        intra_list_diversity(np.zeros((1, 2, 3)))
    # a zero embedding in a padded slot is fine
    emb = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    assert intra_list_diversity(emb, [[True, True, False]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="features"):
        intra_list_diversity(np.ones(3))
    with pytest.raises(ValueError, match="mask"):
        intra_list_diversity(np.ones((2, 3, 4)), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="features"):
        intra_list_diversity(np.array([[[np.nan, 1.0], [1.0, 0.0]]]))


# ------------------------------------------------------------------ exposure


def test_exposure_share_hand_computed():
    flags = [[1, 0, 0], [0, 0, 1]]
    assert exposure_share(flags) == pytest.approx(2 / 6)
    # position weights 1, 1/log2(3), 1/2 per list:
    # flagged = 1 + 1/2, total = 2 * (1 + 1/log2(3) + 1/2)
    w_total = 2 * (1 + 1 / LOG2_3 + 0.5)
    assert exposure_share(flags, position_weighted=True) == pytest.approx(1.5 / w_total)
    # masked slots drop out of numerator and denominator
    mask = [[True, True, False], [True, False, True]]
    assert exposure_share(np.array(flags, bool), mask) == pytest.approx(2 / 4)
    assert exposure_share([[0, 0]]) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(exposure_share([[1, 0]], [[False, False]]))
    with pytest.raises(ValueError, match="flags"):
        exposure_share([[0, 2]])
    with pytest.raises(ValueError, match="mask"):
        exposure_share([[0, 1]], [[True]])


# ---------------------------------------------------------------------- gini


def ref_gini(x):
    """Mean-absolute-difference definition: sum_ij |x_i - x_j| / (2 n^2 mean)."""
    x = np.asarray(x, dtype=float)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def test_gini_hand_computed():
    # exposures [1, 1, 1, 1] -> 0
    assert creator_exposure_gini([[0, 1, 2, 3]]) == pytest.approx(0.0, abs=1e-15)
    # exposures [0, 0, 0, 4] over the universe {0..3}:
    # 2 * (4 * 4) / (4 * 4) - 5/4 = 0.75
    assert creator_exposure_gini([[3, 3, 3, 3]], universe=[0, 1, 2, 3]) == pytest.approx(0.75)
    # without a universe only creator 3 is known: a single creator is perfectly "equal"
    assert creator_exposure_gini([[3, 3, 3, 3]]) == 0.0
    # exposures {7: 3, 8: 1} across two lists: sorted [1, 3]:
    # 2 * (1*1 + 2*3) / (2 * 4) - 3/2 = 14/8 - 12/8 = 0.25
    creators = [[7, 7, 0], [8, 7, 0]]
    mask = [[True, True, False], [True, True, False]]
    assert creator_exposure_gini(creators, mask) == pytest.approx(0.25)
    # duplicates in the universe are ignored
    assert creator_exposure_gini(creators, mask, universe=[7, 8, 8, 7]) == pytest.approx(0.25)


def test_gini_position_weighted_hand_computed():
    # creator 1 at position 0 of both lists (2 * 1), creator 2 at position 1 of both
    # (2 / log2(3)): sorted x = [1.2619, 2]
    x = [2 / LOG2_3, 2.0]
    expected = 2 * (x[0] + 2 * x[1]) / (2 * sum(x)) - 1.5
    got = creator_exposure_gini([[1, 2], [1, 2]], position_weighted=True)
    assert got == pytest.approx(expected)
    assert got == pytest.approx(ref_gini(x))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("position_weighted", [False, True])
def test_gini_matches_reference(seed, position_weighted):
    rng = np.random.default_rng(seed)
    creators = rng.zipf(1.8, (50, 8)) % 40  # skewed exposure
    mask = rng.random((50, 8)) < 0.8
    universe = np.arange(60)
    w = 1 / np.log2(np.arange(8) + 2) if position_weighted else np.ones(8)
    expo = np.zeros(60)
    np.add.at(expo, creators[mask], np.broadcast_to(w, mask.shape)[mask])
    got = creator_exposure_gini(creators, mask, universe, position_weighted=position_weighted)
    assert got == pytest.approx(ref_gini(expo), abs=1e-12)
    shown = expo[np.unique(creators[mask])]
    assert creator_exposure_gini(
        creators, mask, position_weighted=position_weighted
    ) == pytest.approx(ref_gini(shown), abs=1e-12)


def test_gini_edges():
    with pytest.raises(ValueError, match="universe"):
        creator_exposure_gini([[1, 2, 5]], universe=[1, 2, 3])
    # padded creators need not be in the universe
    assert creator_exposure_gini([[1, 2, 5]], [[True, True, False]], universe=[1, 2]) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(creator_exposure_gini([[1, 2]], [[False, False]]))
        assert math.isnan(creator_exposure_gini([[1, 2]], [[False, False]], universe=[1, 2]))
    with pytest.raises(ValueError, match="creators"):
        creator_exposure_gini([[1.0, np.nan]])


@settings(deadline=None, max_examples=50, derandomize=True)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=25))
def test_gini_property_bounds(counts):
    # each creator c shown counts[c] times, all in one long list
    creators = np.repeat(np.arange(len(counts)), counts)[None, :]
    if creators.size == 0:
        return
    g = creator_exposure_gini(creators, universe=np.arange(len(counts)))
    n = len(counts)
    assert -1e-12 <= g <= (n - 1) / n + 1e-12
    assert g == pytest.approx(ref_gini(counts), abs=1e-12)


# --------------------------------------------------------- padding invariance


@pytest.mark.parametrize("position_weighted", [False, True])
def test_padding_invariance_all_metrics(position_weighted):
    rng = np.random.default_rng(12)
    values, _ = random_lists(12, shape=(25, 7))
    mask = np.arange(7)[None, :] < rng.integers(0, 8, (25, 1))  # ordered prefix lists
    emb = rng.normal(size=(25, 7, 4))
    flags = rng.random((25, 7)) < 0.3
    (pv, pflags), pm = pad_junk([values, flags.astype(np.int64)], mask, rng)
    (pemb,), _ = pad_junk([emb], mask, rng)

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

    for normalize in (False, True):
        base = list_entropy(values, mask, normalize=normalize, reduce=False)
        got = list_entropy(pv, pm, normalize=normalize, reduce=False)
        close(got[:25], base)
        assert np.all(np.isnan(got[25:]))
        close(
            list_entropy(pv, pm, normalize=normalize),
            list_entropy(values, mask, normalize=normalize),
        )
    close(intra_list_diversity(pv, pm), intra_list_diversity(values, mask))
    close(intra_list_diversity(pemb, pm), intra_list_diversity(emb, mask))
    close(
        intra_list_diversity(pemb, pm, reduce=False)[:25],
        intra_list_diversity(emb, mask, reduce=False),
    )
    close(
        exposure_share(pflags, pm, position_weighted=position_weighted),
        exposure_share(flags, mask, position_weighted=position_weighted),
    )
    close(
        creator_exposure_gini(pv, pm, position_weighted=position_weighted),
        creator_exposure_gini(values, mask, position_weighted=position_weighted),
    )
    universe = np.arange(10)
    close(
        creator_exposure_gini(pv, pm, universe, position_weighted=position_weighted),
        creator_exposure_gini(values, mask, universe, position_weighted=position_weighted),
    )


def test_torch_inputs():
    values, mask = random_lists(13, shape=(6, 5))
    tv, tm = torch.tensor(values), torch.tensor(mask)
    assert list_entropy(tv, tm) == list_entropy(values, mask)
    assert intra_list_diversity(tv, tm) == intra_list_diversity(values, mask)
    emb = np.random.default_rng(13).normal(size=(6, 5, 3)).astype(np.float32)
    assert intra_list_diversity(torch.tensor(emb), tm) == intra_list_diversity(emb, mask)
    assert exposure_share(tv > 2, tm) == exposure_share(values > 2, mask)
    assert creator_exposure_gini(tv, tm, torch.arange(5)) == creator_exposure_gini(
        values, mask, np.arange(5)
    )
