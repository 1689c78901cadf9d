"""Every knob of the simulated world and its user model, and the named presets.

A :class:`SimulatorConfig` fully describes a world: together with a seed it regenerates the
catalogue, the users, every request's hidden state, the logged lists and the feedback. The user
model's formulas are in :mod:`genrerank.data.simulator.user_model`; the world's in :mod:`.world`.

Presets (``get_preset(name, **overrides)``):

- ``avito``: n = m = 5, click only, steep position bias (examination ``(1 + j)^-1``); the whole
  short list is nearly always seen: a search page with five contextual ads. Click rates ~1-3 %.
- ``kuaishou``: n = 60 candidates, m = 6 shown, click (= a view), like, long view (> 5 s), watch
  time. A short-video feed: mild examination decay, scroll depth that depends on how satisfying
  the list was so far, satiation and complementarity between categories.
- ``large``: n = 500, m = 50; a long feed, for scaling checks.

The default values of the design knobs were tuned on seed 12345 (never on a benchmark's
evaluation seed) to land in plausible ranges: click (view) rates of a few % to ~20 % per shown
item, likes ~1-3 % of views, long views ~30-50 % of views, and satiation and position effects of
moderate size (for an average user, the same category in the next slot costs roughly 40 % of the
item's click probability; the examination of slot 6 is ~75 % of slot 1's). Numbers fitted on
KuaiRand-Pure (``kuairand_marginals.json``) set the category shares, the durations, creator
popularity, the activity levels and half of the complementary category pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from genrerank.data.schema import KNOWN_LABELS

#: Gain of each signal for list scoring (production article, NOTES.md section 5): click 1.0,
#: like 1.5, view > 5 s (long_view) 0.8. Watch time has no gain weight.
GAIN_WEIGHTS: dict[str, float] = {"click": 1.0, "like": 1.5, "long_view": 0.8}

#: Activity levels of simulated users, in the order of the fitted shares.
ACTIVITY_LEVELS = ("full_active", "high_active", "middle_active", "low_active", "new")


@dataclass(frozen=True)
class SimulatorConfig:
    """The world and the ground-truth user model. All fields are JSON-friendly.

    Notation used in the docs: ``s`` pointwise appeal logit, ``z_j`` contextual appeal logit of the
    item at position ``j`` (0-based), ``delta_u`` a user's appetite for diversity.
    """

    name: str = "kuaishou"

    # ---------------------------------------------------------------- request shape
    n_candidates: int = 60  #: n, candidates from the ranking stage per request
    list_length: int = 6  #: m, items shown
    #: Signals logged (and counted in the gain). "click" is required: the others are given a view.
    labels: tuple[str, ...] = ("click", "like", "long_view", "watch_time")

    # ---------------------------------------------------------------- world size
    n_items: int = 30_000  #: catalogue size
    n_users: int = 20_000
    #: Categories = the most frequent KuaiRand primary tags (n_categories - 1 of them) plus "other";
    #: at most 31 (the fitted table has the top 30 tags).
    n_categories: int = 31
    n_segments: int = 8  #: coarse user segments; each has its own taste centroid
    segment_observed_prob: float = 0.7  #: the observable segment feature is right this often

    # ---------------------------------------------------------------- catalogue and creators
    #: Exponent of the zeta law of items per creator. KuaiRand-Pure gives 3.49, but it holds a thin
    #: sample of each creator's videos, which steepens the law; 2.5 gives a catalogue where popular
    #: creators have tens of items, so same-creator pairs do occur among 60 candidates (~5 per
    #: request).
    creator_size_exponent: float = 2.5
    max_items_per_creator: int = 300
    #: Rank correlation-ish coupling of a creator's size with its popularity (0 = independent).
    creator_size_popularity_coupling: float = 1.0
    #: Share of creators that are cold-start (fitted: authors registered within 180 days, 4.9 %).
    cold_start_share: float = 0.049
    #: Creators below this quantile of fan count are long-tail (the head is the top 20 %).
    long_tail_quantile: float = 0.8
    #: True-appeal shift of items by cold-start / long-tail creators (logit units).
    cold_start_appeal_shift: float = 0.0
    long_tail_appeal_shift: float = -0.1
    #: Cold-start items' quality is more spread out (unknown quantities: some gems, some duds).
    cold_start_quality_scale: float = 1.4

    # ---------------------------------------------------------------- time
    start_time: int = 1_649_376_000  #: 2022-04-08 00:00 UTC, the start of KuaiRand's logs
    span_days: float = 14.0

    # ---------------------------------------------------------------- users' latent tastes
    taste_segment_std: float = 0.7  #: std of segment taste centroids over categories (logits)
    taste_individual_std: float = 0.5  #: a user's own deviation from the centroid
    quality_std: float = 0.5  #: item quality q_i (logits)
    match_std: float = 0.5  #: request-level user-item match noise (logits), hidden
    diversity_shape: float = 4.0  #: delta_u ~ Gamma(shape, 1/shape): mean 1, CV 1/sqrt(shape)
    #: Relative request rate per activity level (full, high, middle, low, new).
    activity_request_weight: tuple[float, ...] = (1.0, 0.6, 0.35, 0.15, 0.3)
    #: Base scroll propensity alpha per activity level (logit of continuing), plus N(0, std).
    activity_scroll_bias: tuple[float, ...] = (2.4, 2.2, 1.9, 1.5, 1.7)
    scroll_bias_std: float = 0.4
    like_bias_std: float = 0.5  #: lambda_u, a user's propensity to like

    # ---------------------------------------------------------------- recall stage
    #: Category of each recalled candidate ~ (1 - eps) softmax(theta_u + log f) + eps f,
    #: f = fitted category shares.
    recall_exploration: float = 0.3
    recall_popularity_power: float = 0.5  #: item weight exp(power * standardised log fans)
    recall_quality_power: float = 0.5  #: recall knows quality a bit: weight exp(power * q)
    cold_start_recall_shift: float = -0.3  #: lower prior exposure of cold-start items (log weight)
    #: Correlation of the upstream score with the true pointwise appeal within a request, before
    #: the popularity and cold-start biases below.
    upstream_corr: float = 0.6
    upstream_popularity_bias: float = 0.25  #: upstream overrates popular creators
    cold_start_upstream_bias: float = -0.4  #: and underrates cold-start ones ...
    cold_start_upstream_noise: float = 1.5  #: ... with a noisier estimate (noise std multiplier)

    # ---------------------------------------------------------------- user model
    base_logit: float = -3.2  #: beta_0 in s
    #: Examination (position bias) of the item at position j, given reached: (1 + j)^-eta.
    examination_power: float = 0.15
    #: Continuation after position j: sigmoid(alpha_u - slope * j + satisfaction * (zbar_j - b0)).
    scroll_position_slope: float = 0.15
    scroll_satisfaction: float = 0.7
    #: zbar_j is an exponentially weighted mean of z_0..z_j with weight memory^(j-k)
    #: (1 = plain mean; small = the last item counts most).
    scroll_memory: float = 0.7
    satiation_category: float = 0.5  #: gamma_c, penalty of a same-category item just before
    satiation_creator: float = 0.9  #: gamma_a, penalty of a same-creator item just before
    satiation_decay: float = 0.6  #: rho_s, the penalty decays by this factor per slot of distance
    complementarity: float = 0.5  #: mean boost kappa of a complementary pair in adjacent slots
    complementarity_decay: float = 0.4  #: rho_k, decay per slot of distance
    n_complementary_pairs: int = 12  #: half from KuaiRand tag co-occurrence, half random
    like_base: float = -5.2  #: P(like | view) = sigmoid(like_base + like_slope (z - b0) + lambda_u)
    like_slope: float = 0.5
    #: Watch time given a view: min(duration, T), T ~ Exponential(mean mu),
    #: mu = watch_base_s * (duration / 60 s)^watch_duration_power * exp(watch_slope (z - b0)).
    watch_base_s: float = 3.5
    watch_duration_power: float = 0.5
    watch_slope: float = 0.3
    long_view_threshold_s: float = 5.0  #: long_view = watch time > this

    # ---------------------------------------------------------------- logging policy
    #: Plackett-Luce over upstream scores: P ~ exp(upstream / temperature); 0 = deterministic sort.
    logging_temperature: float = 1.0

    # ---------------------------------------------------------------- generation
    chunk_size: int = 2048  #: requests generated together; request i lives in chunk i // size
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the frozen config hashable-ish and exact.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        unknown = [s for s in self.labels if s not in KNOWN_LABELS]
        if unknown:
            raise ValueError(f"unknown label(s) {unknown}; known: {list(KNOWN_LABELS)}")
        if "click" not in self.labels:
            raise ValueError("labels must include 'click' (the other signals are given a view)")
        if not 1 <= self.list_length <= self.n_candidates:
            raise ValueError(
                f"need 1 <= list_length <= n_candidates, got {self.list_length}, "
                f"{self.n_candidates}"
            )
        if not 2 <= self.n_categories <= 31:
            raise ValueError(f"n_categories must be in [2, 31], got {self.n_categories}")
        if self.n_items < 4 * self.n_candidates:
            raise ValueError("n_items must be at least 4 * n_candidates")
        if len(self.activity_request_weight) != len(ACTIVITY_LEVELS) or len(
            self.activity_scroll_bias
        ) != len(ACTIVITY_LEVELS):
            raise ValueError(f"activity tuples need {len(ACTIVITY_LEVELS)} values")
        if not 0 < self.upstream_corr <= 1:
            raise ValueError("upstream_corr must be in (0, 1]")
        if self.logging_temperature < 0:
            raise ValueError("logging_temperature must be >= 0")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")

    @property
    def gain_weights(self) -> dict[str, float]:
        """Gain weight of each logged signal that has one (absent signals count nothing)."""
        return {k: w for k, w in GAIN_WEIGHTS.items() if k in self.labels}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulatorConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SimulatorConfig field(s) {unknown}")
        return cls(**data)


PRESETS: dict[str, SimulatorConfig] = {
    "avito": SimulatorConfig(
        name="avito",
        n_candidates=5,
        list_length=5,
        labels=("click",),
        n_items=20_000,
        n_users=20_000,
        n_categories=12,
        base_logit=-3.9,
        examination_power=1.0,  # steep: 1, 1/2, 1/3, 1/4, 1/5
        activity_scroll_bias=(4.0, 3.8, 3.6, 3.2, 3.4),  # a five-ad page is nearly always seen
        scroll_position_slope=0.2,
        scroll_satisfaction=0.3,
        satiation_category=0.4,
        satiation_creator=0.6,
        upstream_corr=0.5,
        chunk_size=4096,
    ),
    "kuaishou": SimulatorConfig(name="kuaishou"),
    "large": SimulatorConfig(
        name="large",
        n_candidates=500,
        list_length=50,
        n_items=100_000,
        n_users=50_000,
        scroll_position_slope=0.04,  # long feeds: people scroll far
        activity_scroll_bias=(3.4, 3.2, 2.9, 2.5, 2.7),
        chunk_size=256,
    ),
}


def get_preset(name: str, **overrides: Any) -> SimulatorConfig:
    """The named preset with some fields replaced; ValueError for unknown names or fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown simulator preset {name!r}; presets: {sorted(PRESETS)}")
    names = {f.name for f in fields(SimulatorConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown SimulatorConfig field(s) {unknown}; fields: {sorted(names - {'extra'})}"
        )
    return dataclasses.replace(PRESETS[name], **overrides)
