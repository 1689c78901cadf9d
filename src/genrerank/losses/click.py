"""Auxiliary click head loss: gives every model a click probability for AUC / LogLoss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrerank.data.dataset import Batch
from genrerank.losses.base import Loss, ModelOutput, register_loss, valid_count


@register_loss("click_bce")
class ClickBCELoss(Loss):
    """Binary cross-entropy of ``click_logits[b, exposed_j, j]`` against ``labels[signal]``,
    averaged over the valid positions of the batch. Any positive label counts as a click.

    Args:
        signal: label used as the click target (default "click").
        pos_weight: weight of positive examples (imbalanced clicks), as in torch's BCE.
    """

    def __init__(self, signal: str = "click", pos_weight: float = 1.0) -> None:
        super().__init__()
        if not pos_weight > 0:
            raise ValueError(f"click_bce: pos_weight must be > 0, got {pos_weight!r}")
        self.signal = signal
        self.pos_weight = float(pos_weight)

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        logits = self.require(out, "click_logits", self.name)
        if self.signal not in batch.labels:
            raise ValueError(
                f"click_bce: batch has no {self.signal!r} label (has {sorted(batch.labels)})"
            )
        mask = batch.position_mask
        picked = logits.float().gather(1, batch.exposed.unsqueeze(1)).squeeze(1)  # [B, M]
        # Replace (not multiply) padded entries so garbage there cannot reach the gradient.
        picked = torch.where(mask, picked, torch.zeros_like(picked))
        target = torch.where(mask, batch.labels[self.signal] > 0, False).to(picked.dtype)
        terms = F.binary_cross_entropy_with_logits(
            picked,
            target,
            pos_weight=torch.tensor(self.pos_weight, device=picked.device),
            reduction="none",
        )
        terms = torch.where(mask, terms, torch.zeros_like(terms))
        return terms.sum() / valid_count(mask)
