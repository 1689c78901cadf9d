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
3. **Plan -> constraints**: the most likely counts that sum to the list length (exact, by
   dynamic programming over categories, :func:`plan_counts`), turned into category quotas
   (:func:`skeleton_constraints`), under which the fill decodes
   (``fill.generate(..., constraints=...)``).

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
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.decoding import DecodedLists
from genrerank.losses.base import ModelOutput
from genrerank.models.autoregressive import Autoregressive, AutoregressiveConfig
from genrerank.models.base import RerankModel, make_config, register_model

if TYPE_CHECKING:
    from genrerank.constraints import ConstraintSet, RequestConstraints

#: The attribute the skeleton's quotas constrain.
CATEGORY = "category"


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
    #: Why ``genrerank export`` cannot write this model (serving has no skeleton stage and no
    #: constraint masking in its step loop).
    export_refusal: ClassVar[str] = (
        "hierarchical: ONNX export is not supported (the skeleton stage and the constrained "
        "fill have no serving graph); serve the run with the PyTorch backend")

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
        # The ONNX exporter reads a stepwise model's decoder layers before writing its step
        # graph; this model has no single step graph, so that read refuses the export in one
        # line (a ValueError, which the command line reports as such).
        raise ValueError(self.export_refusal)

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

    def skeleton(self, batch: Batch, x: torch.Tensor) -> HierarchicalOutput:
        """Skeleton predictions from the encoded candidates ``x [B, N, d]`` (the fill's);
        ``log_probs`` is left empty (the caller sets it)."""
        cand = batch.candidate_mask
        c = self.n_categories
        member = (batch.category.clamp(0, c - 1).unsqueeze(-1)
                  == torch.arange(c, device=x.device)) & cand.unsqueeze(-1)  # [B, N, C]
        memberf = member.to(x.dtype)
        count = member.sum(1)  # [B, C]
        present = count > 0
        mean = torch.einsum("bnc,bnd->bcd", memberf, x) / count.clamp_min(1).unsqueeze(-1)
        # Attention pool within each category: its best items matter more than its average.
        score = self.pool_score(x).squeeze(-1).unsqueeze(-1).expand_as(memberf)
        weight = torch.softmax(score.masked_fill(~member, float("-inf")), dim=1)
        weight = torch.nan_to_num(weight, nan=0.0)  # absent categories: no candidate at all
        pooled = torch.einsum("bnc,bnd->bcd", weight, x)
        real = cand.unsqueeze(-1).to(x.dtype)
        request = (x * real).sum(1) / real.sum(1).clamp_min(1.0)  # [B, d]
        tokens = self.category_in(torch.cat(
            [mean, pooled, torch.log1p(count.to(x.dtype)).unsqueeze(-1)], dim=-1))
        tokens = tokens + self.category_embedding.weight + request.unsqueeze(1)
        # A request without candidates (batch padding) keeps one token unmasked: attention
        # over nothing would give NaN.
        keep = present.clone()
        keep[:, 0] |= ~present.any(1)
        h = self.category_norm(self.category_encoder(tokens, src_key_padding_mask=~keep))
        logits = self.count_head(h)  # [B, C, K + 1]
        k = torch.arange(logits.shape[-1], device=x.device)
        logits = logits.masked_fill(k > count.unsqueeze(-1), float("-inf"))
        density = long_item = None
        if self.density_head is not None:
            presentf = present.unsqueeze(-1).to(x.dtype)
            summary = (h * presentf).sum(1) / presentf.sum(1).clamp_min(1.0)
            density = self.density_head(summary).squeeze(-1)
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
            plan = self.skeleton(batch, self.fill.encode(batch))
        finally:
            self.train(was_training)
        counts = plan_counts(torch.log_softmax(plan.count_logits, dim=-1), lengths)
        return counts, plan.category_count

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
        with the plan is decoded under its rules alone (:func:`_with_plan`)."""
        slack = self.config.slack if slack is None else int(slack)
        if slack < -1:
            raise ValueError(f"hierarchical: slack must be >= -1, got {slack}")
        if slack == -1:
            if constraints is not None:
                params["constraints"] = constraints
            return self.fill.generate(batch, list_length, decoder, **params)
        from genrerank.constraints import constraints_for_batch

        lengths, _ = self.fill._lengths(batch, list_length)  # at most the real candidates
        counts, available = (t.cpu().numpy() for t in self.plan(batch, lengths))
        sets = [skeleton_constraints(k, slack, a) for k, a in zip(counts, available, strict=True)]
        planned = constraints_for_batch(sets, batch, lengths)
        if constraints is not None:
            if len(constraints) != batch.batch_size:
                raise ValueError(f"constraints: {len(constraints)} entries for a batch of "
                                 f"{batch.batch_size} requests")
            category = batch.category.cpu().numpy()
            planned = [
                mine if rc is None else _with_plan(rc, counts[r], available[r], slack,
                                                   int(lengths[r]), category[r])
                for r, (rc, mine) in enumerate(zip(constraints, planned, strict=True))]
        return self.fill.generate(batch, list_length, decoder, constraints=planned, **params)


def _with_plan(rc: RequestConstraints, counts: np.ndarray, available: np.ndarray, slack: int,
               length: int, category: np.ndarray) -> RequestConstraints:
    """The caller's constraints ``rc`` plus the plan's quotas; ``rc`` alone when together they
    admit no list. A category the caller bounds over the whole list keeps the plan's bounds
    where the two ranges overlap (their intersection) and the caller's alone where they do
    not, which settles the usual conflict without a search."""
    from genrerank.constraints import ConstraintSearchLimit, compile_constraints

    bounds: dict[int, tuple[int, int | None]] = {}
    for q in rc.cs.quotas:
        if q.attribute == CATEGORY and q.within is None and q.value is not None:
            low, high = bounds.get(q.value, (0, None))
            if q.max is not None:
                high = q.max if high is None else min(high, q.max)
            bounds[q.value] = (max(low, q.min), high)
    plan = []
    for q in skeleton_constraints(counts, slack, available).quotas:
        if q.value in bounds:
            low, high = bounds[q.value]
            low, high = max(low, q.min), q.max if high is None else min(high, q.max)
            if high is not None and low > high:
                continue  # the ranges are disjoint: the caller's rule alone
            q = dataclasses.replace(q, min=low, max=high)
        plan.append(q)
    merged = dataclasses.replace(rc.cs, quotas=(*rc.cs.quotas, *plan))
    compiled = compile_constraints(
        merged, category=category, creator=rc.creator, is_cold_start=rc.cold,
        is_long_tail=rc.tail, item_ids=rc.item_ids, candidate_mask=rc.real,
        list_length=length, request_id=rc.request_id, max_nodes=rc.max_nodes)
    try:
        return compiled if compiled.feasible() else rc
    except ConstraintSearchLimit:  # undecided within the budget: the rules alone
        return rc


def plan_counts(log_probs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The most likely counts ``[B, C]`` under independent per-category distributions
    ``log_probs [B, C, K + 1]`` (-inf = impossible) that sum to ``lengths [B]``: exact, by
    dynamic programming over the categories (O(C K^2) per request). A length no counts can
    reach (fewer candidates than it) takes the largest reachable total."""
    b, c, width = log_probs.shape
    k_max = width - 1
    lengths = lengths.to(device=log_probs.device, dtype=torch.long).clamp(0, k_max)
    lp = log_probs.float()
    neg = torch.tensor(float("-inf"), device=lp.device)
    s = torch.arange(k_max + 1, device=lp.device)
    k = torch.arange(width, device=lp.device)
    prev_idx = (s.unsqueeze(1) - k).clamp_min(0)  # [S, K + 1]: s - k
    valid = s.unsqueeze(1) >= k
    best = torch.full((b, k_max + 1), float("-inf"), device=lp.device)
    best[:, 0] = 0.0
    # choices[c][b, s]: the count of category c in the best allocation of s items to 0..c.
    choices = []
    for cat in range(c):
        # total[b, s, k] = best[b, s - k] + lp[b, cat, k]
        total = torch.where(valid, best[:, prev_idx] + lp[:, cat].unsqueeze(1), neg)
        best, pick = total.max(dim=2)
        choices.append(pick)
    reachable = torch.isfinite(best)
    target = torch.where(reachable & (s <= lengths.unsqueeze(1)), s, -1).max(1).values
    target = target.clamp_min(0)
    counts = torch.zeros(b, c, dtype=torch.long, device=lp.device)
    rows = torch.arange(b, device=lp.device)
    for cat in range(c - 1, -1, -1):
        pick = choices[cat][rows, target]
        counts[:, cat] = pick
        target = target - pick
    return counts


def skeleton_constraints(counts: Sequence[int] | np.ndarray, slack: int = 0,
                         available: Sequence[int] | np.ndarray | None = None) -> ConstraintSet:
    """A :class:`genrerank.constraints.ConstraintSet` of category quotas from a plan.

    ``counts[c]`` is the planned number of items of category c. Each planned category gets
    ``Quota("category", c, min=k - slack, max=k + slack)``; with ``slack > 0`` every other
    category with candidates in ``available`` (``available[c]`` = candidates of category c)
    gets at most ``slack`` (with slack 0 the planned minimums fill the list, so they need no
    quota).

    Feasibility, for a list of length L = sum(counts) (what :func:`plan_counts` returns): every
    minimum is clipped to the category's candidates when ``available`` is given, and the
    minimums sum to at most L; the maximums of the categories with candidates sum to at least L.
    """
    from genrerank.constraints import ConstraintSet, Quota

    counts = np.asarray(counts, dtype=np.int64)
    if slack < 0:
        raise ValueError(f"skeleton_constraints: slack must be >= 0, got {slack}")
    if (counts < 0).any():
        raise ValueError("skeleton_constraints: counts must be >= 0")
    avail = None if available is None else np.asarray(available, dtype=np.int64)
    quotas = []
    for cat, k in enumerate(counts.tolist()):
        have = None if avail is None else int(avail[cat])
        if k > 0:
            low = max(k - slack, 0)
            if have is not None:
                low = min(low, have)
            quotas.append(Quota(CATEGORY, value=cat, min=low, max=k + slack))
        elif slack > 0 and have is not None and have > 0:
            quotas.append(Quota(CATEGORY, value=cat, min=0, max=slack))
    return ConstraintSet(quotas=tuple(quotas))
