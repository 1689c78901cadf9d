"""PRM-style baseline (Pei et al., 2019): a Transformer re-scores the input list; sort by it.

The input list is the candidates in upstream order (how they are stored), with a learned
embedding of each candidate's input rank, so every score can depend on the whole candidate set.
Trained like the pointwise model (click of the exposed items), it differs from it only by the
self-attention over candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.losses.base import ModelOutput
from genrerank.models.base import RerankModel, register_model
from genrerank.models.pointwise import item_scores_output
from genrerank.modules.features import FeatureEmbedding


@dataclass
class PRMConfig:
    dim: int = 64
    heads: int = 4
    layers: int = 2
    ff_mult: int = 2
    dropout: float = 0.1
    features: dict = field(default_factory=dict)  # FeatureConfig options
    max_candidates: int = 0  # 0: the largest n in the data
    max_positions: int = 0


@register_model("prm")
class PRM(RerankModel):
    Config = PRMConfig

    def __init__(self, spec: FeatureSpec, config: PRMConfig) -> None:
        super().__init__(spec, config)
        d = config.dim
        self.features = FeatureEmbedding(spec, d, config.dropout, config.features)
        self.input_rank = nn.Embedding(config.max_candidates or max(spec.max_candidates, 1), d)
        layer = nn.TransformerEncoderLayer(d, config.heads, d * config.ff_mult, config.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
        max_positions = config.max_positions or max(spec.max_list_length, 1)
        self.position_bias = nn.Parameter(torch.zeros(max_positions))

    def input_limits(self) -> tuple[int | None, int | None]:
        return self.input_rank.num_embeddings, self.position_bias.numel()

    def forward(self, batch: Batch, list_length: int | None = None) -> ModelOutput:
        m = list_length or batch.position_mask.shape[1]
        tokens, _ = self.features(batch)
        n = tokens.shape[1]
        if n > self.input_rank.num_embeddings:
            raise ValueError(f"prm: {n} candidates exceed max_candidates "
                             f"{self.input_rank.num_embeddings}")
        ranks = torch.arange(n, device=tokens.device)
        h = self.encoder(
            tokens + self.input_rank(ranks), src_key_padding_mask=~batch.candidate_mask
        )
        scores = self.head(h).squeeze(-1)
        return item_scores_output(scores, batch.candidate_mask, m, self.position_bias, h)
