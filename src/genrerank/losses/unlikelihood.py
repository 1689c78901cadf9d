"""NAR4Rec sequence unlikelihood loss: likelihood on good lists, per-position unlikelihood on
bad ones, split by the list utility R at a threshold tau."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.losses.base import (
    Loss,
    ModelOutput,
    exposed_log_probs,
    list_utility,
    register_loss,
    valid_count,
)
from genrerank.metrics.ranking import DEFAULT_GAIN_WEIGHTS


def log1m_exp(log_p: torch.Tensor, eps: float) -> torch.Tensor:
    """log(1 - p) from log p, with 1 - p floored at ``eps``.

    ``-expm1`` keeps 1 - p accurate as p -> 1 (where ``1 - exp`` cancels); clamping log p
    BEFORE the log keeps both the value and the gradient finite at p = 1 (the usual
    unlikelihood clamp: beyond 1 - eps the term is constant -log(eps) with zero gradient).
    """
    capped = log_p.clamp(max=math.log1p(-eps))
    return torch.log(-torch.expm1(capped))


@register_loss("unlikelihood")
class UnlikelihoodLoss(Loss):
    """Per list: R >= tau -> sum_j -log p^[exposed_j, j];
    R < tau -> ``ul_weight`` * sum_j -log(1 - p^[exposed_j, j]); summed over the batch and
    divided by the number of valid positions in the batch (as :class:`LikelihoodLoss`).

    Args:
        tau: utility threshold; may be None at construction and set later
            (``loss.tau = utility_threshold(...)``, done once by the trainer).
        ul_weight: weight of the unlikelihood terms relative to the likelihood terms.
        eps: floor on 1 - p, bounding each unlikelihood term at -log(eps) (~11.5).
        weights, discount: the list utility R (see ``list_utility``); training fills in the
            data set's gain weights when ``weights`` is left out (:meth:`resolve_params`).
    """

    @classmethod
    def resolve_params(cls, params: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
        return cls._resolve_gain_weights(params, spec)

    def __init__(
        self,
        tau: float | None = None,
        ul_weight: float = 1.0,
        eps: float = 1e-5,
        weights: Mapping[str, float] | None = None,
        discount: bool = True,
    ) -> None:
        super().__init__()
        if not (math.isfinite(ul_weight) and ul_weight >= 0):
            raise ValueError(f"unlikelihood: ul_weight must be finite and >= 0, got {ul_weight!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"unlikelihood: eps must be in (0, 1), got {eps!r}")
        self.tau = tau
        self.ul_weight = float(ul_weight)
        self.eps = float(eps)
        self.weights = dict(DEFAULT_GAIN_WEIGHTS if weights is None else weights)
        self.discount = discount

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        if self.tau is None:
            raise ValueError(
                "unlikelihood: tau is not set; pass tau= or set loss.tau from "
                "utility_threshold(list_utility(train batches)) before training"
            )
        picked = exposed_log_probs(out.log_probs, batch)  # 0 at padded positions
        good = list_utility(batch, self.weights, self.discount) >= float(self.tau)  # [B]
        like = -picked
        # log1m_exp(0) would be log(eps) at padded positions: mask again after it.
        unlike = -self.ul_weight * log1m_exp(picked, self.eps)
        per_position = torch.where(good.unsqueeze(1), like, unlike)
        per_position = torch.where(batch.position_mask, per_position, torch.zeros_like(like))
        return per_position.sum() / valid_count(batch.position_mask)
