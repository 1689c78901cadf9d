"""Tests for genrerank.metrics.debiased: PBM propensities (EM) and debiased clicks@k."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from genrerank.metrics import (
    fit_position_propensities,
    ips_clicks_at_k,
    ips_clicks_ratio_at_k,
    list_clicks_at_k,
)

THETA = np.array([1.0, 0.5, 0.25])


def two_requests():
    """Request 0: logged [c2, c0, c1] with clicks [0, 1, 1]; the model shows [c1, c0, c3]
    (c3 never exposed). Request 1: logged [c0, c1], clicks [1, 0]; the model swaps them."""
    lists = np.array([[1, 0, 3], [1, 0, -1]])
    exposed = np.array([[2, 0, 1], [0, 1, 0]])
    clicks = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    mask = np.array([[True, True, True], [True, True, False]])
    return lists, exposed, clicks, mask


def pad(lists, exposed, clicks, mask, rng, extra_cols=2, extra_rows=2):
    """A padded copy: junk in padded slots (NaN clicks, random indices), padding rows."""
    r, m = exposed.shape
    lw = lists.shape[1]
    big_lists = np.full((r + extra_rows, lw + extra_cols), -1)
    big_lists[:r, :lw] = lists
    big_lists[r:, :] = rng.integers(0, 5, (extra_rows, lw + extra_cols))  # rows with no log
    big_exp = rng.integers(-3, 7, (r + extra_rows, m + extra_cols))
    big_exp[:r, :m] = np.where(mask, exposed, big_exp[:r, :m])
    big_clicks = np.full(big_exp.shape, np.nan)
    big_clicks[:r, :m] = np.where(mask, clicks, np.nan)
    big_mask = np.zeros(big_exp.shape, dtype=bool)
    big_mask[:r, :m] = mask
    return big_lists, big_exp, big_clicks, big_mask


# ------------------------------------------------------------------ list metrics by hand


def test_list_clicks_by_hand() -> None:
    lists, exposed, clicks, mask = two_requests()
    per = [list_clicks_at_k(lists, exposed, clicks, mask, k, reduce=False) for k in (1, 2, 3)]
    np.testing.assert_array_equal(per[0], [1.0, 0.0])
    np.testing.assert_array_equal(per[1], [2.0, 1.0])
    np.testing.assert_array_equal(per[2], [2.0, 1.0])  # c3 was never exposed: 0
    assert list_clicks_at_k(lists, exposed, clicks, mask, 2) == 1.5
    assert list_clicks_at_k(lists, exposed, clicks, mask, 50) == 1.5  # k > L: the whole list


def test_ips_clicks_by_hand() -> None:
    lists, exposed, clicks, mask = two_requests()
    # Request 0: c1 moves 2 -> 0 (x 1 / 0.25 = 4), c0 stays at 1 (x 1). Request 1: c1 has
    # no click, c0 moves 0 -> 1 (x 0.5).
    per1 = ips_clicks_at_k(lists, exposed, clicks, mask, THETA, 1, reduce=False)
    per3 = ips_clicks_at_k(lists, exposed, clicks, mask, THETA, 3, reduce=False)
    np.testing.assert_allclose(per1, [4.0, 0.0])
    np.testing.assert_allclose(per3, [5.0, 0.5])
    assert ips_clicks_at_k(lists, exposed, clicks, mask, THETA, 3) == pytest.approx(2.75)


def test_ips_ratio_by_hand() -> None:
    lists, exposed, clicks, mask = two_requests()
    # Logged order: top 3 holds 2 + 1 clicks; model: 5 + 0.5 expected clicks.
    assert ips_clicks_ratio_at_k(lists, exposed, clicks, mask, THETA, 3) == pytest.approx(
        5.5 / 3
    )
    # Top 1: the logged order has 0 + 1 clicks, the model 4 + 0.
    assert ips_clicks_ratio_at_k(lists, exposed, clicks, mask, THETA, 1) == pytest.approx(4.0)


def test_ratio_is_clipped() -> None:
    lists, exposed, clicks, mask = two_requests()
    theta = np.array([1.0, 0.5, 0.05])  # 1 / 0.05 = 20 > 10
    per = ips_clicks_at_k(lists, exposed, clicks, mask, theta, 1, reduce=False)
    np.testing.assert_allclose(per, [10.0, 0.0])
    per = ips_clicks_at_k(lists, exposed, clicks, mask, theta, 1, max_ratio=3.0, reduce=False)
    np.testing.assert_allclose(per, [3.0, 0.0])


def test_positions_beyond_theta_use_its_last_value() -> None:
    lists, exposed, clicks, mask = two_requests()
    short = ips_clicks_at_k(lists, exposed, clicks, mask, THETA[:2], 3, reduce=False)
    # c1 logged at position 2 takes theta[1] = 0.5: ratio 1 / 0.5 = 2.
    np.testing.assert_allclose(short, [3.0, 0.5])


def test_logged_order_ratio_is_exactly_one() -> None:
    rng = np.random.default_rng(3)
    r, m = 40, 8
    exposed = np.stack([rng.permutation(12)[:m] for _ in range(r)])
    mask = np.arange(m) < rng.integers(1, m + 1, r)[:, None]
    clicks = (rng.random((r, m)) < 0.3).astype(float)
    clicks[0, 0] = 1.0
    mask[0, 0] = True
    theta = np.sort(rng.uniform(0.05, 1.0, m))[::-1]
    theta /= theta[0]
    logged = np.where(mask, exposed, -1)
    for k in (1, 3, 8, 20):
        assert ips_clicks_ratio_at_k(logged, exposed, clicks, mask, theta, k) == 1.0
        np.testing.assert_array_equal(
            ips_clicks_at_k(logged, exposed, clicks, mask, theta, k, reduce=False),
            list_clicks_at_k(logged, exposed, clicks, mask, k, reduce=False),
        )


def test_moving_a_click_up_scores_higher_with_decreasing_theta() -> None:
    exposed = np.array([[0, 1, 2, 3]])
    clicks = np.array([[0.0, 0.0, 0.0, 1.0]])
    theta = np.array([1.0, 0.7, 0.5, 0.3])
    logged = exposed.copy()
    moved = np.array([[3, 0, 1, 2]])  # the clicked item from position 3 to 0
    k = 4
    # Raw clicks@4 cannot tell the two apart; the debiased metrics can.
    assert list_clicks_at_k(moved, exposed, clicks, None, k) == list_clicks_at_k(
        logged, exposed, clicks, None, k
    )
    ips_moved = ips_clicks_at_k(moved, exposed, clicks, None, theta, k)
    ips_logged = ips_clicks_at_k(logged, exposed, clicks, None, theta, k)
    assert ips_moved == pytest.approx(1.0 / 0.3)
    assert ips_logged == 1.0
    assert ips_clicks_ratio_at_k(moved, exposed, clicks, None, theta, k) > 1.0
    # Moving a click down instead scores lower: position 0 -> 3 keeps 0.3 of it.
    top_click = np.array([[1.0, 0.0, 0.0, 0.0]])
    down = np.array([[1, 2, 3, 0]])
    assert ips_clicks_at_k(down, exposed, top_click, None, theta, k) == pytest.approx(0.3)
    assert ips_clicks_ratio_at_k(down, exposed, top_click, None, theta, k) < 1.0


def test_padding_is_ignored() -> None:
    rng = np.random.default_rng(0)
    lists, exposed, clicks, mask = two_requests()
    big = pad(lists, exposed, clicks, mask, rng)
    r = lists.shape[0]
    for k in (1, 2, 3, 5):
        for fn, extra in (
            (list_clicks_at_k, ()),
            (ips_clicks_at_k, (THETA,)),
        ):
            small = fn(lists, exposed, clicks, mask, *extra, k, reduce=False)
            padded = fn(*big, *extra, k, reduce=False)
            np.testing.assert_array_equal(padded[:r], small)
            assert np.all(np.isnan(padded[r:]))
            assert fn(*big, *extra, k) == fn(lists, exposed, clicks, mask, *extra, k)
        small_ratio = ips_clicks_ratio_at_k(lists, exposed, clicks, mask, THETA, k)
        big_ratio = ips_clicks_ratio_at_k(*big, THETA, k)
        assert small_ratio == big_ratio or (np.isnan(small_ratio) and np.isnan(big_ratio))


def test_torch_inputs() -> None:
    lists, exposed, clicks, mask = two_requests()
    t = [torch.from_numpy(a) for a in (lists, exposed, clicks, mask)]
    assert ips_clicks_at_k(*t, torch.from_numpy(THETA), 3) == pytest.approx(2.75)
    assert list_clicks_at_k(*t, 2) == 1.5


def test_empty_inputs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape in ((0, 3), (2, 0)):
            lists = np.full(shape, -1)
            exposed = np.zeros(shape, dtype=np.int64)
            clicks = np.zeros(shape)
            mask = np.zeros(shape, dtype=bool)
            assert math.isnan(list_clicks_at_k(lists, exposed, clicks, mask, 3))
            assert math.isnan(ips_clicks_at_k(lists, exposed, clicks, mask, THETA, 3))
            assert math.isnan(ips_clicks_ratio_at_k(lists, exposed, clicks, mask, THETA, 3))
            out = ips_clicks_at_k(lists, exposed, clicks, mask, THETA, 3, reduce=False)
            assert out.shape == (shape[0],)
        # Requests without clicks count as 0 (not NaN); the ratio is then undefined.
        lists = np.array([[0, 1]])
        exposed = np.array([[1, 0]])
        clicks = np.zeros((1, 2))
        assert ips_clicks_at_k(lists, exposed, clicks, None, THETA, 2) == 0.0
        assert list_clicks_at_k(lists, exposed, clicks, None, 2) == 0.0
        assert math.isnan(ips_clicks_ratio_at_k(lists, exposed, clicks, None, THETA, 2))
        # A row with logged positions but an empty model list scores 0.
        assert ips_clicks_at_k(np.full((1, 2), -1), exposed, np.ones((1, 2)), None, THETA, 2) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lists": np.zeros((3, 3), dtype=int)}, "lists must be 2-D"),
        ({"lists": np.zeros(3, dtype=int)}, "lists must be 2-D"),
        ({"exposed": np.zeros(3, dtype=int)}, "exposed must be 2-D"),
        ({"clicks": np.zeros((2, 2))}, "clicks has shape"),
        ({"mask": np.ones((2, 2), dtype=bool)}, "mask has shape"),
        ({"clicks": -np.ones((2, 3))}, "clicks must be >= 0"),
        ({"lists": np.zeros((2, 3))}, "integer candidate indices"),
        ({"exposed": np.array([[0, 0, 1], [0, 1, 0]])}, "twice"),
        ({"exposed": np.array([[-1, 0, 1], [0, 1, 0]])}, ">= 0"),
        ({"theta": np.ones((2, 2))}, "theta must be"),
        ({"theta": np.array([1.0, -0.5])}, "theta must be >= 0"),
        ({"k": 0}, "k must be"),
        ({"max_ratio": 0.0}, "max_ratio"),
    ],
)
def test_bad_inputs_raise(kwargs, match) -> None:
    lists, exposed, clicks, mask = two_requests()
    args = {"lists": lists, "exposed": exposed, "clicks": clicks, "mask": mask,
            "theta": THETA, "k": 2, "max_ratio": 10.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ips_clicks_at_k(args["lists"], args["exposed"], args["clicks"], args["mask"],
                        args["theta"], args["k"], max_ratio=args["max_ratio"])


# ------------------------------------------------------------------ propensities


def test_ctr_by_hand_and_unobserved_positions() -> None:
    pos = np.array([0, 0, 0, 0, 2, 2])
    clicks = np.array([1, 1, 0, 0, 1, 0])
    theta = fit_position_propensities(pos, clicks, np.arange(6), 4, method="ctr")
    # CTR 0.5 at 0 and 2; position 1 takes position 0's value, position 3 position 2's.
    np.testing.assert_allclose(theta, [1.0, 1.0, 1.0, 1.0])
    clicks = np.array([1, 1, 0, 0, 1, 1])
    theta = fit_position_propensities(pos, clicks, np.arange(6), 4, method="ctr")
    np.testing.assert_allclose(theta, [1.0, 1.0, 2.0, 2.0])


def test_em_one_item_is_the_ctr_ratio() -> None:
    # One item at two positions: the PBM is saturated, its MLE has theta_1 / theta_0 equal to
    # the CTR ratio (1/4) / (2/4).
    pos = np.array([0] * 4 + [1] * 4)
    clicks = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    theta = fit_position_propensities(pos, clicks, np.zeros(8, dtype=int), 2, iterations=5000,
                                      tol=1e-12)
    assert theta[0] == 1.0
    assert theta[1] == pytest.approx(0.5, abs=1e-3)


def synthetic_pbm(seed: int, n: int = 100_000, positions: int = 10, items: int = 300):
    rng = np.random.default_rng(seed)
    theta = 1.0 / (1.0 + np.arange(positions)) ** 0.7
    gamma = rng.uniform(0.05, 0.9, items)
    pos = rng.integers(0, positions, n)
    # A biased logger: half the time the better items go to the top positions, so the CTR per
    # position mixes position and relevance.
    ranked = np.argsort(-gamma)[np.minimum(pos * (items // positions)
                                           + rng.integers(0, items // positions, n), items - 1)]
    item = np.where(rng.random(n) < 0.5, rng.integers(0, items, n), ranked)
    clicks = (rng.random(n) < theta[pos] * gamma[item]).astype(np.float64)
    return theta, pos, clicks, item


def test_em_recovers_known_theta() -> None:
    theta, pos, clicks, item = synthetic_pbm(0)
    est = fit_position_propensities(pos, clicks, item, len(theta))
    assert est.shape == theta.shape
    assert est[0] == 1.0
    np.testing.assert_allclose(est, theta, atol=0.05)
    # The naive CTR ratio is biased by the logger here (a check that the test has teeth).
    ctr = fit_position_propensities(pos, clicks, item, len(theta), method="ctr")
    assert np.abs(ctr - theta).max() > 0.1
    # String item ids and [n, 2] keys work the same way.
    est_str = fit_position_propensities(pos, clicks, np.char.add("i", item.astype(str)), 10)
    np.testing.assert_allclose(est_str, est)
    est_pair = fit_position_propensities(pos, clicks, np.stack([item, item * 0], 1), 10)
    np.testing.assert_allclose(est_pair, est)


def test_em_without_identification_falls_back_to_ctr() -> None:
    theta, pos, clicks, _ = synthetic_pbm(1, n=5_000)
    per_impression = np.arange(len(pos))  # every key seen once
    with pytest.warns(UserWarning, match="per-position click-through rate"):
        est = fit_position_propensities(pos, clicks, per_impression, len(theta))
    ctr = fit_position_propensities(pos, clicks, per_impression, len(theta), method="ctr")
    np.testing.assert_array_equal(est, ctr)


def test_sparse_items_warn_and_the_relevance_prior_helps() -> None:
    # Items seen ~2.5 times each, placed at random (so the position CTR is unbiased here):
    # plain EM gives most clicks to item relevance and overestimates theta.
    rng = np.random.default_rng(0)
    theta = 1.0 / (1.0 + np.arange(10)) ** 0.7
    gamma = rng.uniform(0.05, 0.9, 20_000)
    pos = rng.integers(0, 10, 50_000)
    item = rng.integers(0, 20_000, 50_000)
    clicks = (rng.random(50_000) < theta[pos] * gamma[item]).astype(float)
    with pytest.warns(UserWarning, match="relevance_prior"):
        plain = fit_position_propensities(pos, clicks, item, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shrunk = fit_position_propensities(pos, clicks, item, 10, relevance_prior=20)
    assert shrunk[0] == 1.0
    assert np.abs(shrunk - theta).max() < 0.5 * np.abs(plain - theta).max()
    # On well-identified data a small prior changes little.
    theta, pos, clicks, item = synthetic_pbm(0)
    np.testing.assert_allclose(
        fit_position_propensities(pos, clicks, item, 10, relevance_prior=1.0), theta, atol=0.05
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (([0, 1], [1, 0], [0, 0], 0), "max_position"),
        (([0, 2], [1, 0], [0, 0], 2), r"\[0, 2\)"),
        (([0, -1], [1, 0], [0, 0], 2), r"\[0, 2\)"),
        (([0, 1], [1, 0, 1], [0, 0], 2), "clicks has shape"),
        (([0, 1], [1, 0], [0, 0, 0], 2), "item_keys"),
        (([0, 1], [1, 0.5], [0, 0], 2), "binary"),
        (([[0, 1]], [[1, 0]], [0], 2), "1-D"),
        (([], [], [], 2), "no observations"),
        (([0, 1], [0, 0], [0, 0], 2), "no clicks"),
        (([0, 1], [0, 1], [0, 0], 2), "position 0"),
    ],
)
def test_fit_bad_inputs_raise(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        fit_position_propensities(*[np.asarray(a) if isinstance(a, list) else a for a in args])


def test_fit_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="method"):
        fit_position_propensities([0], [1], [0], 1, method="regression")
    with pytest.raises(ValueError, match="relevance_prior"):
        fit_position_propensities([0], [1], [0], 1, relevance_prior=-1.0)
