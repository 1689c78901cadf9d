"""Reward terms: one number per list ``[B, K]`` for one objective (engagement, diversity,
exposure fairness). A :class:`~genrerank.rewards.reward.ListReward` weighs them into a total.

Lists are ``[B, K, m]`` candidate indices, ``-1`` = empty slot; ``lists >= 0`` is the filled
mask and position j is slot j. A list with no filled slot gets 0 from every term. Terms are
registered by name (:func:`register_term`); constructor keyword arguments are their config.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from genrerank.data.dataset import Batch
from genrerank.rewards.sources import ListSignals

__all__ = [
    "REWARD_TERMS",
    "RewardTerm",
    "build_term",
    "register_term",
]

#: Term name -> class; filled by :func:`register_term`.
REWARD_TERMS: dict[str, type[RewardTerm]] = {}

TermT = TypeVar("TermT", bound=type["RewardTerm"])


class RewardTerm:
    """One objective of a list. ``needs_signals``: whether it reads feedback signals (then the
    reward asks its :class:`~genrerank.rewards.sources.SignalSource` for them)."""

    #: Registry name, set by :func:`register_term`.
    name: ClassVar[str] = ""
    needs_signals: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """The constructor keyword arguments (JSON-able) that rebuild this term."""
        return {}

    def __call__(self, batch: Batch, lists: torch.Tensor, signals: ListSignals | None
                 ) -> torch.Tensor:
        raise NotImplementedError


def register_term(name: str) -> Callable[[TermT], TermT]:
    """Class decorator: make a :class:`RewardTerm` subclass buildable by ``name``."""

    def decorate(cls: TermT) -> TermT:
        if not (isinstance(cls, type) and issubclass(cls, RewardTerm)):
            raise TypeError(f"register_term({name!r}) decorates RewardTerm subclasses, "
                            f"got {cls!r}")
        if name in REWARD_TERMS and REWARD_TERMS[name] is not cls:
            raise ValueError(f"reward term {name!r} is already registered to "
                             f"{REWARD_TERMS[name]!r}")
        cls.name = name
        REWARD_TERMS[name] = cls
        return cls

    return decorate


def build_term(name: str, params: Mapping[str, Any] | None = None) -> RewardTerm:
    """The term ``name`` with config ``params``; one-line errors naming what is accepted."""
    if name not in REWARD_TERMS:
        raise ValueError(f"unknown reward term {name!r}; known: {sorted(REWARD_TERMS)}")
    cls = REWARD_TERMS[name]
    params = dict(params or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = sorted(set(params) - set(accepted))
    if bad:
        raise TypeError(f"reward term {name!r}: unknown parameter(s) {bad}; accepted: "
                        f"{accepted}")
    return cls(**params)


# ---------------------------------------------------------------------- helpers


def _filled(lists: torch.Tensor) -> torch.Tensor:
    if lists.dim() != 3:
        raise ValueError(f"lists must be [B, K, m], got shape {tuple(lists.shape)}")
    return lists >= 0


def _gather(values: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """Per-candidate ``values [B, N]`` at the slots of ``lists [B, K, m]`` (any value at empty
    slots: callers mask them)."""
    b, k, m = lists.shape
    index = lists.clamp_min(0).reshape(b, k * m).to(values.device)
    return values.gather(1, index).reshape(b, k, m)


def _discounts(m: int, device: torch.device) -> torch.Tensor:
    """``1 / log2(j + 2)`` for slots j = 0..m-1, the position weight of the metrics."""
    return 1.0 / torch.log2(torch.arange(m, device=device, dtype=torch.float32) + 2.0)


def _normalised_entropy(values: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` entropy of ``values`` over the filled slots divided by log(#filled), as
    :func:`genrerank.metrics.beyond_accuracy.list_entropy` with ``normalize=True``; 0 for lists
    of at most one item."""
    same = (values.unsqueeze(-1) == values.unsqueeze(-2)) & filled.unsqueeze(-2)
    count = same.sum(-1).float()  # slot j: filled slots holding the same value as slot j
    n = filled.sum(-1).float()
    p = count / n.clamp_min(1.0).unsqueeze(-1)
    plogp = torch.where(filled, torch.log(p.clamp_min(1e-30)), 0.0)
    entropy = (-plogp.sum(-1) / n.clamp_min(1.0)).clamp_min(0.0)
    return torch.where(n > 1, entropy / torch.log(n.clamp_min(2.0)), 0.0)


def _weighted_share(flags: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` position-weighted share of filled slots whose flag is set (0 if none)."""
    w = torch.where(filled, _discounts(filled.shape[-1], filled.device), 0.0)
    total = w.sum(-1)
    hit = torch.where(flags.bool(), w, 0.0).sum(-1)
    return torch.where(total > 0, hit / total.clamp_min(1e-30), 0.0)


# ---------------------------------------------------------------------- terms

SCROLL_MODELS = ("own", "dcg", "geometric")


@register_term("engagement")
class Engagement(RewardTerm):
    """``sum_j c(j) sum_s w_s values[s][j]`` over filled slots.

    ``scroll`` sets c(j): ``"own"`` = 1, the source's own position effects (logged labels,
    evaluator predictions and oracle expectations are unconditional, so they already include
    the chance the user scrolls that far); ``"dcg"`` = ``1 / log2(j + 2)``; ``"geometric"`` =
    ``scroll_rate ** j``. ``gain_weights`` None: the data set's (:class:`ListReward` fills
    them from its spec); a signal missing from the source counts 0.
    """

    needs_signals = True

    def __init__(self, gain_weights: Mapping[str, float] | None = None, scroll: str = "own",
                 scroll_rate: float = 0.9) -> None:
        if scroll not in SCROLL_MODELS:
            raise ValueError(f"engagement: unknown scroll {scroll!r}; accepted: "
                             f"{list(SCROLL_MODELS)}")
        if not (isinstance(scroll_rate, int | float) and 0.0 < scroll_rate <= 1.0):
            raise ValueError(f"engagement: scroll_rate must be in (0, 1], got {scroll_rate!r}")
        if gain_weights is not None:
            bad = {s: w for s, w in gain_weights.items()
                   if not (isinstance(w, int | float) and math.isfinite(w))}
            if bad:
                raise ValueError(f"engagement: gain weights must be finite numbers, got {bad}")
            gain_weights = {str(s): float(w) for s, w in gain_weights.items()}
        self.gain_weights = gain_weights
        self.scroll = scroll
        self.scroll_rate = float(scroll_rate)

    def config(self) -> dict[str, Any]:
        return {"gain_weights": None if self.gain_weights is None else dict(self.gain_weights),
                "scroll": self.scroll, "scroll_rate": self.scroll_rate}

    def position_weights(self, m: int, device: torch.device) -> torch.Tensor:
        """c(j) for slots j = 0..m-1."""
        if self.scroll == "dcg":
            return _discounts(m, device)
        if self.scroll == "geometric":
            return self.scroll_rate ** torch.arange(m, device=device, dtype=torch.float32)
        return torch.ones(m, device=device)

    def __call__(self, batch: Batch, lists: torch.Tensor, signals: ListSignals | None
                 ) -> torch.Tensor:
        if signals is None:
            raise ValueError("engagement needs signals from a reward source")
        if self.gain_weights is None:
            raise ValueError("engagement: no gain weights (pass them, or build the ListReward "
                             "with the data set's spec)")
        filled = _filled(lists).to(signals.filled.device) & signals.filled
        b, k, m = lists.shape
        gain = torch.zeros(b, k, m, device=filled.device)
        for s, w in self.gain_weights.items():
            if w and s in signals.values:
                gain = gain + w * signals.values[s].float()
        c = self.position_weights(m, filled.device)
        return torch.where(filled, gain * c, 0.0).sum(-1)


_ENTROPY_FIELDS = ("category", "creator")


@register_term("diversity")
class Diversity(RewardTerm):
    """Mean normalised entropy of the named per-candidate fields over the filled slots."""

    needs_signals = False

    def __init__(self, fields: Sequence[str] = _ENTROPY_FIELDS) -> None:
        fields = [fields] if isinstance(fields, str) else list(fields)
        bad = [f for f in fields if f not in _ENTROPY_FIELDS]
        if bad or not fields:
            raise ValueError(f"diversity: fields must be a non-empty subset of "
                             f"{list(_ENTROPY_FIELDS)}, got {fields}")
        self.fields = tuple(fields)

    def config(self) -> dict[str, Any]:
        return {"fields": list(self.fields)}

    def __call__(self, batch: Batch, lists: torch.Tensor, signals: ListSignals | None
                 ) -> torch.Tensor:
        filled = _filled(lists).to(batch.candidate_mask.device)
        terms = [_normalised_entropy(_gather(getattr(batch, f), lists), filled)
                 for f in self.fields]
        return torch.stack(terms).mean(0)


@register_term("category_diversity")
class CategoryDiversity(Diversity):
    """Normalised entropy of the categories of the filled slots."""

    def __init__(self) -> None:
        super().__init__(("category",))

    def config(self) -> dict[str, Any]:
        return {}


@register_term("creator_diversity")
class CreatorDiversity(Diversity):
    """Normalised entropy of the creators of the filled slots."""

    def __init__(self) -> None:
        super().__init__(("creator",))

    def config(self) -> dict[str, Any]:
        return {}


_GROUPS = {"cold_start": "is_cold_start", "long_tail": "is_long_tail"}


@register_term("fairness")
class Fairness(RewardTerm):
    """Mean position-weighted exposure share (``1 / log2(j + 2)``) of the named item groups."""

    needs_signals = False

    def __init__(self, groups: Sequence[str] = ("cold_start", "long_tail")) -> None:
        groups = [groups] if isinstance(groups, str) else list(groups)
        bad = [g for g in groups if g not in _GROUPS]
        if bad or not groups:
            raise ValueError(f"fairness: groups must be a non-empty subset of "
                             f"{list(_GROUPS)}, got {groups}")
        self.groups = tuple(groups)

    def config(self) -> dict[str, Any]:
        return {"groups": list(self.groups)}

    def __call__(self, batch: Batch, lists: torch.Tensor, signals: ListSignals | None
                 ) -> torch.Tensor:
        filled = _filled(lists).to(batch.candidate_mask.device)
        shares = [_weighted_share(_gather(getattr(batch, _GROUPS[g]), lists), filled)
                  for g in self.groups]
        return torch.stack(shares).mean(0)


@register_term("cold_start_exposure")
class ColdStartExposure(Fairness):
    """Position-weighted share of filled slots holding a cold-start item."""

    def __init__(self) -> None:
        super().__init__(("cold_start",))

    def config(self) -> dict[str, Any]:
        return {}


@register_term("long_tail_exposure")
class LongTailExposure(Fairness):
    """Position-weighted share of filled slots holding a long-tail item."""

    def __init__(self) -> None:
        super().__init__(("long_tail",))

    def config(self) -> dict[str, Any]:
        return {}
