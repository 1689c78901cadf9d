"""The `logging` baseline: the upstream order, as a model in the same framework.

It ranks candidates by the ranking stage's upstream score (so greedy decoding is the upstream
order) and has only a calibrated click head, ``a * upstream + b + position bias``, trained by the
shared trainer on the train split like every other model, so its AUC and LogLoss are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.losses.base import ModelOutput
from genrerank.models.base import RerankModel, register_model


@dataclass
class LoggingConfig:
    max_positions: int = 0  # 0: the longest list in the data


@register_model("logging")
class UpstreamOrder(RerankModel):
    Config = LoggingConfig

    def __init__(self, spec: FeatureSpec, config: LoggingConfig) -> None:
        super().__init__(spec, config)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        max_positions = config.max_positions or max(spec.max_list_length, 1)
        self.position_bias = nn.Parameter(torch.zeros(max_positions))

    def forward(self, batch: Batch, list_length: int | None = None) -> ModelOutput:
        m = list_length or batch.position_mask.shape[1]
        mask = batch.candidate_mask
        upstream = batch.upstream_score.masked_fill(~mask, 0.0)
        log_probs = torch.log_softmax(upstream.masked_fill(~mask, float("-inf")), dim=1)
        click = (self.scale * upstream + self.bias).unsqueeze(-1) + self.position_bias[:m]
        return ModelOutput(
            log_probs=log_probs.unsqueeze(-1).expand(-1, -1, m),
            item_repr=upstream.unsqueeze(-1),
            click_logits=click,
        )
