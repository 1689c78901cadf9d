"""The logging policy: Plackett-Luce sampling over upstream scores, with a temperature.

A list of m of n candidates is drawn without replacement, each next item with probability::

    P(y_j = i | y_<j) = exp(x_i / T) / sum_{i' not in y_<j} exp(x_i' / T),   x = upstream score.

Vectorised with the Gumbel top-k trick: the m largest of ``x_i / T + Gumbel_i`` in descending order
are an exact Plackett-Luce sample. ``T -> 0`` is the deterministic sort by upstream score, large T
is near uniform: T controls how much the logs explore (and so how well they reveal list effects).
:func:`plackett_luce_log_prob` gives the logging propensity of any list, for off-policy estimators.
"""

from __future__ import annotations

import numpy as np
from scipy import special


def plackett_luce_sample(
    scores: np.ndarray,
    m: int,
    temperature: float,
    rng: np.random.Generator | int | np.random.SeedSequence,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """[B, m] candidate indices drawn by Plackett-Luce over ``scores`` [B, n].

    ``mask`` [B, n] (True = a real candidate) keeps padding out; every row needs >= m candidates.
    Gumbel noise is always drawn (also for T = 0) so the stream does not depend on T.
    """
    rng = np.random.default_rng(rng)
    scores = np.asarray(scores, dtype=np.float64)
    B, n = scores.shape
    if not 1 <= m <= n:
        raise ValueError(f"need 1 <= m <= n, got m={m}, n={n}")
    gumbel = rng.gumbel(size=(B, n))
    keys = scores / temperature + gumbel if temperature > 0 else scores.copy()
    if mask is not None:
        if (np.asarray(mask).sum(axis=1) < m).any():
            raise ValueError(f"a request has fewer than m={m} valid candidates")
        keys = np.where(mask, keys, -np.inf)
    if m < n:
        top = np.argpartition(-keys, m - 1, axis=1)[:, :m]
    else:
        top = np.broadcast_to(np.arange(n), (B, n)).copy()
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def plackett_luce_log_prob(
    scores: np.ndarray, lists: np.ndarray, temperature: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """[B] log-probability of each (full, unpadded) list under Plackett-Luce at ``temperature``."""
    if temperature <= 0:
        raise ValueError("the log-probability needs temperature > 0")
    x = np.asarray(scores, dtype=np.float64) / temperature
    if mask is not None:
        x = np.where(mask, x, -np.inf)
    lists = np.asarray(lists)
    B, m = lists.shape
    rows = np.arange(B)
    avail = np.isfinite(x)
    total = np.zeros(B)
    for j in range(m):  # m steps; each vectorised over requests and candidates
        lse = special.logsumexp(np.where(avail, x, -np.inf), axis=1)
        total += x[rows, lists[:, j]] - lse
        avail[rows, lists[:, j]] = False
    return total
