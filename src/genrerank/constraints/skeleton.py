"""The hierarchical generator's plan, in numpy: counts per category -> category quotas.

The skeleton stage of :class:`~genrerank.models.hierarchical.Hierarchical` predicts, per
category, a distribution over how many of its items the list holds (``count_logits [B, C,
K + 1]``). Everything after that is plain arithmetic and constraint compilation, so it lives
here, free of torch, and the PyTorch model and the ONNX Runtime backend
(:mod:`genrerank.serving.onnx_model`) run the very same code: an exported model plans exactly
as its PyTorch original, and serving need not import the models package.

- :func:`expected_counts_np`: the expected composition rounded to each list's length (the
  default plan), and :func:`plan_counts_np`: the most likely counts that sum to each list's
  length (exact, by dynamic programming over the categories).
- :func:`skeleton_constraints`: a plan -> a :class:`~genrerank.constraints.ConstraintSet` of
  category quotas (``slack`` widens each range).
- :func:`merge_plan`: the caller's compiled constraints plus the plan's quotas, the caller's
  rules winning a conflict.
- :func:`plan_constraints`: all of it for a batch, one compiled set per request, what the
  fill's decoder takes as ``constraints=``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from genrerank.constraints.compile import (
    DEFAULT_MAX_NODES,
    ConstraintSearchLimit,
    RequestConstraints,
    compile_constraints,
)
from genrerank.constraints.spec import ConstraintSet, Quota

__all__ = [
    "CATEGORY",
    "PLAN_METHODS",
    "category_counts_np",
    "expected_counts_np",
    "log_softmax_np",
    "merge_plan",
    "plan_constraints",
    "plan_counts_np",
    "plan_from_logits",
    "skeleton_constraints",
]

#: The attribute the skeleton's quotas constrain.
CATEGORY = "category"


def log_softmax_np(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log_softmax`` of float32 ``logits`` along ``axis`` (-inf entries stay -inf), in
    float32 like :func:`torch.log_softmax`, so that both backends plan from the same numbers."""
    x = np.asarray(logits, dtype=np.float32)
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, np.float32(0.0))  # an all -inf row stays -inf
    shifted = x - top
    with np.errstate(divide="ignore"):
        norm = np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    return (shifted - norm).astype(np.float32)


def plan_counts_np(log_probs: np.ndarray, lengths: np.ndarray | Sequence[int]) -> np.ndarray:
    """The most likely counts ``[B, C]`` (int64) under independent per-category distributions
    ``log_probs [B, C, K + 1]`` (-inf = impossible) that sum to ``lengths [B]``: exact, by
    dynamic programming over the categories (O(C K^2) per request). A length no counts can
    reach (fewer candidates than it) takes the largest reachable total. Ties go to the
    smaller count of the later category (the first maximum, as ``torch.max`` picks it)."""
    lp = np.asarray(log_probs, dtype=np.float32)
    b, c, width = lp.shape
    k_max = width - 1
    lengths = np.clip(np.asarray(lengths, dtype=np.int64).reshape(b), 0, k_max)
    s = np.arange(k_max + 1)
    k = np.arange(width)
    prev_idx = np.clip(s[:, None] - k[None, :], 0, None)  # [S, K + 1]: s - k
    valid = s[:, None] >= k[None, :]
    best = np.full((b, k_max + 1), -np.inf, dtype=np.float32)
    best[:, 0] = 0.0
    # choices[c][b, s]: the count of category c in the best allocation of s items to 0..c.
    choices = []
    for cat in range(c):
        # total[b, s, k] = best[b, s - k] + lp[b, cat, k]
        total = np.where(valid, best[:, prev_idx] + lp[:, cat][:, None, :], -np.inf)
        pick = total.argmax(axis=2)
        best = np.take_along_axis(total, pick[..., None], axis=2)[..., 0].astype(np.float32)
        choices.append(pick)
    reachable = np.isfinite(best)
    target = np.where(reachable & (s[None, :] <= lengths[:, None]), s[None, :], -1).max(1)
    target = np.maximum(target, 0)
    counts = np.zeros((b, c), dtype=np.int64)
    rows = np.arange(b)
    for cat in range(c - 1, -1, -1):
        pick = choices[cat][rows, target]
        counts[:, cat] = pick
        target = target - pick
    return counts


#: How a plan turns the count distributions into counts (:func:`plan_from_logits`).
PLAN_METHODS = ("expected", "map")


def expected_counts_np(log_probs: np.ndarray, lengths: np.ndarray | Sequence[int]
                       ) -> np.ndarray:
    """Counts ``[B, C]`` (int64) summing to ``lengths [B]`` (or to the candidates, if fewer),
    closest to each category's expected count ``sum_k k p_c(k)`` rescaled to the length:
    one item at a time to the category furthest below its target (first on ties) among those
    with candidates left (``log_probs [B, C, K + 1]``, -inf above a category's candidates)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    b, c, width = lp.shape
    k = np.arange(width, dtype=np.float64)
    cap = np.where(np.isfinite(lp), k, 0).max(axis=2).astype(np.int64)  # [B, C] candidates
    p = np.exp(lp)
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64).reshape(b), cap.sum(1))
    expected = (p * k).sum(2)
    total = expected.sum(1, keepdims=True)
    # A request whose expected counts are all 0 falls back to its candidates' shares.
    weight = np.where(total > 0, expected, cap.astype(np.float64))
    target = weight * (lengths / np.maximum(weight.sum(1), 1e-12))[:, None]
    counts = np.zeros((b, c), dtype=np.int64)
    rows = np.arange(b)
    for _ in range(int(lengths.max(initial=0))):
        open_ = (counts < cap) & (counts.sum(1) < lengths)[:, None]
        gap = np.where(open_, target - counts, -np.inf)
        pick = gap.argmax(1)
        counts[rows, pick] += open_[rows, pick]
    return counts


def plan_from_logits(count_logits: np.ndarray, lengths: np.ndarray | Sequence[int],
                     method: str = "expected") -> np.ndarray:
    """The plan ``[B, C]`` from the skeleton's raw ``count_logits [B, C, K + 1]``.

    ``"expected"`` (default): :func:`expected_counts_np`, the expected composition rounded to
    the length. ``"map"``: :func:`plan_counts_np`, the jointly most likely counts under the
    per-category distributions; these are independent, so the MAP under a fixed total favours
    piling the list into one category (one unlikely count costs less than several
    less-than-certain ones): with a briefly trained skeleton on simulated kuaishou it planned
    single-category lists (category entropy 0)."""
    log_probs = log_softmax_np(count_logits)
    if method == "expected":
        return expected_counts_np(log_probs, lengths)
    if method == "map":
        return plan_counts_np(log_probs, lengths)
    raise ValueError(f"hierarchical: plan must be one of {PLAN_METHODS}, got {method!r}")


def category_counts_np(category: np.ndarray, candidate_mask: np.ndarray, n_categories: int
                       ) -> np.ndarray:
    """``[B, C]`` each request's real candidates per category; categories outside ``[0, C)``
    are clamped into it, as the skeleton stage does."""
    cat = np.clip(np.asarray(category, dtype=np.int64), 0, n_categories - 1)
    mask = np.asarray(candidate_mask, dtype=np.bool_)
    member = (cat[..., None] == np.arange(n_categories)) & mask[..., None]  # [B, N, C]
    return member.sum(1).astype(np.int64)


def skeleton_constraints(counts: Sequence[int] | np.ndarray, slack: int = 0,
                         available: Sequence[int] | np.ndarray | None = None) -> ConstraintSet:
    """A :class:`~genrerank.constraints.ConstraintSet` of category quotas from a plan.

    ``counts[c]`` is the planned number of items of category c. Each planned category gets
    ``Quota("category", c, min=k - slack, max=k + slack)``; with ``slack > 0`` every other
    category with candidates in ``available`` (``available[c]`` = candidates of category c)
    gets at most ``slack`` (with slack 0 the planned minimums fill the list, so they need no
    quota).

    Feasibility, for a list of length L = sum(counts) (what :func:`plan_counts_np` returns):
    every minimum is clipped to the category's candidates when ``available`` is given, and the
    minimums sum to at most L; the maximums of the categories with candidates sum to at least
    L.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if slack < 0:
        raise ValueError(f"skeleton_constraints: slack must be >= 0, got {slack}")
    if (counts < 0).any():
        raise ValueError("skeleton_constraints: counts must be >= 0")
    avail = None if available is None else np.asarray(available, dtype=np.int64)
    quotas = []
    for cat, k in enumerate(counts.tolist()):
        have = None if avail is None else int(avail[cat])
        if k > 0:
            low = max(k - slack, 0)
            if have is not None:
                low = min(low, have)
            quotas.append(Quota(CATEGORY, value=cat, min=low, max=k + slack))
        elif slack > 0 and have is not None and have > 0:
            quotas.append(Quota(CATEGORY, value=cat, min=0, max=slack))
    return ConstraintSet(quotas=tuple(quotas))


def merge_plan(rc: RequestConstraints, counts: np.ndarray, available: np.ndarray, slack: int,
               length: int, category: np.ndarray) -> RequestConstraints:
    """The caller's constraints ``rc`` plus the plan's quotas; ``rc`` alone when together they
    admit no list. A category the caller bounds over the whole list keeps the plan's bounds
    where the two ranges overlap (their intersection) and the caller's alone where they do
    not, which settles the usual conflict without a search: the caller's constraints are
    rules, the plan is advice."""
    bounds: dict[int, tuple[int, int | None]] = {}
    for q in rc.cs.quotas:
        if q.attribute == CATEGORY and q.within is None and q.value is not None:
            low, high = bounds.get(q.value, (0, None))
            if q.max is not None:
                high = q.max if high is None else min(high, q.max)
            bounds[q.value] = (max(low, q.min), high)
    plan = []
    for q in skeleton_constraints(counts, slack, available).quotas:
        if q.value in bounds:
            low, high = bounds[q.value]
            low, high = max(low, q.min), q.max if high is None else min(high, q.max)
            if high is not None and low > high:
                continue  # the ranges are disjoint: the caller's rule alone
            q = dataclasses.replace(q, min=low, max=high)
        plan.append(q)
    merged = dataclasses.replace(rc.cs, quotas=(*rc.cs.quotas, *plan))
    compiled = compile_constraints(
        merged, category=category, creator=rc.creator, is_cold_start=rc.cold,
        is_long_tail=rc.tail, item_ids=rc.item_ids, candidate_mask=rc.real,
        list_length=length, request_id=rc.request_id, max_nodes=rc.max_nodes)
    try:
        return compiled if compiled.feasible() else rc
    except ConstraintSearchLimit:  # undecided within the budget: the rules alone
        return rc


def plan_constraints(
    counts: np.ndarray, available: np.ndarray, category: np.ndarray,
    candidate_mask: np.ndarray, lengths: np.ndarray | Sequence[int], slack: int,
    constraints: Sequence[RequestConstraints | None] | None = None,
    request_ids: Sequence[str] | None = None, max_nodes: int = DEFAULT_MAX_NODES,
) -> list[RequestConstraints | None]:
    """One compiled set per request (None where the plan is empty and the caller set none):
    the plan's quotas (:func:`skeleton_constraints`, ``counts`` and ``available`` ``[B, C]``),
    merged with the caller's ``constraints`` where a request has some (:func:`merge_plan`).
    ``category`` and ``candidate_mask`` are ``[B, N]``, ``lengths [B]`` each list's length
    (at most its real candidates). Shared by the PyTorch model and the ONNX Runtime backend,
    so both decode under the same constraints."""
    b = len(counts)
    if constraints is not None and len(constraints) != b:
        raise ValueError(f"constraints: {len(constraints)} entries for a batch of {b} requests")
    category = np.asarray(category)
    mask = np.asarray(candidate_mask, dtype=np.bool_)
    out: list[RequestConstraints | None] = []
    for r in range(b):
        length = int(lengths[r])
        rc = None if constraints is None else constraints[r]
        if rc is not None:
            out.append(merge_plan(rc, counts[r], available[r], slack, length, category[r]))
            continue
        cs = skeleton_constraints(counts[r], slack, available[r])
        if cs.is_empty():  # nothing planned (an empty list): the decoder's free path
            out.append(None)
            continue
        out.append(compile_constraints(
            cs, category=category[r], candidate_mask=mask[r], list_length=length,
            request_id=None if request_ids is None else request_ids[r], max_nodes=max_nodes))
    return out
