"""Shared input coercion and validation for :mod:`genrerank.metrics`.

Every metric accepts numpy arrays, torch tensors or nested sequences. Torch is never
imported here: tensors are recognised by duck typing (``.detach().cpu().numpy()``) so the
metrics stay usable (and cheap to import) without torch.

Validation only looks at *valid* (mask True) entries, because padded slots may hold
arbitrary junk, NaN included. Helpers that hand arrays on to the metrics therefore
also overwrite padded slots with a harmless fill value: ``NaN * 0`` is still NaN, so
masking by multiplication alone would not be enough.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "as_array",
    "as_mask",
    "check_binary",
    "check_finite",
    "check_k",
    "check_nonnegative",
    "check_shape",
    "masked_mean",
    "position_discount",
    "sort_rows",
    "tie_groups",
]


def as_array(x: Any, name: str) -> np.ndarray:
    """Convert ``x`` (numpy array, torch tensor, sequence) to a numpy array."""
    if x is None:
        raise ValueError(f"{name} must not be None")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        t = x.detach().cpu()
        try:
            return np.asarray(t.numpy())
        except (TypeError, RuntimeError):
            # dtypes numpy lacks (bfloat16, ...): upcast on the torch side first.
            return np.asarray(t.double().numpy())
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got dtype=object")
    return arr


def check_shape(arr: np.ndarray, name: str, shape: tuple[int, ...], ref: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``arr.shape == shape``."""
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(arr.shape)} but {ref} has shape {tuple(shape)}")


def as_mask(mask: Any, shape: tuple[int, ...], ref: str) -> np.ndarray:
    """Return a boolean mask of ``shape``; ``None`` means every entry is valid.

    Boolean masks are used as is; numeric masks must contain only 0/1.
    """
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = as_array(mask, "mask")
    check_shape(m, "mask", shape, ref)
    if m.dtype == bool:
        return m
    if not np.issubdtype(m.dtype, np.number):
        raise ValueError(f"mask must be boolean, got dtype={m.dtype}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("mask must be boolean or contain only 0/1")
    return m.astype(bool)


def _require_numeric(arr: np.ndarray, name: str) -> None:
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{name} must be numeric, got dtype={arr.dtype}")


def check_finite(arr: np.ndarray, mask: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` if a valid entry of ``arr`` is NaN or infinite."""
    _require_numeric(arr, name)
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr[mask])):
        raise ValueError(f"{name} contains NaN or infinite values in valid (unmasked) entries")


def check_binary(arr: np.ndarray, mask: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` unless every valid entry of ``arr`` is 0 or 1."""
    check_finite(arr, mask, name)
    vals = arr[mask]
    if not np.all((vals == 0) | (vals == 1)):
        bad = vals[(vals != 0) & (vals != 1)]
        raise ValueError(
            f"{name} must be binary (0/1) in valid entries; found e.g. {bad.flat[0]!r}"
        )


def check_nonnegative(arr: np.ndarray, mask: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` unless every valid entry of ``arr`` is finite and >= 0."""
    check_finite(arr, mask, name)
    if np.any(arr[mask] < 0):
        raise ValueError(f"{name} must be >= 0 in valid entries")


def check_k(k: Any) -> int:
    """Validate a cut-off ``k`` (a positive integer)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def masked_mean(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """(Weighted) mean of the non-NaN entries; NaN, without a warning, if there are none."""
    keep = ~np.isnan(values)
    if not np.any(keep):
        return float("nan")
    if weights is None:
        return float(np.mean(values[keep]))
    w = weights[keep]
    total = w.sum()
    if total <= 0:
        return float("nan")
    return float(np.dot(values[keep], w) / total)


def position_discount(length: int, k: int | None = None) -> np.ndarray:
    """DCG position discount ``1 / log2(j + 2)`` for 0-based positions ``j < length``.

    Positions ``j >= k`` get discount 0 when ``k`` is given.
    """
    disc = 1.0 / np.log2(np.arange(length, dtype=np.float64) + 2.0)
    if k is not None:
        disc[k:] = 0.0
    return disc


def sort_rows(
    keys: np.ndarray, mask: np.ndarray, *, descending: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Stable per-row sort of the valid entries of a ``[B, L]`` array.

    Returns ``(order, sorted_keys)``: ``order`` are column indices (as from ``argsort``)
    and ``sorted_keys`` the sorted, sign-adjusted float64 keys. Padded entries get key
    ``+inf`` so they always come after every valid (finite) entry, and position ``j`` in
    the sorted row is the rank ``j`` among valid items. Ties keep the lower column first.
    """
    k = keys.astype(np.float64, copy=False)
    filled = np.where(mask, -k if descending else k, np.inf)
    order = np.argsort(filled, axis=1, kind="stable")
    return order, np.take_along_axis(filled, order, axis=1)


def tie_groups(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label runs of equal adjacent values in each row of a row-sorted ``[B, L]`` array.

    Returns ``(gid, starts)``: ``gid`` is a flat (row-major) array of group ids, unique
    across rows (a row never shares a group with another row), usable with
    ``np.bincount``; ``starts`` is the ``[B, L]`` boolean array marking each group's
    first element.
    """
    b, n = sorted_keys.shape
    starts = np.ones((b, n), dtype=bool)
    starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    gid = np.cumsum(starts.ravel()) - 1
    return gid, starts
