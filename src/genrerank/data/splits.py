"""Train / validation / test split by time.

Requests are ordered by (time, request_id) and cut by count: the earliest ``train`` share is the
training split, the next ``valid`` share the validation split, the rest the test split. No test
request is older than a training request, so nothing from the future leaks into training.
Validation is for early stopping and model selection; the test split is only ever reported.
Loaders that have a published split (Avito: by day) assign ``split`` themselves instead.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def assign_time_split(
    times: np.ndarray,
    request_ids: np.ndarray,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> np.ndarray:
    """Return an array of ``"train"``/``"valid"``/``"test"`` aligned with ``times``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(
            f"split fractions must be three non-negative numbers that sum to 1: {fractions}"
        )
    times = np.asarray(times)
    n = len(times)
    order = np.lexsort((np.asarray(request_ids).astype(str), times))
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    split = np.empty(n, dtype=object)
    split[order[:n_train]] = "train"
    split[order[n_train : n_train + n_valid]] = "valid"
    split[order[n_train + n_valid :]] = "test"
    return split
