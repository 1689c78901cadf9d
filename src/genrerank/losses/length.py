"""Auxiliary list-length head loss (variable-length lists, NAR4Rec Q&A)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrerank.data.dataset import Batch
from genrerank.losses.base import Loss, ModelOutput, register_loss, valid_count


@register_loss("list_length")
class ListLengthLoss(Loss):
    """Cross-entropy of ``length_logits [B, L_max + 1]`` against the logged list length
    ``position_mask.sum(1)``, averaged over the requests that have at least one candidate
    (rows without candidates are batch padding)."""

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        logits = self.require(out, "length_logits", self.name).float()
        if logits.dim() != 2 or logits.shape[0] != batch.batch_size:
            raise ValueError(
                f"list_length: length_logits must be [B, L_max + 1] with B={batch.batch_size}, "
                f"got {tuple(logits.shape)}"
            )
        length = batch.position_mask.sum(dim=1)
        real = batch.candidate_mask.any(dim=1)
        # Replace padding rows before the softmax so garbage there cannot reach the gradient.
        logits = torch.where(real.unsqueeze(1), logits, torch.zeros_like(logits))
        longest = int(length.max()) if length.numel() else 0
        if longest >= logits.shape[1]:
            raise ValueError(
                f"list_length: a list has length {longest} but length_logits has only "
                f"{logits.shape[1]} classes (0..{logits.shape[1] - 1})"
            )
        terms = F.cross_entropy(logits, length, reduction="none")
        terms = torch.where(real, terms, torch.zeros_like(terms))
        return terms.sum() / valid_count(real)
