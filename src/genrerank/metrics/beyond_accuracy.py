"""Beyond-accuracy metrics of displayed lists: entropy, diversity, exposure, fairness.

Inputs describe the displayed lists as padded ``[B, M]`` arrays (``[B, M, D]`` for
embeddings) with a boolean ``mask [B, M]`` (True = real slot, ``None`` = all valid).
Padded slots are ignored completely, whatever they hold (NaN included). Column ``j`` is
display position ``j`` (0-based) where a metric is position weighted, with weight
``1 / log2(j + 2)`` as in DCG.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genrerank.metrics._masking import (
    as_array,
    as_mask,
    check_binary,
    check_finite,
    masked_mean,
    position_discount,
    tie_groups,
)

__all__ = [
    "category_entropy",
    "creator_entropy",
    "creator_exposure_gini",
    "exposure_share",
    "intra_list_diversity",
    "list_entropy",
]


def _values_and_mask(values: Any, mask: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    v = as_array(values, name)
    if v.ndim != 2:
        raise ValueError(f"{name} must be 2-D [B, M], got shape {tuple(v.shape)}")
    m = as_mask(mask, v.shape, name)
    check_finite(v, m, name)
    return v, m


def _value_groups(v: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row counts of each distinct valid value.

    Returns ``(counts, row)``: for every group of equal values in a row, its number of
    valid entries (possibly 0) and the row it belongs to.
    """
    # Padded slots may sit in any group (they get a placeholder value); they are
    # counted with weight 0, which keeps them out of every result.
    filled = np.where(m, v, 0)
    order = np.argsort(filled, axis=1, kind="stable")
    gid, starts = tie_groups(np.take_along_axis(filled, order, axis=1))
    n_groups = int(gid[-1]) + 1 if gid.size else 0
    m_sorted = np.take_along_axis(m, order, axis=1)
    counts = np.bincount(gid, weights=m_sorted.ravel(), minlength=n_groups)
    return counts, np.nonzero(starts)[0]


def list_entropy(
    values: Any,
    mask: Any = None,
    base: float = 2,
    normalize: bool = False,
    *,
    reduce: bool = True,
) -> float | np.ndarray:
    """Shannon entropy of the distribution of ``values`` within each displayed list.

    H = -sum_v p_v log_base(p_v), with p_v the share of the list's valid slots holding
    value v. ``normalize=True`` divides by log_base(#valid slots), the maximum (all
    distinct), giving [0, 1]; a list of one item is defined as 0. Lists without valid
    slots are undefined (NaN per request, excluded from the mean).

    Args:
        values: ``[B, M]`` discrete ids (e.g. categories, creators).
        mask: ``[B, M]`` boolean validity mask; ``None`` = all valid.
        base: logarithm base (2 = bits).
        normalize: divide by the maximum entropy of the list length.
        reduce: mean over lists (float) or per-list ``[B]`` array.
    """
    if not (base > 0 and base != 1):
        raise ValueError(f"base must be positive and != 1, got {base!r}")
    v, m = _values_and_mask(values, mask, "values")
    b = v.shape[0]
    n = m.sum(axis=1).astype(np.float64)
    counts, row = _value_groups(v, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = counts / n[row]
        plogp = np.where(counts > 0, p * np.log(np.where(counts > 0, p, 1.0)), 0.0)
    entropy = -np.bincount(row, weights=plogp, minlength=b)
    entropy = np.maximum(entropy, 0.0)  # -0.0 / rounding noise for single-valued lists
    if normalize:
        out = np.where(n > 1, entropy / np.log(np.maximum(n, 2.0)), 0.0)
    else:
        out = entropy / np.log(base)
    out[n == 0] = np.nan
    return masked_mean(out) if reduce else out


def category_entropy(
    categories: Any,
    mask: Any = None,
    base: float = 2,
    normalize: bool = False,
    *,
    reduce: bool = True,
) -> float | np.ndarray:
    """Entropy of item categories within each displayed list; see :func:`list_entropy`."""
    return list_entropy(categories, mask, base=base, normalize=normalize, reduce=reduce)


def creator_entropy(
    creators: Any,
    mask: Any = None,
    base: float = 2,
    normalize: bool = False,
    *,
    reduce: bool = True,
) -> float | np.ndarray:
    """Entropy of item creators within each displayed list; see :func:`list_entropy`."""
    return list_entropy(creators, mask, base=base, normalize=normalize, reduce=reduce)


def intra_list_diversity(
    features: Any, mask: Any = None, *, reduce: bool = True
) -> float | np.ndarray:
    """Intra-list diversity: mean dissimilarity over the unordered pairs of each list.

    - 2-D ``[B, M]`` features (discrete ids, e.g. categories): share of valid unordered
      pairs whose values differ.
    - 3-D ``[B, M, D]`` features (embeddings): mean over valid pairs of
      ``1 - cosine_similarity``; zero-norm valid embeddings raise ``ValueError``.

    Lists with fewer than 2 valid items are undefined (NaN per list, excluded from the
    mean); the mean is NaN if no list qualifies.
    """
    f = as_array(features, "features")
    if f.ndim == 2:
        v, m = _values_and_mask(f, mask, "features")
        n = m.sum(axis=1).astype(np.float64)
        counts, row = _value_groups(v, m)
        same_pairs = np.bincount(row, weights=counts * (counts - 1) / 2.0, minlength=v.shape[0])
    elif f.ndim == 3:
        m = as_mask(mask, f.shape[:2], "features [B, M, :]")
        x = f.astype(np.float64, copy=True)
        x[~m] = 0.0  # in place; NaN junk in padding would survive multiplication by 0
        sq_norms = np.einsum("bmd,bmd->bm", x, x)
        # A NaN/inf component makes the squared norm non-finite: one cheap [B, M] check.
        if not np.all(np.isfinite(sq_norms[m])):
            raise ValueError("features contains NaN, infinite or overflowing values in valid slots")
        if np.any(sq_norms[m] == 0):
            raise ValueError("features has a zero-norm embedding in a valid slot")
        norms = np.sqrt(sq_norms)
        inv_norms = np.where(m, 1.0 / np.where(m, norms, 1.0), 0.0)
        n = m.sum(axis=1).astype(np.float64)
        # sum_{i<j} cos(u_i, u_j) = (||sum_i u_i||^2 - n) / 2 for unit vectors u_i: O(M*D)
        # per list instead of materialising the M x M similarity matrix.
        total = np.einsum("bmd,bm->bd", x, inv_norms)
        same_pairs = (np.einsum("bd,bd->b", total, total) - n) / 2.0
    else:
        raise ValueError(
            f"features must be [B, M] ids or [B, M, D] embeddings, got shape {tuple(f.shape)}"
        )
    pairs = n * (n - 1) / 2.0
    out = np.full(n.shape[0], np.nan)
    defined = n >= 2
    out[defined] = 1.0 - same_pairs[defined] / pairs[defined]
    return masked_mean(out) if reduce else out


def _slot_weights(shape: tuple[int, ...], m: np.ndarray, position_weighted: bool) -> np.ndarray:
    w = position_discount(shape[1]) if position_weighted else np.ones(shape[1])
    return np.where(m, w, 0.0)


def exposure_share(flags: Any, mask: Any = None, position_weighted: bool = False) -> float:
    """Share of exposure given to flagged items (e.g. cold-start or long-tail creators).

    Pooled over all lists: (number of valid slots holding a flagged item) / (number of
    valid slots). With ``position_weighted=True`` each slot counts with its position
    weight ``1 / log2(j + 2)`` instead of 1. NaN if there is no valid slot.

    Args:
        flags: ``[B, M]`` booleans (or 0/1) marking the items of interest.
        mask: ``[B, M]`` boolean validity mask; ``None`` = all valid.
    """
    fl = as_array(flags, "flags")
    if fl.ndim != 2:
        raise ValueError(f"flags must be 2-D [B, M], got shape {tuple(fl.shape)}")
    m = as_mask(mask, fl.shape, "flags")
    check_binary(fl, m, "flags")
    w = _slot_weights(fl.shape, m, position_weighted)
    total = w.sum()
    if total == 0:
        return float("nan")
    flagged = np.where(m, fl, 0) == 1
    return float(w[flagged].sum() / total)


def _gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values (sorted formula); NaN if all are 0."""
    n = x.size
    total = x.sum()
    if n == 0 or total <= 0:
        return float("nan")
    xs = np.sort(x)
    idx = np.arange(1, n + 1, dtype=np.float64)
    g = 2.0 * np.dot(idx, xs) / (n * total) - (n + 1.0) / n
    return float(max(g, 0.0))  # clip rounding noise below the minimum of 0


def creator_exposure_gini(
    creators: Any,
    mask: Any = None,
    universe: Any = None,
    position_weighted: bool = False,
) -> float:
    """Gini coefficient of total exposure per creator, over all displayed lists.

    A creator's exposure is the number of valid slots showing them (or, with
    ``position_weighted``, the sum of the slots' weights ``1 / log2(j + 2)``). With
    sorted exposures x_1 <= ... <= x_n:
    ``G = 2 * sum_i i * x_i / (n * sum_i x_i) - (n + 1) / n``;
    0 = equal exposure, towards 1 (max (n - 1) / n) = concentrated on few creators.

    Args:
        creators: ``[B, M]`` creator ids of the displayed items.
        mask: ``[B, M]`` boolean validity mask; ``None`` = all valid.
        universe: optional ids of every creator that could have been shown (e.g. all
            creators among the candidates); creators in it that were never shown count
            with zero exposure. Duplicates are ignored. Default: the creators shown.
            A shown creator missing from ``universe`` raises ``ValueError``.
        position_weighted: weight slots by position instead of counting them.

    Returns:
        The Gini coefficient; NaN if there is no exposure at all.
    """
    c, m = _values_and_mask(creators, mask, "creators")
    w = _slot_weights(c.shape, m, position_weighted)
    ids, inverse = np.unique(c[m], return_inverse=True)
    exposure = np.bincount(inverse.ravel(), weights=w[m], minlength=ids.size)
    if universe is not None:
        u = as_array(universe, "universe").ravel()
        check_finite(u, np.ones(u.shape, dtype=bool), "universe")
        u = np.unique(u)
        missing = ~np.isin(ids, u)
        if np.any(missing):
            raise ValueError(
                f"universe is missing {int(missing.sum())} displayed creator id(s), "
                f"e.g. {ids[missing][0]!r}"
            )
        full = np.zeros(u.size, dtype=np.float64)
        full[np.searchsorted(u, ids)] = exposure
        exposure = full
    return _gini(exposure)
