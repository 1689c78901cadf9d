"""Shared helpers for the trainer tests: a tiny registered model and a stand-in objective.

They depend on nothing but the data layer and the model registry, so the trainer is tested
independently of the real models and losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.models.base import MODELS, RerankModel, build_model, register_model
from genrerank.training import TrainConfig, seed_everything

TINY_MODEL = "tiny_test_scorer"


@dataclass
class TinyConfig:
    dim: int = 16
    dropout: float = 0.2  # > 0 so the torch RNG matters to training (tests RNG restore)


@dataclass
class TinyOutput:
    log_probs: torch.Tensor  # [B, N, M]


class TinyScorer(RerankModel):
    """One score per candidate from its dense features, upstream score and category; the same
    log-softmax over candidates in every position column."""

    Config = TinyConfig

    def __init__(self, spec: FeatureSpec, config: TinyConfig) -> None:
        super().__init__(spec, config)
        self.dense = nn.Linear(len(spec.item_dense) + 1, config.dim)
        self.category = nn.Embedding(spec.n_categories, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.dim, 1)

    def forward(self, batch: Batch) -> TinyOutput:
        x = torch.cat([batch.item_dense, batch.upstream_score.unsqueeze(-1)], dim=-1)
        hidden = torch.relu(self.dropout(self.dense(x) + self.category(batch.category)))
        scores = self.head(hidden).squeeze(-1).masked_fill(~batch.candidate_mask, -1e9)
        log_probs = torch.log_softmax(scores, dim=1)
        return TinyOutput(log_probs.unsqueeze(-1).expand(-1, -1, batch.exposed.shape[1]))


if TINY_MODEL not in MODELS:
    register_model(TINY_MODEL)(TinyScorer)


class TinyObjective(nn.Module):
    """Mean -log p of the logged item at each exposed position; a second, logged-only component
    (mean top-1 probability) so the trainer sees more than one."""

    def forward(self, out: TinyOutput, batch: Batch) -> tuple[torch.Tensor, dict]:
        picked = torch.gather(out.log_probs, 1, batch.exposed.unsqueeze(1)).squeeze(1)
        mask = batch.position_mask.float()
        nll = -(picked * mask).sum() / mask.sum()
        top1 = out.log_probs[:, :, 0].exp().max(dim=1).values.mean()
        return nll, {"nll": nll, "top1_prob": top1.detach()}


def make_model(spec: FeatureSpec, seed: int = 0, **config: object) -> RerankModel:
    seed_everything(seed)  # model init is seeded by whoever builds the model
    return build_model(TINY_MODEL, spec, dict(config))


def small_config(**overrides: object) -> TrainConfig:
    values: dict = {
        "seed": 0,
        "epochs": 3,
        "batch_size": 32,
        "lr": 0.01,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "patience": 0,
        "progress": False,
        "num_threads": 2,
    }
    values.update(overrides)
    return TrainConfig(**values)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"tensor {key} differs"


def any_tensor_differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)
