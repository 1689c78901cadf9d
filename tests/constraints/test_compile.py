"""Compiled constraints: each kind on hand-built requests, the feasibility search and the
look-ahead masks against a brute-force enumerator, the conflict explanations."""

from __future__ import annotations

import numpy as np
import pytest

from genrerank.constraints import (
    ConstraintSearchLimit,
    ConstraintSet,
    InfeasibleConstraints,
    Quota,
    Spacing,
    compile_constraints,
)
from tests.constraints._random import (
    CASES,
    Request,
    brute_allowed,
    brute_lists,
    random_request,
    random_set,
)


def _req(n: int, *, category: list[int] | None = None, creator: list[int] | None = None,
         cold: list[int] | None = None, tail: list[int] | None = None,
         mask: list[int] | None = None, m: int = 3) -> Request:
    return Request(
        category=np.array(category if category is not None else [0] * n),
        creator=np.array(creator if creator is not None else list(range(n))),
        cold=np.array(cold if cold is not None else [0] * n, dtype=bool),
        tail=np.array(tail if tail is not None else [0] * n, dtype=bool),
        mask=np.array(mask if mask is not None else [1] * n, dtype=bool),
        ids=[f"v{i}" for i in range(n)], m=m)


def _allowed(rc, prefix: list[int]) -> set[int]:  # noqa: ANN001
    return set(np.flatnonzero(rc.allowed(prefix)).tolist())


# --------------------------------------------------------------------------- each kind


def test_quota_maximum_inside_a_window() -> None:
    req = _req(6, category=[0, 0, 0, 1, 1, 2], m=4)
    rc = req.compile(ConstraintSet(quotas=(Quota("category", 0, max=1, within=3),)))
    rc.check_feasible()
    assert _allowed(rc, []) == set(range(6))
    assert _allowed(rc, [0]) == {3, 4, 5}  # a second category 0 only from position 3
    assert _allowed(rc, [0, 3]) == {4, 5}
    assert _allowed(rc, [0, 3, 4]) == {1, 2, 5}
    assert rc.violations([0, 1, 3, 4]) == ["quotas[0] (category 0: max 1 within 3): 2 in the "
                                           "first 3"]
    assert rc.violations([0, 3, 4, 1]) == []


def test_quota_minimum_inside_a_window_forces_the_last_slot() -> None:
    req = _req(5, cold=[0, 0, 0, 0, 1], m=3)
    rc = req.compile(ConstraintSet(quotas=(Quota("cold_start", min=1, within=2),)))
    assert _allowed(rc, []) == set(range(5))
    assert _allowed(rc, [0]) == {4}
    assert _allowed(rc, [4]) == {0, 1, 2, 3}
    assert rc.violations([0, 1, 4])  # too late


def test_quota_on_creator_and_long_tail_with_min_and_max() -> None:
    req = _req(6, creator=[5, 5, 5, 1, 2, 3], tail=[1, 1, 0, 0, 0, 1], m=4)
    cs = ConstraintSet(quotas=(Quota("creator", 5, min=1, max=1), Quota("long_tail", min=2)))
    rc = req.compile(cs)
    rc.check_feasible()
    for lst in brute_lists(rc):
        assert sum(req.creator[i] == 5 for i in lst) == 1
        assert sum(req.tail[i] for i in lst) >= 2
    assert _allowed(rc, [0]) == {3, 4, 5}  # creator 5 is used up; another tail item is needed


def test_max_per_creator_caps_each_creator() -> None:
    req = _req(5, creator=[0, 0, 0, 1, 2], m=4)
    rc = req.compile(ConstraintSet(max_per_creator=2))
    assert _allowed(rc, [0, 1]) == {3, 4}
    assert rc.violations([0, 1, 2, 3]) == ["max_per_creator (2): creator 0 has 3"]
    with pytest.raises(InfeasibleConstraints, match=r"max_per_creator \(2\)") as info:
        req.compile(ConstraintSet(max_per_creator=2), m=5).check_feasible()
    assert info.value.conflict == ("max_per_creator (2)",)


def test_required_and_forbidden_ids() -> None:
    req = _req(5, m=2)
    rc = req.compile(ConstraintSet(required=("v4",), forbidden=("v1", "zz")))
    assert _allowed(rc, []) == {0, 2, 3, 4}
    assert _allowed(rc, [0]) == {4}
    assert rc.violations([0, 2]) == ["required[0] ('v4') is not listed"]
    assert rc.violations([1, 4]) == ["forbidden item 'v1' is listed"]
    with pytest.raises(InfeasibleConstraints, match="'v7' is not among the request's candidates"):
        req.compile(ConstraintSet(required=("v7",))).check_feasible()
    with pytest.raises(InfeasibleConstraints, match="'v2' is also forbidden"):
        req.compile(ConstraintSet(required=("v2",), forbidden=("v2",))).check_feasible()
    with pytest.raises(InfeasibleConstraints, match="3 required items do not fit"):
        req.compile(ConstraintSet(required=("v0", "v1", "v2"))).check_feasible()
    with pytest.raises(InfeasibleConstraints, match="forbidden"):
        req.compile(ConstraintSet(forbidden=("v0", "v1", "v2", "v3"))).check_feasible()


def test_a_padded_candidate_is_never_allowed_nor_required() -> None:
    req = _req(4, mask=[1, 0, 1, 1], m=3)
    rc = req.compile(ConstraintSet(forbidden=("v0",)), m=2)
    assert _allowed(rc, []) == {2, 3}
    with pytest.raises(InfeasibleConstraints, match="not among"):
        req.compile(ConstraintSet(required=("v1",))).check_feasible()
    assert req.compile(ConstraintSet(forbidden=("v0",)), m=9).list_length == 3  # min(m, real)


def test_spacing_keeps_equal_values_apart() -> None:
    req = _req(4, category=[0, 0, 1, 1], m=4)
    rc = req.compile(ConstraintSet(spacing=(Spacing("category", 2),)))
    assert _allowed(rc, []) == {0, 1, 2, 3}
    assert _allowed(rc, [0]) == {2, 3}
    assert _allowed(rc, [0, 2]) == {1}
    assert rc.violations([0, 1, 2, 3]) == [
        "spacing[0] (category distance 2): category 0 at positions 0 and 1",
        "spacing[0] (category distance 2): category 1 at positions 2 and 3"]
    stuck = _req(4, category=[0, 0, 0, 1], m=4)
    with pytest.raises(InfeasibleConstraints, match=r"spacing\[0\]"):
        stuck.compile(ConstraintSet(spacing=(Spacing("category", 2),))).check_feasible()
    # distance 3 over creators: x . . x
    req = _req(5, creator=[7, 7, 1, 2, 3], m=5)
    rc = req.compile(ConstraintSet(spacing=(Spacing("creator", 3),)))
    assert all(abs(lst.index(0) - lst.index(1)) >= 3 for lst in brute_lists(rc))
    assert _allowed(rc, [0]) == {2, 3, 4}
    assert _allowed(rc, [0, 2]) == {3, 4}  # creator 7 again only from position 3


def test_look_ahead_avoids_the_dead_end_greedy_walks_into() -> None:
    # The only cold-start item shares creator 0 (cap 1) with the best item: taking the best
    # item first would leave no way to meet the cold-start minimum.
    req = _req(5, creator=[0, 0, 1, 2, 3], cold=[0, 1, 0, 0, 0], m=3)
    rc = req.compile(ConstraintSet(quotas=(Quota("cold_start", min=1, within=3),),
                                   max_per_creator=1))
    assert 0 not in _allowed(rc, [])
    scores = np.array([9.0, 0.0, 1.0, 2.0, 3.0])
    prefix: list[int] = []
    for _ in range(3):
        prefix.append(int(np.where(rc.allowed(prefix), scores, -np.inf).argmax()))
    assert prefix == [4, 3, 1] and rc.violations(prefix) == []


def test_conflict_names_a_minimal_set_of_constraints() -> None:
    req = _req(6, category=[0, 0, 1, 2, 2, 1], cold=[1, 1, 0, 0, 0, 0], m=4)
    cs = ConstraintSet(quotas=(Quota("long_tail", max=3), Quota("cold_start", min=2),
                               Quota("category", 0, max=1)),
                       spacing=(Spacing("creator", 2),), forbidden=("v5",))
    rc = req.compile(cs, request_id="r7")
    with pytest.raises(InfeasibleConstraints) as info:
        rc.check_feasible()
    assert info.value.conflict == ("quotas[1] (cold_start: min 2)",
                                   "quotas[2] (category 0: max 1)")
    assert info.value.request_id == "r7"
    assert "request 'r7'" in str(info.value) and "\n" not in str(info.value)
    assert not rc.allowed([]).any() and not rc.feasible()


def test_classes_group_interchangeable_candidates() -> None:
    rng = np.random.default_rng(0)
    n = 500
    rc = compile_constraints(
        ConstraintSet(quotas=(Quota("category", 1, max=3, within=10), Quota("cold_start",
                                                                            min=2))),
        category=rng.integers(0, 30, n), creator=rng.integers(0, 200, n),
        is_cold_start=rng.random(n) < 0.1, is_long_tail=rng.random(n) < 0.3, item_ids=None,
        candidate_mask=None, list_length=50)
    assert rc.S == 4  # (category 1 or not) x (cold or not): the search is over 4 classes
    rc.check_feasible()


def test_for_length_and_empty_sets() -> None:
    req = _req(6, category=[0, 0, 1, 1, 2, 2], m=6)
    cs = ConstraintSet(quotas=(Quota("category", 0, min=2, within=2),))
    rc = req.compile(cs)
    assert rc.for_length(6) is rc and rc.for_length(2).list_length == 2
    assert _allowed(rc.for_length(2), [0]) == {1}
    assert req.compile(ConstraintSet()).is_empty()
    with pytest.raises(ValueError, match="needs|read"):
        compile_constraints(cs, category=None, creator=None, is_cold_start=None,
                            is_long_tail=None, item_ids=None, candidate_mask=[1, 1],
                            list_length=2)
    with pytest.raises(ValueError, match="item_ids"):
        compile_constraints(ConstraintSet(required=("a",)), category=None, creator=None,
                            is_cold_start=None, is_long_tail=None, item_ids=None,
                            candidate_mask=[1, 1], list_length=2)


def test_the_node_budget_stops_a_search() -> None:
    req = _req(8, category=[0, 1, 2, 3, 0, 1, 2, 3], m=8)
    rc = req.compile(ConstraintSet(spacing=(Spacing("category", 4),)), max_nodes=2)
    with pytest.raises(ConstraintSearchLimit, match="search steps"):
        rc.check_feasible()


# --------------------------------------------------------------------------- brute force


def test_feasibility_and_look_ahead_match_brute_force_enumeration() -> None:
    """Random tiny requests (n <= 7, L <= 5) and constraint sets: the search decides exactly
    what the enumerator finds, and allowed(prefix) is exactly the set of next items of valid
    lists, for every prefix of a valid list and for random (often invalid) prefixes."""
    rng = np.random.default_rng(11)
    feasible = infeasible = prefixes = 0
    for _ in range(CASES * 4):
        req = random_request(rng, n_max=7, m_max=5)
        rc = req.compile(random_set(rng, req))
        valid = brute_lists(rc)
        assert rc.feasible() == bool(valid), rc
        feasible += bool(valid)
        infeasible += not valid
        checks = {p[:t] for p in valid for t in range(len(p))}
        for _ in range(5):
            t = int(rng.integers(0, rc.list_length + 1))
            checks.add(tuple(int(x) for x in rng.choice(req.n, min(t, req.n), replace=False)))
        for prefix in checks:
            assert (rc.allowed(list(prefix)) == brute_allowed(valid, prefix, req.n)).all(), (
                rc, prefix)
        prefixes += len(checks)
    assert feasible > CASES and infeasible > CASES // 4  # both sides are exercised


def test_typical_request_needs_few_search_nodes() -> None:
    """n = 60, m = 6, a cap, a windowed cold-start minimum and a category maximum: the whole
    constrained greedy walk (feasibility + 6 look-ahead steps) of 20 requests expands few
    search states (the time per step is measured by the benchmarks, not here)."""
    rng = np.random.default_rng(3)
    cs = ConstraintSet(quotas=(Quota("cold_start", min=1, within=3), Quota("category", 0, max=2)),
                       max_per_creator=2)
    for _ in range(20):
        req = Request(rng.integers(0, 20, 60), rng.integers(0, 30, 60), rng.random(60) < 0.1,
                      rng.random(60) < 0.3, np.ones(60, bool), [f"v{i}" for i in range(60)], 6)
        rc = req.compile(cs)
        scores = rng.standard_normal(60)
        prefix: list[int] = []
        for _ in range(6):
            prefix.append(int(np.where(rc.allowed(prefix), scores, -np.inf).argmax()))
        assert rc.violations(prefix) == []
        assert rc._nodes < 50  # 6 measured


def test_cover_bound_of_disjoint_quotas_is_exact_without_search() -> None:
    """Quotas on distinct categories (a hierarchical plan) match disjoint sets: the fewest
    items meeting the deficits is their sum, found without the breadth-first search (which
    took seconds per step at n = 500, m = 50 with 20 planned categories)."""
    rc = _req(6, category=[0, 1, 2, 0, 1, 2]).compile(ConstraintSet(quotas=(
        Quota("category", 0, min=1), Quota("category", 1, min=1))))
    assert rc._min_cover((2, 1, 3), frozenset({0b001, 0b110})) == 2 + 3
    assert rc._min_cover((2, 0, 3), frozenset({0b001, 0b010})) >= 1 << 40  # bit 2: no item
    # Overlapping patterns still go through the search: one item of 0b011 meets both.
    assert rc._min_cover((1, 1), frozenset({0b01, 0b10, 0b11})) == 1


def test_a_plan_of_many_category_quotas_decodes_a_long_list() -> None:
    """n = 500, m = 50, exact counts for 20 categories (what the hierarchical model asks):
    every look-ahead step answers, and the greedy walk meets the plan exactly."""
    rng = np.random.default_rng(5)
    category = rng.integers(0, 20, 500)
    counts = np.minimum(rng.multinomial(50, np.full(20, 0.05)), np.bincount(category,
                                                                            minlength=20))
    while counts.sum() < 50:
        c = int(rng.integers(20))
        counts[c] += counts[c] < (category == c).sum()
    cs = ConstraintSet(quotas=tuple(Quota("category", c, min=int(k), max=int(k))
                                    for c, k in enumerate(counts) if k))
    rc = compile_constraints(cs, category=category, creator=None, is_cold_start=None,
                             is_long_tail=None, item_ids=None,
                             candidate_mask=np.ones(500, bool), list_length=50)
    scores = rng.standard_normal(500)
    prefix: list[int] = []
    for _ in range(50):
        prefix.append(int(np.where(rc.allowed(prefix), scores, -np.inf).argmax()))
    assert rc.violations(prefix) == []
    assert np.array_equal(np.bincount(category[prefix], minlength=20), counts)
