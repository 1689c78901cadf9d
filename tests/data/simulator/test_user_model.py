"""Each effect of the ground-truth user model, tested on hand-built requests."""

from __future__ import annotations

import numpy as np
import pytest

from genrerank.data.simulator import RequestState, UserModel, get_preset

CFG = get_preset("kuaishou")


def make_state(
    appeal,
    category=None,
    creator=None,
    duration=None,
    diversity=1.0,
    scroll_bias=2.0,
    like_bias=0.0,
) -> RequestState:
    """A batch of requests from [B, n] arrays; distinct categories / creators unless given."""
    appeal = np.atleast_2d(np.asarray(appeal, dtype=np.float64))
    B, n = appeal.shape
    grid = np.broadcast_to(np.arange(1, n + 1), (B, n))

    def arr(x, default, dtype=np.float64):
        x = default if x is None else x
        return np.broadcast_to(np.asarray(x, dtype=dtype), (B, n)).copy()

    def per_request(x):
        return np.broadcast_to(np.asarray(x, dtype=np.float64), (B,)).copy()

    return RequestState(
        index=np.arange(B),
        time=np.zeros(B, dtype=np.int64),
        user=np.zeros(B, dtype=np.int64),
        diversity=per_request(diversity),
        scroll_bias=per_request(scroll_bias),
        like_bias=per_request(like_bias),
        taste=np.zeros((B, 2)),
        items=grid.copy(),
        category=arr(category, grid, np.int64),
        creator=arr(creator, grid, np.int64),
        duration=arr(duration, 60.0),
        quality=np.zeros((B, n)),
        is_cold_start=np.zeros((B, n), dtype=bool),
        is_long_tail=np.zeros((B, n), dtype=bool),
        appeal=appeal,
        upstream=appeal.copy(),
    )


def model(complementarity=None, n_categories=12, **overrides) -> UserModel:
    cfg = get_preset("kuaishou", **overrides)
    K = np.zeros((n_categories + 1, n_categories + 1))
    if complementarity:
        for (a, b), k in complementarity.items():
            K[a, b] = K[b, a] = k
    return UserModel(cfg, K)


def test_satiation_repeated_category_lowers_appeal_and_gain():
    um = model()
    # Candidates 0 and 1 share category 1; candidate 2 (same appeal as 0) is category 2.
    st = make_state([[-2.0, -2.0, -2.0]], category=[[1, 1, 2]])
    after_same = um.expected_signals(st, np.array([[0, 1]]))
    after_other = um.expected_signals(st, np.array([[2, 1]]))
    assert after_same["appeal"][0, 1] < after_other["appeal"][0, 1]
    # The same item at the same position, reached with the same probability, earns less.
    assert after_same["reach"][0, 1] == pytest.approx(after_other["reach"][0, 1])
    assert after_same["gain"][0, 1] < after_other["gain"][0, 1]
    penalty = after_other["appeal"][0, 1] - after_same["appeal"][0, 1]
    assert penalty == pytest.approx(CFG.satiation_category)


def test_satiation_by_creator_and_decay_with_distance():
    um = model()
    st = make_state([[-2.0] * 4], category=[[1, 2, 3, 4]], creator=[[7, 8, 9, 7]])
    z = um.contextual_appeal(st, np.array([[0, 3, 1, 2]]))  # creator 7 twice in a row
    assert -2.0 - z[0, 1] == pytest.approx(CFG.satiation_creator)
    st3 = make_state([[-2.0] * 4] * 3, category=[[1, 2, 3, 1]], creator=[[1, 2, 3, 4]])
    lists = np.array([[0, 3, 1, 2], [0, 1, 3, 2], [0, 1, 2, 3]])  # repeat at distance 1, 2, 3
    z = um.contextual_appeal(st3, lists)
    pen = -2.0 - np.array([z[0, 1], z[1, 2], z[2, 3]])
    assert pen[0] > pen[1] > pen[2] > 0
    assert pen[1] == pytest.approx(CFG.satiation_category * CFG.satiation_decay)


def test_diversity_appetite_scales_satiation():
    um = model()
    st = make_state([[-2.0, -2.0]] * 2, category=[[1, 1]], diversity=[0.5, 2.0])
    z = um.contextual_appeal(st, np.array([[0, 1], [0, 1]]))
    pen = -2.0 - z[:, 1]
    assert pen[1] > pen[0] > 0
    assert pen[1] == pytest.approx(4 * pen[0])


def test_complementary_pair_gets_boost_when_near():
    um = model(complementarity={(1, 2): 0.6})
    st = make_state([[-2.0] * 4], category=[[1, 2, 3, 4]])
    near = um.contextual_appeal(st, np.array([[0, 1]]))  # 1 then its complement 2
    plain = um.contextual_appeal(st, np.array([[2, 1]]))  # 3 then 2: no pair
    assert near[0, 1] - plain[0, 1] == pytest.approx(0.6)
    far = um.contextual_appeal(st, np.array([[0, 2, 3, 1]]))  # complement three slots later
    assert 0 < far[0, 3] - (-2.0) < 0.6 * CFG.complementarity_decay
    g_near = um.expected_gain(st, np.array([[0, 1]]))
    g_plain = um.expected_gain(st, np.array([[2, 1]]))
    assert g_near[0] > g_plain[0]


def test_reach_decreases_with_position():
    um = model()
    st = make_state([[-2.5] * 6])
    reach = um.expected_signals(st, np.arange(6)[None])["reach"][0]
    assert reach[0] == 1.0
    assert np.all(np.diff(reach) < 0)


def test_low_appeal_prefix_stops_users_earlier():
    um = model()
    # Same last two items; the first three are dull in row 0 and appealing in row 1.
    appeal = np.array([[-6.0, -6.0, -6.0, -2.0, -2.0], [0.0, 0.0, 0.0, -2.0, -2.0]])
    st = make_state(appeal)
    reach = um.expected_signals(st, np.tile(np.arange(5), (2, 1)))["reach"]
    assert reach[0, 3] < reach[1, 3] and reach[0, 4] < reach[1, 4]


def test_position_bias_examination():
    um = model()
    st = make_state([[-2.0] * 5])
    sig = um.expected_signals(st, np.arange(5)[None])
    click_given_reach = sig["click"][0] / sig["reach"][0]
    assert np.all(np.diff(click_given_reach) < 0)  # same appeal, later slot: fewer clicks
    steep = model(examination_power=1.0).expected_signals(st, np.arange(5)[None])
    assert steep["click"][0, 4] / steep["reach"][0, 4] < click_given_reach[4]


def test_watch_time_depends_on_duration_and_long_view_needs_length():
    um = model()
    st = make_state([[-1.0, -1.0, -1.0]], duration=[[4.0, 30.0, 300.0]])
    sig = um.expected_signals(st, np.array([[0, 1, 2]]))
    watch_per_view = sig["watch_time"][0] / sig["click"][0]
    assert watch_per_view[0] < watch_per_view[1] < watch_per_view[2]
    assert watch_per_view[0] <= 4.0
    assert sig["long_view"][0, 0] == 0.0  # a 4 s video can never be watched > 5 s
    assert sig["long_view"][0, 2] / sig["click"][0, 2] > sig["long_view"][0, 1] / sig["click"][0, 1]


def test_sampled_signals_are_consistent():
    um = model()
    st = make_state(np.full((4000, 6), -1.0), duration=np.linspace(3, 400, 6)[None])
    fb = um.sample(st, np.tile(np.arange(6), (4000, 1)), rng=7)
    click, like, lv, watch, reached = (
        fb["click"], fb["like"], fb["long_view"], fb["watch_time"], fb["reached"]
    )
    assert set(fb) == {"click", "like", "long_view", "watch_time", "reached"}
    assert np.all(click[~reached] == 0)
    assert np.all(like <= click) and np.all(lv <= click)
    assert np.all((watch > 0) == (click > 0))
    assert np.all(watch <= st.duration + 1e-9)
    assert np.all(lv == ((watch > CFG.long_view_threshold_s) & (click > 0)))
    assert like.sum() > 0 and lv.sum() > 0
    # Reached is a prefix: once a user stops, nothing later is reached.
    assert np.all(np.diff(reached.astype(int), axis=1) <= 0)


@pytest.mark.parametrize("preset", ["kuaishou", "avito"])
def test_exact_expected_gain_matches_monte_carlo(preset):
    um = model(complementarity={(1, 2): 0.5}, **({} if preset == "kuaishou" else
                                                  {"labels": ("click",), "examination_power": 1.0}))
    base = make_state(
        [[-1.0, -0.5, -1.5, -0.8, -2.0, -1.2]],
        category=[[1, 2, 1, 3, 2, 1]],
        creator=[[1, 2, 1, 3, 4, 5]],
        duration=[[4.0, 20.0, 60.0, 120.0, 300.0, 9.0]],
        diversity=1.3,
        scroll_bias=1.0,
        like_bias=1.0,
    )
    reps = 60_000
    st = base.take(np.zeros(reps, dtype=np.int64))
    lists = np.tile(np.array([[0, 1, 2, 3, 4, 5]]), (reps, 1))
    fb = um.sample(st, lists, rng=123)
    sig = um.expected_signals(base, lists[:1])
    realised = um.realised_gain(fb)
    exact = um.expected_gain(base, lists[:1])[0]
    assert exact == pytest.approx(sig["gain"].sum())
    se = realised.std() / np.sqrt(reps)
    assert abs(realised.mean() - exact) < 4 * se
    for k in um.config.labels:
        per_pos = fb[k].astype(np.float64)
        se_k = per_pos.std(axis=0) / np.sqrt(reps) + 1e-12
        assert np.all(np.abs(per_pos.mean(axis=0) - sig[k][0]) < 4.5 * se_k + 1e-9), k
    reach_se = fb["reached"].std(axis=0) / np.sqrt(reps) + 1e-12
    assert np.all(np.abs(fb["reached"].mean(axis=0) - sig["reach"][0]) < 4.5 * reach_se)


def test_mask_ignores_padded_positions():
    um = model()
    st = make_state(np.array([[-1.0, -2.0, -1.5, -0.5, -3.0]] * 2), category=[[1, 1, 2, 2, 3]])
    short = um.expected_gain(st, np.array([[3, 0], [3, 0]]))
    padded = np.array([[3, 0, -1, 99], [3, 4, 0, 2]])  # junk in padded slots
    mask = np.array([[True, True, False, False], [True, False, True, False]])
    gains = um.expected_gain(st, padded, mask)
    assert np.allclose(gains, short)
    sig = um.expected_signals(st, padded, mask)
    assert np.all(sig["gain"][~mask] == 0) and np.all(sig["reach"][~mask] == 0)
    assert sig["gain"][1, 2] == pytest.approx(um.expected_signals(st, np.array([[3, 0]] * 2))[
        "gain"][1, 1])
    fb = um.sample(st, padded, rng=0, mask=mask)
    assert np.all(fb["click"][~mask] == 0) and not fb["reached"][~mask].any()


def test_common_random_numbers():
    um = model()
    st = make_state(np.full((500, 6), -1.0), category=[[1, 2, 3, 4, 5, 6]])
    a = np.tile(np.arange(6), (500, 1))
    b = a.copy()
    b[:, 5] = 4
    b[:, 4] = 5  # same prefix of four, last two swapped
    fa, fb = um.sample(st, a, rng=5), um.sample(st, b, rng=5)
    for k in fa:
        assert np.array_equal(fa[k][:, :4], fb[k][:, :4])
    again = um.sample(st, a, rng=5)
    assert all(np.array_equal(fa[k], again[k]) for k in fa)


def test_bad_lists_raise():
    um = model()
    st = make_state([[-1.0, -2.0, -3.0]])
    with pytest.raises(ValueError, match="twice"):
        um.expected_gain(st, np.array([[0, 0]]))
    with pytest.raises(ValueError, match="candidate indices"):
        um.expected_gain(st, np.array([[0, 3]]))
    with pytest.raises(ValueError):
        um.expected_gain(st, np.array([0, 1]))
