"""SimCTG-style contrastive regularisers of NAR4Rec on candidate and position representations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genrerank.data.dataset import Batch
from genrerank.losses.base import Loss, ModelOutput, register_loss


def contrastive_hinge(reprs: torch.Tensor, mask: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over sets with n >= 2 valid vectors of
    ``1/(n(n-1)) sum_i sum_{j != i} max(0, margin - s(x_i, x_i) + s(x_i, x_j))``, s = cosine.

    Args:
        reprs: ``[S, K, D]`` S sets of K vectors.
        mask: ``[S, K]`` bool, True = valid vector.

    Sets with fewer than two valid vectors have no pairs: they are excluded from the mean
    (not counted as 0); if no set has a pair the result is 0 (still attached to the graph).
    """
    # Zero padded vectors BEFORE normalising: garbage (NaN, huge) would otherwise leak into
    # the gradient through the similarity matmul even where its result is masked.
    x = torch.where(mask.unsqueeze(-1), reprs.float(), torch.zeros((), device=reprs.device))
    x = F.normalize(x, dim=-1)
    sim = x @ x.transpose(1, 2)  # [S, K, K]
    self_sim = torch.diagonal(sim, dim1=1, dim2=2).unsqueeze(-1)  # s(x_i, x_i), 1 unless zero
    hinge = F.relu(margin - self_sim + sim)
    k = mask.shape[1]
    eye = torch.eye(k, dtype=torch.bool, device=mask.device)
    pair = mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye
    hinge = torch.where(pair, hinge, torch.zeros_like(hinge))
    n = mask.sum(dim=1).to(hinge.dtype)
    has_pairs = n >= 2
    per_set = hinge.sum(dim=(1, 2)) / (n * (n - 1)).clamp_min(1.0)
    return (per_set * has_pairs).sum() / has_pairs.sum().clamp_min(1).to(hinge.dtype)


@register_loss("contrastive")
class ContrastiveLoss(Loss):
    """L = L_item + L_position (NAR4Rec); the weight omega is the composite term's ``weight``.

    L_item runs over each request's VALID candidates (``item_repr [B, N, D]``, n = its valid
    count); L_position over the position representations: all M' rows of a shared
    ``[M', D]`` table, or each request's valid positions of a per-request ``[B, M, D]``.
    Each is the mean over the requests (sets) that have at least two vectors.

    Args:
        margin: rho, the SimCTG margin.
        item, position: switch the two terms on or off.
    """

    def __init__(self, margin: float = 0.5, item: bool = True, position: bool = True) -> None:
        super().__init__()
        if not math.isfinite(margin):
            raise ValueError(f"contrastive: margin must be finite, got {margin!r}")
        if not (item or position):
            raise ValueError("contrastive: at least one of item / position must be True")
        self.margin = float(margin)
        self.item = item
        self.position = position

    def item_term(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        reprs = self.require(out, "item_repr", self.name)
        if reprs.dim() != 3 or reprs.shape[:2] != batch.candidate_mask.shape:
            raise ValueError(
                f"contrastive: item_repr must be [B, N, D] matching candidate_mask "
                f"{tuple(batch.candidate_mask.shape)}, got {tuple(reprs.shape)}"
            )
        return contrastive_hinge(reprs, batch.candidate_mask, self.margin)

    def position_term(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        reprs = self.require(out, "position_repr", self.name)
        if reprs.dim() == 2:  # one table shared by every request: all rows are real
            mask = torch.ones(reprs.shape[0], dtype=torch.bool, device=reprs.device)
            return contrastive_hinge(reprs.unsqueeze(0), mask.unsqueeze(0), self.margin)
        if reprs.dim() != 3 or reprs.shape[:2] != batch.position_mask.shape:
            raise ValueError(
                f"contrastive: position_repr must be [M, D] or [B, M, D] matching position_mask "
                f"{tuple(batch.position_mask.shape)}, got {tuple(reprs.shape)}"
            )
        return contrastive_hinge(reprs, batch.position_mask, self.margin)

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        total = torch.zeros((), device=out.log_probs.device)
        if self.item:
            total = total + self.item_term(out, batch)
        if self.position:
            total = total + self.position_term(out, batch)
        return total
