"""Auxiliary click head loss: gives every model a click probability for AUC / LogLoss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.data.signals import describe_signals, require_click_signal
from genrerank.losses.base import Loss, ModelOutput, register_loss, valid_count


@register_loss("click_bce")
class ClickBCELoss(Loss):
    """Binary cross-entropy of ``click_logits[b, exposed_j, j]`` against ``labels[signal]``,
    averaged over the valid positions of the batch. Any positive label counts as a click.

    Args:
        signal: label used as the click target; left out, training fills in the data set's
            click signal (:func:`genrerank.data.signals.click_signal`: ``click``, else its most
            valuable binary signal), and outside training it is ``click``.
        pos_weight: weight of positive examples (imbalanced clicks), as in torch's BCE.
    """

    @classmethod
    def resolve_params(cls, params: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
        signal = params.get("signal")
        if signal is None:
            return {**params, "signal": require_click_signal(spec, f"loss {cls.name!r}")}
        if signal not in spec.labels:
            raise ValueError(f"loss {cls.name!r}: signal {signal!r} is not in the data set, "
                             f"which has {describe_signals(spec)}")
        return params

    def __init__(self, signal: str | None = None, pos_weight: float = 1.0) -> None:
        super().__init__()
        if not pos_weight > 0:
            raise ValueError(f"click_bce: pos_weight must be > 0, got {pos_weight!r}")
        self.signal = signal or "click"
        self.pos_weight = float(pos_weight)

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        logits = self.require(out, "click_logits", self.name)
        if self.signal not in batch.labels:
            raise ValueError(
                f"click_bce: the batch has no {self.signal!r} signal (it has "
                f"{sorted(batch.labels)}); set the loss's signal to one of them"
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
