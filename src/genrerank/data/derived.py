"""Leakage-free derived features: item and user statistics computed from logged impressions.

An importer that turns impression logs into a data set can add these as per-candidate dense
features. Every statistic is built from the **training split only**: a validation or test label
never contributes to any feature, so the splits used for early stopping and for reporting stay
unseen.

Which training requests a row may see
-------------------------------------
Training requests are ordered by (time, request index). A **training** row sees only the training
requests strictly before its own request in that order (an expanding window): never its own
request, never a later one, and for requests logged at the same second the lower index goes
first. A **validation / test** row sees the training requests logged at or before its own time
(``eval_history="past"``, the default) or every training request (``eval_history="all"``). Under
the default time split both are all training requests; under a user or column split "past" keeps
later popularity out of an earlier request, so train and evaluation features are built alike and
as they could be at serving time.

Why not the whole training split, or leave-one-out, for training rows? A statistic that includes
the row's own label (an item CTR over all training impressions) tells the model its answer; it
learns to trust the feature, then meets the honest evaluation value and fails. Leave-one-out
target encoding removes the row's own label but leaks the other way: for an item with ``S`` clicks
in ``n`` impressions the row gets ``(S - y) / (n - 1)``, which within one item is *lower exactly
when the row was clicked* (anti-correlated with its own label), so a model can read ``y`` off
the feature by comparing rows of the same item. The expanding window has neither problem: a row's
features depend only on labels of strictly earlier requests.

Choices
-------
- Impressions are rows with ``position >= 0``; candidates not shown count nothing but still get
  features (from their own item's earlier impressions).
- Smoothing uses ``prior_impressions`` pseudo-impressions at the global CTR ``m`` of the visible
  window (``m = 0`` before any impression): ``item_ctr = (clicks + a m) / (impressions + a)``.
- ``item_coec``: the expected clicks of an impression are the (smoothed) CTR of its position as
  known just before that impression's own request, so the expected clicks also depend only on
  earlier labels. ``(clicks + a m) / (expected + a m)``, 1 when there is no history at all.
- ``user_category_share`` uses the user's **clicks** (a preference; impressions mostly echo what
  the upstream ranker already chose): ``(clicks in c + b g_c) / (clicks + b)`` with ``b =
  prior_clicks`` and ``g_c`` the share of all visible clicks in category ``c``; clicks on items of
  unknown category count in the user's total, and a candidate of unknown category (0) gets 0.
- ``item_age``: days from the item's first visible training impression to the request, log1p'd;
  an item with no visible impression gets 0, i.e. it is treated as new now (``item_impressions``
  = 0 tells the model it is unseen). Negative ages (possible only with ``eval_history="all"``)
  are clipped to 0.

Vectorised: events (training impressions) are sorted by (key, request rank) once per key, and each
row's sums are two ``searchsorted`` look-ups into cumulative sums; a million rows take under two
seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from genrerank.data.schema import SPLITS

DERIVED_FEATURES: dict[str, str] = {
    "item_ctr": "smoothed click-through rate of the item over earlier training impressions",
    "item_impressions": "log1p of the item's number of earlier training impressions",
    "item_coec": "position-debiased CTR of the item: clicks over expected clicks, smoothed to 1",
    "user_category_share": "smoothed share of the user's earlier training clicks in the "
    "candidate's category",
    "item_age": "log1p of days since the item's first training impression (0 if never seen)",
}

#: Inputs each feature needs beyond the always-present ones.
_NEEDS: dict[str, tuple[str, ...]] = {
    "item_ctr": ("click",),
    "item_coec": ("click",),
    "user_category_share": ("click", "category"),
}

_DAY = 86400.0


class _Prefix:
    """Sums over events of one key whose request rank is below a limit.

    Keys must be dense codes ``0..K-1`` so that ``key * (n_ranks + 1) + rank`` fits in int64.
    """

    def __init__(self, key: np.ndarray, rank: np.ndarray, n_ranks: int) -> None:
        self.stride = np.int64(n_ranks + 1)
        composite = key.astype(np.int64) * self.stride + rank
        self.order = np.argsort(composite, kind="stable")
        self.sorted = composite[self.order]

    def bounds(self, key: np.ndarray, limit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index range, in sorted order, of the events of ``key`` with rank < ``limit``."""
        base = key.astype(np.int64) * self.stride
        lo = np.searchsorted(self.sorted, base, side="left")
        hi = np.searchsorted(self.sorted, base + limit, side="left")
        return lo, hi

    def sums(self, values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        cum = np.zeros(len(values) + 1)
        np.cumsum(values[self.order], out=cum[1:])
        return cum[hi] - cum[lo]


def _codes(values: np.ndarray) -> np.ndarray:
    """Dense int64 codes 0..K-1 of ``values``."""
    return np.unique(values, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    out = np.full(len(num), empty)
    np.divide(num, den, out=out, where=den > 0)
    return out


def derived_features(
    names: Sequence[str],
    *,
    request: np.ndarray,
    request_time: np.ndarray,
    request_split: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    position: np.ndarray,
    click: np.ndarray | None = None,
    category: np.ndarray | None = None,
    prior_impressions: float = 20.0,
    prior_clicks: float = 5.0,
    eval_history: str = "past",
) -> dict[str, np.ndarray]:
    """Compute the named features (see :data:`DERIVED_FEATURES`) for every candidate row.

    Per row: ``request`` (request index 0..R-1), ``item`` (item code), ``position`` (display
    position, -1 if not shown), ``click`` (click-like signal, 0 where not shown), ``category``
    (0 = unknown). Per request: ``request_time`` (unix seconds), ``request_split``
    (train/valid/test), ``user`` (user code). Returns name -> float32 array per row; see the
    module docstring for which requests each row's statistics come from.
    """
    names = list(names)
    unknown = [n for n in names if n not in DERIVED_FEATURES]
    if unknown:
        raise ValueError(
            f"unknown derived feature(s) {unknown}; known: {sorted(DERIVED_FEATURES)}"
        )
    given = {"click": click is not None, "category": category is not None}
    for name in names:
        missing = [k for k in _NEEDS.get(name, ()) if not given[k]]
        if missing:
            raise ValueError(
                f"derived feature {name!r} needs {' and '.join(missing)}, which the source "
                "does not provide"
            )
    if eval_history not in ("past", "all"):
        raise ValueError(f"eval_history must be 'past' or 'all', not {eval_history!r}")
    if prior_impressions <= 0 or prior_clicks <= 0:
        raise ValueError("prior_impressions and prior_clicks must be positive")

    request = np.asarray(request, dtype=np.int64)
    request_time = np.asarray(request_time, dtype=np.int64)
    request_split = np.asarray(request_split)
    user = np.asarray(user)
    item = np.asarray(item)
    position = np.asarray(position, dtype=np.int64)
    n_rows, n_requests = len(request), len(request_time)
    for label, arr, n in (
        ("request_split", request_split, n_requests),
        ("user", user, n_requests),
        ("item", item, n_rows),
        ("position", position, n_rows),
        ("click", click, n_rows),
        ("category", category, n_rows),
    ):
        if arr is not None and len(arr) != n:
            raise ValueError(f"{label} has {len(arr)} values, expected {n}")
    if n_rows and (request.min() < 0 or request.max() >= n_requests):
        raise ValueError(f"request indices must lie in 0..{n_requests - 1}")
    bad = ~np.isin(request_split, SPLITS)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"request {k}: split {request_split[k]!r} is not one of {SPLITS}")
    if not names:
        return {}

    # Rank of each training request in (time, index) order, and per request the number of
    # leading ranks it may see.
    is_train = request_split == "train"
    train_idx = np.flatnonzero(is_train)
    train_order = train_idx[np.lexsort((train_idx, request_time[train_idx]))]
    n_train = len(train_order)
    rank = np.full(n_requests, -1, dtype=np.int64)
    rank[train_order] = np.arange(n_train)
    limit = rank.copy()
    evaluated = ~is_train
    if eval_history == "all":
        limit[evaluated] = n_train
    else:
        limit[evaluated] = np.searchsorted(
            request_time[train_order], request_time[evaluated], side="right"
        )
    row_limit = limit[request]

    # Events: impressions in training requests.
    ev_rows = np.flatnonzero((position >= 0) & is_train[request])
    ev_rank = rank[request[ev_rows]]
    ev_click = (
        np.zeros(len(ev_rows)) if click is None
        else np.asarray(click, dtype=np.float64)[ev_rows]
    )

    # Global impressions and clicks before each rank, and the global CTR m there.
    imps_before = np.zeros(n_train + 1)
    np.cumsum(np.bincount(ev_rank, minlength=n_train), out=imps_before[1:])
    clicks_before = np.zeros(n_train + 1)
    np.cumsum(np.bincount(ev_rank, weights=ev_click, minlength=n_train), out=clicks_before[1:])
    ctr_before = _ratio(clicks_before, imps_before, 0.0)
    m_row = ctr_before[row_limit]

    a, b = float(prior_impressions), float(prior_clicks)
    out: dict[str, np.ndarray] = {}
    item_names = {"item_ctr", "item_impressions", "item_coec", "item_age"}
    if item_names & set(names):
        item_code = _codes(item)
        by_item = _Prefix(item_code[ev_rows], ev_rank, n_train)
        lo, hi = by_item.bounds(item_code, row_limit)
        n_imp = (hi - lo).astype(np.float64)
        item_clicks = by_item.sums(ev_click, lo, hi)
        if "item_ctr" in names:
            out["item_ctr"] = (item_clicks + a * m_row) / (n_imp + a)
        if "item_impressions" in names:
            out["item_impressions"] = np.log1p(n_imp)
        if "item_coec" in names:
            # Each impression's expected clicks: its position's CTR just before its request.
            ev_pos = _codes(position[ev_rows])
            by_pos = _Prefix(ev_pos, ev_rank, n_train)
            plo, phi = by_pos.bounds(ev_pos, ev_rank)
            pos_ctr = (
                by_pos.sums(ev_click, plo, phi) + a * ctr_before[ev_rank]
            ) / ((phi - plo) + a)
            expected = by_item.sums(pos_ctr, lo, hi)
            out["item_coec"] = _ratio(item_clicks + a * m_row, expected + a * m_row, 1.0)
        if "item_age" in names:
            # Events are sorted by (item, rank) and rank follows time: the first is the earliest.
            seen = hi > lo
            ev_time = request_time[request[ev_rows]][by_item.order]
            first_time = np.zeros(n_rows, dtype=np.int64)
            first_time[seen] = ev_time[lo[seen]]
            days = (request_time[request] - first_time) / _DAY
            out["item_age"] = np.where(seen, np.log1p(np.maximum(days, 0.0)), 0.0)

    if "user_category_share" in names:
        assert category is not None and click is not None
        row_cat = np.asarray(category, dtype=np.int64)
        user_code = _codes(user[request])
        cat_code = _codes(row_cat)
        pair_code = _codes(user_code * (int(cat_code.max()) + 1) + cat_code)
        ev_user, ev_cat, ev_pair = user_code[ev_rows], cat_code[ev_rows], pair_code[ev_rows]
        by_user = _Prefix(ev_user, ev_rank, n_train)
        user_clicks = by_user.sums(ev_click, *by_user.bounds(user_code, row_limit))
        by_pair = _Prefix(ev_pair, ev_rank, n_train)
        pair_clicks = by_pair.sums(ev_click, *by_pair.bounds(pair_code, row_limit))
        by_cat = _Prefix(ev_cat, ev_rank, n_train)
        cat_clicks = by_cat.sums(ev_click, *by_cat.bounds(cat_code, row_limit))
        cat_share = _ratio(cat_clicks, clicks_before[row_limit], 0.0)
        share = (pair_clicks + b * cat_share) / (user_clicks + b)
        out["user_category_share"] = np.where(row_cat == 0, 0.0, share)

    return {name: out[name].astype(np.float32) for name in names}
