"""A multi-objective list reward: a weighted sum of reward terms, with the terms kept apart.

The unweighted terms are reported next to the total, so stored lists can be re-weighted later
(:func:`combine`) without scoring them again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.data.signals import gain_weights as spec_gain_weights
from genrerank.rewards.sources import SignalSource
from genrerank.rewards.terms import REWARD_TERMS, Engagement, RewardTerm, build_term

__all__ = ["DEFAULT_REWARD", "ListReward", "RewardBreakdown", "combine"]

#: The reward of plain engagement: the data set's gain, the source's own position effects.
DEFAULT_REWARD: dict[str, Any] = {"weights": {"engagement": 1.0}}


@dataclass
class RewardBreakdown:
    """Rewards of lists ``[B, K]``.

    Attributes:
        total: ``[B, K]`` weighted sum of the terms; ``-inf`` for lists with no filled slot.
        terms: term name -> ``[B, K]`` unweighted value (0 for lists with no filled slot).
        source: name of the signal source used.
        weights: term name -> weight.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    source: str
    weights: dict[str, float]


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(REWARD_TERMS))
    if unknown:
        raise ValueError(f"unknown reward term(s) {unknown}; known: {sorted(REWARD_TERMS)}")
    out: dict[str, float] = {}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) \
                or w < 0:
            raise ValueError(f"reward weight of {name!r} must be a finite number >= 0, "
                             f"got {w!r}")
        out[name] = float(w)
    if not any(w > 0 for w in out.values()):
        raise ValueError(f"a reward needs at least one weight above 0, got {out}")
    return out


def combine(terms: Mapping[str, torch.Tensor | np.ndarray],
            weights: Mapping[str, float]) -> torch.Tensor | np.ndarray:
    """Totals ``sum_t w_t terms[t]`` from stored (unweighted) term values, to re-weight stored
    lists without scoring them again. Terms with weight 0 may be absent; the result has the
    type (torch or numpy) of the stored values. Lists that were ``-inf`` must be masked by
    the caller (stored terms are 0 there)."""
    weights = _check_weights(weights)
    missing = sorted(t for t, w in weights.items() if w > 0 and t not in terms)
    if missing:
        raise ValueError(f"combine: no stored values for term(s) {missing}; stored: "
                         f"{sorted(terms)}")
    used = [(terms[t], w) for t, w in weights.items() if w > 0]
    total: Any = used[0][0] * used[0][1]
    for value, w in used[1:]:
        total = total + value * w
    return total


class ListReward:
    """``total = sum_t w_t term_t(lists)``; see the package docstring.

    ``weights``: term name -> weight (finite, >= 0, at least one above 0); ``terms``: term name
    -> that term's keyword arguments; ``spec``: the data set, whose gain weights the engagement
    term takes when none are given.
    """

    def __init__(self, weights: Mapping[str, float],
                 terms: Mapping[str, Mapping[str, Any]] | None = None,
                 spec: FeatureSpec | None = None) -> None:
        self.weights = _check_weights(weights)
        params = {name: dict(p or {}) for name, p in (terms or {}).items()}
        unknown = sorted(set(params) - set(self.weights))
        if unknown:
            raise ValueError(f"reward: parameters for term(s) {unknown} that have no weight; "
                             f"weighted terms: {sorted(self.weights)}")
        self.spec = spec
        self.terms: dict[str, RewardTerm] = {}
        for name in self.weights:
            term = build_term(name, params.get(name))
            if isinstance(term, Engagement) and term.gain_weights is None:
                if spec is None:
                    raise ValueError("reward: the engagement term needs gain_weights or the "
                                     "data set's spec")
                term.gain_weights = spec_gain_weights(spec)
            self.terms[name] = term

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: FeatureSpec | None = None
                    ) -> ListReward:
        """From ``{"weights": {...}, "terms": {...}}`` (as :meth:`to_config` writes)."""
        unknown = sorted(set(cfg) - {"weights", "terms"})
        if unknown:
            raise ValueError(f"reward config: unknown key(s) {unknown}; accepted: "
                             "['terms', 'weights']")
        if "weights" not in cfg:
            raise ValueError("reward config: needs 'weights' (term name -> weight)")
        return cls(cfg["weights"], cfg.get("terms"), spec)

    def to_config(self) -> dict[str, Any]:
        """JSON-able config with the gain weights resolved: rebuilds the same reward."""
        return {"weights": dict(self.weights),
                "terms": {name: term.config() for name, term in self.terms.items()}}

    def with_weights(self, weights: Mapping[str, float]) -> ListReward:
        """The same terms with new weights (terms not weighted before get their defaults)."""
        params = {name: term.config() for name, term in self.terms.items() if name in weights}
        return ListReward(weights, params, self.spec)

    @property
    def needs_signals(self) -> bool:
        return any(t.needs_signals and self.weights[n] > 0 for n, t in self.terms.items())

    def __call__(self, batch: Batch, lists: torch.Tensor, source: SignalSource
                 ) -> RewardBreakdown:
        if lists.dim() != 3 or lists.shape[0] != batch.batch_size:
            raise ValueError(f"reward: lists must be [B, K, m] with B = {batch.batch_size}, "
                             f"got {tuple(lists.shape)}")
        lists = lists.long()
        signals = source.signals(batch, lists) if self.needs_signals else None
        any_filled = (lists >= 0).any(-1)
        terms: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            if term.needs_signals and signals is None:
                continue  # weight 0 and no signals fetched: not reported
            value = term(batch, lists, signals).float()
            terms[name] = torch.where(any_filled.to(value.device), value, 0.0)
        total = combine(terms, self.weights)
        assert isinstance(total, torch.Tensor)
        total = torch.where(any_filled.to(total.device), total, -math.inf)
        return RewardBreakdown(total, terms, source.name, dict(self.weights))
