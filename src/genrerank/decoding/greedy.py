"""Masked greedy decoding: positions left to right, each takes its best unchosen candidate."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from genrerank.constraints.batch import apply_allowed, prepare_constraints
from genrerank.constraints.compile import RequestConstraints
from genrerank.decoding import mask_beyond_length, prepare_inputs, register_decoder


@register_decoder("greedy")
@torch.no_grad()
def greedy(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
    *,
    constraints: Sequence[RequestConstraints | None] | None = None,
) -> torch.Tensor:
    """``y_t = argmax_{x unchosen, real} log p(x | t)`` -> LongTensor ``[B, m]``.

    Ties go to the lower candidate index (``argmax`` keeps the first maximum). With
    ``constraints`` the argmax runs over the candidates they allow at each step.
    """
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    rcs = prepare_constraints(constraints, lengths, mask)
    b, n, _ = lp.shape
    out = torch.full((b, m), -1, dtype=torch.long, device=lp.device)
    if m == 0 or n == 0:
        return out
    # Position-major copy so each step reads one contiguous [B, N] slice.
    columns = lp.permute(2, 0, 1)[:m].contiguous()
    blocked = torch.zeros(b, n, device=lp.device).masked_fill_(~mask, float("-inf"))
    for t in range(m):
        step = columns[t] + blocked
        if rcs is not None:
            step = apply_allowed(step, rcs, out[:, :t], t < lengths)
        pick = step.argmax(1)
        out[:, t] = pick
        # Rows already past their length keep blocking junk; their slots are reset below.
        blocked.scatter_(1, pick[:, None], float("-inf"))
    return mask_beyond_length(out, lengths)
