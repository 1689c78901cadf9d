"""Contrastive decoding (NAR4Rec, after SimCTG): trade position probability for novelty.

``y_t = argmax_x (1 - alpha) p(x | t) - alpha max_{j < t} cos(h_x, h_{y_j})`` over unchosen real
candidates, with ``p`` the probability (not the log-probability), as in the paper. At ``t = 0``
the penalty is zero, so the first item is ``argmax_x p(x | 0)`` (for every alpha). The paper
does not mask chosen items; we do, so lists never repeat an item.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from genrerank.constraints.batch import apply_allowed, prepare_constraints
from genrerank.constraints.compile import RequestConstraints
from genrerank.decoding import mask_beyond_length, prepare_inputs, register_decoder
from genrerank.decoding.greedy import greedy


@register_decoder("contrastive")
@torch.no_grad()
def contrastive(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
    *,
    item_repr: torch.Tensor,
    alpha: float = 0.6,
    constraints: Sequence[RequestConstraints | None] | None = None,
) -> torch.Tensor:
    """Contrastive decoding -> LongTensor ``[B, m]``.

    ``item_repr`` ``[B, N, D]``: the candidate representations the similarity is taken on
    (NAR4Rec: the encoded candidates X). ``alpha`` in ``[0, 1]``; ``alpha = 0`` is exactly
    :func:`greedy` (delegated, so ties among underflowed probabilities break the same way).
    ``constraints``: each step's argmax runs over the candidates they allow.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"contrastive: alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return greedy(log_probs, candidate_mask, list_length, constraints=constraints)
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    rcs = prepare_constraints(constraints, lengths, mask)
    b, n, _ = lp.shape
    if item_repr.dim() != 3 or tuple(item_repr.shape[:2]) != (b, n):
        raise ValueError(
            f"item_repr must be [B, N, D] with B, N = {(b, n)}, got {tuple(item_repr.shape)}"
        )
    out = torch.full((b, m), -1, dtype=torch.long, device=lp.device)
    if m == 0 or n == 0:
        return out
    h = item_repr.detach().to(device=lp.device, dtype=torch.float32)
    d = h.shape[-1]
    # Two full passes only (norm, scale); junk in padded rows is neutralised per step on the
    # [B, N] similarities, which is much cheaper than cleaning [B, N, D] up front.
    inv_norm = torch.linalg.vector_norm(h, dim=-1).clamp_(min=1e-12).reciprocal_()
    unit = h * inv_norm[:, :, None]
    columns = lp.permute(2, 0, 1)[:m].contiguous()  # [m, B, N]: cheap per-step slices
    # argmax (1 - a) p - a s == argmax p - a / (1 - a) s: one fused add per step. exp is taken
    # per step on [B, N] so small batches never enter a multi-threaded kernel (which stalls
    # when the other core is busy).
    ratio = alpha / (1.0 - alpha) if alpha < 1.0 else float("inf")
    # For t >= 1 the penalty tensor doubles as the "unavailable" mask: +inf similarity for
    # padded and chosen items gives them score -inf (alpha > 0 here), saving a mask per step.
    penalty = torch.empty(b, n, device=lp.device)
    first = columns[0].masked_fill(~mask, float("-inf"))  # t = 0: argmax p
    if rcs is not None:
        first = apply_allowed(first, rcs, out[:, :0], lengths > 0)
    pick = first.argmax(1)
    for t in range(m):
        if t > 0:
            if rcs is not None:  # the same choice, among the allowed candidates
                score = (torch.add(columns[t].exp(), penalty, alpha=-ratio) if alpha < 1.0
                         else -penalty)
                pick = apply_allowed(score, rcs, out[:, :t], t < lengths).argmax(1)
            elif alpha < 1.0:
                pick = torch.add(columns[t].exp(), penalty, alpha=-ratio).argmax(1)
            else:
                pick = penalty.argmin(1)  # alpha = 1: similarity only
        out[:, t] = pick
        if t + 1 < m:
            chosen = unit.gather(1, pick[:, None, None].expand(b, 1, d))  # [B, 1, D]
            sim = torch.bmm(unit, chosen.transpose(1, 2)).squeeze(2)  # [B, N]
            # Junk (NaN / inf) in padded or chosen rows must not reach the running max.
            sim.nan_to_num_(nan=0.0, posinf=1.0, neginf=-1.0)
            if t == 0:
                penalty.copy_(sim).masked_fill_(~mask, float("inf"))
            else:
                torch.maximum(penalty, sim, out=penalty)
            penalty.scatter_(1, pick[:, None], float("inf"))
    return mask_beyond_length(out, lengths)
