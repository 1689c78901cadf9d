"""The hierarchical generator's skeleton loss: learn the composition of high-utility lists.

Target of a request: how many items of each category its logged list showed (``[B, C]``), and
optionally the share of long items in it. Which lists teach the skeleton:

- ``weighting="threshold"`` (default): only the lists whose list gain R (the data set's gain
  weights on the logged labels, :func:`~genrerank.losses.base.list_utility`) is at least tau;
  tau defaults to the training split's median R raised above its minimum (the trainer sets it,
  as for the unlikelihood loss; ``train.tau_quantile`` moves it), so the lists without any
  feedback never teach the plan.
- ``weighting="gain"``: every list, weighted by its R (a list without feedback weighs 0).

Per request, the count term is the mean over the categories present among its candidates of the
cross-entropy of the logged count (classes above the category's candidate count are excluded
by the model); the density term a soft-target binary cross-entropy of the long-item share.
Requests are averaged with their weights (self-normalised within the batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.losses.base import Loss, ModelOutput, list_utility, register_loss
from genrerank.metrics.ranking import DEFAULT_GAIN_WEIGHTS

WEIGHTINGS = ("threshold", "gain")


def logged_category_counts(batch: Batch, n_categories: int) -> torch.Tensor:
    """``[B, C]`` items of each category in the logged lists (padded positions ignored)."""
    shown = batch.exposed_attribute(batch.category).clamp(0, n_categories - 1)
    counts = torch.zeros(batch.batch_size, n_categories, dtype=torch.long,
                         device=shown.device)
    return counts.scatter_add_(1, shown, batch.position_mask.long())


def skeleton_weights(batch: Batch, weighting: str, tau: float | None,
                     weights: Mapping[str, float], discount: bool = True) -> torch.Tensor:
    """``[B]`` how much each logged list teaches the skeleton (see the module docstring);
    lists without a position weigh 0."""
    utility = list_utility(batch, weights, discount)
    if weighting == "threshold":
        if tau is None:
            raise ValueError("skeleton: tau is not set; pass tau= or let the trainer set it "
                             "from the training split")
        w = (utility >= float(tau)).float()
    elif weighting == "gain":
        w = utility.clamp_min(0.0)
    else:
        raise ValueError(f"skeleton: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return w * batch.position_mask.any(1).float()


@register_loss("skeleton")
class SkeletonLoss(Loss):
    """Count cross-entropy (+ ``density_weight`` x density BCE) on the selected lists.

    Args:
        tau: list-gain threshold of ``weighting="threshold"``; None: set by the trainer from
            the training split (``train.tau_quantile``, the median by default).
        weighting: ``"threshold"`` or ``"gain"`` (module docstring).
        density_weight: weight of the long-item share term (ignored without a density head).
        weights, discount: the list gain R (:func:`list_utility`); training fills in the data
            set's gain weights when ``weights`` is left out.
    """

    @classmethod
    def resolve_params(cls, params: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
        return cls._resolve_gain_weights(params, spec)

    def __init__(self, tau: float | None = None, weighting: str = "threshold",
                 density_weight: float = 1.0, weights: Mapping[str, float] | None = None,
                 discount: bool = True) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"skeleton: weighting must be one of {WEIGHTINGS}, got "
                             f"{weighting!r}")
        if not (math.isfinite(density_weight) and density_weight >= 0):
            raise ValueError(f"skeleton: density_weight must be finite and >= 0, got "
                             f"{density_weight!r}")
        self.tau = tau
        self.weighting = weighting
        self.density_weight = float(density_weight)
        self.weights = dict(DEFAULT_GAIN_WEIGHTS if weights is None else weights)
        self.discount = discount

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        logits = getattr(out, "count_logits", None)
        count = getattr(out, "category_count", None)
        if logits is None or count is None:
            raise ValueError("loss 'skeleton' needs a model with a skeleton stage "
                             "(count_logits); use it with the hierarchical model")
        w = skeleton_weights(batch, self.weighting, self.tau, self.weights, self.discount)
        target = logged_category_counts(batch, logits.shape[1])
        present = count > 0
        # Absent categories have only class 0 finite; drop them before the softmax so their
        # -inf entries reach neither the value nor the gradient.
        safe = torch.where(present.unsqueeze(-1), logits.float(), torch.zeros_like(logits))
        ce = F.cross_entropy(safe.transpose(1, 2), target, reduction="none")  # [B, C]
        ce = torch.where(present, ce, torch.zeros_like(ce))
        per_request = ce.sum(1) / present.sum(1).clamp_min(1)
        density = getattr(out, "density_logit", None)
        long_item = getattr(out, "long_item", None)
        if density is not None and long_item is not None and self.density_weight > 0:
            shown = batch.position_mask.float()
            share = (long_item.gather(1, batch.exposed) * shown).sum(1) / shown.sum(1).clamp_min(1)
            bce = F.binary_cross_entropy_with_logits(density.float(), share, reduction="none")
            per_request = per_request + self.density_weight * bce
        return (w * per_request).sum() / w.sum().clamp_min(1e-8)
