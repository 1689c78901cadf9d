"""The ground-truth user model: how a user reacts to an ordered list (numpy, batched).

A request has n candidates with pointwise appeal logits ``s_i`` (see :mod:`.world`), categories
``c_i``, creators ``a_i`` and durations ``d_i``; its user has an appetite for diversity
``delta_u``, a scroll propensity ``alpha_u`` and a like propensity ``lambda_u``. The list shown is
``y_0, ..., y_{L-1}`` (positions ``j`` are 0-based); ``b0`` is ``base_logit``. Other knob names
are :class:`SimulatorConfig` fields.

Contextual appeal (logit) of the item at position j::

    z_j = s_{y_j}
          - delta_u * sum_{k<j} rho_s^(j-k-1) * (gamma_c [c_k = c_j] + gamma_a [a_k = a_j])
          + sum_{k<j} rho_k^(j-k-1) * K[c_k, c_j]

The second line is satiation: a category or creator seen just before lowers appeal, by less the
further back it was (``rho_s = satiation_decay``, ``gamma_c = satiation_category``,
``gamma_a = satiation_creator``); users with a larger appetite for diversity ``delta_u`` are
penalised more. The third is complementarity: ``K`` is symmetric and non-zero for a few
complementary category pairs (:mod:`.world`); the later item of a pair shown close together gets
the boost (``rho_k = complementarity_decay``).

Scroll depth. The user always sees position 0; after position j the user goes on with probability::

    g_j    = sigmoid(alpha_u - scroll_position_slope * j + scroll_satisfaction * (zbar_j - b0))
    zbar_j = sum_{k<=j} w^(j-k) z_k / sum_{k<=j} w^(j-k),        w = scroll_memory

a deterministic function of the list so far (a satisfying list keeps users scrolling; a dull one
makes them stop early). ``P(reach 0) = 1`` and ``P(reach j) = g_0 * ... * g_{j-1}``.

Signals, given position j is reached (click = the user opens / views the item)::

    P(click_j)         = e_j * sigmoid(z_j),      e_j = (1 + j)^-examination_power  (position bias)
    P(like_j | click)  = sigmoid(like_base + like_slope * (z_j - b0) + lambda_u)
    watch_j | click    = min(d_j, T),  T ~ Exponential(mean mu_j)
    mu_j               = watch_base_s * (d_j / 60)^watch_duration_power
                         * exp(watch_slope * (z_j - b0))
    long_view_j        = [watch_j > t],  t = long_view_threshold_s,  so P = [d_j > t] exp(-t / mu_j)
    E[watch_j | click] = mu_j * (1 - exp(-d_j / mu_j))

Like, long view and watch time are zero without a click; given the click and z they are
independent.

Gain. The expected gain of a list is EXACT (closed form, no sampling)::

    E[G] = sum_j P(reach j) P(click_j) (1.0 + 1.5 P(like_j | click) + 0.8 P(long_view_j | click))

with the weights of :data:`GAIN_WEIGHTS`, counting only the signals the preset logs (avito:
clicks). It is undiscounted on purpose: position effects already live in the user model (reach and
examination), so a DCG discount would count them twice. :meth:`UserModel.sample` draws the stop
and the signals with the same probabilities; draws are indexed by (request, position, signal),
never by item, so two lists of one request sampled with the same seed share their random numbers
(common random numbers).

Masks: ``mask[b, j] = False`` marks padding. Padded positions are dropped (the remaining items
keep their order and move up), contribute nothing and are not context for other items;
per-position outputs are reported at the input positions, with zeros at padding.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from genrerank.data.simulator.presets import GAIN_WEIGHTS, SimulatorConfig
from genrerank.data.simulator.world import RequestState

__all__ = ["GAIN_WEIGHTS", "UserModel"]


def _decay_matrix(length: int, rate: float, strict: bool) -> np.ndarray:
    """W[k, j] = rate^(j-k-1) for k < j (strict) or rate^(j-k) for k <= j, else 0."""
    k = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    if strict:
        return np.where(k < j, float(rate) ** np.maximum(j - k - 1, 0), 0.0)
    return np.where(k <= j, float(rate) ** np.maximum(j - k, 0), 0.0)


class UserModel:
    """The ground-truth user model of one world (config + complementarity matrix)."""

    def __init__(self, config: SimulatorConfig, complementarity: np.ndarray) -> None:
        self.config = config
        self.complementarity = np.asarray(complementarity, dtype=np.float64)
        self.gain_weights = config.gain_weights

    # ------------------------------------------------------------------ per-item primitives

    def examination(self, position: np.ndarray | int) -> np.ndarray:
        """e_j = (1 + j)^-eta, the probability of noticing a reached item at position j."""
        return (1.0 + np.asarray(position, dtype=np.float64)) ** (-self.config.examination_power)

    def item_probabilities(
        self,
        z: np.ndarray,
        duration: np.ndarray,
        like_bias: np.ndarray,
        position: np.ndarray | int,
    ) -> dict[str, np.ndarray]:
        """Given reached: P(click), P(like | click), P(long_view | click), E[watch | click], mu."""
        cfg = self.config
        dz = z - cfg.base_logit
        p_click = self.examination(position) * special.expit(z)
        p_like = special.expit(cfg.like_base + cfg.like_slope * dz + like_bias)
        mu = (
            cfg.watch_base_s
            * (duration / 60.0) ** cfg.watch_duration_power
            * np.exp(cfg.watch_slope * dz)
        )
        thr = cfg.long_view_threshold_s
        p_lv = np.where(duration > thr, np.exp(-thr / mu), 0.0)
        e_watch = mu * -np.expm1(-duration / mu)
        return {"click": p_click, "like": p_like, "long_view": p_lv, "watch": e_watch, "mu": mu}

    def item_gain(self, probs: dict[str, np.ndarray]) -> np.ndarray:
        """Expected gain of an item given reached, from :meth:`item_probabilities`."""
        w = self.gain_weights
        inner = w["click"]
        if "like" in w:
            inner = inner + w["like"] * probs["like"]
        if "long_view" in w:
            inner = inner + w["long_view"] * probs["long_view"]
        return probs["click"] * inner

    def continuation(
        self, zbar: np.ndarray, position: np.ndarray | int, scroll_bias: np.ndarray
    ) -> np.ndarray:
        """g_j: probability of scrolling on to position j + 1 having reached j."""
        cfg = self.config
        return special.expit(
            scroll_bias
            - cfg.scroll_position_slope * np.asarray(position, dtype=np.float64)
            + cfg.scroll_satisfaction * (zbar - cfg.base_logit)
        )

    # ------------------------------------------------------------------ whole lists

    def _compact(
        self, state: RequestState, lists: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Lists with padding moved to the end (stable), the valid mask, and the permutation."""
        lists = np.asarray(lists)
        if lists.ndim != 2 or lists.shape[0] != state.batch_size:
            raise ValueError(
                f"lists must be [B={state.batch_size}, L] candidate indices, got {lists.shape}"
            )
        if mask is None:
            valid = np.ones(lists.shape, dtype=bool)
            order = None
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != lists.shape:
                raise ValueError(f"mask shape {mask.shape} != lists shape {lists.shape}")
            order = np.argsort(~mask, axis=1, kind="stable")
            lists = np.take_along_axis(lists, order, axis=1)
            valid = np.take_along_axis(mask, order, axis=1)
        idx = np.where(valid, lists, 0)
        n = state.n_candidates
        if ((idx < 0) | (idx >= n)).any():
            raise ValueError(f"list entries must be candidate indices in [0, {n})")
        if idx.shape[1] > 1:
            srt = np.sort(np.where(valid, idx, -1 - np.arange(idx.shape[1])), axis=1)
            if (srt[:, 1:] == srt[:, :-1]).any():
                raise ValueError("a list shows the same candidate twice")
        return idx.astype(np.int64), valid, order

    @staticmethod
    def _restore(x: np.ndarray, order: np.ndarray | None) -> np.ndarray:
        if order is None:
            return x
        out = np.empty_like(x)
        np.put_along_axis(out, order, x, axis=1)
        return out

    def _core(
        self, state: RequestState, idx: np.ndarray, valid: np.ndarray
    ) -> dict[str, np.ndarray]:
        """All per-position quantities for compacted lists (padding at the end)."""
        cfg = self.config
        B, L = idx.shape
        vf = valid.astype(np.float64)
        s = np.take_along_axis(state.appeal, idx, axis=1)
        c = np.take_along_axis(state.category, idx, axis=1)
        a = np.take_along_axis(state.creator, idx, axis=1)
        d = np.take_along_axis(state.duration, idx, axis=1)

        # Satiation and complementarity: pairwise [B, k, j] terms weighted by distance.
        same = cfg.satiation_category * (c[:, :, None] == c[:, None, :]) + cfg.satiation_creator * (
            a[:, :, None] == a[:, None, :]
        )
        same = same * vf[:, :, None]
        sat = np.einsum("bkj,kj->bj", same, _decay_matrix(L, cfg.satiation_decay, strict=True))
        comp = self.complementarity[c[:, :, None], c[:, None, :]] * vf[:, :, None]
        boost = np.einsum(
            "bkj,kj->bj", comp, _decay_matrix(L, cfg.complementarity_decay, strict=True)
        )
        z = s - state.diversity[:, None] * sat + boost

        # Scroll: continuation after j from the exponentially weighted mean appeal so far.
        wm = _decay_matrix(L, cfg.scroll_memory, strict=False)
        # einsum without BLAS: sums in a fixed order, whatever the thread count.
        num = np.einsum("bk,kj->bj", z * vf, wm)
        den = np.einsum("bk,kj->bj", vf, wm)
        zbar = num / np.maximum(den, 1e-12)
        pos = np.arange(L)
        cont = self.continuation(zbar, pos[None, :], state.scroll_bias[:, None]) * vf
        reach = np.cumprod(np.concatenate([np.ones((B, 1)), cont[:, :-1]], axis=1), axis=1) * vf

        probs = self.item_probabilities(z, d, state.like_bias[:, None], pos[None, :])
        return {
            "appeal": z * vf,
            "zbar": zbar * vf,
            "continue": cont,
            "reach": reach,
            "p_click": probs["click"] * vf,
            "p_like": probs["like"] * vf,
            "p_long_view": probs["long_view"] * vf,
            "e_watch": probs["watch"] * vf,
            "mu": np.where(valid, probs["mu"], 1.0),
            "duration": d,
            "gain_given_reach": self.item_gain(probs) * vf,
        }

    def contextual_appeal(
        self, state: RequestState, lists: np.ndarray, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """[B, L] z_j, the appeal logit of each shown item in its list context."""
        idx, valid, order = self._compact(state, lists, mask)
        return self._restore(self._core(state, idx, valid)["appeal"], order)

    def expected_signals(
        self, state: RequestState, lists: np.ndarray, mask: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Exact per-position expectations [B, L] (unconditional, i.e. including P(reach)).

        Keys: ``reach`` P(reach j), ``continue`` g_j, ``appeal`` z_j, ``click``, ``like``,
        ``long_view``, ``watch_time`` (expected values) and ``gain``. All signals are returned,
        whatever the preset logs; ``gain`` counts only the logged ones.
        """
        idx, valid, order = self._compact(state, lists, mask)
        core = self._core(state, idx, valid)
        click = core["reach"] * core["p_click"]
        out = {
            "reach": core["reach"],
            "continue": core["continue"],
            "appeal": core["appeal"],
            "click": click,
            "like": click * core["p_like"],
            "long_view": click * core["p_long_view"],
            "watch_time": click * core["e_watch"],
            "gain": core["reach"] * core["gain_given_reach"],
        }
        return {k: self._restore(v, order) for k, v in out.items()}

    def expected_gain(
        self, state: RequestState, lists: np.ndarray, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """[B] exact expected gain of each list (see the module docstring)."""
        idx, valid, _ = self._compact(state, lists, mask)
        core = self._core(state, idx, valid)
        return (core["reach"] * core["gain_given_reach"]).sum(axis=1)

    def sample(
        self,
        state: RequestState,
        lists: np.ndarray,
        rng: np.random.Generator | int | np.random.SeedSequence,
        mask: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Draw feedback: float32 [B, L] per logged signal, plus ``reached`` (bool [B, L]).

        Uniforms are drawn as one [B, L, 4] block (stop, click, like, watch), so equal seeds give
        two lists of the same requests the same random numbers position by position.
        """
        rng = np.random.default_rng(rng)
        idx, valid, order = self._compact(state, lists, mask)
        core = self._core(state, idx, valid)
        B, L = idx.shape
        u = rng.random((B, L, 4))
        go_on = u[:, :, 0] < core["continue"]
        reached = np.cumprod(
            np.concatenate([np.ones((B, 1), dtype=bool), go_on[:, :-1]], axis=1), axis=1
        ).astype(bool) & valid
        click = reached & (u[:, :, 1] < core["p_click"])
        like = click & (u[:, :, 2] < core["p_like"])
        # Inverse CDF keeps watch time monotone in the uniform (common random numbers).
        t = -core["mu"] * np.log1p(-u[:, :, 3])
        watch = np.where(click, np.minimum(core["duration"], t), 0.0)
        long_view = click & (watch > self.config.long_view_threshold_s)
        signals = {"click": click, "like": like, "long_view": long_view, "watch_time": watch}
        out = {k: signals[k].astype(np.float32) for k in self.config.labels}
        out["reached"] = reached
        return {k: self._restore(v, order) for k, v in out.items()}

    def realised_gain(self, feedback: dict[str, np.ndarray]) -> np.ndarray:
        """[B] gain of sampled feedback with the same weights as :meth:`expected_gain`."""
        total = 0.0
        for k, w in self.gain_weights.items():
            total = total + w * feedback[k].astype(np.float64).sum(axis=1)
        return np.asarray(total)
