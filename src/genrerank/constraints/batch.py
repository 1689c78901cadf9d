"""Constraints for a batch, and the masking step every decoder shares.

:func:`constraints_for_batch` compiles one :class:`~genrerank.constraints.ConstraintSet` (or one
per request) against a :class:`~genrerank.data.dataset.Batch`: each request's ``category``,
``creator``, ``is_cold_start`` and ``is_long_tail`` columns, its candidate mask and its item ids.
Decoders take the result as ``constraints=`` and call :func:`prepare_constraints` (length and
mask checks, feasibility) before decoding and :func:`allowed_mask` at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from genrerank.constraints.compile import (
    DEFAULT_MAX_NODES,
    RequestConstraints,
    compile_constraints,
)
from genrerank.constraints.spec import ConstraintSet

if TYPE_CHECKING:
    from genrerank.data.dataset import Batch, RerankDataset

__all__ = [
    "allowed_mask",
    "apply_allowed",
    "batch_item_ids",
    "constraints_for_batch",
    "prepare_constraints",
]


def _lengths(list_length: int | torch.Tensor | Sequence[int], b: int) -> list[int]:
    if isinstance(list_length, torch.Tensor):
        if list_length.dim() == 0:
            return [int(list_length)] * b
        return [int(x) for x in list_length.tolist()]
    if isinstance(list_length, int | np.integer):
        return [int(list_length)] * b
    values = [int(x) for x in list_length]
    if len(values) != b:
        raise ValueError(f"constraints_for_batch: {len(values)} list lengths for {b} requests")
    return values


def constraints_for_batch(
    cs: ConstraintSet | Sequence[ConstraintSet | None] | None, batch: Batch,
    list_length: int | torch.Tensor | Sequence[int], *,
    item_ids: Sequence[Sequence[str]] | None = None,
    request_ids: Sequence[str] | None = None, max_nodes: int = DEFAULT_MAX_NODES,
) -> list[RequestConstraints | None]:
    """One :class:`RequestConstraints` per request of ``batch`` (None where the set is None or
    empty, so decoders keep their unconstrained path for it).

    ``cs``: one set for every request, or a list with one per request. ``list_length``: an int
    or per-request lengths ``[B]`` (each request's list is ``min(length, real candidates)``).
    ``item_ids [B][n_b]`` (optional) name the candidates for required / forbidden ids; without
    them the ids are matched by their hash (``batch.item_hash``, CRC-32, see
    :mod:`genrerank.data.ids`), which a data set's batches carry. ``request_ids`` go into error
    messages (default: the batch's ``request_index`` rows).
    """
    b = batch.batch_size
    if cs is None:
        return [None] * b
    sets = [cs] * b if isinstance(cs, ConstraintSet) else list(cs)
    if len(sets) != b:
        raise ValueError(f"constraints_for_batch: {len(sets)} constraint sets for {b} requests")
    lengths = _lengths(list_length, b)
    mask = batch.candidate_mask.cpu().numpy()
    columns = {name: getattr(batch, name).cpu().numpy()
               for name in ("category", "creator", "is_cold_start", "is_long_tail")}
    hashes = None if batch.item_hash is None else batch.item_hash.cpu().numpy()
    rows = batch.request_index.cpu().numpy()
    out: list[RequestConstraints | None] = []
    for r, s in enumerate(sets):
        if s is None or s.is_empty():
            out.append(None)
            continue
        ids: Sequence[str] | None = None
        if s.required or s.forbidden:
            ids = item_ids[r] if item_ids is not None else _ids_by_hash(s, hashes, r, mask[r])
            ids = list(ids) + [""] * (mask.shape[1] - len(ids))  # padded slots: never named
        rid = request_ids[r] if request_ids is not None else f"row {int(rows[r])}"
        out.append(compile_constraints(
            s, category=columns["category"][r], creator=columns["creator"][r],
            is_cold_start=columns["is_cold_start"][r], is_long_tail=columns["is_long_tail"][r],
            item_ids=ids, candidate_mask=mask[r], list_length=lengths[r], request_id=rid,
            max_nodes=max_nodes))
    return out


def _ids_by_hash(cs: ConstraintSet, hashes: np.ndarray | None, r: int,
                 mask: np.ndarray) -> list[str]:
    """Stand-in ids for request ``r``: a candidate whose hash equals a named id's hash gets
    that id, every other one a name no constraint uses."""
    from genrerank.data.ids import hash_item_id

    if hashes is None:
        raise ValueError("constraints_for_batch: required / forbidden ids need item_ids (the "
                         "batch carries no item hashes)")
    names = {hash_item_id(i): i for i in (*cs.required, *cs.forbidden)}
    return [names.get(int(h), f"\x00{j}") if mask[j] else f"\x00{j}"
            for j, h in enumerate(hashes[r].tolist())]


def batch_item_ids(dataset: RerankDataset, batch: Batch, with_items: bool = True,
                   ) -> tuple[list[list[str]] | None, list[str]]:
    """``(item ids per request, request ids)`` of a batch drawn from ``dataset`` (item ids
    None unless ``with_items``)."""
    local = np.searchsorted(dataset.rows, batch.request_index.cpu().numpy())
    ids = None
    if with_items:
        column = dataset.table.column("item_id")
        ids = [[str(x) for x in column[int(i)].as_py()] for i in local]
    return ids, [str(dataset.request_ids[int(i)]) for i in local]


def prepare_constraints(
    constraints: Sequence[RequestConstraints | None] | None, lengths: torch.Tensor,
    candidate_mask: torch.Tensor,
) -> list[RequestConstraints | None] | None:
    """What a decoder does before its first step: None when no request is constrained (the
    decoder then runs its unconstrained code, unchanged); else the per-request constraints at
    the decoder's list lengths ``lengths [B]`` (recompiled for a request whose constraints
    were compiled for another length), each checked feasible
    (:class:`~genrerank.constraints.InfeasibleConstraints` otherwise)."""
    if constraints is None:
        return None
    if isinstance(constraints, ConstraintSet | dict):
        raise TypeError("decoders take compiled per-request constraints: pass "
                        "constraints_for_batch(constraint_set, batch, list_length)")
    b, n = candidate_mask.shape
    rcs = list(constraints)
    if len(rcs) != b:
        raise ValueError(f"constraints: {len(rcs)} entries for a batch of {b} requests")
    mask = candidate_mask.cpu().numpy()
    out: list[RequestConstraints | None] = []
    for r, rc in enumerate(rcs):
        if rc is None or rc.cs.is_empty():
            out.append(None)
            continue
        if not isinstance(rc, RequestConstraints):
            raise TypeError(f"constraints[{r}] is a {type(rc).__name__}, not RequestConstraints")
        if rc.n != n or not np.array_equal(rc.real, mask[r]):
            raise ValueError(f"constraints[{r}] was compiled for other candidates (n = {rc.n}, "
                             f"{int(rc.real.sum())} real) than the decoder's (n = {n}, "
                             f"{int(mask[r].sum())} real)")
        rc = rc.for_length(int(lengths[r]))
        rc.check_feasible()
        out.append(rc)
    return out if any(rc is not None for rc in out) else None


def allowed_mask(
    constraints: Sequence[RequestConstraints | None], prefixes: torch.Tensor | np.ndarray,
    request_of_row: Sequence[int] | np.ndarray | None = None,
    active: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """bool ``[R, N]`` for one decoding step: for each row (a request, or one of its beams /
    samples: ``request_of_row[row]``, default the row itself) with prefix ``prefixes [R, t]``,
    the candidates its constraints allow next; all True for unconstrained rows and rows not
    ``active`` (past their length, dead beams), whose choice does not matter."""
    pre = prefixes.cpu().numpy() if isinstance(prefixes, torch.Tensor) else np.asarray(prefixes)
    rows = pre.shape[0]
    req = np.arange(rows) if request_of_row is None else np.asarray(request_of_row)
    act = np.ones(rows, np.bool_) if active is None else (
        active.cpu().numpy() if isinstance(active, torch.Tensor) else np.asarray(active))
    n = next(rc.n for rc in constraints if rc is not None)
    out = np.ones((rows, n), np.bool_)
    for row in range(rows):
        rc = constraints[int(req[row])]
        if rc is None or not act[row]:
            continue
        out[row] = rc.allowed(pre[row].tolist())
    return out


def apply_allowed(
    scores: torch.Tensor, constraints: Sequence[RequestConstraints | None],
    prefixes: torch.Tensor, active: torch.Tensor | None = None,
    request_of_row: Sequence[int] | np.ndarray | None = None, fill: float = float("-inf"),
) -> torch.Tensor:
    """``scores [R, N]`` with the candidates the constraints do not allow next set to
    ``fill`` (see :func:`allowed_mask`); a new tensor, rows without constraints unchanged."""
    if all(rc is None for rc in constraints):
        return scores
    allowed = allowed_mask(constraints, prefixes, request_of_row, active)
    if not allowed.all():
        lost = ~allowed.any(1)
        if lost.any():  # feasible constraints always leave a candidate: a bug if reached
            row = int(np.flatnonzero(lost)[0])
            raise RuntimeError(f"constraints: no candidate is allowed at position "
                               f"{prefixes.shape[1]} of row {row}")
        scores = scores.masked_fill(~torch.from_numpy(allowed).to(scores.device), fill)
    return scores

