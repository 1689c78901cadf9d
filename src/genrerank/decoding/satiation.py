"""Greedy decoding with a satiation penalty: the strongest simple list method (MMR-style).

``y_t = argmax_x log p(x | t) - penalty * sum_{k < t} decay^(t-k-1) [cat(x) = cat(y_k)]``
over unchosen real candidates. On item-scoring models (pointwise, PRM) ``log p`` differs from the
item's score by a per-request constant, so this is "sort by score, but pay for repeating a
category just shown", the satiation a user feels. ``penalty = 0`` is exactly :func:`greedy`.
The penalty is tuned on the validation split (``"penalty": "auto"``) like any decoder option.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from genrerank.constraints.batch import apply_allowed, prepare_constraints
from genrerank.constraints.compile import RequestConstraints
from genrerank.decoding import mask_beyond_length, prepare_inputs, register_decoder
from genrerank.decoding.greedy import greedy


@register_decoder("satiation")
@torch.no_grad()
def satiation(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
    *,
    category: torch.Tensor,
    penalty: float = 0.5,
    decay: float = 0.5,
    constraints: Sequence[RequestConstraints | None] | None = None,
) -> torch.Tensor:
    """Greedy decoding with a decaying same-category penalty -> LongTensor ``[B, m]``.

    ``category`` ``[B, N]``: each candidate's category (any integer id; padded entries are
    ignored). ``penalty >= 0`` in log-probability units, ``decay`` in ``[0, 1]``.
    ``constraints``: each step's argmax runs over the candidates they allow.
    """
    if not penalty >= 0.0:
        raise ValueError(f"satiation: penalty must be >= 0, got {penalty}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"satiation: decay must be in [0, 1], got {decay}")
    if penalty == 0.0:
        return greedy(log_probs, candidate_mask, list_length, constraints=constraints)
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    rcs = prepare_constraints(constraints, lengths, mask)
    b, n, _ = lp.shape
    if tuple(category.shape) != (b, n):
        raise ValueError(f"category must be [B, N] = {(b, n)}, got {tuple(category.shape)}")
    out = torch.full((b, m), -1, dtype=torch.long, device=lp.device)
    if m == 0 or n == 0:
        return out
    category = category.to(lp.device)
    rows = torch.arange(b, device=lp.device)
    satiety = torch.zeros(b, n, device=lp.device)
    available = mask.clone()
    for t in range(m):
        score = (lp[:, :, t] - penalty * satiety).masked_fill(~available, float("-inf"))
        if rcs is not None:
            score = apply_allowed(score, rcs, out[:, :t], t < lengths)
        pick = score.argmax(1)
        out[:, t] = pick
        available[rows, pick] = False
        same = category == category[rows, pick].unsqueeze(1)
        satiety = decay * satiety + same.to(satiety.dtype)
    return mask_beyond_length(out, lengths)
