"""Per-signal binary cross-entropy for list evaluators (``ListScoreOutput.signal_logits``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from genrerank.data.dataset import Batch
from genrerank.losses.base import ListScoreOutput, Loss, register_loss, valid_count


@register_loss("signal_bce")
class SignalBCELoss(Loss):
    """``sum_s weight_s * mean_j BCE(signal_logits[s][b, j], labels[s][b, j] > 0)``.

    The mean runs over the valid positions of the batch (``batch.position_mask``); padded
    positions are ignored whatever they hold. Signals the model predicts but the batch lacks are
    skipped (a source without likes still trains the click head); if the batch has none of them
    the loss raises.

    Args:
        weights: per-signal weight, default 1.0 for every signal. Weights for signals the model
            or the batch lacks are allowed and unused (one config serves several data sets).
    """

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights = {str(k): float(v) for k, v in (weights or {}).items()}
        bad = {k: v for k, v in self.weights.items() if not v >= 0}
        if bad:
            raise ValueError(f"signal_bce: weights must be >= 0, got {bad}")

    def forward(self, out: ListScoreOutput, batch: Batch) -> torch.Tensor:  # type: ignore[override]
        logits = getattr(out, "signal_logits", None)
        if logits is None:
            raise ValueError(
                "loss 'signal_bce' needs a list evaluator's output "
                f"(ListScoreOutput.signal_logits); the model gave {type(out).__name__}"
            )
        present = [s for s in logits if s in batch.labels]
        if not present:
            raise ValueError(
                f"signal_bce: the batch has none of the model's signals {sorted(logits)} "
                f"(it has {sorted(batch.labels)})"
            )
        mask = batch.position_mask
        total = torch.zeros((), device=mask.device)
        for signal in present:
            # Replace (not multiply) padded entries so garbage there cannot reach the gradient.
            pred = torch.where(mask, logits[signal].float(), 0.0)
            target = (torch.where(mask, batch.labels[signal], 0.0) > 0).to(pred.dtype)
            terms = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
            terms = torch.where(mask, terms, 0.0)
            total = total + self.weights.get(signal, 1.0) * terms.sum() / valid_count(mask)
        return total
