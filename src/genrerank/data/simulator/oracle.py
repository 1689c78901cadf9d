"""The oracle: regenerate any request's hidden state and score any list under the true user model.

This is the stand-in for an online A/B test. ``Simulator(config, seed)`` rebuilds the world;
request ``i`` lives in chunk ``i // chunk_size`` whose random streams come from
``SeedSequence([seed, chunk]).spawn(3)`` = (hidden state, logging policy, feedback). A chunk is
always generated whole, so request i's state, logged list and feedback do not depend on how many
requests a data set has (a small data set is a prefix of a larger one with the same seed).

A data set written by :mod:`.generate` carries (in ``FeatureSpec.extra["simulator"]``) the preset,
overrides, full config and seed, but never hidden state; :meth:`Simulator.from_dataset`
regenerates the truth from those. (Anyone can do that too: keep the oracle out of models' code;
it is not out of reach.)

Scoring:

- :meth:`Simulator.expected_gain` is EXACT (closed form, see :mod:`.user_model`), so comparing two
  lists needs no common random numbers; :meth:`Simulator.sample_feedback` with one seed does use
  common random numbers across lists of the same requests.
- :meth:`Simulator.upper_bound` is a beam search under the true model (default width 16; the
  benchmark reports the width it used). Its partial scores are exact expected gains of prefixes
  (position j's term needs only the prefix), it keeps the ``beam_width`` best prefixes per step, and
  returns the best of its final beams and the true-appeal sort. It is the best list we can find, a
  lower bound on the true optimum, and an upper bound for any re-ranker we compare.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from genrerank.data.schema import SPEC_FILE, FeatureSpec
from genrerank.data.simulator.logging_policy import plackett_luce_sample
from genrerank.data.simulator.presets import SimulatorConfig, get_preset
from genrerank.data.simulator.user_model import UserModel
from genrerank.data.simulator.world import RequestState, World

#: Bumped whenever the same (config, seed) would generate different data.
SIMULATOR_VERSION = 1
REQUEST_ID_PREFIX = "r"
REQUEST_ID_WIDTH = 9
_BEAM_BLOCK = 2_000_000  # beam states [B, W, n] are processed in request blocks of this many cells


def request_ids(indices: np.ndarray) -> np.ndarray:
    """Request ids (``r000000042``) that encode the request index."""
    idx = np.asarray(indices, dtype=np.int64)
    return np.char.add(REQUEST_ID_PREFIX, np.char.zfill(idx.astype(str), REQUEST_ID_WIDTH))


def request_index(ids: Any) -> np.ndarray:
    """Inverse of :func:`request_ids`: the request indices encoded in simulated request ids."""
    arr = np.asarray(ids, dtype=str)
    if arr.size and not np.char.startswith(arr, REQUEST_ID_PREFIX).all():
        raise ValueError(f"not simulator request ids (expected '{REQUEST_ID_PREFIX}<index>')")
    return np.char.lstrip(arr, REQUEST_ID_PREFIX).astype(np.int64)


class Simulator:
    """A simulated world with its ground-truth user model and oracle methods."""

    def __init__(
        self,
        config: SimulatorConfig | str,
        seed: int,
        preset: str | None = None,
        overrides: dict[str, Any] | None = None,
        cache_chunks: int = 4,
    ) -> None:
        if isinstance(config, str):
            preset, config = config, get_preset(config, **(overrides or {}))
        if int(seed) < 0:
            raise ValueError("seed must be a non-negative integer")
        self.config = config
        self.seed = int(seed)
        self.preset = preset or config.name
        self.overrides = dict(overrides or {})
        self.world = World(config, self.seed)
        self.user_model = UserModel(config, self.world.complementarity)
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._cache_chunks = cache_chunks

    # ------------------------------------------------------------------ provenance

    @classmethod
    def from_spec(cls, spec: FeatureSpec) -> Simulator:
        """The simulator that generated a data set with this feature spec."""
        info = spec.extra.get("simulator")
        if not info:
            raise ValueError(f"feature spec of source {spec.source!r} is not from the simulator")
        if info.get("version") != SIMULATOR_VERSION:
            raise ValueError(
                f"data set made by simulator version {info.get('version')}, this is version "
                f"{SIMULATOR_VERSION}: regenerate the data set"
            )
        config = SimulatorConfig.from_dict(info["config"])
        return cls(config, info["seed"], preset=info["preset"], overrides=info.get("overrides"))

    @classmethod
    def from_dataset(cls, data_dir: str | Path) -> Simulator:
        """The simulator that generated the data set folder ``data_dir``."""
        return cls.from_spec(FeatureSpec.load(Path(data_dir) / SPEC_FILE))

    def provenance(self, n_requests: int) -> dict[str, Any]:
        """What ``FeatureSpec.extra["simulator"]`` records: enough to regenerate everything."""
        return {
            "version": SIMULATOR_VERSION,
            "preset": self.preset,
            "overrides": self.overrides,
            "seed": self.seed,
            "n_requests": int(n_requests),
            "chunk_size": self.config.chunk_size,
            "request_id": f"{REQUEST_ID_PREFIX}<index zero-padded to {REQUEST_ID_WIDTH}>",
            "config": self.config.to_dict(),
        }

    # ------------------------------------------------------------------ requests

    def _streams(self, chunk: int) -> list[np.random.SeedSequence]:
        return np.random.SeedSequence([self.seed, int(chunk)]).spawn(3)

    def simulate_chunk(self, chunk: int) -> tuple[RequestState, np.ndarray, dict[str, np.ndarray]]:
        """Hidden state, logged lists [S, m] and sampled feedback of a whole chunk (S = chunk_size).

        Exactly what :func:`~genrerank.data.simulator.generate.simulate_dataset` writes.
        """
        state = self.chunk_state(chunk)
        _, log_ss, fb_ss = self._streams(chunk)
        lists = self.logging_lists(state, log_ss)
        return state, lists, self.user_model.sample(state, lists, fb_ss)

    def chunk_state(self, chunk: int) -> RequestState:
        """Hidden state of all requests of one chunk (cached: the last few chunks)."""
        if chunk in self._cache:
            self._cache.move_to_end(chunk)
            return self._cache[chunk]
        size = self.config.chunk_size
        index = np.arange(chunk * size, (chunk + 1) * size, dtype=np.int64)
        state_ss = self._streams(chunk)[0]
        state = self.world.make_requests(index, np.random.default_rng(state_ss))
        self._cache[chunk] = state
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return state

    def chunk_times(self, chunk: int) -> np.ndarray:
        """The request times of one chunk, equal to ``chunk_state(chunk).time`` but replaying
        only the first draws of its state stream (:meth:`World.draw_user_and_time`): a few
        microseconds per request, so a data set can be split by time before it is generated."""
        rng = np.random.default_rng(self._streams(chunk)[0])
        return self.world.draw_user_and_time(self.config.chunk_size, rng)[1]

    def requests(self, indices: np.ndarray | list[int]) -> RequestState:
        """Hidden state of the requests with these indices, in this order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if (idx < 0).any():
            raise ValueError("request indices must be >= 0")
        size = self.config.chunk_size
        chunks = idx // size
        parts, where = [], []
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            parts.append(self.chunk_state(int(c)).take(idx[sel] - c * size))
            where.append(sel)
        if not parts:
            raise ValueError("no request indices given")
        state = RequestState.concat(parts)
        return state.take(np.argsort(np.concatenate(where), kind="stable"))

    def logged(
        self, indices: np.ndarray | list[int]
    ) -> tuple[RequestState, np.ndarray, dict[str, np.ndarray]]:
        """Regenerate state, logged list and feedback of these requests exactly as generated."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        size = self.config.chunk_size
        chunks = idx // size
        out: list[tuple] = []
        where = []
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            state, lists, fb = self.simulate_chunk(int(c))
            rows = idx[sel] - c * size
            out.append((state.take(rows), lists[rows], {k: v[rows] for k, v in fb.items()}))
            where.append(sel)
        back = np.argsort(np.concatenate(where), kind="stable")
        state = RequestState.concat([o[0] for o in out]).take(back)
        lists = np.concatenate([o[1] for o in out])[back]
        fb = {k: np.concatenate([o[2][k] for o in out])[back] for k in out[0][2]}
        return state, lists, fb

    # ------------------------------------------------------------------ scoring

    def expected_gain(
        self, state: RequestState, lists: np.ndarray, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """[B] exact expected gain (click 1.0, like 1.5, long view 0.8; logged signals only)."""
        return self.user_model.expected_gain(state, lists, mask)

    def expected_signals(
        self, state: RequestState, lists: np.ndarray, mask: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """[B, L] exact per-position expectations: reach, click, like, long_view, watch_time..."""
        return self.user_model.expected_signals(state, lists, mask)

    def sample_feedback(
        self,
        state: RequestState,
        lists: np.ndarray,
        rng: np.random.Generator | int | np.random.SeedSequence,
        mask: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Sampled feedback [B, L] per logged signal plus ``reached`` (common random numbers)."""
        return self.user_model.sample(state, lists, rng, mask)

    # ------------------------------------------------------------------ reference lists

    def logging_lists(
        self, state: RequestState, rng: np.random.Generator | int | np.random.SeedSequence
    ) -> np.ndarray:
        """[B, m] lists drawn by the logging policy (Plackett-Luce over upstream scores)."""
        cfg = self.config
        return plackett_luce_sample(state.upstream, cfg.list_length, cfg.logging_temperature, rng)

    def pointwise_gain(self, state: RequestState) -> np.ndarray:
        """[B, n] expected gain of each candidate shown alone at position 0."""
        um = self.user_model
        probs = um.item_probabilities(state.appeal, state.duration, state.like_bias[:, None], 0)
        return um.item_gain(probs)

    def true_appeal_sort(self, state: RequestState, m: int | None = None) -> np.ndarray:
        """[B, m] candidates ordered by true pointwise appeal (gain alone at position 0)."""
        m = m or self.config.list_length
        return np.argsort(-self.pointwise_gain(state), axis=1, kind="stable")[:, :m]

    def upstream_sort(self, state: RequestState, m: int | None = None) -> np.ndarray:
        """[B, m] candidates ordered by upstream score (the ranking stage's own order)."""
        m = m or self.config.list_length
        return np.argsort(-state.upstream, axis=1, kind="stable")[:, :m]

    def noise_free(self, state: RequestState) -> RequestState:
        """``state`` with each candidate's appeal stripped of its per-request match noise: the
        user's taste for the category plus the item's quality (and the creator shifts). What a
        model that knew the user and the item perfectly could know; the noise is hidden from
        every model by design (the features reveal the taste and the quality only in part)."""
        cfg = self.config
        appeal = (
            cfg.base_logit
            + np.take_along_axis(state.taste, state.category, axis=1)
            + state.quality
            + cfg.cold_start_appeal_shift * state.is_cold_start
            + cfg.long_tail_appeal_shift * state.is_long_tail
        )
        return dataclasses.replace(state, appeal=appeal)

    def learnable_ceilings(
        self, state: RequestState, beam_width: int = 16, m: int | None = None
    ) -> dict[str, np.ndarray]:
        """[B] true expected gains of the two learnable-ceiling lists: ``sort`` orders the
        candidates by their noise-free appeal (:meth:`noise_free`), ``beam`` searches under the
        true list model on that appeal. Both lists are scored under the TRUE state. Never visible
        to models: these rows tell how much of the headroom any model could reach."""
        m = m or self.config.list_length
        clean = self.noise_free(state)
        sort = self.true_appeal_sort(clean, m)
        beam, _ = self.upper_bound(clean, beam_width=beam_width, m=m)
        return {"sort": self.expected_gain(state, sort), "beam": self.expected_gain(state, beam)}

    def upper_bound(
        self,
        state: RequestState,
        beam_width: int = 16,
        m: int | None = None,
        return_beams: bool = False,
    ) -> tuple[np.ndarray, ...]:
        """Best lists found by beam search under the true model: (lists [B, m], gains [B]).

        With ``return_beams`` also (beam lists [B, W, m], beam gains [B, W]): every final beam, so
        callers can check the returned gain is the maximum over all lists considered.
        """
        m = m or self.config.list_length
        if beam_width < 1:
            raise ValueError("beam_width must be >= 1")
        B, n = state.appeal.shape
        block = max(1, _BEAM_BLOCK // (beam_width * n))
        beams, scores = [], []
        for lo in range(0, B, block):
            bl, bs = self._beam_search(state.take(slice(lo, lo + block)), beam_width, m)
            beams.append(bl)
            scores.append(bs)
        beam_lists = np.concatenate(beams)
        beam_gains = np.concatenate(scores)
        best = np.argmax(beam_gains, axis=1)
        rows = np.arange(B)
        lists = beam_lists[rows, best]
        gains = beam_gains[rows, best]
        # The true-appeal sort is one more list considered: never return less than it.
        tas = self.true_appeal_sort(state, m)
        tas_gain = self.expected_gain(state, tas)
        better = tas_gain > gains
        lists = np.where(better[:, None], tas, lists)
        gains = np.where(better, tas_gain, gains)
        if return_beams:
            return lists, gains, beam_lists, beam_gains
        return lists, gains

    def list_ceiling(
        self, state: RequestState, appeal: np.ndarray, beam_width: int = 16, m: int | None = None
    ) -> np.ndarray:
        """[B] true expected gains of the lists beam search finds under the TRUE list model
        (satiation, complementarity, scroll, position) when the candidates' appeal is
        ``appeal [B, n]`` (an estimate, e.g. a model's) instead of the true one. Scored under the
        true state: what a perfect list model could serve with that knowledge of appeal."""
        appeal = np.asarray(appeal, dtype=np.float64)
        if appeal.shape != state.appeal.shape:
            raise ValueError(f"appeal must be [B, n] = {state.appeal.shape}, got {appeal.shape}")
        if not np.isfinite(appeal).all():
            raise ValueError("appeal has NaN or infinite values")
        lists, _ = self.upper_bound(dataclasses.replace(state, appeal=appeal),
                                    beam_width=beam_width, m=m)
        return self.expected_gain(state, lists)

    def _beam_search(
        self, st: RequestState, width: int, m: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Beam search for one block of requests; the incremental terms mirror ``_core`` exactly."""
        cfg = self.config
        um = self.user_model
        K = um.complementarity
        B, n = st.appeal.shape
        rows = np.arange(B)[:, None]
        s = st.appeal[:, None, :]
        cat = st.category[:, None, :]
        cre = st.creator[:, None, :]
        dur = st.duration[:, None, :]
        delta = st.diversity[:, None, None]
        like_b = st.like_bias[:, None, None]
        # sat: sum_k rho_s^(j-k-1) (gamma_c [same category] + gamma_a [same creator])
        sat = np.zeros((B, 1, n))
        comp = np.zeros((B, 1, n))  # sum_k rho_k^(j-k-1) K[c_k, c_i]
        used = np.zeros((B, 1, n), dtype=bool)
        num = np.zeros((B, 1))
        den = np.zeros((B, 1))
        reach = np.ones((B, 1))
        score = np.zeros((B, 1))
        chosen = np.zeros((B, 1, 0), dtype=np.int64)
        for j in range(m):
            wc = sat.shape[1]
            z = s - delta * sat + comp
            gain = um.item_gain(um.item_probabilities(z, dur, like_b, j))
            cand = np.where(used, -np.inf, score[:, :, None] + reach[:, :, None] * gain)
            flat = cand.reshape(B, wc * n)
            k = min(width, wc * (n - j))  # every beam has n - j unused items: all finite
            if k < wc * n:
                top = np.argpartition(-flat, k - 1, axis=1)[:, :k]
            else:
                top = np.broadcast_to(np.arange(wc * n), (B, wc * n)).copy()
            top = np.take_along_axis(
                top, np.argsort(-np.take_along_axis(flat, top, axis=1), axis=1, kind="stable"), 1
            )
            parent, item = np.divmod(top, n)
            score = np.take_along_axis(flat, top, axis=1)
            z_new = z[rows, parent, item]
            sat, comp, used = sat[rows, parent], comp[rows, parent], used[rows, parent]
            num, den, reach = num[rows, parent], den[rows, parent], reach[rows, parent]
            chosen = np.concatenate([chosen[rows, parent], item[:, :, None]], axis=2)
            used[rows, np.arange(k)[None, :], item] = True
            c_new = np.take_along_axis(st.category, item, axis=1)[:, :, None]
            a_new = np.take_along_axis(st.creator, item, axis=1)[:, :, None]
            sat = (
                cfg.satiation_decay * sat
                + cfg.satiation_category * (cat == c_new)
                + cfg.satiation_creator * (cre == a_new)
            )
            comp = cfg.complementarity_decay * comp + K[c_new, cat]
            num = cfg.scroll_memory * num + z_new
            den = cfg.scroll_memory * den + 1.0
            reach = reach * um.continuation(num / den, j, st.scroll_bias[:, None])
        return chosen, score
