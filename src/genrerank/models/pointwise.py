"""Pointwise baseline: a DNN predicts each candidate's click from its own features; sort by it.

It sees the same features as every other model but no other candidate, so it cannot model
redundancy or position effects beyond a per-position bias on its click logit. Its ranking score
is expressed as the same ``[B, N, M]`` matrix the list models produce (identical columns), so
the shared losses, decoders and metrics apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.losses.base import ModelOutput
from genrerank.models.base import RerankModel, register_model
from genrerank.modules.features import FeatureEmbedding


def item_scores_output(
    scores: torch.Tensor, cand_mask: torch.Tensor, m: int, position_bias: torch.Tensor,
    item_repr: torch.Tensor,
) -> ModelOutput:
    """ModelOutput of a model that scores items: every position column is the same softmax."""
    scores = scores.masked_fill(~cand_mask, float("-inf"))
    log_probs = torch.log_softmax(scores, dim=1).unsqueeze(-1).expand(-1, -1, m)
    # The click logit of an item at a position: its score plus that position's bias.
    click = scores.masked_fill(~cand_mask, 0.0).unsqueeze(-1) + position_bias[:m]
    return ModelOutput(log_probs=log_probs, item_repr=item_repr, click_logits=click,
                       logits=click)


def score_mlp(dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """``layers`` x (Linear, ReLU, Dropout) then a Linear to one score per token."""
    blocks: list[nn.Module] = []
    width = dim
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*blocks, nn.Linear(width, 1))


@dataclass
class PointwiseConfig:
    dim: int = 64
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.1
    features: dict = field(default_factory=dict)  # FeatureConfig options
    max_positions: int = 0


@register_model("pointwise")
class Pointwise(RerankModel):
    Config = PointwiseConfig

    def __init__(self, spec: FeatureSpec, config: PointwiseConfig) -> None:
        super().__init__(spec, config)
        self.features = FeatureEmbedding(spec, config.dim, config.dropout, config.features)
        self.mlp = score_mlp(config.dim, config.hidden, config.layers, config.dropout)
        max_positions = config.max_positions or max(spec.max_list_length, 1)
        self.position_bias = nn.Parameter(torch.zeros(max_positions))

    def forward(self, batch: Batch, list_length: int | None = None) -> ModelOutput:
        m = list_length or batch.position_mask.shape[1]
        tokens, _ = self.features(batch)
        scores = self.mlp(tokens).squeeze(-1)
        return item_scores_output(scores, batch.candidate_mask, m, self.position_bias, tokens)
