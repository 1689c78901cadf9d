"""The simulated world: catalogue, creators, users, the recall stage and request times.

Everything here is drawn once per (config, seed) from ``SeedSequence([seed, WORLD_KEY])``, except
the per-request state, which :meth:`World.make_requests` draws from the chunk's own stream.

Catalogue (C = ``n_categories``; category 0 means unknown and is never used)
    Category shares ``f_c``: the top C - 1 KuaiRand primary tags plus "other" (fitted).
    Creators: sizes (items per creator) ~ zeta(``creator_size_exponent``), fans ~ the fitted
    KuaiRand author fan-count distribution, coupled to size (bigger creators tend to be more
    popular).
    A ``cold_start_share`` of creators are cold-start: new, few fans (bottom 30 % of the fan
    distribution), at most 5 items. Creators below the ``long_tail_quantile`` of fans are long-tail.
    Each creator has a home category (~ f); each of its items is in it with probability 0.8.
    Item duration ~ log-normal with the fitted per-category mean and std of log seconds, clipped to
    the fitted range. Item quality ``q_i ~ N(0, quality_std)`` (x ``cold_start_quality_scale`` for
    cold-start creators).

Users
    Segment ``g`` (uniform over ``n_segments``), taste logits ``theta_u = mu_g + N(0, sd_ind)``
    over categories with centroids ``mu_g ~ N(0, sd_seg)``; activity level ~ fitted KuaiRand
    shares; scroll propensity ``alpha_u = activity_scroll_bias[level] + N(0, scroll_bias_std)``;
    like propensity ``lambda_u ~ N(0, like_bias_std)``; diversity appetite
    ``delta_u ~ Gamma(k, 1/k)`` with ``k = diversity_shape`` (mean 1).
    Observable features are noisy views of these (historical category shares from 40 past views,
    a noisy diversity and scroll-depth history, follow count and account age from KuaiRand).

Requests (the recall stage)
    user ~ activity-weighted; time ~ uniform over ``span_days``; each of the n candidates draws a
    category from ``(1 - eps) softmax(theta_u + log f) + eps f`` and then an item of that category
    with weight ``exp(pop_power * z(log fans) + quality_power * q + cold_shift * cold)``; duplicates
    are redrawn. Pointwise appeal (logit, the item alone at position 0)::

        s_i = b0 + theta_u[c_i] + q_i + match_std * eps_ui
              + cold_shift * cold_i + tail_shift * tail_i

    with a fresh ``eps_ui ~ N(0, 1)`` per request (hidden). The upstream score is an informative but
    noisy estimate::

        upstream_i = s_i + sd_r(s) * sqrt(1 / rho^2 - 1) * (cold_i ? noise_mult : 1) * N(0, 1)
                     + pop_bias * z(log fans_i) + cold_bias * cold_i

    where ``sd_r(s)`` is the std of ``s`` over the request's candidates, so that before the biases
    the within-request correlation with ``s`` is ``upstream_corr``. Candidates are ordered by
    upstream score, descending, as a ranking stage would pass them on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special

from genrerank.data.simulator.presets import ACTIVITY_LEVELS, SimulatorConfig

MARGINALS_PATH = Path(__file__).with_name("kuairand_marginals.json")
WORLD_KEY = 1 << 40  # second SeedSequence word for the world; chunk streams use the chunk index
HOME_CATEGORY_PROB = 0.8
HIST_VIEWS = 40
#: Upper edges (seconds) of the observable duration buckets; bucket k + 1 = (edge_{k-1}, edge_k].
DURATION_BUCKET_EDGES = (10.0, 15.0, 30.0, 60.0, 120.0, 240.0, 480.0)


@lru_cache(maxsize=1)
def load_marginals() -> dict[str, Any]:
    """The numbers fitted on KuaiRand-Pure by ``scripts/fit_kuairand_marginals.py``."""
    return json.loads(MARGINALS_PATH.read_text())


def _quantile_sampler(probs: list[float], quantiles: list[float], u: np.ndarray) -> np.ndarray:
    """Inverse CDF from a quantile table, interpolated in log1p space (heavy-tailed counts)."""
    return np.expm1(np.interp(u, probs, np.log1p(quantiles)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return special.expit(x)


@dataclass
class RequestState:
    """The hidden state of a batch of B requests with n candidates each (truth: never logged).

    Per-candidate arrays are [B, n] in the order the candidates appear in the data set (by upstream
    score, descending); per-request arrays are [B].
    """

    index: np.ndarray  #: request indices
    time: np.ndarray  #: unix seconds
    user: np.ndarray  #: user index in the world
    diversity: np.ndarray  #: delta_u, appetite for diversity (scales satiation)
    scroll_bias: np.ndarray  #: alpha_u, propensity to keep scrolling
    like_bias: np.ndarray  #: lambda_u, propensity to like
    taste: np.ndarray  #: [B, C + 1] theta_u (column 0 unused)
    items: np.ndarray  #: catalogue indices
    category: np.ndarray  #: 1..C
    creator: np.ndarray  #: 1..A
    duration: np.ndarray  #: seconds
    quality: np.ndarray  #: q_i
    is_cold_start: np.ndarray
    is_long_tail: np.ndarray
    appeal: np.ndarray  #: s, pointwise appeal logit (alone, position 0)
    upstream: np.ndarray  #: the ranking stage's score

    @property
    def batch_size(self) -> int:
        return int(self.appeal.shape[0])

    @property
    def n_candidates(self) -> int:
        return int(self.appeal.shape[1])

    def take(self, rows: np.ndarray | slice) -> RequestState:
        """The sub-batch of these rows."""
        return RequestState(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concat(states: list[RequestState]) -> RequestState:
        return RequestState(
            **{
                f.name: np.concatenate([getattr(s, f.name) for s in states])
                for f in fields(RequestState)
            }
        )


class World:
    """Catalogue, creators and users of one (config, seed); see the module docstring."""

    def __init__(self, config: SimulatorConfig, seed: int) -> None:
        self.config = config
        self.seed = int(seed)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, WORLD_KEY]))
        marg = load_marginals()
        self._make_categories(rng, marg)
        self._make_catalogue(rng, marg)
        self._make_recall_index()
        self._make_users(rng, marg)

    # ------------------------------------------------------------------ world generation

    def _make_categories(self, rng: np.random.Generator, marg: dict[str, Any]) -> None:
        cfg = self.config
        C = cfg.n_categories
        tag = marg["primary_tag"]
        shares = np.zeros(C + 1)
        shares[1:C] = tag["shares"][: C - 1]
        shares[C] = 1.0 - shares[1:C].sum()  # "other" takes the rest
        self.category_share = shares / shares.sum()
        self.category_tags = [*tag["tags"][: C - 1], "other"]  # category k -> tags[k - 1]
        mu = np.array(tag["log_duration_mean"])
        sd = np.array(tag["log_duration_std"])
        self.category_log_duration = np.concatenate([[0.0], mu[: C - 1], [mu[-1]]])
        self.category_log_duration_std = np.concatenate([[1.0], sd[: C - 1], [sd[-1]]])

        # Complementary pairs: first the KuaiRand tag pairs that co-occur on one video (both tags
        # are categories here), then random pairs weighted by f_a * f_b.
        index = {t: k + 1 for k, t in enumerate(tag["tags"][: C - 1])}
        pairs: list[tuple[int, int]] = []
        n_fitted = cfg.n_complementary_pairs // 2
        for p in marg["tag_pairs"]:
            if len(pairs) >= n_fitted:
                break
            if p["a"] in index and p["b"] in index:
                pairs.append((index[p["a"]], index[p["b"]]))
        cand = [(a, b) for a in range(1, C + 1) for b in range(a + 1, C + 1)]
        cand = [pr for pr in cand if pr not in pairs and pr[::-1] not in pairs]
        w = np.array([shares[a] * shares[b] for a, b in cand])
        n_random = min(cfg.n_complementary_pairs - len(pairs), len(cand))
        if n_random > 0:
            pick = rng.choice(len(cand), size=n_random, replace=False, p=w / w.sum())
            pairs += [cand[k] for k in sorted(pick.tolist())]
        K = np.zeros((C + 1, C + 1))
        strength = cfg.complementarity * rng.uniform(0.5, 1.5, size=len(pairs))
        for (a, b), k in zip(pairs, strength, strict=True):
            K[a, b] = K[b, a] = k
        self.complementary_pairs = pairs
        self.complementarity = K

    def _make_catalogue(self, rng: np.random.Generator, marg: dict[str, Any]) -> None:
        cfg = self.config
        C = cfg.n_categories
        n_items = cfg.n_items
        probs = marg["quantile_probs"]
        # Draw more creators than needed, then keep those that fill the catalogue.
        n_slots = n_items
        is_cold = rng.random(n_slots) < cfg.cold_start_share
        g = rng.standard_normal(n_slots)
        u_fans = special.ndtr(g)
        u_fans = np.where(is_cold, 0.3 * u_fans, u_fans)
        fans = np.round(_quantile_sampler(probs, marg["creator_fans_quantiles"], u_fans))
        sizes = np.minimum(rng.zipf(cfg.creator_size_exponent, size=n_slots),
                           cfg.max_items_per_creator)
        # Couple size with popularity: larger sizes go to creators with a higher noisy fan rank.
        key = cfg.creator_size_popularity_coupling * g + rng.standard_normal(n_slots)
        sizes_sorted = np.sort(sizes)
        sizes = np.empty_like(sizes)
        sizes[np.argsort(key, kind="stable")] = sizes_sorted
        sizes = np.where(is_cold, np.minimum(sizes, 5), sizes)
        n_creators = int(np.searchsorted(np.cumsum(sizes), n_items)) + 1
        sizes = sizes[:n_creators]
        sizes[-1] -= int(sizes.sum()) - n_items
        home = rng.choice(np.arange(1, C + 1), size=n_creators, p=self.category_share[1:])

        # Creator arrays are 1-based (0 = unknown), matching the data set's creator column.
        self.n_creators = n_creators
        self.creator_fans = np.concatenate([[0.0], fans[:n_creators]])
        self.creator_cold = np.concatenate([[False], is_cold[:n_creators]])
        log_fans = np.log1p(self.creator_fans[1:])
        cut = np.quantile(log_fans, cfg.long_tail_quantile)
        self.creator_long_tail = np.concatenate([[False], log_fans < cut])
        self._log_fans_mean = float(log_fans.mean())
        self._log_fans_std = float(log_fans.std()) or 1.0

        creator = np.repeat(np.arange(1, n_creators + 1), sizes)
        own = rng.random(n_items) < HOME_CATEGORY_PROB
        other = rng.choice(np.arange(1, C + 1), size=n_items, p=self.category_share[1:])
        category = np.where(own, home[creator - 1], other)
        lo, hi = marg["duration_s"]["quantiles"][0], marg["duration_s"]["quantiles"][-1]
        log_d = self.category_log_duration[category] + self.category_log_duration_std[
            category
        ] * rng.standard_normal(n_items)
        duration = np.clip(np.exp(log_d), lo, hi)
        cold = self.creator_cold[creator]
        quality = cfg.quality_std * rng.standard_normal(n_items)
        quality = np.where(cold, cfg.cold_start_quality_scale * quality, quality)
        # Observable history CTR: the catalogue's estimate of quality, poor for cold-start items.
        hist_noise = np.where(cold, 0.8, 0.3) * rng.standard_normal(n_items)
        self.item_creator = creator
        self.item_category = category
        self.item_duration = duration
        self.item_quality = quality
        self.item_hist_ctr = _sigmoid(cfg.base_logit + quality + hist_noise)
        self.item_cold = cold
        self.item_long_tail = self.creator_long_tail[creator]
        self.item_fans_z = (np.log1p(self.creator_fans[creator]) - self._log_fans_mean) / (
            self._log_fans_std
        )

    def _make_users(self, rng: np.random.Generator, marg: dict[str, Any]) -> None:
        cfg = self.config
        C, U, G = cfg.n_categories, cfg.n_users, cfg.n_segments
        probs = marg["quantile_probs"]
        segment = rng.integers(0, G, size=U)
        centroids = cfg.taste_segment_std * rng.standard_normal((G, C))
        taste = centroids[segment] + cfg.taste_individual_std * rng.standard_normal((U, C))
        self.user_taste = np.concatenate([np.zeros((U, 1)), taste], axis=1)
        shares = np.array(marg["user_activity"]["shares"])
        level = rng.choice(len(ACTIVITY_LEVELS), size=U, p=shares / shares.sum())
        self.user_activity = level
        self.user_segment = segment
        self.user_scroll_bias = np.asarray(cfg.activity_scroll_bias)[
            level
        ] + cfg.scroll_bias_std * rng.standard_normal(U)
        self.user_like_bias = cfg.like_bias_std * rng.standard_normal(U)
        k = cfg.diversity_shape
        self.user_diversity = rng.gamma(k, 1.0 / k, size=U)
        rate = np.asarray(cfg.activity_request_weight)[level] * np.exp(
            0.5 * rng.standard_normal(U)
        )
        self.user_request_cdf = np.cumsum(rate) / rate.sum()

        # Observable user features (noisy views of the latents).
        observed = rng.random(U) < cfg.segment_observed_prob
        seg_obs = np.where(observed, segment, rng.integers(0, G, size=U))
        self.user_cat = np.stack([level + 1, seg_obs + 1], axis=1).astype(np.int32)
        follow = _quantile_sampler(probs, marg["user_follow_quantiles"], rng.random(U))
        u_reg = rng.random(U)
        u_reg = np.where(level == ACTIVITY_LEVELS.index("new"), 0.05 * u_reg, u_reg)
        register = _quantile_sampler(probs, marg["user_register_days_quantiles"], u_reg)
        recall_p = self.recall_category_probs(self.user_taste)
        hist = rng.multinomial(HIST_VIEWS, recall_p[:, 1:]) / HIST_VIEWS
        self.user_dense = np.concatenate(
            [
                np.stack(
                    [
                        np.log1p(follow),
                        np.log(register),
                        np.log(rate) + 0.3 * rng.standard_normal(U),
                        np.log(self.user_diversity) + 0.3 * rng.standard_normal(U),
                        self.user_scroll_bias + 0.5 * rng.standard_normal(U),
                    ],
                    axis=1,
                ),
                hist,
            ],
            axis=1,
        ).astype(np.float32)
        self.user_dense_names = [
            "log_follow_count",
            "log_register_days",
            "hist_activity",
            "hist_diversity",
            "hist_scroll_depth",
            *[f"hist_cat_{c}" for c in range(1, C + 1)],
        ]

    def _make_recall_index(self) -> None:
        cfg = self.config
        C = cfg.n_categories
        w = np.exp(
            cfg.recall_popularity_power * self.item_fans_z
            + cfg.recall_quality_power * self.item_quality
            + cfg.cold_start_recall_shift * self.item_cold
        )
        order = np.argsort(self.item_category, kind="stable")
        cum = np.cumsum(w[order])
        counts = np.bincount(self.item_category, minlength=C + 1)
        end = np.cumsum(counts)
        start = end - counts
        before = np.concatenate([[0.0], cum])[start]
        self._recall_order = order
        self._recall_cum = cum
        self._cat_start = start
        self._cat_end = end
        self._cat_lo = before
        self._cat_mass = np.concatenate([[0.0], cum])[end] - before
        self._has_items = counts > 0

    # ------------------------------------------------------------------ requests

    def recall_category_probs(self, taste: np.ndarray) -> np.ndarray:
        """[B, C + 1] category distribution of recalled candidates for users with these tastes."""
        eps = self.config.recall_exploration
        f = self.category_share
        logits = taste + np.log(np.maximum(f, 1e-300))
        logits[:, 0] = -np.inf
        p = ((1 - eps) * special.softmax(logits, axis=1) + eps * f) * self._has_items
        return p / p.sum(axis=1, keepdims=True)

    def _draw_items(self, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(categories.shape)
        target = self._cat_lo[categories] + u * self._cat_mass[categories]
        pos = np.searchsorted(self._recall_cum, target, side="right")
        pos = np.clip(pos, self._cat_start[categories], self._cat_end[categories] - 1)
        return self._recall_order[pos]

    def _draw_categories(
        self, cdf: np.ndarray, rng: np.random.Generator, shape: tuple
    ) -> np.ndarray:
        u = rng.random(shape)
        # cdf: [B, C + 1] cumulative over categories 0..C (category 0 has zero mass).
        return (u[..., None] >= cdf[:, None, :]).sum(axis=-1)

    def recall(self, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[B, n] unique catalogue items for these users (the recall stage)."""
        n = self.config.n_candidates
        B = len(user)
        p = self.recall_category_probs(self.user_taste[user])
        cdf = np.cumsum(p, axis=1)
        cdf[:, -1] = 1.0 + 1e-12  # guard against rounding: the last category catches u ~ 1
        cats = self._draw_categories(cdf, rng, (B, n))
        items = self._draw_items(cats, rng)
        rows = np.arange(B)[:, None]
        for round_ in range(1000):
            order = np.argsort(items, axis=1, kind="stable")
            srt = items[rows, order]
            dup_sorted = np.zeros_like(srt, dtype=bool)
            dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
            if not dup_sorted.any():
                return items
            dup = np.zeros_like(dup_sorted)
            dup[rows, order] = dup_sorted
            r, c = np.nonzero(dup)
            if round_ >= 10:  # a small category may run dry for this user: redraw the category
                sub_cdf = cdf[r]
                cats[r, c] = self._draw_categories(sub_cdf, rng, (len(r), 1))[:, 0]
            items[r, c] = self._draw_items(cats[r, c], rng)
        raise RuntimeError("recall could not draw unique candidates; is the catalogue too small?")

    def draw_user_and_time(
        self, B: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first draws of a chunk's state stream: the user, then the time of each request.

        Kept apart (and first) so that :meth:`Simulator.chunk_times` can replay only these to
        split a data set by time before generating it shard by shard. Times are drawn
        uniformly over ``span_days``, independently of the request index (not monotone in it).
        """
        cfg = self.config
        user = np.searchsorted(self.user_request_cdf, rng.random(B) * self.user_request_cdf[-1])
        user = np.minimum(user, cfg.n_users - 1)
        time = cfg.start_time + np.floor(rng.random(B) * cfg.span_days * 86400).astype(np.int64)
        return user, time

    def make_requests(self, index: np.ndarray, rng: np.random.Generator) -> RequestState:
        """The hidden state of requests ``index`` drawn from ``rng`` (one chunk's state stream)."""
        cfg = self.config
        B = len(index)
        user, time = self.draw_user_and_time(B, rng)
        items = self.recall(user, rng)
        category = self.item_category[items]
        creator = self.item_creator[items]
        quality = self.item_quality[items]
        cold = self.item_cold[items]
        tail = self.item_long_tail[items]
        taste = self.user_taste[user]
        match = cfg.match_std * rng.standard_normal(items.shape)
        appeal = (
            cfg.base_logit
            + np.take_along_axis(taste, category, axis=1)
            + quality
            + match
            + cfg.cold_start_appeal_shift * cold
            + cfg.long_tail_appeal_shift * tail
        )
        rho = cfg.upstream_corr
        sd = appeal.std(axis=1, keepdims=True) * np.sqrt(1.0 / rho**2 - 1.0)
        noise_mult = np.where(cold, cfg.cold_start_upstream_noise, 1.0)
        upstream = (
            appeal
            + sd * noise_mult * rng.standard_normal(items.shape)
            + cfg.upstream_popularity_bias * self.item_fans_z[items]
            + cfg.cold_start_upstream_bias * cold
        )
        order = np.argsort(-upstream, axis=1, kind="stable")

        def srt(a: np.ndarray) -> np.ndarray:
            return np.take_along_axis(a, order, axis=1)

        return RequestState(
            index=np.asarray(index, dtype=np.int64),
            time=time,
            user=user,
            diversity=self.user_diversity[user],
            scroll_bias=self.user_scroll_bias[user],
            like_bias=self.user_like_bias[user],
            taste=taste,
            items=srt(items),
            category=srt(category),
            creator=srt(creator),
            duration=srt(self.item_duration[items]),
            quality=srt(quality),
            is_cold_start=srt(cold),
            is_long_tail=srt(tail),
            appeal=srt(appeal),
            upstream=srt(upstream),
        )

    # ------------------------------------------------------------------ observable features

    def duration_bucket(self, duration: np.ndarray) -> np.ndarray:
        """1-based duration bucket (0 is reserved for unknown)."""
        return np.searchsorted(np.asarray(DURATION_BUCKET_EDGES), duration, side="left") + 1

    def item_dense(self, items: np.ndarray) -> np.ndarray:
        """[..., 3] observable dense item features: log duration, creator log fans, history CTR."""
        return np.stack(
            [
                np.log(self.item_duration[items]),
                np.log1p(self.creator_fans[self.item_creator[items]]),
                self.item_hist_ctr[items],
            ],
            axis=-1,
        )
