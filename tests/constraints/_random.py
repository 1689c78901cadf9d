"""Random requests and constraint sets for the property tests, and a brute-force oracle."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np

from genrerank.constraints import (
    ConstraintSet,
    Quota,
    RequestConstraints,
    Spacing,
    compile_constraints,
)

#: Random cases per property test (``GENRERANK_CONSTRAINT_CASES``; small by default so the
#: folder runs in well under a minute).
CASES = int(os.environ.get("GENRERANK_CONSTRAINT_CASES", "40"))


@dataclass
class Request:
    category: np.ndarray  # [n]
    creator: np.ndarray
    cold: np.ndarray
    tail: np.ndarray
    mask: np.ndarray
    ids: list[str]
    m: int

    @property
    def n(self) -> int:
        return len(self.ids)

    def compile(self, cs: ConstraintSet, m: int | None = None, **kw: object) -> RequestConstraints:
        return compile_constraints(cs, category=self.category, creator=self.creator,
                                   is_cold_start=self.cold, is_long_tail=self.tail,
                                   item_ids=self.ids, candidate_mask=self.mask,
                                   list_length=self.m if m is None else m, **kw)


def random_request(rng: np.random.Generator, n_max: int = 30, m_max: int = 10,
                   n_min: int = 1) -> Request:
    n = int(rng.integers(n_min, n_max + 1))
    cats = int(rng.integers(1, 6))
    creators = int(rng.integers(1, max(2, n)))
    mask = rng.random(n) < rng.uniform(0.5, 1.0)
    if not mask.any():
        mask[int(rng.integers(n))] = True
    return Request(
        category=rng.integers(0, cats, n), creator=rng.integers(0, creators, n),
        cold=rng.random(n) < 0.3, tail=rng.random(n) < 0.3, mask=mask,
        ids=[f"v{i}" for i in range(n)], m=int(rng.integers(0, m_max + 1)))


def random_set(rng: np.random.Generator, req: Request, size: float = 1.0) -> ConstraintSet:
    """A random constraint set over ``req``'s attributes: often feasible, sometimes not."""
    n = req.n
    quotas = []
    for _ in range(int(rng.integers(0, 4))):
        attr = str(rng.choice(["category", "creator", "cold_start", "long_tail"]))
        value = None
        if attr == "category":
            value = int(rng.choice(req.category))
        elif attr == "creator":
            value = int(rng.choice(req.creator))
        low = int(rng.integers(0, 3)) if rng.random() < 0.6 else 0
        high = None if rng.random() < 0.5 else low + int(rng.integers(0, 3))
        within = None if rng.random() < 0.5 else int(rng.integers(1, max(2, req.m + 2)))
        quotas.append(Quota(attr, value, min=low, max=high, within=within))
    cap = None if rng.random() < 0.6 else int(rng.integers(1, 3))
    real = [req.ids[i] for i in np.flatnonzero(req.mask)]
    required: list[str] = []
    if rng.random() < 0.3 * size:
        required = [str(x) for x in rng.choice(real, size=min(len(real), int(rng.integers(1, 3))),
                                               replace=False)]
    if rng.random() < 0.03:
        required.append(f"v{n + 5}")  # not a candidate: infeasible
    forbidden: list[str] = []
    if rng.random() < 0.3:
        forbidden = [str(x) for x in rng.choice(req.ids, size=min(n, int(rng.integers(1, 3))),
                                                replace=False)]
    spacing = []
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.5 else 0):
        spacing.append(Spacing(str(rng.choice(["category", "creator"])),
                               int(rng.integers(1, 4))))
    return ConstraintSet(tuple(quotas), cap, tuple(required), tuple(forbidden), tuple(spacing))


def brute_lists(rc: RequestConstraints) -> list[tuple[int, ...]]:
    """Every valid list (tiny cases only)."""
    real = np.flatnonzero(rc.real).tolist()
    return [p for p in itertools.permutations(real, rc.list_length) if not rc.violations(p)]


def brute_allowed(valid: list[tuple[int, ...]], prefix: tuple[int, ...], n: int) -> np.ndarray:
    out = np.zeros(n, np.bool_)
    t = len(prefix)
    for p in valid:
        if p[:t] == prefix and t < len(p):
            out[p[t]] = True
    return out
