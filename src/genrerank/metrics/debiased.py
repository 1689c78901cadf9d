"""Position-debiased offline metrics for logged clicks.

Logged clicks follow position, so NDCG / Recall on logs favour the logged order. These
metrics correct for that under a **position-based click model (PBM)**::

    P(click of item i at position j) = theta_j * gamma_i

with theta_j = P(examined | position j) and gamma_i = P(relevant | item i). Its assumptions:
examination depends on the position only (not on the item, the user or the items around it);
relevance does not depend on the position or on the other items in the list; a click means
examined and relevant. Under them an item clicked at logged position l would, at position j,
be clicked ``theta_j / theta_l`` times as often.

- :func:`fit_position_propensities` fits theta by EM on logged (position, item, click)
  triples (the EM of Wang et al. 2018, "Position bias estimation for unbiased learning to
  rank in personal search", with a per-item relevance instead of their regression model).
- :func:`list_clicks_at_k`: raw logged clicks of the model's top-k items (position ignored).
- :func:`ips_clicks_at_k`: each logged click of a top-k item is re-weighted by
  ``theta[new position] / theta[logged position]`` (clipped at ``max_ratio``, default 10,
  to bound the variance of large ratios): the expected clicks of the model's list.
- :func:`ips_clicks_ratio_at_k`: ``ips_clicks_at_k`` of the model divided by the same
  quantity for the logged order (which therefore scores exactly 1.0).

Items the model lists but the log never exposed contribute 0: their click is unknown. The
metrics are therefore a lower bound that favours lists overlapping the logged one. Lists
are taken to be duplicate-free.

List inputs: ``lists [R, L]`` candidate indices in display order (-1 = empty slot),
``exposed [R, M]`` the logged candidate index at each logged position, ``clicks [R, M]``
(>= 0) and ``position_mask [R, M]`` (True = real logged position; ``None`` = all valid).
Padded slots may hold anything. Per-request values are averaged over the requests with at
least one valid logged position (a request without clicks counts as 0); pure padding rows
are NaN per request (``reduce=False``) and excluded from the mean. With no valid request at
all the mean is NaN, as for the other metrics of :mod:`genrerank.metrics`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from genrerank.metrics._masking import (
    as_array,
    as_mask,
    check_binary,
    check_k,
    check_nonnegative,
    check_shape,
    masked_mean,
)

__all__ = [
    "fit_position_propensities",
    "ips_clicks_at_k",
    "ips_clicks_ratio_at_k",
    "list_clicks_at_k",
]

DEFAULT_MAX_RATIO = 10.0


# --------------------------------------------------------------------------- propensities


def _key_codes(item_keys: Any, n: int) -> np.ndarray:
    """Dense integer codes 0..K-1 for item keys: 1-D (ids) or 2-D rows (e.g. (request, cand))."""
    keys = np.asarray(item_keys)
    if keys.ndim not in (1, 2) or keys.shape[0] != n:
        raise ValueError(
            f"item_keys must have shape [{n}] or [{n}, d], got {tuple(keys.shape)}"
        )
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    axis = 0 if keys.ndim == 2 else None
    _, codes = np.unique(keys, return_inverse=True, axis=axis)
    return codes.reshape(-1).astype(np.int64)


def _fill_unobserved(theta: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Positions without observations take the nearest lower observed value (or the first)."""
    idx = np.where(observed, np.arange(len(theta)), -1)
    idx = np.maximum.accumulate(idx)
    first = int(np.flatnonzero(observed)[0])
    idx[idx < 0] = first
    return theta[idx]


def fit_position_propensities(
    exposed_positions: Any,
    clicks: Any,
    item_keys: Any,
    max_position: int,
    iterations: int = 300,
    *,
    tol: float = 1e-7,
    method: str = "em",
    relevance_prior: float = 0.0,
) -> np.ndarray:
    """Fit PBM examination propensities theta (``theta[0] == 1``) from logged clicks.

    Fit on the TRAINING split's logs, then use on the evaluation split.

    Args:
        exposed_positions: ``[n]`` 0-based logged position of each observation
            (one observation = one exposed item in one request).
        clicks: ``[n]`` binary click of each observation.
        item_keys: ``[n]`` (or ``[n, d]`` rows) identifying the item across requests, e.g.
            the item id. theta is only identified through items seen at several positions;
            per-impression keys such as (request, candidate) give one relevance per
            observation, which EM cannot separate from position (see ``method``).
        max_position: length of the returned theta; every position must be below it.
        iterations: maximum EM iterations.
        tol: stop when no theta_j (normalised) moves by more than this.
        method: ``"em"`` (default): EM for the PBM, theta_j and gamma_i updated from the
            posteriors of (examined, relevant) given each click. If no item key is observed
            at two different positions, theta is not identified: EM then warns and falls
            back to ``"ctr"``. ``"ctr"``: the closed-form click-through rate per position
            over that of position 0, which is unbiased only if items were placed at random.
        relevance_prior: pseudo-observations of a Beta prior on each gamma_i, centred on the
            mean relevance (MAP-EM). 0 (default) is plain EM. When items are seen only a few
            times each, plain EM explains clicks by per-item relevance and drifts towards
            theta = 1 (no debiasing; it warns when keys average fewer than
            5 observations); a prior of a few to ~20 observations shrinks rarely seen items
            towards the mean and moves theta towards the position CTR.

    Returns:
        ``float64 [max_position]``; positions never observed take the value of the nearest
        lower observed position.

    Raises:
        ValueError: bad shapes / values, no observation, no click, or no click at
            position 0 (theta cannot be normalised).
    """
    if isinstance(max_position, bool) or not isinstance(max_position, int | np.integer):
        raise ValueError(f"max_position must be a positive integer, got {max_position!r}")
    max_position = int(max_position)
    if max_position < 1:
        raise ValueError(f"max_position must be a positive integer, got {max_position!r}")
    if method not in ("em", "ctr"):
        raise ValueError(f"method must be 'em' or 'ctr', got {method!r}")
    relevance_prior = float(relevance_prior)
    if not np.isfinite(relevance_prior) or relevance_prior < 0:
        raise ValueError(f"relevance_prior must be finite and >= 0, got {relevance_prior!r}")
    pos = as_array(exposed_positions, "exposed_positions")
    c = as_array(clicks, "clicks")
    if pos.ndim != 1:
        raise ValueError(f"exposed_positions must be 1-D [n], got shape {tuple(pos.shape)}")
    check_shape(c, "clicks", pos.shape, "exposed_positions")
    if (pos.size and not np.issubdtype(pos.dtype, np.integer)
            and not (np.all(np.isfinite(pos)) and np.all(pos == np.round(pos)))):
        raise ValueError("exposed_positions must be integers")
    pos = pos.astype(np.int64)
    if np.any(pos < 0) or np.any(pos >= max_position):
        raise ValueError(f"exposed_positions must lie in [0, {max_position})")
    check_binary(c, np.ones(c.shape, dtype=bool), "clicks")
    c = c.astype(np.float64)
    key = _key_codes(item_keys, len(pos))
    if pos.size == 0:
        raise ValueError("no observations to fit position propensities on")
    if c.sum() == 0:
        raise ValueError("no clicks: position propensities are not identified")

    n_pos = np.bincount(pos, minlength=max_position).astype(np.float64)
    observed = n_pos > 0
    clicks_pos = np.bincount(pos, weights=c, minlength=max_position)
    if clicks_pos[0] == 0:
        raise ValueError("no click at position 0: cannot normalise theta to theta[0] = 1")

    if method == "em":
        pairs = np.unique(key * max_position + pos)
        if np.bincount(pairs // max_position).max(initial=0) < 2:
            warnings.warn(
                "fit_position_propensities: no item key is observed at two different "
                "positions, so EM cannot separate position from relevance; using the "
                "per-position click-through rate instead",
                stacklevel=2,
            )
            method = "ctr"
        elif relevance_prior == 0 and len(pos) < 5 * (int(key.max()) + 1):
            warnings.warn(
                f"fit_position_propensities: item keys average "
                f"{len(pos) / (int(key.max()) + 1):.1f} observations; with so few, EM "
                "attributes clicks to item relevance and theta is biased towards 1 (consider "
                "relevance_prior > 0)",
                stacklevel=2,
            )

    if method == "ctr":
        theta = np.zeros(max_position)
        theta[observed] = clicks_pos[observed] / n_pos[observed]
    else:
        theta = _em(pos, c, key, n_pos, observed, max_position, iterations, tol,
                    relevance_prior)
    theta = _fill_unobserved(theta, observed)
    return theta / theta[0]


def _em(
    pos: np.ndarray,
    c: np.ndarray,
    key: np.ndarray,
    n_pos: np.ndarray,
    observed: np.ndarray,
    max_position: int,
    iterations: int,
    tol: float,
    prior: float,
) -> np.ndarray:
    n_key = np.bincount(key).astype(np.float64)
    clicked = c > 0
    # Start from the position CTR (scaled to the top position = 0.9) and the item CTR.
    ctr = np.bincount(pos, weights=c, minlength=max_position)[observed] / n_pos[observed]
    theta = np.full(max_position, 0.5)
    theta[observed] = np.clip(0.9 * ctr / ctr.max(), 1e-3, 0.999)
    gamma = np.clip(np.bincount(key, weights=c) / n_key / 0.9, 1e-3, 0.999)
    prev = theta / theta[0]
    for _ in range(max(int(iterations), 1)):
        t = theta[pos]
        g = gamma[key]
        denom = np.maximum(1.0 - t * g, 1e-12)
        # E-step: P(examined | no click) and P(relevant | no click); a click means both.
        post_e = np.where(clicked, 1.0, t * (1.0 - g) / denom)
        post_r = np.where(clicked, 1.0, (1.0 - t) * g / denom)
        # M-step: means of the posteriors per position / per item.
        theta = np.full(max_position, 0.5)
        theta[observed] = np.bincount(pos, weights=post_e, minlength=max_position)[observed]
        theta[observed] /= n_pos[observed]
        # Beta prior: `prior` pseudo-observations at the mean relevance posterior.
        gamma = (np.bincount(key, weights=post_r, minlength=len(n_key))
                 + prior * post_r.mean()) / (n_key + prior)
        current = theta / theta[0]
        if np.max(np.abs(current - prev)) < tol:
            break
        prev = current
    return theta


# --------------------------------------------------------------------------- list metrics


def _prepare_lists(
    lists: Any, exposed: Any, clicks: Any, position_mask: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate; return (lists, logged position of each list slot or -1, clicks, pmask, rows).

    ``rows`` flags requests with at least one valid logged position.
    """
    e = as_array(exposed, "exposed")
    if e.ndim != 2:
        raise ValueError(f"exposed must be 2-D [R, M], got shape {tuple(e.shape)}")
    lst = as_array(lists, "lists")
    if lst.ndim != 2 or lst.shape[0] != e.shape[0]:
        raise ValueError(
            f"lists must be 2-D [R, L] with R = {e.shape[0]} (as exposed), "
            f"got shape {tuple(lst.shape)}"
        )
    y = as_array(clicks, "clicks")
    check_shape(y, "clicks", e.shape, "exposed")
    m = as_mask(position_mask, e.shape, "exposed")
    check_nonnegative(y, m, "clicks")
    for arr, name in ((lst, "lists"), (e, "exposed")):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integer candidate indices, got dtype={arr.dtype}")
    lst = lst.astype(np.int64)
    e = np.where(m, e, 0).astype(np.int64)
    if np.any(e[m] < 0):
        raise ValueError("exposed must hold candidate indices >= 0 at valid positions")
    y = np.where(m, y, 0).astype(np.float64)
    width = int(max(e.max(initial=-1), lst.max(initial=-1))) + 1
    # Match list entries to logged entries by the key request * width + candidate.
    rows, slots = np.nonzero(m)
    logged_keys = rows * width + e[rows, slots]
    order = np.argsort(logged_keys, kind="stable")
    logged_keys = logged_keys[order]
    if np.any(logged_keys[1:] == logged_keys[:-1]):
        raise ValueError("exposed lists a candidate twice in one request")
    logged_slots = slots[order]
    new_rows, new_slots = np.nonzero(lst >= 0)
    wanted = new_rows * width + lst[new_rows, new_slots]
    at = np.minimum(np.searchsorted(logged_keys, wanted), max(len(logged_keys) - 1, 0))
    found = logged_keys[at] == wanted if len(logged_keys) else np.zeros(len(wanted), bool)
    logged_pos = np.full(lst.shape, -1, dtype=np.int64)
    logged_pos[new_rows[found], new_slots[found]] = logged_slots[at[found]]
    return lst, logged_pos, y, m, m.any(axis=1)


def _top_k_hits(logged_pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows, slots (new positions) of the top-k list entries that were logged."""
    hit = logged_pos >= 0
    hit[:, k:] = False
    return np.nonzero(hit)


def _per_request(values: np.ndarray, rows: np.ndarray, n: int, valid: np.ndarray) -> np.ndarray:
    out = np.bincount(rows, weights=values, minlength=n).astype(np.float64)
    out[~valid] = np.nan
    return out


def _check_theta(theta: Any) -> np.ndarray:
    t = as_array(theta, "theta").astype(np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"theta must be a non-empty 1-D array, got shape {tuple(t.shape)}")
    check_nonnegative(t, np.ones(t.shape, dtype=bool), "theta")
    return t


def _check_max_ratio(max_ratio: float) -> float:
    r = float(max_ratio)
    if not np.isfinite(r) or r <= 0:
        raise ValueError(f"max_ratio must be a positive finite number, got {max_ratio!r}")
    return r


def _ips_per_request(
    lists: Any,
    exposed: Any,
    clicks: Any,
    position_mask: Any,
    theta: Any,
    k: int,
    max_ratio: float,
) -> np.ndarray:
    k = check_k(k)
    t = _check_theta(theta)
    max_ratio = _check_max_ratio(max_ratio)
    lst, logged_pos, y, _, valid = _prepare_lists(lists, exposed, clicks, position_mask)
    rows, new = _top_k_hits(logged_pos, k)
    old = logged_pos[rows, new]
    # Positions beyond theta take its last value (a flat tail).
    t_new = t[np.minimum(new, len(t) - 1)]
    t_old = t[np.minimum(old, len(t) - 1)]
    ratio = np.divide(t_new, t_old, out=np.zeros_like(t_new), where=t_old > 0)
    # A click at a zero-propensity position contradicts the PBM; treat it as the clip.
    ratio = np.where((t_old <= 0) & (t_new > 0), max_ratio, ratio)
    ratio = np.minimum(ratio, max_ratio)
    ratio[new == old] = 1.0  # unmoved items keep their click exactly
    return _per_request(y[rows, old] * ratio, rows, lst.shape[0], valid)


def list_clicks_at_k(
    lists: Any,
    exposed: Any,
    clicks: Any,
    position_mask: Any = None,
    k: int = 10,
    *,
    reduce: bool = True,
) -> float | np.ndarray:
    """Clicks@k of a decoded list: logged clicks of the items in its first k slots.

    Position is ignored (a click logged at position 5 counts fully at position 0). Items the
    log never exposed count 0. Only the list's own slots count, so k > L is the whole list.
    Averaged over requests with a valid logged position.
    """
    k = check_k(k)
    lst, logged_pos, y, _, valid = _prepare_lists(lists, exposed, clicks, position_mask)
    rows, new = _top_k_hits(logged_pos, k)
    out = _per_request(y[rows, logged_pos[rows, new]], rows, lst.shape[0], valid)
    return masked_mean(out) if reduce else out


def ips_clicks_at_k(
    lists: Any,
    exposed: Any,
    clicks: Any,
    position_mask: Any,
    theta: Any,
    k: int = 10,
    *,
    max_ratio: float = DEFAULT_MAX_RATIO,
    reduce: bool = True,
) -> float | np.ndarray:
    """PBM expected clicks@k of a decoded list, from logged clicks.

    Each item in the list's first k slots that the log exposed at position l and that now
    sits at position j contributes ``click * min(theta[j] / theta[l], max_ratio)``: its
    expected click had it been shown at j, under the PBM (an unmoved item: exactly its
    click). Never-exposed items contribute 0, so this is a lower bound that favours lists
    overlapping the logged one. Positions at or beyond ``len(theta)`` use ``theta[-1]``.

    Args:
        lists: ``[R, L]`` model lists, candidate indices in display order, -1 = empty.
        exposed: ``[R, M]`` logged candidate index per logged position.
        clicks: ``[R, M]`` logged clicks (>= 0) per logged position.
        position_mask: ``[R, M]`` True = real logged position (``None`` = all).
        theta: ``[P]`` examination propensities (e.g. from
            :func:`fit_position_propensities`), >= 0.
        k: cut-off on the model's list.
        max_ratio: clip of the propensity ratio (bounds the variance of clicks moved up from
            rarely examined positions).
        reduce: mean over requests with a valid logged position, or the per-request array.
    """
    out = _ips_per_request(lists, exposed, clicks, position_mask, theta, k, max_ratio)
    return masked_mean(out) if reduce else out


def ips_clicks_ratio_at_k(
    lists: Any,
    exposed: Any,
    clicks: Any,
    position_mask: Any,
    theta: Any,
    k: int = 10,
    *,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> float:
    """Expected-clicks ratio@k: :func:`ips_clicks_at_k` of ``lists`` over that of the logged
    order, summed over the same requests (a ratio of totals, not a mean of per-request
    ratios, so requests without clicks in the logged top k still count).

    The logged order scores exactly 1.0; above 1 the model's list is expected to get more
    clicks than the logged one (under the PBM, and knowing only the logged clicks). NaN if
    the logged order has no click in its top k.
    """
    model = _ips_per_request(lists, exposed, clicks, position_mask, theta, k, max_ratio)
    e = as_array(exposed, "exposed")
    m = as_mask(position_mask, e.shape, "exposed")
    logged_lists = np.where(m, e, -1).astype(np.int64)
    logged = _ips_per_request(logged_lists, exposed, clicks, position_mask, theta, k, max_ratio)
    keep = ~np.isnan(logged)
    denom = float(logged[keep].sum())
    if denom <= 0:
        return float("nan")
    return float(model[keep].sum() / denom)
