"""A simulator of re-ranking logs with a known ground-truth user model.

Logs label only the items shown, so a list never shown cannot be judged from logs. The
simulator's user model (position bias, scroll depth, satiation, complementarity, diversity
appetite, multi-signal feedback, cold-start and long-tail creators; formulas in
:mod:`.user_model`) scores any list exactly and bounds the best achievable list: the stand-in for
an online A/B test.

Typical use::

    from genrerank.data.simulator import Simulator, simulate_to_dir

    path = simulate_to_dir("kuaishou", 100_000, seed=0, out_dir="data/sim_kuaishou")
    sim = Simulator.from_dataset(path)              # regenerates the hidden truth
    state = sim.requests(test_request_indices)      # hidden state of those requests
    gains = sim.expected_gain(state, my_lists)      # exact expected gain of a model's lists
    best, best_gain = sim.upper_bound(state, beam_width=16)
"""

from genrerank.data.simulator.generate import (
    feature_spec,
    simulate_dataset,
    simulate_sharded,
    simulate_to_dir,
    time_split_codes,
)
from genrerank.data.simulator.logging_policy import plackett_luce_log_prob, plackett_luce_sample
from genrerank.data.simulator.oracle import (
    SIMULATOR_VERSION,
    Simulator,
    request_ids,
    request_index,
)
from genrerank.data.simulator.presets import (
    ACTIVITY_LEVELS,
    GAIN_WEIGHTS,
    PRESETS,
    SimulatorConfig,
    get_preset,
)
from genrerank.data.simulator.user_model import UserModel
from genrerank.data.simulator.world import RequestState, World, load_marginals

__all__ = [
    "ACTIVITY_LEVELS",
    "GAIN_WEIGHTS",
    "PRESETS",
    "SIMULATOR_VERSION",
    "RequestState",
    "Simulator",
    "SimulatorConfig",
    "UserModel",
    "World",
    "feature_spec",
    "get_preset",
    "load_marginals",
    "plackett_luce_log_prob",
    "plackett_luce_sample",
    "request_ids",
    "request_index",
    "simulate_dataset",
    "simulate_sharded",
    "simulate_to_dir",
    "time_split_codes",
]
