"""Optimal assignment: the list maximising ``sum_t log p(y_t | t)`` with distinct items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from genrerank.constraints.batch import prepare_constraints
from genrerank.constraints.compile import RequestConstraints
from genrerank.decoding import prepare_inputs, register_decoder
from genrerank.decoding.greedy import greedy


@register_decoder("hungarian")
@torch.no_grad()
def hungarian(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
    *,
    constraints: Sequence[RequestConstraints | None] | None = None,
) -> torch.Tensor:
    """Hungarian algorithm per request on the real-candidates x first-``L_b``-positions block.

    Returns LongTensor ``[B, m]``. The optimum over all lists of ``L_b`` distinct real items, so
    its total log-prob bounds every other decoder's. Loops over requests (scipy, CPU).

    ``constraints``, per request:

    - only required / forbidden ids: still the exact optimum under them. Forbidden candidates
      leave the matrix; ``n' - L`` dummy positions (score 0) absorb the unlisted candidates,
      and a required candidate may not take a dummy position, so it is listed.
    - anything else (quotas, a creator cap, spacing): assignment cannot express them. The
      unconstrained optimum is kept when it happens to satisfy them (it is then the
      constrained optimum too); otherwise the request falls back to the constrained
      :func:`greedy` list (feasible, not optimal).
    """
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    rcs = prepare_constraints(constraints, lengths, mask)
    b = lp.shape[0]
    out = np.full((b, m), -1, dtype=np.int64)
    # float64: the solver's dual potentials lose small differences in float32.
    lp_np = lp.cpu().numpy().astype(np.float64)
    mask_np = mask.cpu().numpy()
    lengths_np = lengths.cpu().numpy()
    fallback: list[int] = []
    for r in range(b):
        length = int(lengths_np[r])
        if length == 0:
            continue
        rc = None if rcs is None else rcs[r]
        if rc is not None and rc.ids_only():
            out[r, :length] = _forced_assignment(lp_np[r], rc, length)
            continue
        real = np.flatnonzero(mask_np[r])
        rows, cols = linear_sum_assignment(lp_np[r, real, :length], maximize=True)
        out[r, cols] = real[rows]
        if rc is not None and rc.violations(out[r, :length]):
            fallback.append(r)
    if fallback:
        idx = torch.tensor(fallback, dtype=torch.long, device=lp.device)
        g = greedy(lp[idx], mask[idx], lengths[idx],
                   constraints=[rcs[r] for r in fallback])  # type: ignore[index]
        out[fallback] = g.cpu().numpy()[:, :m]
    return torch.from_numpy(out).to(lp.device)


def _forced_assignment(lp: np.ndarray, rc: RequestConstraints, length: int) -> np.ndarray:
    """The optimal list of ``length`` usable candidates that holds every required one."""
    usable = np.flatnonzero(rc.usable)
    required = np.isin(usable, rc.required_idx)
    k = len(usable)
    cost = np.zeros((k, k))
    cost[:, :length] = lp[usable, :length]
    cost[required, length:] = -np.inf  # a required candidate must take a real position
    rows, cols = linear_sum_assignment(cost, maximize=True)
    lst = np.full(length, -1, dtype=np.int64)
    real = cols < length
    lst[cols[real]] = usable[rows[real]]
    return lst
