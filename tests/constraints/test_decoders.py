"""Property tests: every matrix decoder under random constraints on random padded requests.

Each case is a batch of 1-3 requests (n <= 30 candidates with random padding, m <= 10, random
categories / creators / flags, random log-probs) with a random constraint set per request
(``tests/constraints/_random.py``). Every returned list must satisfy every constraint of its
request (``violations == []``), hold distinct real candidates and have length
``L = min(m, real)``; a batch with an infeasible request must raise InfeasibleConstraints and a
feasible one never fails. ``GENRERANK_CONSTRAINT_CASES`` sets the number of cases per decoder.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from genrerank.constraints import (
    ConstraintSet,
    InfeasibleConstraints,
    Quota,
    RequestConstraints,
    Spacing,
)
from genrerank.decoding import DecodedLists, decode
from tests.constraints._random import CASES, Request, random_request, random_set


def _pad(req: Request, n: int) -> Request:
    extra = n - req.n
    return Request(np.pad(req.category, (0, extra)), np.pad(req.creator, (0, extra)),
                   np.pad(req.cold, (0, extra)), np.pad(req.tail, (0, extra)),
                   np.pad(req.mask, (0, extra)), req.ids + [f"pad{i}" for i in range(extra)],
                   req.m)


def random_batch(rng: np.random.Generator, retry: float = 0.85) -> dict[str, Any]:
    """A padded batch, its per-request constraints (some None) and whether all are feasible.
    Infeasible sets are mostly redrawn (``retry``) so most batches decode."""
    b = int(rng.integers(1, 4))
    reqs = [random_request(rng, n_max=30, m_max=10) for _ in range(b)]
    n = max(r.n for r in reqs)
    big_m = max(1, max(r.m for r in reqs))
    padded = [_pad(r, n) for r in reqs]
    rcs: list[RequestConstraints | None] = []
    for r in padded:
        if rng.random() < 0.1:
            rcs.append(None)
            continue
        rc = r.compile(random_set(rng, r))
        for _ in range(10):
            if rc.feasible() or rng.random() > retry:
                break
            rc = r.compile(random_set(rng, r))
        rcs.append(rc)
    mask = torch.from_numpy(np.stack([r.mask for r in padded]))
    logits = torch.from_numpy(rng.standard_normal((b, n, big_m)).astype(np.float32))
    logits *= float(rng.choice([0.1, 1.0, 5.0]))
    if rng.random() < 0.3:
        logits = logits.round()  # ties
    lp = logits.masked_fill(~mask[:, :, None], float("-inf")).log_softmax(1)
    lp = lp.masked_fill(~mask[:, :, None], float(rng.choice([0.0, float("nan"), -1e30])))
    lengths: int | torch.Tensor = torch.tensor([r.m for r in reqs])
    if rng.random() < 0.3:  # one int length for the batch: recompile at it
        lengths = int(rng.integers(0, big_m + 1))
        rcs = [None if rc is None else rc.for_length(lengths) for rc in rcs]
    return {
        "lp": lp, "mask": mask, "lengths": lengths, "rcs": rcs,
        "feasible": all(rc is None or rc.feasible() for rc in rcs),
        "category": torch.from_numpy(np.stack([r.category for r in padded])),
        "item_repr": torch.from_numpy(rng.standard_normal((b, n, 3)).astype(np.float32)),
        "pair": torch.from_numpy(rng.standard_normal((6, 6)).astype(np.float32)),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


DECODERS: dict[str, Any] = {
    "greedy": lambda p: {},
    "contrastive": lambda p: {"item_repr": p["item_repr"], "alpha": 0.3},
    "contrastive_a1": lambda p: {"item_repr": p["item_repr"], "alpha": 1.0},
    "satiation": lambda p: {"category": p["category"], "penalty": 0.7},
    "context": lambda p: {"category": p["category"], "pair": p["pair"], "decay": 0.5,
                          "penalty": 0.2},
    "hungarian": lambda p: {},
    "beam": lambda p: {"beam_width": 3},
    "sample": lambda p: {"k": 3, "top_k": 4, "temperature": 0.7, "seed": p["seed"]},
}


def _run(name: str, p: dict[str, Any], constraints: Any) -> torch.Tensor | DecodedLists:
    decoder = name.split("_")[0]
    return decode(decoder, p["lp"], p["mask"], p["lengths"], constraints=constraints,
                  **DECODERS[name](p))


def _lists(out: torch.Tensor | DecodedLists) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(out, DecodedLists):
        return [(out.lists[:, j], out.valid[:, j]) for j in range(out.lists.shape[1])]
    return [(out, torch.ones(out.shape[0], dtype=torch.bool))]


def check_output(name: str, p: dict[str, Any], out: torch.Tensor | DecodedLists,
                 tally: Counter) -> None:
    """Every available list: L distinct real items then -1, and no violated constraint."""
    mask = p["mask"]
    lengths = p["lengths"]
    asked = lengths.tolist() if isinstance(lengths, torch.Tensor) else [lengths] * len(mask)
    for j, (lists, valid) in enumerate(_lists(out)):
        assert j or bool(valid.all()), name  # the best list of every request exists
        for b, row in enumerate(lists.tolist()):
            if not valid[b]:
                assert all(x == -1 for x in row), name
                continue
            length = min(asked[b], int(mask[b].sum()))
            head, tail = row[:length], row[length:]
            assert all(0 <= i < mask.shape[1] and mask[b, i] for i in head), (name, row)
            assert len(set(head)) == length and all(x == -1 for x in tail), (name, row, length)
            rc = p["rcs"][b]
            if rc is not None:
                problems = rc.violations(row)
                tally[(name, "violations")] += bool(problems)
                assert problems == [], (name, rc, row, problems)
            tally[(name, "lists")] += 1


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_list_satisfies_every_constraint(name: str, tally: Counter) -> None:
    rng = np.random.default_rng(sorted(DECODERS).index(name))
    for _ in range(CASES):
        p = random_batch(rng)
        if not p["feasible"]:
            with pytest.raises(InfeasibleConstraints):
                _run(name, p, p["rcs"])
            tally[(name, "infeasible")] += 1
            continue
        try:
            out = _run(name, p, p["rcs"])
        except Exception:
            tally[(name, "failures")] += 1
            raise
        tally[(name, "cases")] += 1
        check_output(name, p, out, tally)


@pytest.mark.parametrize("name", list(DECODERS))
def test_no_or_empty_constraints_change_nothing(name: str) -> None:
    """None, all-None and empty sets give bit-identical lists (and scores) to a call without
    the keyword; unconstrained rows of a constrained batch decode as they would alone."""
    rng = np.random.default_rng(100 + sorted(DECODERS).index(name))
    for _ in range(max(5, CASES // 4)):
        p = random_batch(rng)
        decoder = name.split("_")[0]
        plain = decode(decoder, p["lp"], p["mask"], p["lengths"], **DECODERS[name](p))
        b, n = p["mask"].shape
        empty = [Request(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool),
                         np.zeros(n, bool), p["mask"][i].numpy(), [f"v{j}" for j in range(n)],
                         0).compile(ConstraintSet(quotas=(Quota("long_tail"),),
                                                  spacing=(Spacing("category", 1),)),
                                    m=int(p["mask"][i].sum()))
                 for i in range(b)]
        for constraints in (None, [None] * b, empty):
            got = _run(name, p, constraints)
            for (x, _), (y, _) in zip(_lists(plain), _lists(got), strict=True):
                assert torch.equal(x, y), name
            if isinstance(plain, DecodedLists):
                assert torch.equal(plain.scores, got.scores), name
        if decoder == "sample" or not p["feasible"]:
            continue  # sampling's random stream follows the batch: rows are not independent
        got = _run(name, p, p["rcs"])
        for (x, _), (y, _) in zip(_lists(plain), _lists(got), strict=True):
            for row, rc in enumerate(p["rcs"]):
                if rc is None:
                    assert torch.equal(x[row], y[row]), name


def test_hungarian_is_exact_under_required_and_forbidden_ids() -> None:
    """With only ids, the constrained optimum: the best of all valid lists by brute force."""
    import itertools

    rng = np.random.default_rng(5)
    for _ in range(max(10, CASES // 2)):
        req = random_request(rng, n_max=6, m_max=4, n_min=2)
        real = [req.ids[i] for i in np.flatnonzero(req.mask)]
        cs = ConstraintSet(required=tuple(rng.choice(real, min(len(real), 1), replace=False)),
                           forbidden=tuple(rng.choice(req.ids, 1)))
        rc = req.compile(cs)
        if not rc.feasible() or rc.list_length == 0:
            continue
        lp = torch.from_numpy(rng.standard_normal((1, req.n, max(1, req.m))))
        got = decode("hungarian", lp, torch.from_numpy(req.mask)[None], req.m,
                     constraints=[rc])[0].tolist()
        assert rc.violations(got) == []
        best = max((p for p in itertools.permutations(np.flatnonzero(req.mask).tolist(),
                                                      rc.list_length) if not rc.violations(p)),
                   key=lambda p: sum(float(lp[0, i, t]) for t, i in enumerate(p)))
        assert sum(float(lp[0, i, t]) for t, i in enumerate(got[:rc.list_length])) == \
            pytest.approx(sum(float(lp[0, i, t]) for t, i in enumerate(best)))


def test_decoders_refuse_constraints_for_other_candidates() -> None:
    req = _pad(random_request(np.random.default_rng(0), n_max=5, n_min=5, m_max=3), 5)
    rc = req.compile(ConstraintSet(max_per_creator=1))
    lp = torch.zeros(1, 6, 3).log_softmax(1)
    with pytest.raises(ValueError, match="other candidates"):
        decode("greedy", lp, None, 2, constraints=[rc])
    with pytest.raises(TypeError, match="constraints_for_batch"):
        decode("greedy", lp, None, 2, constraints=ConstraintSet(max_per_creator=1))
    with pytest.raises(ValueError, match="entries for a batch"):
        decode("greedy", lp, None, 2, constraints=[rc, rc])
