"""Hierarchical generator: a coarse parallel stage plans the list, a fine stage fills it.

Reading order:

1. **Fill stage** (:class:`~genrerank.models.autoregressive.Autoregressive`, a submodule): the
   usual pointer generator. Training is its own: teacher-forced on the logged list with the
   run's losses (``gain_bce``, ``click_bce``), so ``log_probs``/``logits`` are the fill's.
2. **Skeleton stage**, one parallel pass over the fill's encoded candidates ``X [B, N, d]``:
   one token per category present among the request's candidates (mean and attention pool of
   its candidates, its candidate count, a category embedding, the request's mean candidate),
   self-attention across those tokens, then per category a distribution over how many of its
   items the list holds, ``count_logits [B, C, K + 1]`` (K = the longest list). Optionally a
   content-density target: the logit of the share of "long" items in the list (item dense
   feature ``density_feature`` above its training-split median; off when the data has no such
   feature). The density is predicted and trained but not enforced: the constraint language
   has no quota on a dense feature.
3. **Plan -> constraints**: counts that sum to the list length, by default each category's
   expected count rounded to the length (``plan="expected"``; ``"map"``: the jointly most
   likely counts, exact dynamic programming, :func:`plan_counts`), turned into category quotas
   (:func:`skeleton_constraints`), under which the fill decodes
   (``fill.generate(..., constraints=...)``). This part is numpy and lives in
   :mod:`genrerank.constraints.skeleton`, so that the ONNX Runtime backend plans with the
   same code.

Serving: ``genrerank export`` writes the fill's graphs (item tower, encoder, step) as for an
autoregressive model plus a ``skeleton`` graph (the fill's encoded candidates ``memory``,
``category``, ``candidate_mask`` -> ``count_logits``); the runtime plans and decodes under the
plan outside the graphs (:mod:`genrerank.serving.onnx_model`).

Why counts per category rather than a category per position: the gain of a list depends on the
order of its categories (satiation, complementarity), which the fill decides better, item by
item, with its learned list context; counts are permutation-invariant, so every good logged list
is one unambiguous target (a slot target would punish the same categories in another order);
and quotas are what the constraint language expresses.

The skeleton is trained by the ``skeleton`` loss (:mod:`genrerank.losses.skeleton`) from the
high-utility logged lists (list gain >= tau, tau from the training split) or from all lists
weighted by their gain. By default it reads the fill's encoding without training it
(``skeleton_grad``), so the fill learns exactly what a plain autoregressive model learns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from genrerank.constraints.skeleton import (
    CATEGORY,
    PLAN_METHODS,
    merge_plan,
    plan_constraints,
    plan_counts_np,
    plan_from_logits,
    skeleton_constraints,
)
from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.decoding import DecodedLists
from genrerank.losses.base import ModelOutput
from genrerank.models.autoregressive import Autoregressive, AutoregressiveConfig
from genrerank.models.base import RerankModel, make_config, register_model

if TYPE_CHECKING:
    from genrerank.constraints import RequestConstraints

# Re-exported: the plan's numpy half moved to genrerank.constraints.skeleton.
__all__ = ["CATEGORY", "Hierarchical", "HierarchicalConfig", "HierarchicalOutput",
           "merge_plan", "plan_counts", "plan_counts_np", "skeleton_constraints"]


@dataclass
class HierarchicalConfig:
    # Fill stage: the autoregressive generator's options, same names (``fill`` takes any other).
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    encoder_layers: int = 2
    decoder_layers: int = 2
    ff_mult: int = 2
    dropout: float = 0.1
    features: dict = field(default_factory=dict)
    max_positions: int = 0
    list_context: bool = True
    fill: dict = field(default_factory=dict)  # further AutoregressiveConfig options
    # Skeleton stage.
    skeleton_layers: int = 1  # self-attention layers across the category tokens
    #: Let the skeleton loss train the shared candidate encoder too. Off: the plan reads the
    #: fill's encoding without changing it (on simulated kuaishou the shared gradient made the
    #: fill's validation list score lag the plain autoregressive model's by 0.1 to 0.3).
    skeleton_grad: bool = False
    #: Item dense feature whose share of high values is the density target ("" = none; also
    #: off when the data set has no such feature).
    density_feature: str = "log_duration"
    #: Decoding default: quota slack s, each planned count k allows [k - s, k + s] items of its
    #: category (unplanned categories at most s); 0 = exactly the plan, -1 = no plan (the
    #: fill alone, an ablation).
    slack: int = 0
    #: How the count distributions become counts: "expected" (the expected composition
    #: rounded to the length) or "map" (the jointly most likely counts; see
    #: :func:`~genrerank.constraints.skeleton.plan_from_logits` for why it is not the default).
    plan: str = "expected"


@dataclass
class HierarchicalOutput(ModelOutput):
    """The fill's :class:`ModelOutput` plus the skeleton's predictions.

    Attributes:
        count_logits: ``[B, C, K + 1]`` logits of how many items of category c the list holds;
            classes above the category's candidate count are -inf.
        category_count: ``[B, C]`` the request's candidates of each category (0 = absent;
            absent categories are not predicted and carry no loss).
        density_logit: ``[B]`` logit of the share of long items in the list, or None.
        long_item: ``[B, N]`` float, 1 where a candidate counts as long, or None.
    """

    count_logits: torch.Tensor | None = None
    category_count: torch.Tensor | None = None
    density_logit: torch.Tensor | None = None
    long_item: torch.Tensor | None = None


@register_model("hierarchical")
class Hierarchical(RerankModel):
    Config = HierarchicalConfig
    stepwise = True

    def __init__(self, spec: FeatureSpec, config: HierarchicalConfig) -> None:
        super().__init__(spec, config)
        fill_cfg = {name: getattr(config, name) for name in (
            "dim", "n_heads", "n_kv_heads", "encoder_layers", "decoder_layers", "ff_mult",
            "dropout", "features", "max_positions", "list_context")}
        # Built first, so that its initial weights are a plain autoregressive model's.
        self.fill = Autoregressive(spec, make_config(AutoregressiveConfig,
                                                     {**fill_cfg, **config.fill}))
        if config.slack < -1:
            raise ValueError(f"hierarchical: slack must be >= -1, got {config.slack}")
        if config.plan not in PLAN_METHODS:
            raise ValueError(f"hierarchical: plan must be one of {PLAN_METHODS}, got "
                             f"{config.plan!r}")
        d = config.dim
        self.max_positions = self.fill.max_positions
        self.n_categories = max(int(spec.n_categories), 1)
        self.category_embedding = nn.Embedding(self.n_categories, d)
        self.pool_score = nn.Linear(d, 1)
        self.category_in = nn.Linear(2 * d + 1, d)
        layer = nn.TransformerEncoderLayer(d, config.n_heads, d * config.ff_mult, config.dropout,
                                           batch_first=True, norm_first=True)
        self.category_encoder = nn.TransformerEncoder(layer, config.skeleton_layers,
                                                      enable_nested_tensor=False)
        self.category_norm = nn.LayerNorm(d)
        self.count_head = nn.Linear(d, self.max_positions + 1)
        self.density_index = (spec.item_dense.index(config.density_feature)
                              if config.density_feature in spec.item_dense else None)
        self.density_head = nn.Linear(d, 1) if self.density_index is not None else None
        # The density threshold: the feature's training-split median (fit_statistics).
        self.register_buffer("density_threshold", torch.zeros(()))

    # -- what the shared machinery asks of a model -------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        # The fill's decoder layers: the lists are written by the fill, so whatever reads a
        # stepwise model's decoder layers (the ONNX exporter's step graph) reads those.
        return self.fill.layers

    def item_embedding(self, item_cat: torch.Tensor, item_dense: torch.Tensor,
                       item_hash: torch.Tensor | None = None) -> torch.Tensor:
        return self.fill.item_embedding(item_cat, item_dense, item_hash)

    def fit_statistics(self, dataset: Any) -> None:
        self.fill.fit_statistics(dataset)
        dense = getattr(dataset, "_item_dense", None)
        if self.density_index is not None and dense is not None and len(dense.values):
            median = float(np.nanmedian(dense.values[:, self.density_index]))
            self.density_threshold.fill_(median)

    # -- skeleton stage ------------------------------------------------------------------------

    def count_logits(self, x: torch.Tensor, category: torch.Tensor,
                     candidate_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count_logits [B, C, K + 1]``, ``category_count [B, C]``, the category tokens
        ``h [B, C, d]`` and ``present [B, C]`` from the encoded candidates ``x [B, N, d]``.
        Only tensors in, so the exporter's ``skeleton`` graph is exactly this."""
        cand = candidate_mask
        c = self.n_categories
        member = (category.clamp(0, c - 1).unsqueeze(-1)
                  == torch.arange(c, device=x.device)) & cand.unsqueeze(-1)  # [B, N, C]
        memberf = member.to(x.dtype)
        count = member.sum(1)  # [B, C]
        present = count > 0
        mean = torch.einsum("bnc,bnd->bcd", memberf, x) / count.clamp_min(1).unsqueeze(-1)
        # Attention pool within each category: its best items matter more than its average.
        score = self.pool_score(x).squeeze(-1).unsqueeze(-1).expand_as(memberf)
        weight = torch.softmax(score.masked_fill(~member, float("-inf")), dim=1)
        # Absent categories (no candidate at all) softmax over nothing: NaN, zeroed here. A
        # where rather than nan_to_num: the same numbers, and a plain ONNX Where.
        weight = torch.where(member, weight, 0.0)
        pooled = torch.einsum("bnc,bnd->bcd", weight, x)
        real = cand.unsqueeze(-1).to(x.dtype)
        request = (x * real).sum(1) / real.sum(1).clamp_min(1.0)  # [B, d]
        tokens = self.category_in(torch.cat(
            [mean, pooled, torch.log1p(count.to(x.dtype)).unsqueeze(-1)], dim=-1))
        tokens = tokens + self.category_embedding.weight + request.unsqueeze(1)
        # A request without candidates (batch padding) keeps one token unmasked: attention
        # over nothing would give NaN. (Out of place, for the exporter.)
        first = torch.arange(c, device=x.device) == 0
        keep = present | (first & ~present.any(1, keepdim=True))
        h = self.category_norm(self.category_encoder(tokens, src_key_padding_mask=~keep))
        logits = self.count_head(h)  # [B, C, K + 1]
        k = torch.arange(logits.shape[-1], device=x.device)
        logits = logits.masked_fill(k > count.unsqueeze(-1), float("-inf"))
        return logits, count, h, present

    def skeleton(self, batch: Batch, x: torch.Tensor) -> HierarchicalOutput:
        """Skeleton predictions from the encoded candidates ``x [B, N, d]`` (the fill's);
        ``log_probs`` is left empty (the caller sets it)."""
        cand = batch.candidate_mask
        logits, count, h, present = self.count_logits(x, batch.category, cand)
        density = long_item = None
        if self.density_head is not None:
            presentf = present.unsqueeze(-1).to(x.dtype)
            summary = (h * presentf).sum(1) / presentf.sum(1).clamp_min(1.0)
            density = self.density_head(summary).squeeze(-1)
            # A serving batch carries cached item embeddings, not the raw dense features: no
            # long-item target then (it only feeds the training loss).
            if batch.item_dense.shape[-1] > self.density_index:
                values = batch.item_dense[..., self.density_index]
                long_item = ((values > self.density_threshold) & cand).to(x.dtype)
        return HierarchicalOutput(log_probs=x.new_zeros(0), count_logits=logits,
                                  category_count=count, density_logit=density,
                                  long_item=long_item)

    def forward(self, batch: Batch, list_length: int | None = None) -> HierarchicalOutput:
        out = self.fill(batch, list_length)
        x = out.item_repr if self.config.skeleton_grad else out.item_repr.detach()
        plan = self.skeleton(batch, x)
        # Every field of the fill's output (whatever the fill grows), then the skeleton's.
        fill_fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return dataclasses.replace(plan, **fill_fields)

    @torch.inference_mode()
    def plan(self, batch: Batch, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C]`` planned item counts per category, summing to each request's length
        (at most its candidates), and ``[B, C]`` the candidates of each category."""
        was_training = self.training
        self.eval()
        try:
            x = self.fill.encode(batch)
            logits, count, _, _ = self.count_logits(x, batch.category, batch.candidate_mask)
        finally:
            self.train(was_training)
        # The numpy plan, as the ONNX Runtime backend computes it from its count_logits.
        counts = plan_from_logits(logits.float().cpu().numpy(), lengths.cpu().numpy(),
                                  self.config.plan)
        return torch.from_numpy(counts).to(count.device), count

    # -- decoding ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, batch: Batch, list_length: int | torch.Tensor, decoder: str = "greedy", *,
        slack: int | None = None,
        constraints: Sequence[RequestConstraints | None] | None = None, **params: Any,
    ) -> torch.Tensor | DecodedLists:
        """Plan the counts, then let the fill decode under them (``params`` go to
        :meth:`Autoregressive.generate`: beam width, sampling options). ``slack`` overrides
        the config's: 0 = exactly the planned counts, -1 = no plan. The caller's
        ``constraints`` (:func:`~genrerank.constraints.constraints_for_batch`) are rules and
        the plan is advice: a category both bound keeps the intersection of the two ranges, or
        the caller's range where they do not overlap, and a request whose rules admit no list
        with the plan is decoded under its rules alone
        (:func:`~genrerank.constraints.skeleton.merge_plan`)."""
        slack = self.config.slack if slack is None else int(slack)
        if slack < -1:
            raise ValueError(f"hierarchical: slack must be >= -1, got {slack}")
        if slack == -1:
            if constraints is not None:
                params["constraints"] = constraints
            return self.fill.generate(batch, list_length, decoder, **params)
        lengths, _ = self.fill._lengths(batch, list_length)  # at most the real candidates
        counts, available = (t.cpu().numpy() for t in self.plan(batch, lengths))
        # The same function the ONNX Runtime backend calls: both decode under the same sets.
        planned = plan_constraints(
            counts, available, batch.category.cpu().numpy(), batch.candidate_mask.cpu().numpy(),
            lengths.cpu().numpy(), slack, constraints,
            request_ids=[f"row {int(i)}" for i in batch.request_index.tolist()])
        return self.fill.generate(batch, list_length, decoder, constraints=planned, **params)



def plan_counts(log_probs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """:func:`~genrerank.constraints.skeleton.plan_counts_np` on tensors: the most likely
    counts ``[B, C]`` under ``log_probs [B, C, K + 1]`` (-inf = impossible) that sum to
    ``lengths [B]`` (exact dynamic programming). One implementation for both backends, so an
    export plans exactly as the model does."""
    counts = plan_counts_np(log_probs.detach().float().cpu().numpy(),
                            lengths.detach().cpu().numpy())
    return torch.from_numpy(counts).to(log_probs.device)
