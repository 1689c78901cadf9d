"""Train / validation / test splits.

By time (the default): requests are ordered by (time, request_id) and cut by count: the earliest
``train`` share is the training split, the next ``valid`` share the validation split, the rest
the test split. No test request is older than a training request, so nothing from the future
leaks into training. Validation is for early stopping and model selection; the test split is
only ever reported. Loaders that have a published split (Avito: by day) assign ``split``
themselves instead.

:func:`assign_split` also offers a split by user (each user's requests in one split, for
generalisation to unseen users; the fractions are then shares of users) and by a column that
names each request's split. :func:`check_splits` and :func:`split_boundary_warnings` report
missing splits and requests straddling a time cut, as messages for the caller to show.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np

from genrerank.data.schema import SPLITS

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_METHODS = ("time", "user", "column")


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(
            f"split fractions must be three non-negative numbers that sum to 1: {fractions}"
        )


def assign_time_split(
    times: np.ndarray,
    request_ids: np.ndarray,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> np.ndarray:
    """Return an array of ``"train"``/``"valid"``/``"test"`` aligned with ``times``."""
    _check_fractions(fractions)
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


# --------------------------------------------------------------------------- split options


def assign_user_split(
    users: np.ndarray, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> np.ndarray:
    """All requests of a user in one split; ``fractions`` are shares of *users*, not requests.

    Distinct users are ordered by the CRC-32 of their id (as in :mod:`genrerank.data.ids`; the
    same on every machine and run, unlike Python's salted ``hash``), ties by the id, and cut by
    count like :func:`assign_time_split`. Pass the source's user id strings, not codes that
    depend on the data's order, so that a user keeps its split across imports.
    """
    _check_fractions(fractions)
    distinct, inverse = np.unique(np.asarray(users).astype(str), return_inverse=True)
    crc = np.fromiter(
        (zlib.crc32(u.encode("utf-8")) for u in distinct), dtype=np.int64, count=len(distinct)
    )
    order = np.lexsort((distinct, crc))
    n = len(distinct)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    user_split = np.empty(n, dtype=object)
    user_split[order[:n_train]] = "train"
    user_split[order[n_train : n_train + n_valid]] = "valid"
    user_split[order[n_train + n_valid :]] = "test"
    return user_split[inverse.reshape(-1)]


def assign_column_split(
    column: np.ndarray, values: Mapping[str, str] | None = None
) -> np.ndarray:
    """The split named by a column: ``values`` maps each raw value (as a string) to train / valid
    / test; without it the raw values must already be those names."""
    mapping = dict(values) if values is not None else {s: s for s in SPLITS}
    bad_targets = {k: v for k, v in mapping.items() if v not in SPLITS}
    if bad_targets:
        raise ValueError(f"split values map to {bad_targets}; each must be one of {SPLITS}")
    raw = np.asarray(column).astype(str)
    distinct, inverse = np.unique(raw, return_inverse=True)
    inverse = inverse.reshape(-1)
    known = np.array([d in mapping for d in distinct], dtype=bool)
    if not known.all():
        row = int(np.flatnonzero(~known[inverse])[0])
        raise ValueError(
            f"split column: value {str(raw[row])!r} (first at row {row}) names no split; "
            f"expected one of {sorted(mapping)}"
        )
    return np.array([mapping[d] for d in distinct], dtype=object)[inverse]


def assign_split(
    method: str,
    *,
    request_time: np.ndarray,
    request_id: np.ndarray,
    user: np.ndarray | None = None,
    column: np.ndarray | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    values: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Split requests by ``method``: ``time`` (default; :func:`assign_time_split`), ``user``
    (:func:`assign_user_split`, fractions of users) or ``column`` (:func:`assign_column_split`;
    ``fractions`` unused). Returns ``"train"``/``"valid"``/``"test"`` per request."""
    if method == "time":
        return assign_time_split(request_time, request_id, fractions)
    if method == "user":
        if user is None:
            raise ValueError("the user split needs the user id of each request")
        return assign_user_split(user, fractions)
    if method == "column":
        if column is None:
            raise ValueError("the column split needs a column naming each request's split")
        return assign_column_split(column, values)
    raise ValueError(f"unknown split method {method!r}; choose one of {SPLIT_METHODS}")


def check_splits(request_split: np.ndarray) -> list[str]:
    """Messages about missing splits (empty when all three are present); never raises, so the
    caller decides whether a missing split is fatal."""
    split = np.asarray(request_split)
    consequence = {
        "train": "nothing to train on",
        "valid": "early stopping and model selection are impossible",
        "test": "there is nothing to report results on",
    }
    messages = [
        f"no {name} requests: {consequence[name]}"
        for name in SPLITS
        if not (split == name).any()
    ]
    other = sorted({str(s) for s in split[~np.isin(split, SPLITS)]})
    if other:
        messages.append(f"split values {other} are not one of {SPLITS}")
    return messages


def split_boundary_warnings(
    request_split: np.ndarray,
    request_time: np.ndarray,
    row_request: np.ndarray,
    row_time: np.ndarray,
    limit: int = 5,
    request_id: np.ndarray | None = None,
) -> list[str]:
    """For a time split: requests whose rows straddle a cut between consecutive splits.

    The cut between two consecutive non-empty splits (train -> valid -> test) is the earliest
    request time of the later one; a request whose earliest row is strictly before it and whose
    latest row strictly after it has events in both periods. Returns at most ``limit`` lines, one
    per such request and cut, and a count line; empty when none.
    """
    split = np.asarray(request_split)
    request_time = np.asarray(request_time)
    row_request = np.asarray(row_request, dtype=np.int64)
    row_time = np.asarray(row_time)
    present = [s for s in SPLITS if (split == s).any()]  # train -> test if valid is empty
    cuts = [
        (before, after, request_time[split == after].min())
        for before, after in zip(present, present[1:], strict=False)
    ]
    if not cuts or len(row_request) == 0:
        return []
    # Earliest and latest row time per request, from rows sorted by (request, time).
    order = np.lexsort((row_time, row_request))
    req_sorted, time_sorted = row_request[order], row_time[order]
    starts = np.flatnonzero(np.r_[True, req_sorted[1:] != req_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)] - 1
    reqs, first, last = req_sorted[starts], time_sorted[starts], time_sorted[ends]
    lines: list[str] = []
    flagged = np.zeros(len(reqs), dtype=bool)
    for before, after, cut in cuts:
        across = (first < cut) & (last > cut)
        flagged |= across
        for k in np.flatnonzero(across)[: max(limit - len(lines), 0)]:
            r = int(reqs[k])
            name = f"request {r}" if request_id is None else f"request {str(request_id[r])!r}"
            lines.append(
                f"{name} ({split[r]}, time {int(request_time[r])}) has rows from "
                f"{int(first[k])} to {int(last[k])}, across the {before}/{after} cut at "
                f"{int(cut)}"
            )
    n = int(flagged.sum())
    if n:
        lines.append(
            f"{n} of {len(reqs)} requests have rows on both sides of a split cut; their later "
            "events fall in the next split's period"
        )
    return lines
