"""Greedy decoding under a model's learned list context (:mod:`genrerank.modules.list_context`).

``y_t = argmax_x log p(x | t) + context(x, t)``, ``context(x, t) = sum_{k<t} decay^(t-k-1)
pair[cat(y_k), cat(x)]`` over unchosen real candidates. Where :mod:`.satiation` pays a hand-tuned
penalty for any repeated category, this decoder uses the table the model fitted on the logged
lists: which categories tire a user after which (satiation, negative entries) and which go well
together (complementarity, positive ones). ``pair = -penalty * I`` is the satiation decoder.
A model with a list context passes its own ``pair`` and ``decay``; serving reads them from the
export manifest.

``penalty`` subtracts a same-category term on top of the learned table (``pair - penalty * I``).
The table learns complementarity well but not satiation: in logged lists a repeated category
marks a user who likes it, so the fitted diagonal is confounded and near zero or positive.
``penalty`` is chosen on validation like the satiation decoder's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from genrerank.constraints.batch import apply_allowed, prepare_constraints
from genrerank.constraints.compile import RequestConstraints
from genrerank.decoding import mask_beyond_length, prepare_inputs, register_decoder


@register_decoder("context")
@torch.no_grad()
def context_greedy(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
    *,
    category: torch.Tensor,
    pair: torch.Tensor | Sequence[Sequence[float]],
    decay: float | torch.Tensor,
    penalty: float = 0.0,
    constraints: Sequence[RequestConstraints | None] | None = None,
) -> torch.Tensor:
    """Greedy decoding with a learned category-transition term -> LongTensor ``[B, m]``.

    ``category [B, N]`` each candidate's category id in ``[0, C)`` (larger ids are clamped to the
    last row, as the model does); ``pair [C, C]`` (row: the category shown, column: the
    candidate's); ``decay`` in ``[0, 1]``; ``penalty >= 0`` is subtracted from the diagonal.
    ``constraints``: each step's argmax runs over the candidates they allow.
    """
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    rcs = prepare_constraints(constraints, lengths, mask)
    b, n, _ = lp.shape
    pair = torch.as_tensor(pair, dtype=lp.dtype, device=lp.device)
    decay = float(decay)
    if pair.dim() != 2 or pair.shape[0] != pair.shape[1] or pair.shape[0] == 0:
        raise ValueError(f"context: pair must be a square [C, C] table, got {tuple(pair.shape)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"context: decay must be in [0, 1], got {decay}")
    if not penalty >= 0.0:
        raise ValueError(f"context: penalty must be >= 0, got {penalty}")
    if penalty:
        eye = torch.eye(pair.shape[0], dtype=pair.dtype, device=pair.device)
        pair = pair - float(penalty) * eye
    if tuple(category.shape) != (b, n):
        raise ValueError(f"category must be [B, N] = {(b, n)}, got {tuple(category.shape)}")
    out = torch.full((b, m), -1, dtype=torch.long, device=lp.device)
    if m == 0 or n == 0:
        return out
    category = category.to(lp.device).clamp(0, pair.shape[0] - 1)
    rows = torch.arange(b, device=lp.device)
    context = torch.zeros(b, n, dtype=lp.dtype, device=lp.device)
    available = mask.clone()
    for t in range(m):
        score = (lp[:, :, t] + context).masked_fill(~available, float("-inf"))
        if rcs is not None:
            score = apply_allowed(score, rcs, out[:, :t], t < lengths)
        pick = score.argmax(1)
        out[:, t] = pick
        available[rows, pick] = False
        context = decay * context + pair[category[rows, pick]].gather(1, category)
    return mask_beyond_length(out, lengths)
