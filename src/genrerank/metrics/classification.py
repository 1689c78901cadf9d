"""Point-wise classification metrics over padded, masked batches: AUC, GAUC, log-loss.

Inputs are numpy arrays or torch tensors. ``mask`` (True = real entry) selects the
entries that count; padded entries are ignored completely, whatever they hold (NaN
included). ``mask=None`` means every entry is valid.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import numpy as np

from genrerank.metrics._masking import (
    as_array,
    as_mask,
    check_binary,
    check_finite,
    check_shape,
    masked_mean,
    sort_rows,
    tie_groups,
)

__all__ = ["auc", "gauc", "logloss"]


def _scores_labels_mask(
    scores: Any, labels: Any, mask: Any, *, scores_name: str = "scores"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = as_array(scores, scores_name)
    if s.ndim == 0:
        raise ValueError(f"{scores_name} must have at least one dimension")
    y = as_array(labels, "labels")
    check_shape(y, "labels", s.shape, scores_name)
    m = as_mask(mask, s.shape, scores_name)
    check_finite(s, m, scores_name)
    return s, y, m


def _row_auc(
    scores: np.ndarray, pos: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row ROC AUC of ``[B, L]`` inputs via the Mann-Whitney U statistic.

    Ties get average ranks, which is exactly the trapezoidal ROC AUC that sklearn
    computes. Returns ``(auc, n_pos, n_neg)``; ``auc`` is NaN where a class is missing.
    """
    b, n = scores.shape
    pos = pos & mask
    order, sorted_keys = sort_rows(scores, mask, descending=False)
    gid, _ = tie_groups(sorted_keys)
    n_groups = int(gid[-1]) + 1 if gid.size else 0
    ranks = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (b, n)).ravel()
    # Padding sorts after every valid entry, so valid entries hold ranks 1..n_valid and
    # never share a tie group with padding.
    group_mean_rank = np.bincount(gid, weights=ranks, minlength=n_groups) / np.bincount(
        gid, minlength=n_groups
    )
    avg_rank = group_mean_rank[gid].reshape(b, n)
    pos_sorted = np.take_along_axis(pos, order, axis=1)
    rank_sum_pos = np.where(pos_sorted, avg_rank, 0.0).sum(axis=1)
    n_pos = pos.sum(axis=1).astype(np.float64)
    n_neg = (mask & ~pos).sum(axis=1).astype(np.float64)
    defined = (n_pos > 0) & (n_neg > 0)
    out = np.full(b, np.nan)
    u_stat = rank_sum_pos[defined] - n_pos[defined] * (n_pos[defined] + 1.0) / 2.0
    out[defined] = u_stat / (n_pos[defined] * n_neg[defined])
    return out, n_pos, n_neg


def auc(scores: Any, labels: Any, mask: Any = None) -> float:
    """ROC AUC pooled over all valid entries (any shape, typically ``[B, L]``).

    Rank-based (Mann-Whitney U) with average ranks for tied scores, so it equals
    ``sklearn.metrics.roc_auc_score(labels[mask], scores[mask])``.

    Args:
        scores: model scores; must be finite on valid entries.
        labels: binary labels (0/1 or bool), same shape as ``scores``.
        mask: boolean validity mask, same shape; ``None`` = all valid.

    Raises:
        ValueError: on shape mismatch, non-finite scores, non-binary labels, or if the
            valid entries contain only one class (AUC is undefined).
    """
    s, y, m = _scores_labels_mask(scores, labels, mask)
    check_binary(y, m, "labels")
    flat_s = s[m].reshape(1, -1)
    flat_pos = (y[m] == 1).reshape(1, -1)
    value, n_pos, n_neg = _row_auc(flat_s, flat_pos, np.ones_like(flat_pos))
    if n_pos[0] == 0 or n_neg[0] == 0:
        raise ValueError("auc is undefined: only one class present in the valid entries of labels")
    return float(value[0])


@overload
def gauc(
    scores: Any,
    labels: Any,
    mask: Any = ...,
    weighting: Literal["uniform", "impressions"] = ...,
    return_count: Literal[False] = ...,
) -> float: ...


@overload
def gauc(
    scores: Any,
    labels: Any,
    mask: Any = ...,
    weighting: Literal["uniform", "impressions"] = ...,
    *,
    return_count: Literal[True],
) -> tuple[float, int]: ...


def gauc(
    scores: Any,
    labels: Any,
    mask: Any = None,
    weighting: Literal["uniform", "impressions"] = "uniform",
    return_count: bool = False,
) -> float | tuple[float, int]:
    """Group AUC: the AUC of each request (row) of ``[B, L]`` inputs, averaged.

    Only requests whose valid entries contain both classes take part; the others are
    skipped. ``weighting="uniform"`` gives each qualifying request equal weight;
    ``"impressions"`` weights it by its number of valid entries. Per-request AUC uses
    average ranks for ties (as :func:`auc`).

    Returns:
        The GAUC, or ``float('nan')`` if no request qualifies. With
        ``return_count=True``: ``(gauc, n_requests_used)``.

    Raises:
        ValueError: on shape mismatch, non-2D input, non-finite scores, non-binary
            labels or an unknown ``weighting``.
    """
    if weighting not in ("uniform", "impressions"):
        raise ValueError(f"weighting must be 'uniform' or 'impressions', got {weighting!r}")
    s, y, m = _scores_labels_mask(scores, labels, mask)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [B, L], got shape {tuple(s.shape)}")
    check_binary(y, m, "labels")
    pos = np.where(m, y, 0) == 1
    per_request, n_pos, n_neg = _row_auc(s, pos, m)
    weights = None if weighting == "uniform" else n_pos + n_neg
    value = masked_mean(per_request, weights)
    if return_count:
        return value, int(np.count_nonzero(~np.isnan(per_request)))
    return value


def logloss(probs: Any, labels: Any, mask: Any = None, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy over valid entries (any shape, typically ``[B, L]``).

    ``probs`` are clipped to ``[eps, 1 - eps]`` so certain-but-wrong predictions cost a
    large finite amount instead of infinity. For binary labels and probabilities inside
    that range it equals ``sklearn.metrics.log_loss(labels[mask], probs[mask])``.
    Soft labels in ``[0, 1]`` are accepted (cross-entropy against the label).

    Returns:
        The mean loss (natural log), or ``float('nan')`` if there is no valid entry.

    Raises:
        ValueError: on shape mismatch, non-finite probs or probs outside ``[0, 1]``
            (e.g. logits passed by mistake), or labels outside ``[0, 1]``.
    """
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps!r}")
    p, y, m = _scores_labels_mask(probs, labels, mask, scores_name="probs")
    check_finite(y, m, "labels")
    p_valid = p[m].astype(np.float64)
    y_valid = y[m].astype(np.float64)
    if np.any((p_valid < 0) | (p_valid > 1)):
        raise ValueError("probs must lie in [0, 1] in valid entries (got logits?)")
    if np.any((y_valid < 0) | (y_valid > 1)):
        raise ValueError("labels must lie in [0, 1] in valid entries")
    if p_valid.size == 0:
        return float("nan")
    p_valid = np.clip(p_valid, eps, 1.0 - eps)
    losses = -(y_valid * np.log(p_valid) + (1.0 - y_valid) * np.log1p(-p_valid))
    return float(losses.mean())
