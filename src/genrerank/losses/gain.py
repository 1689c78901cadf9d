"""Item-level credit: each logged slot's score is trained towards the gain of the item shown there.

Likelihood and unlikelihood give one list-level label to every item of a logged list, so a
generator trained on them learns to imitate the logging policy (NAR4Rec's lists overlapped the
upstream top 6 by 86 %). Here the raw score ``logits[b, exposed_j, j]`` of the item shown at
position j is a logit of that item's normalised gain
``g_j = sum_s w_s y_s,j / sum_s w_s`` (the data set's gain weights,
:func:`genrerank.data.signals.gain_weights`: ``spec.gain_weights``, else click 1.0, like 1.5,
long view 0.8; the signals the source has), fitted with a soft-target binary cross-entropy.
The score then estimates how much the item is worth at that position (and, for an
autoregressive model, after the logged items above it), which is what a decoder should
maximise; the column softmax of the same scores is still the model's distribution over
candidates for sampling and beam search.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.losses.base import Loss, ModelOutput, register_loss, valid_count
from genrerank.metrics.ranking import DEFAULT_GAIN_WEIGHTS


def slot_gain(batch: Batch, weights: Mapping[str, float]) -> torch.Tensor:
    """``[B, M]`` gain of each logged slot normalised to [0, 1] by the largest possible gain
    (the weights of the signals the batch has); 0 at padded positions."""
    mask = batch.position_mask
    present = {s: float(w) for s, w in weights.items() if s in batch.labels}
    if not present:
        raise ValueError(
            f"gain_bce: the batch has none of the gain signals {sorted(weights)} "
            f"(it has {sorted(batch.labels)}); give the signals gain_weights in the feature spec"
        )
    gain = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for signal, weight in present.items():
        gain = gain + weight * (torch.where(mask, batch.labels[signal].float(), 0.0) > 0)
    return gain / sum(present.values())


@register_loss("gain_bce")
class GainBCELoss(Loss):
    """Mean over valid positions of ``BCE(logits[b, exposed_j, j], g_j)`` (soft target g_j).

    Args:
        weights: signal -> gain weight (default: click 1.0, like 1.5, long view 0.8; training
            fills in the data set's gain weights, see :meth:`resolve_params`).
    """

    @classmethod
    def resolve_params(cls, params: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
        return cls._resolve_gain_weights(params, spec)

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights = dict(DEFAULT_GAIN_WEIGHTS if weights is None else weights)
        bad = {k: v for k, v in self.weights.items() if not float(v) >= 0}
        if bad or not any(float(v) > 0 for v in self.weights.values()):
            raise ValueError(f"gain_bce: weights must be >= 0 and not all 0, got {self.weights}")

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        logits = self.require(out, "logits", self.name)
        mask = batch.position_mask
        picked = logits.float().gather(1, batch.exposed.unsqueeze(1)).squeeze(1)  # [B, M]
        # Replace (not multiply) padded entries so garbage there (-inf) cannot reach the gradient.
        picked = torch.where(mask, picked, torch.zeros_like(picked))
        target = slot_gain(batch, self.weights)
        terms = F.binary_cross_entropy_with_logits(picked, target, reduction="none")
        terms = torch.where(mask, terms, torch.zeros_like(terms))
        return terms.sum() / valid_count(mask)
