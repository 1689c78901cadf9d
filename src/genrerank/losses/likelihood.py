"""NAR4Rec likelihood loss: the logged list as a one-hot candidate-to-position assignment."""

from __future__ import annotations

import torch

from genrerank.data.dataset import Batch
from genrerank.losses.base import Loss, ModelOutput, exposed_log_probs, register_loss, valid_count


@register_loss("likelihood")
class LikelihoodLoss(Loss):
    """L = -sum_{valid j} log p^[exposed_j, j] / (number of valid positions in the batch).

    With the one-hot target p_ij this is NOTES' ``-sum_ij p_ij log p^_ij``; dividing by the
    batch's position count (not by B) makes long and short lists weigh per position.
    """

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        picked = exposed_log_probs(out.log_probs, batch)
        return -picked.sum() / valid_count(batch.position_mask)
