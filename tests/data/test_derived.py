import numpy as np
import pytest

from genrerank.data.derived import DERIVED_FEATURES, derived_features

D = 86400
NAMES = list(DERIVED_FEATURES)


def tiny() -> dict:
    """4 requests, items A=0 (category 1) and B=1 (category 2).

    r0 train  t=D   user 0: A@0 click, B@1
    r1 train  t=D   user 1: B@0 click, A@1 click   (same second as r0: sees r0 by index)
    r2 test   t=3D  user 1: A@0, B not shown
    r3 valid  t=2D  user 0: A@0, B@1 click
    """
    return dict(
        request=np.array([0, 0, 1, 1, 2, 2, 3, 3]),
        request_time=np.array([D, D, 3 * D, 2 * D]),
        request_split=np.array(["train", "train", "test", "valid"]),
        user=np.array([0, 1, 1, 0]),
        item=np.array([0, 1, 1, 0, 0, 1, 0, 1]),
        position=np.array([0, 1, 0, 1, 0, -1, 0, 1]),
        click=np.array([1, 0, 1, 1, 0, 0, 0, 1.0]),
        category=np.array([1, 2, 2, 1, 1, 2, 1, 2]),
    )


def test_hand_computed_tiny_example() -> None:
    f = derived_features(NAMES, **tiny(), prior_impressions=2, prior_clicks=1)
    # Global CTR before r0: 0; after r0: 1/2; after r0, r1 (what r2, r3 see): 3/4. a = 2.
    # r1 sees r0: A (1 click / 1 imp) -> (1 + 1) / 3; B (0 / 1) -> 1 / 3.
    # r2, r3 see r0, r1: A (2 / 2) -> (2 + 1.5) / 4; B (1 / 2) -> 2.5 / 4.
    np.testing.assert_allclose(
        f["item_ctr"], [0, 0, 1 / 3, 2 / 3, 0.875, 0.625, 0.875, 0.625], rtol=1e-6
    )
    ln2, ln3 = np.log(2), np.log(3)
    np.testing.assert_allclose(
        f["item_impressions"], [0, 0, ln2, ln2, ln3, ln3, ln3, ln3], rtol=1e-6
    )
    # Position CTRs known before r0: 0; before r1: pos 0 (1 + 1) / 3, pos 1 (0 + 1) / 3.
    # r0 expected clicks 0 each; r1: B@0 2/3, A@1 1/3.
    # r1 (a m = 1): A (1 + 1) / (0 + 1), B (0 + 1) / (0 + 1). r0: no history -> 1.
    # r2, r3 (a m = 1.5): A (2 + 1.5) / (1/3 + 1.5) = 21/11, B (1 + 1.5) / (2/3 + 1.5) = 15/13.
    np.testing.assert_allclose(
        f["item_coec"], [1, 1, 1, 2, 21 / 11, 15 / 13, 21 / 11, 15 / 13], rtol=1e-6
    )
    # Category shares of clicks: before r1 {1: 1}; before r2, r3 {1: 2/3, 2: 1/3}. b = 1.
    # r1 (user 1, no clicks yet): B 0, A 1. r2 (user 1: A, B one click each): A (1 + 2/3) / 3,
    # B (1 + 1/3) / 3. r3 (user 0: one click on A): A (1 + 2/3) / 2, B (0 + 1/3) / 2.
    np.testing.assert_allclose(
        f["user_category_share"], [0, 0, 0, 1, 5 / 9, 4 / 9, 5 / 6, 1 / 6], rtol=1e-6
    )
    # Both items first shown at t=D. r0 has no history (unseen -> 0), r1 is at t=D (0 days).
    np.testing.assert_allclose(f["item_age"], [0, 0, 0, 0, ln3, ln3, ln2, ln2], rtol=1e-6)
    assert all(v.dtype == np.float32 for v in f.values())


def test_unknown_category_gets_zero_share() -> None:
    data = tiny()
    data["category"] = np.array([1, 2, 2, 1, 0, 2, 1, 0])
    f = derived_features(["user_category_share"], **data, prior_clicks=1)
    assert f["user_category_share"][4] == 0 and f["user_category_share"][7] == 0
    assert f["user_category_share"][6] > 0


def test_eval_history_past_or_all() -> None:
    # A test request logged before every training request (as under a user split).
    data = tiny()
    data["request_time"] = np.array([D, D, D // 2, 2 * D])
    past = derived_features(["item_impressions", "item_age"], **data, eval_history="past")
    every = derived_features(["item_impressions", "item_age"], **data, eval_history="all")
    assert past["item_impressions"][4] == 0 and past["item_impressions"][5] == 0
    np.testing.assert_allclose(every["item_impressions"][4:6], np.log(3), rtol=1e-6)
    assert every["item_age"][4] == 0  # first shown after the request: clipped, not negative
    # The valid request r3 comes after all training: both choices agree.
    np.testing.assert_array_equal(past["item_age"][6:], every["item_age"][6:])


def random_log(seed: int, n_requests: int = 40) -> dict:
    rng = np.random.default_rng(seed)
    n_items, per = 5, 3
    request = np.repeat(np.arange(n_requests), per)
    item = np.concatenate([rng.permutation(n_items)[:per] for _ in range(n_requests)])
    position = np.concatenate([rng.permutation([0, 1, -1]) for _ in range(n_requests)])
    click = np.where(position >= 0, rng.integers(0, 2, len(item)), 0).astype(float)
    return dict(
        request=request,
        request_time=rng.integers(0, 8, n_requests) * (D // 2),  # many ties
        request_split=rng.choice(["train", "train", "valid", "test"], n_requests),
        user=rng.integers(0, 4, n_requests),
        item=item * 7 + 100,  # codes need not be dense
        position=position,
        click=click,
        category=(item % 3),  # item 0 and 3 have unknown category
    )


def brute_force(data: dict, a: float, b: float) -> dict[str, np.ndarray]:
    """The definitions, one row at a time."""
    req, t, split = data["request"], data["request_time"], data["request_split"]
    user, item, pos, click, cat = (
        data[k] for k in ("user", "item", "position", "click", "category")
    )

    def visible(j: int) -> list[int]:
        if split[j] == "train":
            return [k for k in range(len(t)) if split[k] == "train" and (t[k], k) < (t[j], j)]
        return [k for k in range(len(t)) if split[k] == "train" and t[k] <= t[j]]

    def events(j: int) -> list[int]:
        v = set(visible(j))
        return [e for e in range(len(req)) if req[e] in v and pos[e] >= 0]

    def ctr(ev: list[int]) -> float:
        return sum(click[e] for e in ev) / len(ev) if ev else 0.0

    out = {n: np.zeros(len(req)) for n in NAMES}
    for i in range(len(req)):
        j = req[i]
        ev = events(j)
        m = ctr(ev)
        mine = [e for e in ev if item[e] == item[i]]
        clicks = sum(click[e] for e in mine)
        out["item_ctr"][i] = (clicks + a * m) / (len(mine) + a)
        out["item_impressions"][i] = np.log1p(len(mine))
        expected = 0.0
        for e in mine:
            before = events(req[e])
            at_p = [f for f in before if pos[f] == pos[e]]
            expected += (sum(click[f] for f in at_p) + a * ctr(before)) / (len(at_p) + a)
        den = expected + a * m
        out["item_coec"][i] = (clicks + a * m) / den if den > 0 else 1.0
        if mine:
            days = (t[j] - min(t[req[e]] for e in mine)) / D
            out["item_age"][i] = np.log1p(max(days, 0.0))
        users = [e for e in ev if user[req[e]] == user[j]]
        total = sum(click[e] for e in ev)
        g = sum(click[e] for e in ev if cat[e] == cat[i]) / total if total else 0.0
        share = (sum(click[e] for e in users if cat[e] == cat[i]) + b * g) / (
            sum(click[e] for e in users) + b
        )
        out["user_category_share"][i] = share if cat[i] != 0 else 0.0
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_row_by_row_definition(seed: int) -> None:
    data = random_log(seed)
    got = derived_features(NAMES, **data, prior_impressions=3, prior_clicks=2)
    want = brute_force(data, 3, 2)
    for name in NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_evaluation_labels_change_no_feature() -> None:
    data = random_log(2)
    base = derived_features(NAMES, **data)
    evaluated = np.isin(data["request_split"][data["request"]], ["valid", "test"])
    shown = data["position"] >= 0
    assert (evaluated & shown).sum() > 10
    flipped = dict(data, click=np.where(evaluated & shown, 1 - data["click"], data["click"]))
    after = derived_features(NAMES, **flipped)
    for name in NAMES:
        np.testing.assert_array_equal(base[name], after[name], err_msg=name)


def test_train_label_changes_only_later_requests() -> None:
    data = random_log(3)
    t, split, req = data["request_time"], data["request_split"], data["request"]
    train = np.flatnonzero(split == "train")
    order = train[np.lexsort((train, t[train]))]
    r = int(order[len(order) // 3])  # a train request with later train requests after it
    base = derived_features(NAMES, **data)
    hit = (req == r) & (data["position"] >= 0)
    flipped = np.where(hit, 1 - data["click"], data["click"])
    after = derived_features(NAMES, **dict(data, click=flipped))
    later_train = np.array([split[k] == "train" and (t[k], k) > (t[r], r) for k in range(len(t))])
    may_change = later_train[req] | (split[req] != "train")
    changed = np.zeros(len(req), dtype=bool)
    for name in NAMES:
        changed |= base[name] != after[name]
    assert changed.any()
    assert not (changed & ~may_change).any(), np.flatnonzero(changed & ~may_change)
    assert (changed & later_train[req]).any()


def test_deterministic_and_independent_of_row_order() -> None:
    data = random_log(4)
    a = derived_features(NAMES, **data)
    b = derived_features(NAMES, **data)
    perm = np.random.default_rng(0).permutation(len(data["request"]))
    shuffled = {
        k: (v[perm] if k in ("request", "item", "position", "click", "category") else v)
        for k, v in data.items()
    }
    c = derived_features(NAMES, **shuffled)
    for name in NAMES:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name][perm], c[name])


def test_unknown_name_and_missing_inputs() -> None:
    data = tiny()
    with pytest.raises(ValueError, match="item_ctr"):
        derived_features(["item_popularity"], **data)
    with pytest.raises(ValueError, match="needs click"):
        derived_features(["item_coec"], **dict(data, click=None))
    with pytest.raises(ValueError, match="needs category"):
        derived_features(["user_category_share"], **dict(data, category=None))
    # Features without labels work without click and category.
    f = derived_features(["item_impressions", "item_age"], **dict(data, click=None, category=None))
    assert set(f) == {"item_impressions", "item_age"}
    with pytest.raises(ValueError, match="split"):
        derived_features(["item_age"], **dict(data, request_split=np.array(["train"] * 3 + ["x"])))
