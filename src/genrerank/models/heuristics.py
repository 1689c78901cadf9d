"""Heuristic list generators that need no training: upstream order and MMR diversity.

Inputs are padded numpy arrays over candidates ``[B, N]`` with ``mask`` True for real candidates;
outputs are candidate indices ``[B, m]`` in display order with ``-1`` where a request has fewer
than ``m`` candidates. Padded candidates are never chosen.
"""

from __future__ import annotations

import numpy as np


def upstream_order(scores: np.ndarray, mask: np.ndarray, m: int) -> np.ndarray:
    """Top m candidates by upstream score (ties: lower index first)."""
    scores = np.where(mask, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :m]
    valid = np.take_along_axis(mask, order, axis=1)
    return np.where(valid, order, -1)


def mmr(
    scores: np.ndarray,
    categories: np.ndarray,
    mask: np.ndarray,
    m: int,
    diversity: float = 0.5,
) -> np.ndarray:
    """Maximal marginal relevance over categories.

    Each step picks ``argmax (1 - diversity) * z_i - diversity * [category_i already shown]``,
    with ``z`` the upstream scores standardised per request so ``diversity`` means the same
    thing whatever the score scale. ``diversity = 0`` is the upstream order.
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"mmr: diversity must be in [0, 1], got {diversity}")
    b, n = scores.shape
    count = np.maximum(mask.sum(axis=1, keepdims=True), 1)
    mean = np.where(mask, scores, 0.0).sum(axis=1, keepdims=True) / count
    std = np.sqrt(np.where(mask, (scores - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / count)
    z = np.where(mask, (scores - mean) / np.where(std > 0, std, 1.0), 0.0)
    available = mask.copy()
    shown = np.zeros((b, n), dtype=bool)  # shown[b, i]: candidate i's category already shown
    out = np.full((b, m), -1, dtype=np.int64)
    rows = np.arange(b)
    for t in range(min(m, n)):
        value = (1.0 - diversity) * z - diversity * shown
        value = np.where(available, value, -np.inf)
        pick = np.argmax(value, axis=1)
        ok = available[rows, pick]
        out[ok, t] = pick[ok]
        available[rows[ok], pick[ok]] = False
        picked_cat = categories[rows, pick]
        shown |= ok[:, None] & (categories == picked_cat[:, None])
    return out
