"""Turn a padded Batch's raw features into one d-dimensional token per candidate.

Every model reads features the same way, so comparisons between models differ only in what the
models do with them: categorical features are embedded (index 0 = unknown), dense features and
the upstream score are projected, and the user's context is added to every candidate token.
"""

from __future__ import annotations

import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec


class FeatureEmbedding(nn.Module):
    """Candidate tokens [B, N, d] (user context included) and a user vector [B, d]."""

    def __init__(self, spec: FeatureSpec, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.item_cat = nn.ModuleList(
            nn.Embedding(c.vocab_size, dim) for c in spec.item_categorical
        )
        self.user_cat = nn.ModuleList(
            nn.Embedding(c.vocab_size, dim) for c in spec.user_categorical
        )
        # +1: the upstream score is a dense candidate feature like any other.
        self.item_dense = nn.Linear(len(spec.item_dense) + 1, dim)
        self.user_dense = nn.Linear(len(spec.user_dense), dim) if spec.user_dense else None
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def user_vector(self, batch: Batch) -> torch.Tensor:
        user = torch.zeros(
            batch.batch_size, self.item_dense.out_features, device=batch.user_dense.device
        )
        for k, emb in enumerate(self.user_cat):
            user = user + emb(batch.user_cat[:, k])
        if self.user_dense is not None:
            user = user + self.user_dense(batch.user_dense)
        return user

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        dense = torch.cat([batch.item_dense, batch.upstream_score.unsqueeze(-1)], dim=-1)
        tokens = self.item_dense(dense)
        for k, emb in enumerate(self.item_cat):
            tokens = tokens + emb(batch.item_cat[:, :, k])
        user = self.user_vector(batch)
        tokens = self.dropout(self.norm(tokens + user.unsqueeze(1)))
        # Zero padded tokens so nothing of them can leak through a careless reduction.
        tokens = tokens * batch.candidate_mask.unsqueeze(-1)
        return tokens, user
