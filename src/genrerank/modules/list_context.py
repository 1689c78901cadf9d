"""List context: how the items already shown change the value of a candidate, by category.

A user who has just seen two cooking videos wants a third less (satiation); one who has just seen a
recipe may want the kitchen gadget more (complementarity). Both are a function of the categories
of the items above a slot and of the candidate's own, so one learned table covers them::

    context(i, t) = sum_{k < t} decay^(t-k-1) * pair[c(y_k), c(i)]

``pair`` is a ``[C, C]`` table (row: the category shown before, column: the candidate's), zero at
initialisation so a fresh model is unchanged; ``decay`` in (0, 1) is learned too. A generator adds
``context`` to its score of candidate ``i`` at step ``t``. It is fitted from logged lists only,
through the slots they showed.

**What it learns, and what it cannot.** On simulated kuaishou (20,000 requests) NAR4Rec's table
learned complementarity (complementary category pairs +0.07 above the other pairs) but not
satiation (same-category entries level with the others, where the true user model penalises
repetition by 0.5 x the user's appetite for diversity). The logs confound it: a category shown
twice is mostly a category the user likes, and the model's scores know the user's taste only in
part, so "repeated" reads as "liked". Fitted with the true appeal as an offset, the same table
recovers the penalty (-0.55 on the diagonal). A correction that adds a training-only table over
the items *below* each slot (they share the taste signal but cannot have caused the click)
recovered the sign (-0.34) but, unregularised, overfitted rare category pairs and decoded worse;
it is not in the library (see the issue notes).

Two ways to compute it, which agree exactly (tested):

- :meth:`ListContext.teacher_forced`: for every candidate and every position of the LOGGED lists at
  once (training), ``[B, N, M]``.
- :meth:`ListContext.step`: incrementally while decoding, a ``[R, N]`` state updated with the item
  chosen last; this is what the ONNX step graph exports.
"""

from __future__ import annotations

import torch
from torch import nn


class ListContext(nn.Module):
    """A learned category-transition table with a decaying memory of the list so far."""

    def __init__(self, n_categories: int) -> None:
        super().__init__()
        n = max(int(n_categories), 1)
        self.pair = nn.Parameter(torch.zeros(n, n))
        self.decay_logit = nn.Parameter(torch.zeros(()))  # decay = sigmoid(.) = 0.5 at start

    @property
    def decay(self) -> torch.Tensor:
        return torch.sigmoid(self.decay_logit)

    def _clamp(self, category: torch.Tensor) -> torch.Tensor:
        return category.clamp(0, self.pair.shape[0] - 1)

    def teacher_forced(
        self, category: torch.Tensor, exposed: torch.Tensor, position_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[B, N, M]`` context of every candidate at every position of the logged lists.

        ``category [B, N]``, ``exposed [B, M]`` (candidate index per position), ``position_mask
        [B, M]``: padded positions are no context for any slot.
        """
        category = self._clamp(category)
        b, n = category.shape
        m = exposed.shape[1]
        shown = category.gather(1, exposed.clamp(0, max(n - 1, 0)))  # [B, M]
        rows = self.pair[shown]  # [B, M, C]: effect of the item at k on each category
        effect = rows.gather(2, category.unsqueeze(1).expand(b, m, n))  # [B, M(k), N]
        effect = effect * position_mask.unsqueeze(-1).to(effect.dtype)
        k = torch.arange(m, device=category.device)
        gap = (k.unsqueeze(0) - k.unsqueeze(1) - 1).to(effect.dtype)  # [k, t] = t - k - 1
        weight = torch.where(gap >= 0, self.decay ** gap.clamp(min=0), torch.zeros_like(gap))
        return torch.einsum("bki,kt->bit", effect, weight)

    def step(
        self, context: torch.Tensor, category: torch.Tensor, previous: torch.Tensor
    ) -> torch.Tensor:
        """The context ``[R, N]`` after ``previous [R]`` (candidate index chosen last) is shown."""
        category = self._clamp(category)
        shown = category.gather(1, previous.unsqueeze(1))  # [R, 1]
        effect = self.pair[shown.squeeze(1)].gather(1, category)  # [R, N]
        return self.decay * context + effect
