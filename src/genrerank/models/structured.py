"""A structured list model: learned appeal plus explicit list effects, searched by beam.

Why: the generators learn list effects from the logging policy's lists, which teach them little
(a sort with a tuned same-category penalty served lists as good as theirs). This model writes the
list effects a feed has (redundancy, complementarity, position bias, scroll depth) as a few
interpretable terms, fits them and a pointwise appeal jointly on logged feedback, and serves the
list its own predicted gain likes best. Reading order:

1. Appeal ``s_i``: the shared :class:`~genrerank.modules.features.FeatureEmbedding` and an MLP,
   as in the pointwise model. User terms come from the same module's user vector ``u``.
2. Contextual appeal of the item at slot j of a list ``y``::

       z_j = s_{y_j} - delta(u) * sum_{k<j} rho_s^(j-k-1) (g_c [c_k = c_j] + g_a [a_k = a_j])
                     + sum_{k<j} rho_k^(j-k-1) K[c_k, c_j]

   ``c`` categories, ``a`` creators (0 = unknown: never "the same"), ``delta(u) >= 0`` the
   user's appetite for variety, ``g >= 0``, decays in (0, 1), ``K`` a learned symmetric
   category table (``complementarity = False`` drops it).
3. Scroll (``scroll = True``): after slot j the user goes on with probability
   ``sigmoid(alpha(u) - slope * j + satisfaction * zbar_j)``, ``zbar_j`` an exponentially
   weighted mean of ``z_0..z_j``; ``reach_0 = 1``, ``reach_j`` the product of the earlier ones.
4. Signals: ``P(click_j) = reach_j * sigmoid(z_j + b_j)`` (``b_j`` a position bias), and for each
   other binary gain signal ``P(s_j) = P(click_j) * sigmoid(w_s z_j + item_s(i) + user_s(u))``.
   ``forward`` returns their logits on the logged lists (``signal_logits``, trained by the
   ``signal_bce`` loss) alongside the usual score matrix (appeal, position bias per column).
5. Lists: beam search under the model's expected gain ``sum_j sum_s w_s P(s_j)``
   (``generate`` with decoder ``beam``, or ``greedy`` = width 1), over the ``pool`` candidates
   of highest appeal. Constraints and ONNX export are not supported yet.
6. As a list scorer (``scores_lists``): ``score_lists`` and ``signal_probabilities`` have the
   list evaluator's signatures, so the model can pick among a pipeline's proposals or score
   near-line lists as a reward model.

Padding: padded candidates are never searched, padded or empty slots are dropped (the items
below move up, as in the simulator) and are no context for others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.data.signals import click_signal, gain_weights
from genrerank.decoding import DecodedLists
from genrerank.losses.base import ModelOutput
from genrerank.models.base import RerankModel, register_model
from genrerank.models.evaluator import compact_lists
from genrerank.models.pointwise import item_scores_output, score_mlp
from genrerank.modules.features import FeatureEmbedding

#: Probabilities are kept this far from 0 and 1 before their logit is taken.
_EPS = 1e-6
DECODERS = ("beam", "greedy")


@dataclass
class StructuredConfig:
    dim: int = 32
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.1
    features: dict = field(default_factory=dict)  # FeatureConfig options
    max_positions: int = 0  # 0: the longest list in the data
    scroll: bool = True  # model scroll depth (else every slot is reached)
    complementarity: bool = True  # learn the category table K
    beam_width: int = 4  # default width of the ``beam`` decoder
    pool: int = 64  # candidates searched: this many of highest appeal (0 = all)


@dataclass
class StructuredOutput(ModelOutput):
    """ModelOutput plus the per-signal logits on the logged lists (for ``signal_bce``)."""

    signal_logits: dict[str, torch.Tensor] = field(default_factory=dict)


def _decay(m: int, rate: torch.Tensor, strict: bool, device: torch.device) -> torch.Tensor:
    """``[m, m]`` W[k, j] = rate^(j-k-1) for k < j (strict) or rate^(j-k) for k <= j."""
    k = torch.arange(m, device=device).unsqueeze(1)
    j = torch.arange(m, device=device).unsqueeze(0)
    if strict:
        return torch.where(k < j, rate ** (j - k - 1).clamp_min(0), 0.0)
    return torch.where(k <= j, rate ** (j - k).clamp_min(0), 0.0)


@register_model("structured")
class StructuredListModel(RerankModel):
    Config = StructuredConfig
    stepwise = True  # lists come from generate (beam search under the model's own gain)
    scores_lists: ClassVar[bool] = True  # score_lists / signal_probabilities, as an evaluator
    not_servable: ClassVar[str] = (
        "its beam search has no ONNX graph and the service's requests carry no creator ids; "
        "write its lists with `genrerank rerank`")

    def __init__(self, spec: FeatureSpec, config: StructuredConfig) -> None:
        super().__init__(spec, config)
        if config.beam_width < 1 or config.pool < 0:
            raise ValueError("structured: beam_width must be >= 1 and pool >= 0")
        d = config.dim
        self.features = FeatureEmbedding(spec, d, config.dropout, config.features)
        self.mlp = score_mlp(d, config.hidden, config.layers, config.dropout)
        self.max_positions = config.max_positions or max(spec.max_list_length, 1)
        self.position_bias = nn.Parameter(torch.zeros(self.max_positions))

        weights = gain_weights(spec)
        self.click = click_signal(spec)
        if self.click is None or self.click not in spec.labels:
            raise ValueError(f"structured: needs a click signal, the data has {spec.labels}")
        self.signals = [self.click, *(s for s in weights if s != self.click and weights[s] > 0
                                      and s in spec.labels and spec.label_kind(s) == "binary")]
        self.gain_weights = {s: weights.get(s, 1.0) for s in self.signals}
        # Per-request user terms: variety appetite, scroll bias, and one per extra signal.
        self.user_terms = nn.Linear(d, 2 + len(self.signals) - 1)
        nn.init.zeros_(self.user_terms.weight)
        with torch.no_grad():
            # softplus(0.55) ~ 1: an average appetite; sigmoid(2) ~ 0.88: most users scroll on.
            self.user_terms.bias.copy_(torch.tensor([0.55, 2.0] + [0.0] * (len(self.signals) - 1)))
        self.item_terms = nn.Linear(d, max(len(self.signals) - 1, 1))
        self.signal_slope = nn.Parameter(torch.full((max(len(self.signals) - 1, 1),), 0.3))
        # Satiation (category, creator) >= 0 through softplus; decays through sigmoid.
        self.satiation = nn.Parameter(torch.tensor([-1.0, -1.0]))
        self.satiation_decay = nn.Parameter(torch.tensor(0.0))
        n_cat = max(spec.n_categories, 1)
        self.pair = nn.Parameter(torch.zeros(n_cat, n_cat)) if config.complementarity else None
        self.pair_decay = nn.Parameter(torch.tensor(0.0))
        self.scroll_slope = nn.Parameter(torch.tensor(0.1))
        self.scroll_satisfaction = nn.Parameter(torch.tensor(0.3))
        self.scroll_memory = nn.Parameter(torch.tensor(0.0))

    # ------------------------------------------------------------------ pieces

    def appeal(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(s [B, N], item tokens [B, N, d], user vector [B, d])``."""
        tokens, user = self.features(batch)
        return self.mlp(tokens).squeeze(-1), tokens, user

    def list_effects(self) -> dict[str, float]:
        """The fitted list terms in readable units (for logs and the README)."""
        with torch.no_grad():
            sat = F.softplus(self.satiation).tolist()
            return {"satiation_category": sat[0], "satiation_creator": sat[1],
                    "satiation_decay": torch.sigmoid(self.satiation_decay).item(),
                    "scroll_slope": self.scroll_slope.item(),
                    "scroll_satisfaction": self.scroll_satisfaction.item()}

    def slot_probabilities(
        self, batch: Batch, s: torch.Tensor, tokens: torch.Tensor, user: torch.Tensor,
        lists: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Signal -> ``[B, K, m]`` marginal probability at each slot of ``lists [B, K, m]``
        (``-1`` = empty: dropped, the items below move up; 0 there). Lists must be compact
        (filled slots first), which logged lists and searched prefixes are."""
        b, k, m = lists.shape
        filled = lists >= 0
        idx = lists.clamp_min(0).reshape(b, k * m)
        fm = filled.to(s.dtype)

        def take(values: torch.Tensor) -> torch.Tensor:
            return values.gather(1, idx).reshape(b, k, m)

        cat, creator = take(batch.category), take(batch.creator)
        pair_ok = (fm.unsqueeze(-1) * fm.unsqueeze(-2))  # [B, K, m(k), m(j)]
        same_cat = ((cat.unsqueeze(-1) == cat.unsqueeze(-2)) & (cat > 0).unsqueeze(-1))
        same_creator = ((creator.unsqueeze(-1) == creator.unsqueeze(-2))
                        & (creator > 0).unsqueeze(-1))
        gam = F.softplus(self.satiation)
        same = (gam[0] * same_cat + gam[1] * same_creator) * pair_ok
        sat = torch.einsum("bgkj,kj->bgj", same,
                           _decay(m, torch.sigmoid(self.satiation_decay), True, s.device))
        terms = self.user_terms(user)  # [B, 2 + extra]
        z = take(s) - F.softplus(terms[:, 0]).view(b, 1, 1) * sat
        if self.pair is not None:
            table = (self.pair + self.pair.T) / 2
            c = cat.clamp(0, table.shape[0] - 1)
            # Unknown categories (0) pair with nothing, as in satiation.
            known = (c > 0).to(s.dtype)
            comp = table[c.unsqueeze(-1), c.unsqueeze(-2)] * pair_ok \
                * known.unsqueeze(-1) * known.unsqueeze(-2)
            z = z + torch.einsum("bgkj,kj->bgj", comp,
                                 _decay(m, torch.sigmoid(self.pair_decay), True, s.device))
        pos = torch.arange(m, device=s.device, dtype=s.dtype)
        log_reach = torch.zeros_like(z)
        if self.config.scroll:
            mem = _decay(m, torch.sigmoid(self.scroll_memory), False, s.device)
            zbar = torch.einsum("bgk,kj->bgj", z * fm, mem) / torch.einsum(
                "bgk,kj->bgj", fm, mem).clamp_min(1e-6)
            go_on = F.logsigmoid(terms[:, 1].view(b, 1, 1) - self.scroll_slope * pos
                                 + self.scroll_satisfaction * zbar)
            log_reach = torch.cumsum(torch.cat([torch.zeros_like(go_on[..., :1]),
                                                go_on[..., :-1]], -1), -1)
        log_click = log_reach + F.logsigmoid(z + self.position_bias[:m])
        out = {self.click: log_click}
        if len(self.signals) > 1:
            item = take_rows(self.item_terms(tokens), idx, b, k, m)
            for e, signal in enumerate(self.signals[1:]):
                logit = self.signal_slope[e] * z + item[..., e] + terms[:, 2 + e].view(b, 1, 1)
                out[signal] = log_click + F.logsigmoid(logit)
        return {sig: torch.where(filled, lp.exp(), 0.0) for sig, lp in out.items()}

    def slot_gain(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, K, m]`` the gain-weighted sum of the signal probabilities at each slot."""
        return sum(self.gain_weights[s] * p for s, p in probs.items())  # type: ignore[return-value]

    def expected_gain(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, K]`` the model's expected gain of each list."""
        return self.slot_gain(probs).sum(-1)

    # ------------------------------------------------------------------ scoring given lists

    @torch.inference_mode()
    def signal_probabilities(self, batch: Batch, lists: torch.Tensor) -> dict[str, torch.Tensor]:
        """Signal -> ``[B, K, m]`` predicted probability at each input slot of ``lists
        [B, K, m]`` (``-1`` = empty slot: dropped, the items below move up; 0 there). The list
        evaluator's signature (:meth:`ListEvaluator.signal_probabilities`)."""
        if lists.dim() != 3 or lists.shape[0] != batch.batch_size:
            raise ValueError(f"structured: lists must be [B, K, m] with B = {batch.batch_size}, "
                             f"got {tuple(lists.shape)}")
        b, k, m = lists.shape
        if m > self.max_positions:
            raise ValueError(f"structured: list length {m} exceeds max_positions "
                             f"{self.max_positions}")
        lists = lists.to(batch.candidate_mask.device).long()
        compact, filled, order = compact_lists(lists)
        compact = torch.where(filled, compact, -1)
        s, tokens, user = self.appeal(batch)
        probs = self.slot_probabilities(batch, s, tokens, user, compact)
        # Back to the input slots: compacted slot c came from slot order[..., c].
        return {sig: torch.zeros_like(p).scatter(-1, order, p) for sig, p in probs.items()}

    @torch.inference_mode()
    def score_lists(self, batch: Batch, lists: torch.Tensor, valid: torch.Tensor | None = None,
                    discount: bool = False) -> torch.Tensor:
        """``[B, K]`` the model's expected gain of each list (``-inf`` where ``valid`` is False;
        by default a list is valid when it has an item). Undiscounted by default: the model's
        probabilities already hold the position effects; ``discount=True`` divides slot j by
        ``log2(j + 2)`` as the list evaluator's default does."""
        per_slot = self.slot_gain(self.signal_probabilities(batch, lists))
        if discount:
            filled = (lists >= 0).to(per_slot.device)
            rank = filled.long().cumsum(-1) - 1  # slot after the empty ones are dropped
            per_slot = per_slot / torch.log2(rank.clamp_min(0).to(per_slot.dtype) + 2.0)
        scores = per_slot.sum(-1)
        if valid is None:
            valid = (lists >= 0).any(-1)
        return torch.where(valid.to(scores.device).bool(), scores, -math.inf)

    # ------------------------------------------------------------------ forward / generate

    def forward(self, batch: Batch, list_length: int | None = None) -> StructuredOutput:
        m = list_length or batch.position_mask.shape[1]
        if max(m, batch.position_mask.shape[1]) > self.max_positions:
            raise ValueError(f"structured: list length {max(m, batch.position_mask.shape[1])} "
                             f"exceeds max_positions {self.max_positions}")
        s, tokens, user = self.appeal(batch)
        base = item_scores_output(s, batch.candidate_mask, m, self.position_bias, tokens)
        logged = torch.where(batch.position_mask, batch.exposed, -1).unsqueeze(1)
        probs = self.slot_probabilities(batch, s, tokens, user, logged)
        signal_logits = {}
        for sig, p in probs.items():
            p = p.squeeze(1).clamp(_EPS, 1 - _EPS)
            signal_logits[sig] = torch.log(p) - torch.log1p(-p)
        return StructuredOutput(log_probs=base.log_probs, item_repr=base.item_repr,
                                click_logits=base.click_logits, logits=base.logits,
                                signal_logits=signal_logits)

    @torch.inference_mode()
    def generate(  # type: ignore[override]
        self, batch: Batch, list_length: int | torch.Tensor | None, decoder: str = "beam",
        beam_width: int | None = None, constraints: Any = None, **params: Any,
    ) -> torch.Tensor | DecodedLists:
        """Lists ``[B, m]`` (``[B, M]`` for per-request lengths, ``-1`` past each length) by
        beam search under the model's expected gain; ``greedy`` is width 1."""
        if decoder not in DECODERS:
            raise ValueError(f"structured: decoder {decoder!r} is not supported; "
                             f"use one of {list(DECODERS)}")
        if params:
            raise ValueError(f"structured: unknown decoder option(s) {sorted(params)}")
        if constraints is not None and any(c is not None for c in constraints):
            raise ValueError("structured: constraints are not supported yet")
        width = 1 if decoder == "greedy" else int(
            self.config.beam_width if beam_width is None else beam_width)
        if width < 1:
            raise ValueError(f"structured: beam_width must be >= 1, got {width}")
        mask = batch.candidate_mask
        b, n = mask.shape
        if list_length is None:
            list_length = min(self.max_positions, n)
        out_width = batch.position_mask.shape[1] if isinstance(list_length, torch.Tensor) \
            else int(list_length)
        lengths = torch.as_tensor(list_length, device=mask.device).expand(b).clone()
        lengths = torch.minimum(lengths, mask.sum(1))
        result = torch.full((b, out_width), -1, dtype=torch.long, device=mask.device)
        m = int(lengths.max()) if b else 0
        if m == 0:
            return result
        if m > self.max_positions:
            raise ValueError(f"structured: list length {m} exceeds max_positions "
                             f"{self.max_positions}")
        s, tokens, user = self.appeal(batch)
        # Search only the `pool` candidates of highest appeal (all when pool = 0 or >= n); never
        # fewer than the list needs.
        pool = n if self.config.pool == 0 else min(max(self.config.pool, m), n)
        order = s.masked_fill(~mask, float("-inf")).topk(pool, dim=1).indices  # [B, P]
        pool_ok = mask.gather(1, order)
        beams = torch.zeros(b, 1, 0, dtype=torch.long, device=mask.device)
        # A beam kept only to fill the width (no valid extension left) stays dead.
        alive = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
        for j in range(m):
            k = beams.shape[1]
            used = torch.zeros(b, k, n, dtype=torch.bool, device=mask.device)
            if j:
                used.scatter_(2, beams, True)
            ok = alive.unsqueeze(-1) & pool_ok.unsqueeze(1) \
                & ~used.gather(2, order.unsqueeze(1).expand(b, k, pool))
            ext = torch.cat([beams.unsqueeze(2).expand(b, k, pool, j),
                             order.view(b, 1, pool, 1).expand(b, k, pool, 1)], -1)
            ext = ext.reshape(b, k * pool, j + 1)
            gain = self.expected_gain(self.slot_probabilities(batch, s, tokens, user, ext))
            gain = gain.masked_fill(~ok.reshape(b, k * pool), float("-inf"))
            top = gain.topk(min(width, k * pool), dim=1)
            beams = ext.gather(1, top.indices.unsqueeze(-1).expand(-1, -1, j + 1))
            alive = torch.isfinite(top.values)
            # Requests whose list ends here keep their best beam of this length.
            done = (lengths == j + 1) & alive[:, 0]
            result[done, : j + 1] = beams[done, 0]
        return result


def take_rows(values: torch.Tensor, idx: torch.Tensor, b: int, k: int, m: int) -> torch.Tensor:
    """``values [B, N, E]`` gathered at ``idx [B, K * m]`` -> ``[B, K, m, E]``."""
    e = values.shape[-1]
    return values.gather(1, idx.unsqueeze(-1).expand(-1, -1, e)).reshape(b, k, m, e)
