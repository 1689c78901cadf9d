"""Online evaluation: score any list under the simulator's ground-truth user model.

This is the stand-in for an A/B test. For each policy we report the mean exact expected gain
(click 1.0, like 1.5, long view 0.8; the user model applies position effects itself), its
standard error over requests, the **headroom captured**
``(policy - logging) / (upper bound - logging)`` (0 = no better than the logging policy, 1 = as
good as the best list beam search finds under the true model), and what the shown lists do for
diversity and fairness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from genrerank.data.simulator import RequestState, Simulator
from genrerank.metrics import (
    category_entropy,
    creator_entropy,
    creator_exposure_gini,
    exposure_share,
    intra_list_diversity,
)


@dataclass
class OnlineReport:
    """Oracle metrics of one policy over a set of requests."""

    policy: str
    requests: int
    expected_gain: float
    expected_gain_se: float
    headroom_captured: float
    category_entropy: float
    creator_entropy: float
    intra_list_diversity: float
    creator_gini: float
    cold_start_share: float
    long_tail_share: float

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def headroom_captured(policy_gain: float, logging_gain: float, upper_gain: float) -> float:
    """Share of the gap between the logging policy and the upper bound that a policy closes."""
    gap = upper_gain - logging_gain
    return float((policy_gain - logging_gain) / gap) if gap > 0 else float("nan")


def _gather(values: np.ndarray, lists: np.ndarray) -> np.ndarray:
    return np.take_along_axis(values, np.maximum(lists, 0), axis=1)


def evaluate_online(
    sim: Simulator,
    state: RequestState,
    policies: dict[str, np.ndarray],
    logging_lists: np.ndarray,
    upper_bound_gains: np.ndarray | None = None,
    beam_width: int = 16,
) -> list[OnlineReport]:
    """Oracle report for each policy's lists ``[B, m]`` (candidate indices, -1 = empty slot).

    ``logging_lists`` are the lists the logging policy showed for these requests (the logs);
    the upper bound is found by beam search unless its gains are passed in.
    """
    if upper_bound_gains is None:
        _, upper_bound_gains = sim.upper_bound(state, beam_width=beam_width)
    logging_gain = float(sim.expected_gain(state, logging_lists).mean())
    upper_gain = float(np.mean(upper_bound_gains))
    universe = np.unique(state.creator)
    reports = []
    for name, lists in policies.items():
        mask = lists >= 0
        gains = sim.expected_gain(state, np.maximum(lists, 0), mask)
        mean = float(gains.mean())
        categories = _gather(state.category, lists)
        creators = _gather(state.creator, lists)
        reports.append(
            OnlineReport(
                policy=name,
                requests=len(gains),
                expected_gain=mean,
                expected_gain_se=float(gains.std(ddof=1) / np.sqrt(len(gains)))
                if len(gains) > 1
                else float("nan"),
                headroom_captured=headroom_captured(mean, logging_gain, upper_gain),
                category_entropy=float(category_entropy(categories, mask)),
                creator_entropy=float(creator_entropy(creators, mask)),
                intra_list_diversity=float(intra_list_diversity(categories, mask)),
                creator_gini=float(creator_exposure_gini(creators, mask, universe=universe)),
                cold_start_share=float(exposure_share(_gather(state.is_cold_start, lists), mask)),
                long_tail_share=float(exposure_share(_gather(state.is_long_tail, lists), mask)),
            )
        )
    return reports
