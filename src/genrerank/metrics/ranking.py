"""Top-k ranking metrics over padded, masked candidate batches, plus list gain.

Candidate-ranking metrics (``ndcg_at_k``, ``map_at_k``, ``recall_at_k``,
``clicks_at_k``) take ``scores [B, N]`` (higher = ranked earlier), graded relevance
``labels [B, N]`` (>= 0; "positive" means > 0), a boolean ``mask [B, N]`` (True = real
candidate, ``None`` = all valid) and a cut-off ``k``. Only valid candidates are ranked;
padded entries are ignored completely, whatever they hold (NaN included).

With ``reduce=True`` (default) a float is returned, the mean over the requests for
which the metric is defined (NaN if there are none); ``reduce=False`` returns the
per-request ``float64`` array ``[B]`` with NaN for undefined requests.

``list_gain`` instead scores an already *ordered* displayed list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from genrerank.metrics._masking import (
    as_array,
    as_mask,
    check_finite,
    check_k,
    check_nonnegative,
    check_shape,
    masked_mean,
    position_discount,
    sort_rows,
    tie_groups,
)

__all__ = [
    "DEFAULT_GAIN_WEIGHTS",
    "clicks_at_k",
    "list_gain",
    "map_at_k",
    "ndcg_at_k",
    "recall_at_k",
]

#: Default per-signal weights of :func:`list_gain`, for the built-in signals. A data set's
#: ``spec.gain_weights`` overrides them, and other signals weigh 0 unless given a weight there
#: (:func:`genrerank.data.signals.gain_weights`, what evaluation and training use).
DEFAULT_GAIN_WEIGHTS: Mapping[str, float] = {"click": 1.0, "like": 1.5, "long_view": 0.8}


def _prepare(
    scores: Any, labels: Any, mask: Any, labels_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coerce/validate ``[B, N]`` inputs; padded labels are zeroed (junk-proof)."""
    s = as_array(scores, "scores")
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [B, N], got shape {tuple(s.shape)}")
    y = as_array(labels, labels_name)
    check_shape(y, labels_name, s.shape, "scores")
    m = as_mask(mask, s.shape, "scores")
    check_finite(s, m, "scores")
    check_nonnegative(y, m, labels_name)
    return s, np.where(m, y, 0).astype(np.float64), m


def _reduce(per_request: np.ndarray, reduce: bool) -> float | np.ndarray:
    return masked_mean(per_request) if reduce else per_request


def _positives_in_top_k(
    scores: np.ndarray, positive: np.ndarray, mask: np.ndarray, k: int
) -> np.ndarray:
    """``[B, min(k, N)]`` positive flags in ranked order (stable: ties -> lower index)."""
    order, _ = sort_rows(scores, mask, descending=True)
    order = order[:, :k]
    # Padding sorts last and `positive` is False there, so a short list simply has
    # trailing False slots inside the top k.
    return np.take_along_axis(positive, order, axis=1)


def ndcg_at_k(
    scores: Any, labels: Any, mask: Any = None, k: int = 10, *, reduce: bool = True
) -> float | np.ndarray:
    """NDCG@k with graded gains and tie-averaging, matching ``sklearn.metrics.ndcg_score``.

    DCG@k = sum over ranks r <= k (from 1) of gain_r / log2(r + 1) with gain = label.
    Candidates with tied scores share the average gain of their tie group (sklearn's
    ``ignore_ties=False``), so the result does not depend on candidate order. It is
    normalised by the ideal DCG@k of the request's valid candidates. Requests with no
    positive gain are undefined: NaN per request, excluded from the mean. (sklearn
    instead scores them 0 and averages them in, so only defined rows compare.)

    Args:
        scores: ``[B, N]`` model scores (finite on valid entries).
        labels: ``[B, N]`` graded relevance, >= 0.
        mask: ``[B, N]`` boolean validity mask; ``None`` = all valid.
        k: cut-off (positive int; may exceed N).
        reduce: mean over defined requests (True) or per-request array (False).
    """
    k = check_k(k)
    s, g, m = _prepare(scores, labels, mask, "labels")
    b, n = s.shape
    disc = position_discount(n, k)

    order, sorted_keys = sort_rows(s, m, descending=True)
    g_sorted = np.take_along_axis(g, order, axis=1)
    gid, starts = tie_groups(sorted_keys)
    n_groups = int(gid[-1]) + 1 if gid.size else 0
    # Tie group t contributes mean_gain_t * (sum of discounts of the ranks it occupies).
    # Padding sorts last in its own groups with gain 0, so it neither shifts ranks nor
    # adds gain.
    group_size = np.bincount(gid, minlength=n_groups)
    group_gain = np.bincount(gid, weights=g_sorted.ravel(), minlength=n_groups)
    group_disc = np.bincount(gid, weights=np.broadcast_to(disc, (b, n)).ravel(), minlength=n_groups)
    group_dcg = group_gain / np.maximum(group_size, 1) * group_disc
    group_row = np.nonzero(starts)[0]
    dcg = np.bincount(group_row, weights=group_dcg, minlength=b)

    ideal = -np.sort(-g, axis=1)  # padded gains are 0, so they cannot enter the ideal top k
    idcg = ideal @ disc
    out = np.full(b, np.nan)
    defined = idcg > 0
    out[defined] = dcg[defined] / idcg[defined]
    return _reduce(out, reduce)


def map_at_k(
    scores: Any, labels: Any, mask: Any = None, k: int = 10, *, reduce: bool = True
) -> float | np.ndarray:
    """MAP@k: mean over requests of AP@k with binary relevance (label > 0).

    AP@k = (1 / min(k, #positives)) * sum over ranks r <= k of precision@r * rel_r.
    Tied scores are broken deterministically by lower column index (stable sort on
    -score). Requests without a positive valid candidate are undefined (NaN per
    request, excluded from the mean).
    """
    k = check_k(k)
    s, y, m = _prepare(scores, labels, mask, "labels")
    positive = y > 0
    rel = _positives_in_top_k(s, positive, m, k).astype(np.float64)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    precision = np.cumsum(rel, axis=1) / ranks
    n_pos = positive.sum(axis=1)
    out = np.full(s.shape[0], np.nan)
    defined = n_pos > 0
    out[defined] = (precision * rel).sum(axis=1)[defined] / np.minimum(k, n_pos[defined])
    return _reduce(out, reduce)


def recall_at_k(
    scores: Any, labels: Any, mask: Any = None, k: int = 10, *, reduce: bool = True
) -> float | np.ndarray:
    """Recall@k as NAR4Rec reports it: share of a request's positives found in its top k.

    Per request |positives in top k| / |positives| (positive = label > 0), averaged over
    requests with at least one positive (others: NaN, excluded). Ties are broken by
    lower column index, as in :func:`map_at_k`.
    """
    k = check_k(k)
    s, y, m = _prepare(scores, labels, mask, "labels")
    positive = y > 0
    hits = _positives_in_top_k(s, positive, m, k).sum(axis=1)
    n_pos = positive.sum(axis=1)
    out = np.full(s.shape[0], np.nan)
    defined = n_pos > 0
    out[defined] = hits[defined] / n_pos[defined]
    return _reduce(out, reduce)


def clicks_at_k(
    scores: Any, labels: Any, mask: Any = None, k: int = 10, *, reduce: bool = True
) -> float | np.ndarray:
    """Clicks@k: number of positives (label > 0) among a request's top k candidates.

    Averaged over all requests: a request without positives counts as 0. Only a row
    with no valid candidate at all (pure batch padding) is NaN and excluded. Ties are
    broken by lower column index, as in :func:`map_at_k`.
    """
    k = check_k(k)
    s, y, m = _prepare(scores, labels, mask, "labels")
    out = _positives_in_top_k(s, y > 0, m, k).sum(axis=1).astype(np.float64)
    out[~m.any(axis=1)] = np.nan
    return _reduce(out, reduce)


def list_gain(
    signals: Mapping[str, Any],
    mask: Any = None,
    weights: Mapping[str, float] | None = None,
    discount: bool = True,
    reduce: bool = True,
) -> float | np.ndarray:
    """Weighted feedback gain of ORDERED displayed lists (column j = position j).

    Item gain = sum over signals present in ``signals`` of ``weights[name] * label``;
    a list's gain is the sum over its valid positions, times ``1 / log2(j + 2)`` for
    0-based position j when ``discount`` is True.

    Args:
        signals: name -> ``[B, M]`` feedback labels (e.g. ``{"click": ..., "like": ...}``),
            finite on valid entries. Signals not in the dict contribute nothing.
        mask: ``[B, M]`` boolean validity mask; ``None`` = all valid (then ``signals``
            must be non-empty to know the shape).
        weights: per-signal weights, default :data:`DEFAULT_GAIN_WEIGHTS`. Weights for
            absent signals are fine. With the default weights a signal without a weight
            raises ``ValueError``; with explicitly given weights such a signal is
            deliberately ignored (so one dict of signals can serve several weightings).
        discount: apply the DCG position discount.
        reduce: mean over requests (float) or per-request ``[B]`` array. A row with no
            valid slot (pure batch padding) is NaN and excluded from the mean.
    """
    explicit = weights is not None
    w = dict(DEFAULT_GAIN_WEIGHTS if weights is None else weights)
    if not explicit:
        unknown = [name for name in signals if name not in w]
        if unknown:
            raise ValueError(
                f"signals {unknown} have no weight in DEFAULT_GAIN_WEIGHTS "
                f"{sorted(w)}; pass weights= explicitly"
            )
    arrays = {name: as_array(v, f"signals[{name!r}]") for name, v in signals.items()}
    if mask is None:
        if not arrays:
            raise ValueError("list_gain needs mask or at least one signal to infer [B, M]")
        first = next(iter(arrays))
        shape, ref = arrays[first].shape, f"signals[{first!r}]"
    else:
        mask_arr = as_array(mask, "mask")
        shape, ref = mask_arr.shape, "mask"
    if len(shape) != 2:
        raise ValueError(f"{ref} must be 2-D [B, M], got shape {tuple(shape)}")
    m = as_mask(mask, shape, ref)

    gain = np.zeros(shape, dtype=np.float64)
    for name, arr in arrays.items():
        check_shape(arr, f"signals[{name!r}]", shape, ref)
        check_finite(arr, m, f"signals[{name!r}]")
        if name in w:
            weight = float(w[name])
            if not np.isfinite(weight):
                raise ValueError(f"weights[{name!r}] must be finite, got {weight!r}")
            gain += weight * np.where(m, arr, 0).astype(np.float64)
    pos_weight = position_discount(shape[1]) if discount else np.ones(shape[1])
    out = gain @ pos_weight
    out[~m.any(axis=1)] = np.nan
    return _reduce(out, reduce)
