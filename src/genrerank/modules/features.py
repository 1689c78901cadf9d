"""Turn a padded Batch's raw features into one d-dimensional token per candidate.

Every model reads features the same way, so comparisons between models differ only in what the
models do with them: categorical features are embedded (index 0 = unknown), dense features and
the upstream score are projected, and the user's context is added to every candidate token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        # shape[0], not batch.batch_size: int() would freeze the batch size in an ONNX export.
        user = batch.user_dense.new_zeros(batch.user_dense.shape[0], self.item_dense.out_features)
        for k, emb in enumerate(self.user_cat):
            user = user + emb(batch.user_cat[:, k])
        if self.user_dense is not None:
            user = user + self.user_dense(batch.user_dense)
        return user

    def item_static(self, item_cat: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """The request-independent part of a candidate's token, ``[..., d]``: its categorical
        embeddings plus the projection of its dense features (bias included).

        Serving caches this per item (:mod:`genrerank.serving.cache`); the request adds the
        upstream score and the user's context in :meth:`forward`.
        """
        n_dense = item_dense.shape[-1]
        weight = self.item_dense.weight
        static = F.linear(item_dense, weight[:, :n_dense], self.item_dense.bias)
        for k, emb in enumerate(self.item_cat):
            static = static + emb(item_cat[..., k])
        return static

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        static = batch.item_static
        if static is None:
            static = self.item_static(batch.item_cat, batch.item_dense)
        # The upstream score is the last input column of the dense projection.
        tokens = static + batch.upstream_score.unsqueeze(-1) * self.item_dense.weight[:, -1]
        user = self.user_vector(batch)
        tokens = self.dropout(self.norm(tokens + user.unsqueeze(1)))
        # Zero padded tokens so nothing of them can leak through a careless reduction.
        tokens = tokens * batch.candidate_mask.unsqueeze(-1)
        return tokens, user
