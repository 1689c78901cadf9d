"""Masked greedy decoding: positions left to right, each takes its best unchosen candidate."""

from __future__ import annotations

import torch

from genrerank.decoding import mask_beyond_length, prepare_inputs, register_decoder


@register_decoder("greedy")
@torch.no_grad()
def greedy(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
) -> torch.Tensor:
    """``y_t = argmax_{x unchosen, real} log p(x | t)`` -> LongTensor ``[B, m]``.

    Ties go to the lower candidate index (``argmax`` keeps the first maximum).
    """
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    b, n, _ = lp.shape
    out = torch.full((b, m), -1, dtype=torch.long, device=lp.device)
    if m == 0 or n == 0:
        return out
    # Position-major copy so each step reads one contiguous [B, N] slice.
    columns = lp.permute(2, 0, 1)[:m].contiguous()
    blocked = torch.zeros(b, n, device=lp.device).masked_fill_(~mask, float("-inf"))
    for t in range(m):
        pick = (columns[t] + blocked).argmax(1)
        out[:, t] = pick
        # Rows already past their length keep blocking junk; their slots are reset below.
        blocked.scatter_(1, pick[:, None], float("-inf"))
    return mask_beyond_length(out, lengths)
