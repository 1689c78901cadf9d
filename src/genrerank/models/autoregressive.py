"""Autoregressive pointer generator (Seq2Slate-style): the list is written one item at a time.

Reading order:

1. Candidate encoder, the same as NAR4Rec's: candidate tokens (upstream score included) plus the
   user's context, a Transformer encoder over the n candidates -> ``X [B, N, d]``.
2. Decoder input at position t: a learned start token at t = 0, otherwise the encoded candidate
   chosen at t - 1; plus a learned position embedding.
3. Causal decoder: grouped-query self-attention over the positions written so far,
   cross-attention to ``X``, feed-forward (:mod:`genrerank.modules.attention`) -> ``h_t``.
4. Pointer: ``score(i, t) = <W_q h_t, W_k X_i> / sqrt(d) + context(i, t)``, softmax over the
   candidates that are real and not yet chosen. ``context`` (:mod:`genrerank.modules.list_context`)
   is a learned category-transition table with a decaying memory of the items above: satiation and
   complementarity made explicit (``list_context: false`` drops it).

Training is teacher-forced: ``forward`` feeds the LOGGED list and returns, for every position t,
``log p(candidate | logged items before t)`` as the usual ``[B, N, M]`` matrix, so the shared
losses (likelihood, unlikelihood, contrastive, click) apply unchanged. That matrix depends on the
logged prefix, so the matrix decoders cannot decode it: lists come from :meth:`generate`, which
runs the decoder step by step (greedy, beam, or sampling; with or without the KV cache).

The KV cache keeps each decoder layer's self-attention keys and values of the positions already
written, so step t costs one position instead of t; the candidates' cross-attention keys and
values and pointer keys are computed once per request. ``use_cache=False`` recomputes the whole
prefix at every step: the reference the cache must match exactly, and the latency baseline.

Multi-token prediction (``mtp_heads = k``, :mod:`genrerank.models.mtp`): k extra heads predict
the items 1..k positions after the next one, trained with the ``mtp`` loss term; ``generate(...,
"greedy", mtp=True)`` lets them propose and the next-item head verify: plain greedy's lists in
fewer decoder calls. ``mtp_heads = 0`` (the default) builds exactly the model without them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from genrerank.constraints.batch import apply_allowed, prepare_constraints
from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.decoding import DecodedLists, mask_beyond_length
from genrerank.losses.base import ModelOutput
from genrerank.models.base import RerankModel, register_model
from genrerank.models.mtp import MTPHeads, speculative_greedy, teacher_forced_logits
from genrerank.modules.attention import KV, DecoderLayer
from genrerank.modules.features import FeatureEmbedding
from genrerank.modules.list_context import ListContext

if TYPE_CHECKING:
    from genrerank.constraints import RequestConstraints

#: Decoders ``generate`` understands (the matrix decoders do not apply to a stepwise model).
STEPWISE_DECODERS = ("greedy", "beam", "sample")


@dataclass
class AutoregressiveConfig:
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads / n_kv_heads query heads per K/V head
    encoder_layers: int = 2
    decoder_layers: int = 2
    ff_mult: int = 2
    dropout: float = 0.1
    features: dict = field(default_factory=dict)  # FeatureConfig options
    max_positions: int = 0  # 0: the longest list in the data (spec.max_list_length)
    list_context: bool = True  # learned category-transition term in the pointer score
    mtp_heads: int = 0  # multi-token prediction heads (models/mtp.py); 0 = none


@dataclass
class _DecodeState:
    """Per-row state of an incremental decode (rows = requests, or requests x beams/samples)."""

    memory: torch.Tensor  # [R, N, d] encoded candidates
    memory_mask: torch.Tensor  # [R, 1, 1, N] attention mask (True = real candidate)
    memory_kv: list[KV]  # per layer, cross-attention keys/values
    pointer_keys: torch.Tensor  # [R, N, d]
    candidate_mask: torch.Tensor  # [R, N]
    category: torch.Tensor  # [R, N] each candidate's category (list context)
    context: torch.Tensor  # [R, N] list-context term of each candidate at the next position
    chosen: torch.Tensor  # [R, N] bool, already in the list
    inputs: torch.Tensor  # [R, t, d] decoder inputs so far (recomputation without a cache)
    cache: list[KV] | None  # per layer, self-attention keys/values of positions < t

    def select(self, rows: torch.Tensor) -> _DecodeState:
        """Keep / reorder rows (beam search)."""
        pick = lambda x: x.index_select(0, rows)  # noqa: E731
        return _DecodeState(
            memory=pick(self.memory),
            memory_mask=pick(self.memory_mask),
            memory_kv=[(pick(k), pick(v)) for k, v in self.memory_kv],
            pointer_keys=pick(self.pointer_keys),
            candidate_mask=pick(self.candidate_mask),
            category=pick(self.category),
            context=pick(self.context),
            chosen=pick(self.chosen),
            inputs=pick(self.inputs),
            cache=None if self.cache is None else [(pick(k), pick(v)) for k, v in self.cache],
        )


@register_model("autoregressive")
class Autoregressive(RerankModel):
    Config = AutoregressiveConfig
    stepwise = True

    def __init__(self, spec: FeatureSpec, config: AutoregressiveConfig) -> None:
        super().__init__(spec, config)
        d = config.dim
        if d % config.n_heads:
            raise ValueError(f"autoregressive: dim {d} is not divisible by n_heads "
                             f"{config.n_heads}")
        self.max_positions = config.max_positions or max(spec.max_list_length, 1)
        self.features = FeatureEmbedding(spec, d, config.dropout, config.features)
        enc_layer = nn.TransformerEncoderLayer(d, config.n_heads, d * config.ff_mult,
                                               config.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc_layer, config.encoder_layers,
                                             enable_nested_tensor=False)
        self.encoder_norm = nn.LayerNorm(d)
        self.start = nn.Parameter(torch.randn(d) * 0.02)
        self.positions = nn.Parameter(torch.randn(self.max_positions, d) * 0.02)
        self.item_in = nn.Linear(d, d)
        self.layers = nn.ModuleList(
            DecoderLayer(d, config.n_heads, config.n_kv_heads, config.ff_mult, config.dropout)
            for _ in range(config.decoder_layers)
        )
        self.out_norm = nn.LayerNorm(d)
        self.pointer_query = nn.Linear(d, d)
        self.pointer_key = nn.Linear(d, d)
        self.click_item = nn.Linear(d, d)
        self.click_pos = nn.Linear(d, d)
        self.click_bias = nn.Parameter(torch.zeros(self.max_positions))
        self.list_context = ListContext(spec.n_categories) if config.list_context else None
        if config.mtp_heads < 0:
            raise ValueError(f"autoregressive: mtp_heads must be >= 0, got {config.mtp_heads}")
        # Built last, and only when asked for: without heads the weights, their initialisation
        # and the state_dict keys are those of a model without the option.
        self.mtp = MTPHeads(d, config.mtp_heads, config.ff_mult) if config.mtp_heads else None

    # -- shared pieces -------------------------------------------------------------------

    def encode(self, batch: Batch) -> torch.Tensor:
        tokens, _ = self.features(batch)
        x = self.encoder(tokens, src_key_padding_mask=~batch.candidate_mask)
        return self.encoder_norm(x)

    def _check_width(self, m: int) -> None:
        if m > self.max_positions:
            raise ValueError(f"autoregressive: list length {m} exceeds max_positions "
                             f"{self.max_positions}")

    def _pointer_logits(self, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[R, N, T]`` pointer scores of decoder states ``h [R, T, d]``."""
        q = self.pointer_query(self.out_norm(h))
        return torch.einsum("rnd,rtd->rnt", keys, q) / math.sqrt(h.shape[-1])

    # -- training: teacher forcing on the logged list --------------------------------------

    def forward(self, batch: Batch, list_length: int | None = None) -> ModelOutput:
        m = batch.position_mask.shape[1]
        if list_length is not None and list_length != m:
            raise ValueError("autoregressive: forward is teacher-forced on the logged lists; "
                             "use generate() for lists of another length")
        self._check_width(m)
        cand_mask, exposed, pos_mask = batch.candidate_mask, batch.exposed, batch.position_mask
        x = self.encode(batch)
        b, n, d = x.shape
        shown = x.gather(1, exposed[:, :-1, None].expand(-1, -1, d))  # items fed back
        inputs = torch.cat([self.start.expand(b, 1, d), self.item_in(shown)], dim=1)
        h = inputs + self.positions[:m]
        memory_mask = cand_mask[:, None, None, :]
        for layer in self.layers:
            h = layer(h, layer.memory_kv(x), memory_mask)

        # Candidate i is unavailable at position t if the logged list showed it before t.
        # Only real positions mask: a padded column must keep some candidate available.
        onehot = torch.zeros(b, n, m, dtype=torch.bool, device=x.device)
        onehot.scatter_(1, exposed.unsqueeze(1), pos_mask.unsqueeze(1))
        before = (onehot.cumsum(2) - onehot.long()) > 0
        before = before & pos_mask.unsqueeze(1)
        logits = self._pointer_logits(h, self.pointer_key(x))
        context = None
        if self.list_context is not None:
            context = self.list_context.teacher_forced(batch.category, exposed, pos_mask)
            logits = logits + context
        logits = logits.masked_fill(before | ~cand_mask.unsqueeze(-1), float("-inf"))
        mtp_logits = None
        if self.mtp is not None:
            mtp_logits = teacher_forced_logits(self, h, x, exposed, before, cand_mask, context)

        hn = self.out_norm(h)
        click = torch.einsum("bnd,bmd->bnm", self.click_item(x), self.click_pos(hn))
        click = click / math.sqrt(d) + self.click_bias[:m]
        return ModelOutput(
            log_probs=torch.log_softmax(logits, dim=1),
            item_repr=x,
            position_repr=hn,
            click_logits=click,
            logits=logits,
            mtp_logits=mtp_logits,
        )

    # -- inference: step-by-step decoding ------------------------------------------------

    def _start_state(self, batch: Batch, use_cache: bool) -> _DecodeState:
        x = self.encode(batch)
        b = x.shape[0]
        return _DecodeState(
            memory=x,
            memory_mask=batch.candidate_mask[:, None, None, :],
            memory_kv=[layer.memory_kv(x) for layer in self.layers],
            pointer_keys=self.pointer_key(x),
            candidate_mask=batch.candidate_mask,
            category=batch.category,
            context=x.new_zeros(batch.candidate_mask.shape),
            chosen=torch.zeros_like(batch.candidate_mask),
            inputs=x.new_zeros(b, 0, x.shape[-1]),
            cache=[] if use_cache else None,
        )

    def _step(self, state: _DecodeState, previous: torch.Tensor | None) -> torch.Tensor:
        """Append one position (fed the item chosen last, or the start token) and return the
        masked pointer log-probabilities ``[R, N]`` for it; updates ``state`` in place."""
        rows, _, d = state.memory.shape
        t = state.inputs.shape[1]
        if previous is None:
            token = self.start.expand(rows, d)
        else:
            token = self.item_in(state.memory[torch.arange(rows), previous])
            if self.list_context is not None:
                state.context = self.list_context.step(state.context, state.category, previous)
        new = (token + self.positions[t]).unsqueeze(1)  # [R, 1, d]
        state.inputs = torch.cat([state.inputs, new], dim=1)
        blocked = state.chosen | ~state.candidate_mask
        if state.cache is not None:
            log_probs, state.cache = self.cached_step(
                new, state.cache or None, state.memory_kv, state.memory_mask,
                state.pointer_keys, blocked, state.context)
            return log_probs
        # Recompute every position written so far, keep the last.
        h = state.inputs
        for i, layer in enumerate(self.layers):
            h = layer(h, state.memory_kv[i], state.memory_mask)
        logits = self._pointer_logits(h[:, -1:], state.pointer_keys) + state.context.unsqueeze(-1)
        return self._masked_log_probs(logits, blocked)

    def cached_step(
        self, new: torch.Tensor, cache: list[KV] | None, memory_kv: list[KV],
        memory_mask: torch.Tensor, pointer_keys: torch.Tensor, blocked: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """One decoder position ``new [R, 1, d]`` against the per-layer KV ``cache`` (None at
        the first position): pointer log-probabilities ``[R, N]`` (``blocked`` candidates
        excluded; ``context [R, N]`` added to the scores) and the grown cache. The ONNX step
        graph exports exactly this."""
        h, grown = new, []
        for i, layer in enumerate(self.layers):
            h, kv = layer.step(h, None if cache is None else cache[i], memory_kv[i], memory_mask)
            grown.append(kv)
        logits = self._pointer_logits(h, pointer_keys)
        if context is not None:
            logits = logits + context.unsqueeze(-1)
        return self._masked_log_probs(logits, blocked), grown

    @staticmethod
    def _masked_log_probs(logits: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        logits = logits.squeeze(-1)
        # A row with nothing left (list already as long as its candidates) gets a dummy
        # distribution; those slots are cut by the length mask afterwards.
        empty = blocked.all(1, keepdim=True)
        logits = logits.masked_fill(blocked & ~empty, float("-inf"))
        return torch.log_softmax(logits, dim=1)

    def _lengths(
        self, batch: Batch, list_length: int | torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        real = batch.candidate_mask.sum(1)
        if isinstance(list_length, torch.Tensor) and list_length.dim() == 1:
            lengths = list_length.to(dtype=torch.long, device=real.device)
            width = batch.position_mask.shape[1]
            if lengths.numel() and int(lengths.max()) > width:
                raise ValueError(f"list_length values must lie in [0, {width}]")
        else:
            width = int(list_length)
            lengths = torch.full_like(real, width)
        if width < 0:
            raise ValueError(f"list_length must be >= 0, got {width}")
        self._check_width(width)
        return torch.minimum(lengths, real), width

    @torch.inference_mode()
    def generate(
        self,
        batch: Batch,
        list_length: int | torch.Tensor,
        decoder: str = "greedy",
        *,
        use_cache: bool = True,
        beam_width: int = 4,
        k: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        max_draws: int | None = None,
        mtp: bool = False,
        mtp_verify: bool = True,
        constraints: Sequence[RequestConstraints | None] | None = None,
    ) -> torch.Tensor | DecodedLists:
        """Write lists step by step.

        ``greedy`` -> ``[B, m]``; ``beam`` (``beam_width``, returns the best ``k`` <= width
        beams) and ``sample`` (``k`` distinct lists from up to ``max_draws`` = 4k draws at
        ``temperature`` over the ``top_k`` best candidates per step) -> DecodedLists
        ``[B, K, m]`` best first, scored by their log-probability under the model. Slots past
        a request's length (or its candidates) are -1, as with every decoder.

        ``greedy`` with ``mtp=True`` (a model with ``mtp_heads``): self-speculative decoding,
        the same lists in fewer decoder calls (:mod:`genrerank.models.mtp`);
        ``mtp_verify=False`` keeps the heads' proposals unchecked (faster, lists may differ).

        ``constraints`` (:func:`genrerank.constraints.constraints_for_batch`): checked feasible
        first (:class:`~genrerank.constraints.InfeasibleConstraints`), then every step of
        greedy, beam and sampling picks among the candidates they allow after the prefix;
        scores stay the model's log-probabilities. With ``mtp=True`` a constrained batch is
        decoded by constrained greedy (what verified speculation would return).
        """
        if decoder not in STEPWISE_DECODERS:
            raise ValueError(f"autoregressive: decoder {decoder!r} does not apply; use one of "
                             f"{list(STEPWISE_DECODERS)}")
        was_training = self.training
        self.eval()
        try:
            lengths, width = self._lengths(batch, list_length)
            rcs = prepare_constraints(constraints, lengths, batch.candidate_mask)
            if mtp:
                self._check_mtp(decoder, use_cache)
                if rcs is None:
                    return speculative_greedy(self, batch, lengths, width, mtp_verify)[0]
            if decoder == "greedy":
                return self._greedy(batch, lengths, width, use_cache, constraints=rcs)
            if decoder == "beam":
                return self._beam(batch, lengths, width, use_cache, beam_width,
                                  beam_width if k is None else k, constraints=rcs)
            if generator is None and seed is not None:
                generator = torch.Generator(device=batch.candidate_mask.device).manual_seed(seed)
            return self._sample(batch, lengths, width, use_cache, k or 4, temperature, top_k,
                                generator, max_draws, constraints=rcs)
        finally:
            self.train(was_training)

    def _check_mtp(self, decoder: str, use_cache: bool) -> None:
        if decoder != "greedy" or not use_cache:
            raise ValueError("autoregressive: mtp=True is greedy decoding with the KV cache, "
                             f"got decoder {decoder!r}, use_cache={use_cache}")
        if self.mtp is None:
            raise ValueError("autoregressive: mtp=True needs a model trained with mtp_heads >= 1 "
                             "(e.g. --set model.mtp_heads=3 and an 'mtp' loss term)")

    def _greedy(self, batch: Batch, lengths: torch.Tensor, width: int, use_cache: bool,
                constraints: Sequence[RequestConstraints | None] | None = None) -> torch.Tensor:
        state = self._start_state(batch, use_cache)
        rows = torch.arange(batch.batch_size, device=lengths.device)
        lists = torch.full((batch.batch_size, width), -1, dtype=torch.long, device=rows.device)
        previous = None
        for t in range(width):
            lp = self._step(state, previous)
            if constraints is not None:
                lp = apply_allowed(lp, constraints, lists[:, :t], t < lengths)
            pick = lp.argmax(1)
            lists[:, t] = pick
            state.chosen[rows, pick] = True
            previous = pick
        return mask_beyond_length(lists, lengths)

    def _beam(self, batch: Batch, lengths: torch.Tensor, width: int, use_cache: bool,
              beam_width: int, k: int,
              constraints: Sequence[RequestConstraints | None] | None = None) -> DecodedLists:
        if beam_width < 1 or not 1 <= k <= beam_width:
            raise ValueError(f"beam: need beam_width >= 1 and 1 <= k <= beam_width, got "
                             f"beam_width={beam_width}, k={k}")
        b, w = batch.batch_size, beam_width
        device = lengths.device
        state = self._start_state(batch, use_cache).select(
            torch.arange(b, device=device).repeat_interleave(w))
        scores = torch.full((b, w), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: keep one
        lists = torch.full((b, w, width), -1, dtype=torch.long, device=device)
        row_lengths = lengths.repeat_interleave(w)
        previous = None
        for t in range(width):
            lp = self._step(state, previous)  # [B*W, N]
            n = lp.shape[1]
            if constraints is not None:  # live beams still writing follow the constraints
                live = (t < row_lengths) & torch.isfinite(scores.reshape(-1))
                lp = apply_allowed(lp, constraints, lists.reshape(b * w, width)[:, :t], live,
                                   torch.arange(b).repeat_interleave(w).numpy())
            # A finished list (t >= its length) continues with one zero-cost dummy choice, so
            # it keeps its score and its place without spawning copies.
            done = (t >= row_lengths).unsqueeze(1)
            frozen = torch.full_like(lp, float("-inf"))
            frozen[:, 0] = 0.0
            lp = torch.where(done, frozen, lp)
            total = (scores.reshape(-1, 1) + lp).reshape(b, w * n)
            scores, flat = total.topk(w, dim=1)
            parent, item = flat // n, flat % n
            lists = lists.gather(1, parent.unsqueeze(-1).expand(-1, -1, width)).clone()
            lists[:, :, t] = item
            rows = (parent + torch.arange(b, device=device).unsqueeze(1) * w).reshape(-1)
            state = state.select(rows)
            state.chosen[torch.arange(b * w, device=device), item.reshape(-1)] = True
            previous = item.reshape(-1)
        lists = mask_beyond_length(lists[:, :k], lengths)
        scores = scores[:, :k]
        return DecodedLists(lists.masked_fill(~torch.isfinite(scores).unsqueeze(-1), -1), scores)

    def _sample(self, batch: Batch, lengths: torch.Tensor, width: int, use_cache: bool, k: int,
                temperature: float, top_k: int | None, generator: torch.Generator | None,
                max_draws: int | None,
                constraints: Sequence[RequestConstraints | None] | None = None) -> DecodedLists:
        if k < 1 or not temperature > 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"sample: need k >= 1, temperature > 0, top_k >= 1; got k={k}, "
                             f"temperature={temperature}, top_k={top_k}")
        draws = max(max_draws or 4 * k, k)
        lists, log_prob = self._draw(batch, lengths, width, use_cache, draws, temperature, top_k,
                                     generator, constraints)
        return _distinct_best(lists, log_prob, k)

    @torch.no_grad()
    def draw(self, batch: Batch, list_length: int | torch.Tensor, k: int, *,
             temperature: float = 1.0, generator: torch.Generator | None = None,
             use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` independent lists per request from the model's own distribution (duplicates
        kept: an unbiased sample, what policy-gradient fine-tuning needs) -> lists
        ``[B, k, m]`` (-1 past each length) and their log-probabilities ``[B, k]`` under the
        model (at temperature 1, whatever ``temperature`` drew them). Runs in eval mode."""
        if k < 1 or not temperature > 0:
            raise ValueError(f"draw: need k >= 1 and temperature > 0, got k={k}, "
                             f"temperature={temperature}")
        was_training = self.training
        self.eval()
        try:
            lengths, width = self._lengths(batch, list_length)
            return self._draw(batch, lengths, width, use_cache, k, temperature, None, generator)
        finally:
            self.train(was_training)

    def _draw(self, batch: Batch, lengths: torch.Tensor, width: int, use_cache: bool,
              draws: int, temperature: float, top_k: int | None,
              generator: torch.Generator | None,
              constraints: Sequence[RequestConstraints | None] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch.batch_size
        device = lengths.device
        state = self._start_state(batch, use_cache).select(
            torch.arange(b, device=device).repeat_interleave(draws))
        row_lengths = lengths.repeat_interleave(draws)
        lists = torch.full((b * draws, width), -1, dtype=torch.long, device=device)
        log_prob = torch.zeros(b * draws, device=device)
        rows = torch.arange(b * draws, device=device)
        previous = None
        for t in range(width):
            lp = self._step(state, previous)
            if constraints is not None:
                lp = apply_allowed(lp, constraints, lists[:, :t], t < row_lengths,
                                   torch.arange(b).repeat_interleave(draws).numpy())
            logits = lp / temperature
            if top_k is not None and top_k < logits.shape[1]:
                kth = logits.topk(top_k, dim=1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            pick = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator)
            pick = pick.squeeze(1)
            lists[:, t] = pick
            log_prob = log_prob + torch.where(t < row_lengths, lp[rows, pick], 0.0)
            state.chosen[rows, pick] = True
            previous = pick
        lists = mask_beyond_length(lists, row_lengths).view(b, draws, width)
        return lists, log_prob.view(b, draws)


def _distinct_best(lists: torch.Tensor, scores: torch.Tensor, k: int) -> DecodedLists:
    """Per request, the ``k`` highest-scoring distinct lists (-inf / -1 where fewer exist)."""
    b, _, width = lists.shape
    out = torch.full((b, k, width), -1, dtype=torch.long, device=lists.device)
    out_scores = torch.full((b, k), float("-inf"), device=lists.device)
    order = scores.argsort(dim=1, descending=True)
    for r in range(b):
        seen: set[tuple[int, ...]] = set()
        for j in order[r].tolist():
            key = tuple(lists[r, j].tolist())
            if key in seen:
                continue
            out[r, len(seen)] = lists[r, j]
            out_scores[r, len(seen)] = scores[r, j]
            seen.add(key)
            if len(seen) == k:
                break
    return DecodedLists(out, out_scores)
