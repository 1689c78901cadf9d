"""Multi-objective list rewards.

A **reward** scores whole lists ``[B, K, m]`` (candidate indices, ``-1`` = empty slot) as a
weighted sum of terms: engagement (the gain of the feedback signals the list earns), diversity
(normalised entropy of categories / creators) and exposure fairness (position-weighted share of
cold-start / long-tail items). The terms are reported unweighted too, so lists can be
re-weighted later (:func:`combine`).

Engagement needs feedback signals per slot, which come from one of three **sources**:

- :class:`LoggedSignals`: the logged labels, which exist only for the lists actually shown;
- :class:`EvaluatorSignals`: the learned list evaluator's predicted probabilities, for any list;
- :class:`OracleSignals`: exact expectations under the simulator (simulator data only).

A fourth, :class:`SimulatedFeedback`, samples one realisation of the simulated users' feedback
per list: a stand-in for learning online from live traffic (PPO's optional reward), allowed to
train but labelled ``online_stand_in`` wherever it is used, since no offline data set has it.

Each source has ``for_training``. The oracle's is False: it is the ground truth that
evaluation measures against, and a model trained on it would learn from information no real
log has, so its evaluation would be meaningless. Anything that trains on a reward calls
:func:`require_training_source` first.
"""

from genrerank.rewards.reward import DEFAULT_REWARD, ListReward, RewardBreakdown, combine
from genrerank.rewards.sources import (
    EvaluatorSignals,
    ListSignals,
    LoggedSignals,
    OracleSignals,
    SignalSource,
    SimulatedFeedback,
    require_training_source,
)
from genrerank.rewards.terms import REWARD_TERMS, RewardTerm, build_term, register_term

__all__ = [
    "DEFAULT_REWARD",
    "REWARD_TERMS",
    "EvaluatorSignals",
    "ListReward",
    "ListSignals",
    "LoggedSignals",
    "OracleSignals",
    "RewardBreakdown",
    "RewardTerm",
    "SignalSource",
    "SimulatedFeedback",
    "build_term",
    "combine",
    "register_term",
    "require_training_source",
]
