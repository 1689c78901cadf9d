"""Turn a padded Batch's raw features into one d-dimensional token per candidate.

Every model reads features through this one module, so comparisons between models differ only in
what the models do with them. A candidate's token is the sum of

- its **static item part** (request-independent, what serving caches per item): categorical
  embeddings (index 0 = unknown) and the projection of its dense features, **standardised** with
  training-split statistics (history CTR has a standard deviation of 0.03 beside log follower
  counts of 4: unscaled, the small ones are drowned);
- the **upstream score** (standardised) and **within-request context**: the score's z-score
  among the request's real candidates and its log rank, because only the order inside a request
  matters to a re-ranker and raw scores drift between requests;
- **user-history affinity**: where the user's dense features hold history shares per category
  (``hist_cat_<c>``), the share of the candidate's own category, a user-by-candidate cross that
  additive vectors cannot express;
- the **user's context** vector: the user's features plus the **request context** features
  (query, device, page type: ``spec.context_categorical`` / ``spec.context_dense``), embedded
  the same way in tables of their own, and optionally a learned **bilinear** user x candidate
  interaction ``W (u * item)`` (appeal is largely a user-by-category affinity: a product, not a
  sum). Off by default: on simulated kuaishou it lowered the validation list score (1.532 -> 1.504
  for pointwise, 20k requests); the affinity feature already carries the product that matters.
- optionally, **user x category crosses** (``category_cross``): a learned vector per (user
  categorical value, candidate category) pair, the crossed column that learns a segment's taste
  for a category directly;
- with ``min_count`` > 0, an item categorical value seen fewer times than that among the
  training split's exposures reads the shared "unknown" embedding instead of its own (a creator
  shown twice would get a vector fitted to two noisy labels).

Each part can be switched off in the model config's ``features`` section
(:class:`FeatureConfig`); the statistics are buffers, so they are saved with the run's weights and
exported to ONNX as constants. :meth:`FeatureEmbedding.fit_statistics` sets them from the training
split (the shared trainer calls it before the first step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec

#: User dense features named like this hold the user's history share of category ``<c>``.
HISTORY_CATEGORY = re.compile(r"^hist_cat_(\d+)$")
_MIN_STD = 1e-3  # a (nearly) constant feature is centred, not blown up


@dataclass
class FeatureConfig:
    """Which feature transformations a model's :class:`FeatureEmbedding` applies."""

    standardize: bool = True  # z-score dense inputs with training-split statistics
    request_context: bool = True  # upstream score's z-score and log rank inside the request
    affinity: bool = True  # the user's history share of the candidate's category, if logged
    interaction: bool = False  # learned bilinear user x candidate term (hurt on validation)
    #: Request context features (query, device, page type) in the user vector, when the data
    #: has them; a spec without any builds exactly the model it built before they existed.
    context: bool = True
    #: Hashed item-id embedding with this many buckets (0 = off): a learned per-item offset for
    #: items that recur across requests (:mod:`genrerank.data.ids`).
    item_id_buckets: int = 0
    #: Learned user-field x candidate-category crosses: for every user categorical feature a
    #: table ``[vocab x n_categories, d]`` added to the candidate's token (a crossed column, as
    #: in wide & deep). Taste is a user-by-category affinity; a sum of a user vector and an
    #: item vector expresses it only through the MLP, which learned it poorly.
    category_cross: bool = False
    #: Item categorical values (category, creator, ...) shown fewer than this many times in the
    #: training split share the "unknown" embedding (0 = keep all). A creator seen twice gets a
    #: vector fitted to two noisy labels: on simulated kuaishou (median 2 exposures per
    #: creator) the creator embedding alone lowered the pointwise model's test headroom from
    #: 0.376 to 0.343. Hashed item ids are not thresholded (they are a separate switch).
    min_count: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> FeatureConfig:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"features: unknown option(s) {unknown}; known: {sorted(known)}")
        integers = ("item_id_buckets", "min_count")
        for key in integers:
            value = values.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"features: {key} must be an integer >= 0, got {value!r}")
        bad = {k: v for k, v in values.items() if k not in integers and not isinstance(v, bool)}
        if bad:
            raise ValueError(f"features: options must be true or false, got {bad}")
        return cls(**values)


def category_history_columns(spec: FeatureSpec) -> torch.Tensor:
    """``[n_categories]`` column of ``user_dense`` holding the history share of each category
    index (-1 where there is none)."""
    index = torch.full((max(spec.n_categories, 1),), -1, dtype=torch.long)
    for col, name in enumerate(spec.user_dense):
        match = HISTORY_CATEGORY.match(name)
        if match and int(match.group(1)) < index.numel():
            index[int(match.group(1))] = col
    return index


def request_context(upstream: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, N, 2]``: z-score of the upstream score among the request's real candidates and
    ``log(1 + rank)`` (0 = highest). Padded candidates get zeros and never change real ones."""
    maskf = mask.to(upstream.dtype)
    count = maskf.sum(1, keepdim=True).clamp_min(1.0)
    mean = (upstream * maskf).sum(1, keepdim=True) / count
    var = (((upstream - mean) * maskf) ** 2).sum(1, keepdim=True) / count
    z = (upstream - mean) / (var.sqrt() + 1e-6)
    # Rank = how many real candidates score higher (ties share a rank: deterministic, and
    # exportable to ONNX, which has no stable sort). Padding counts as -inf, so never higher.
    keyed = torch.where(mask, upstream, torch.full_like(upstream, float("-inf")))
    rank = (keyed.unsqueeze(1) > keyed.unsqueeze(2)).sum(-1)
    ctx = torch.stack([z, torch.log1p(rank.to(upstream.dtype))], dim=-1)
    return ctx * maskf.unsqueeze(-1)


class FeatureEmbedding(nn.Module):
    """Candidate tokens [B, N, d] (user context included) and a user vector [B, d]."""

    def __init__(
        self, spec: FeatureSpec, dim: int, dropout: float = 0.0,
        config: FeatureConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, FeatureConfig):
            config = FeatureConfig.from_dict(config)
        self.config = config
        self.item_cat = nn.ModuleList(
            nn.Embedding(c.vocab_size, dim) for c in spec.item_categorical
        )
        self.user_cat = nn.ModuleList(
            nn.Embedding(c.vocab_size, dim) for c in spec.user_categorical
        )
        # +1: the upstream score is a dense candidate feature like any other.
        self.item_dense = nn.Linear(len(spec.item_dense) + 1, dim)
        self.user_dense = nn.Linear(len(spec.user_dense), dim) if spec.user_dense else None
        # Standardisation statistics (identity until fit_statistics): buffers, so they travel
        # with the weights into checkpoints and ONNX graphs.
        n_item = len(spec.item_dense) + 1
        self.register_buffer("item_mean", torch.zeros(n_item))
        self.register_buffer("item_std", torch.ones(n_item))
        self.register_buffer("user_mean", torch.zeros(len(spec.user_dense)))
        self.register_buffer("user_std", torch.ones(len(spec.user_dense)))
        self.context = nn.Linear(2, dim) if config.request_context else None
        history = category_history_columns(spec)
        self.affinity = None
        if config.affinity and bool((history >= 0).any()):
            self.register_buffer("history_columns", history)
            self.affinity = nn.Linear(2, dim)
        self.interaction = nn.Linear(dim, dim) if config.interaction else None
        self.category_cross = None
        if config.category_cross and spec.user_categorical and spec.n_categories > 0:
            # Zero at initialisation: a cross moves only as far as its own feedback pushes it.
            self.n_cross_categories = int(spec.n_categories)
            self.category_cross = nn.ModuleList(
                nn.Embedding(c.vocab_size * self.n_cross_categories, dim)
                for c in spec.user_categorical)
            for emb in self.category_cross:
                nn.init.zeros_(emb.weight)
        self.item_id = None
        if config.item_id_buckets:
            # Zero at initialisation: an item starts as its features say and moves only as far
            # as its own feedback pushes it (rare items stay near zero).
            self.item_id = nn.Embedding(config.item_id_buckets, dim)
            nn.init.zeros_(self.item_id.weight)
        # Request context, last: for a spec without context features (or with the switch off)
        # nothing is created, so parameters, their random initialisation and state_dict keys
        # are exactly those of a model built before context features existed.
        use_context = config.context
        self.context_cat = nn.ModuleList(
            nn.Embedding(c.vocab_size, dim) for c in spec.context_categorical if use_context
        )
        self.context_dense = None
        if use_context and spec.context_dense:
            self.context_dense = nn.Linear(len(spec.context_dense), dim)
            self.register_buffer("context_mean", torch.zeros(len(spec.context_dense)))
            self.register_buffer("context_std", torch.ones(len(spec.context_dense)))
        if config.min_count:
            # Which values of each item categorical field keep their own embedding (all until
            # fit_statistics counts the training split's exposures); a buffer, so it travels
            # with the weights into checkpoints and ONNX graphs.
            for k, c in enumerate(spec.item_categorical):
                known = torch.ones(c.vocab_size, dtype=torch.bool)
                self.register_buffer(f"item_cat_known_{k}", known)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def fit_statistics(self, dataset: Any) -> None:
        """Set the standardisation statistics and the known categorical values (``min_count``)
        from a RerankDataset (the TRAINING split)."""
        self.fit_min_count(dataset)
        if not self.config.standardize or not hasattr(dataset, "_item_dense"):
            return
        item = np.concatenate(
            [dataset._item_dense.values,
             dataset._per_candidate["upstream_score"].values[:, None]], axis=1
        ).astype(np.float64)
        self._set("item", item)
        if self.user_mean.numel():
            self._set("user", dataset._user_dense.values.reshape(len(dataset), -1))
        context = getattr(dataset, "_context_dense", None)
        if self.context_dense is not None and context is not None:
            self._set("context", context.values.reshape(len(dataset), -1))

    @torch.no_grad()
    def fit_min_count(self, dataset: Any) -> None:
        """Keep an item categorical value's own embedding only if the TRAINING split shows it at
        least ``min_count`` times (exposures: the only appearances that carry labels)."""
        if not self.config.min_count or not hasattr(dataset, "_exposed"):
            return
        exposed = dataset._exposed
        per_request = np.diff(exposed.offsets)
        request = np.repeat(np.arange(len(per_request)), per_request)
        rows = dataset._item_cat.offsets[request] + exposed.values
        for k in range(len(self.item_cat)):
            known = getattr(self, f"item_cat_known_{k}")
            values = dataset._item_cat.values[rows, k]
            counts = np.bincount(values[(values >= 0) & (values < known.numel())],
                                 minlength=known.numel())
            known.copy_(torch.as_tensor(counts >= self.config.min_count))

    def _known_item_value(self, values: torch.Tensor, field: int) -> torch.Tensor:
        if not self.config.min_count:
            return values
        known = getattr(self, f"item_cat_known_{field}")
        values = values.clamp(0, known.numel() - 1)
        return torch.where(known[values], values, torch.zeros_like(values))

    def _set(self, which: str, values: np.ndarray) -> None:
        if values.shape[0] == 0:
            return
        mean = torch.as_tensor(np.nanmean(values, axis=0), dtype=torch.float32)
        std = torch.as_tensor(np.nanstd(values, axis=0), dtype=torch.float32)
        getattr(self, f"{which}_mean").copy_(mean)
        getattr(self, f"{which}_std").copy_(std.clamp_min(_MIN_STD))

    # ------------------------------------------------------------------ parts

    def _scaled_user_dense(self, user_dense: torch.Tensor) -> torch.Tensor:
        return (user_dense - self.user_mean) / self.user_std

    def user_vector(self, batch: Batch) -> torch.Tensor:
        # shape[0], not batch.batch_size: int() would freeze the batch size in an ONNX export.
        user = batch.user_dense.new_zeros(batch.user_dense.shape[0], self.item_dense.out_features)
        for k, emb in enumerate(self.user_cat):
            user = user + emb(batch.user_cat[:, k])
        if self.user_dense is not None:
            user = user + self.user_dense(self._scaled_user_dense(batch.user_dense))
        for k, emb in enumerate(self.context_cat):
            user = user + emb(batch.context_cat[:, k])
        if self.context_dense is not None:
            scaled = (batch.context_dense - self.context_mean) / self.context_std
            user = user + self.context_dense(scaled)
        return user

    def item_static(
        self, item_cat: torch.Tensor, item_dense: torch.Tensor,
        item_hash: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The request-independent part of a candidate's token, ``[..., d]``: its categorical
        embeddings plus the projection of its standardised dense features (bias included), plus
        its hashed item-id embedding when the config has one (``item_hash`` is then required).

        Serving caches this per item (:mod:`genrerank.serving.cache`); the request adds the
        upstream score, the within-request context and the user's part in :meth:`forward`.
        """
        n_dense = item_dense.shape[-1]
        weight = self.item_dense.weight
        scaled = (item_dense - self.item_mean[:n_dense]) / self.item_std[:n_dense]
        static = F.linear(scaled, weight[:, :n_dense], self.item_dense.bias)
        for k, emb in enumerate(self.item_cat):
            static = static + emb(self._known_item_value(item_cat[..., k], k))
        if self.item_id is not None:
            if item_hash is None:
                raise ValueError("this model embeds item ids (features.item_id_buckets > 0); "
                                 "pass the candidates' item_hash")
            static = static + self.item_id(torch.remainder(item_hash, self.item_id.num_embeddings))
        return static

    def _affinity(self, batch: Batch) -> torch.Tensor:
        """``[B, N, 2]``: the user's history share of the candidate's category, and whether the
        category has a history column at all."""
        columns = self.history_columns[batch.category.clamp(0, self.history_columns.numel() - 1)]
        known = columns >= 0
        shares = torch.gather(batch.user_dense, 1, columns.clamp_min(0).flatten(1))
        shares = shares.view_as(columns) * known
        return torch.stack([shares, known.to(shares.dtype)], dim=-1)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        static = batch.item_static
        if static is None:
            static = self.item_static(batch.item_cat, batch.item_dense, batch.item_hash)
        mask = batch.candidate_mask
        upstream = (batch.upstream_score - self.item_mean[-1]) / self.item_std[-1]
        # The upstream score is the last input column of the dense projection.
        tokens = static + upstream.unsqueeze(-1) * self.item_dense.weight[:, -1]
        if self.context is not None:
            tokens = tokens + self.context(request_context(batch.upstream_score, mask))
        if self.affinity is not None:
            tokens = tokens + self.affinity(self._affinity(batch))
        if self.category_cross is not None:
            category = batch.category.clamp(0, self.n_cross_categories - 1)
            for k, emb in enumerate(self.category_cross):
                field = batch.user_cat[:, k].unsqueeze(1) * self.n_cross_categories
                tokens = tokens + emb(field + category)
        user = self.user_vector(batch)
        if self.interaction is not None:
            tokens = tokens + self.interaction(user.unsqueeze(1) * static)
        tokens = self.dropout(self.norm(tokens + user.unsqueeze(1)))
        # Zero padded tokens so nothing of them can leak through a careless reduction.
        tokens = tokens * mask.unsqueeze(-1)
        return tokens, user
