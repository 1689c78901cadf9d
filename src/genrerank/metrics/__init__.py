"""Evaluation metrics for generative re-ranking (numpy-based).

All metrics take padded batches with explicit boolean masks (``[B, L]``, True = real
entry, ``mask=None`` = all valid), accept numpy arrays or torch tensors, and ignore
padded entries completely.
"""

from genrerank.metrics.beyond_accuracy import (
    category_entropy,
    creator_entropy,
    creator_exposure_gini,
    exposure_share,
    intra_list_diversity,
    list_entropy,
)
from genrerank.metrics.classification import auc, gauc, logloss
from genrerank.metrics.debiased import (
    fit_position_propensities,
    ips_clicks_at_k,
    ips_clicks_ratio_at_k,
    list_clicks_at_k,
)
from genrerank.metrics.ranking import (
    DEFAULT_GAIN_WEIGHTS,
    clicks_at_k,
    list_gain,
    map_at_k,
    ndcg_at_k,
    recall_at_k,
)

__all__ = [
    "DEFAULT_GAIN_WEIGHTS",
    "auc",
    "category_entropy",
    "clicks_at_k",
    "creator_entropy",
    "creator_exposure_gini",
    "exposure_share",
    "fit_position_propensities",
    "gauc",
    "intra_list_diversity",
    "ips_clicks_at_k",
    "ips_clicks_ratio_at_k",
    "list_clicks_at_k",
    "list_entropy",
    "list_gain",
    "logloss",
    "map_at_k",
    "ndcg_at_k",
    "recall_at_k",
]
