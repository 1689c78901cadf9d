"""Multi-token prediction (MTP) for the autoregressive pointer model, and self-speculative greedy.

Gloeckle et al. (2024): extra heads on the shared decoder predict several items ahead; at
inference the heads propose, and the model's own next-item head verifies (NOTES section 10).

**Heads.** With ``mtp_heads = k``, head i (1..k) maps the decoder state ``h_t`` (the state that
the next-item head turns into the item at position t) to a state ``z_{t,i}`` for the item at
position ``t + i``, scored by the model's own pointer (``out_norm``, ``pointer_query``, the
candidates' pointer keys) plus the list context along the way. A head also reads the encoded
item at position t, which is known when it proposes (the next-item head has just chosen it) and
which the decoder only sees one position later. Each head is a residual feed-forward block
whose output layer starts at zero: an untrained head proposes the next-item head's own runners-
up, a useful start for verification.

**Training** (teacher-forced, like the next-item head): ``mtp_logits [B, N, M, k]``, entry
``[b, :, t, i - 1]`` = head i's scores at state t for the LOGGED item at ``t + i``, with the
logged items before ``t + i`` and the padded candidates masked, and the list context of the
logged items before ``t + i`` added. The ``mtp`` loss (:mod:`genrerank.losses.mtp`) is the
cross-entropy of those scores on the logged item (``target: "logged"``) or on the next-item
head's own teacher-forced distribution at ``t + i`` (``target: "model"``, self-distillation:
what verification accepts).

**Self-speculative greedy** (:func:`speculative_greedy`): the heads at the newest position
propose the next k items; one decoder call over the confirmed item and the k proposals (KV
cache) lets the next-item head verify each proposal against its own argmax; the longest
agreeing prefix is kept, plus the next-item head's choice at the first disagreement (or after
the last proposal), and the heads at that position propose again. Every kept item is the
next-item head's argmax given the items before it, so the lists are those of plain greedy
(equal up to floating-point rounding on exact ties: the verification scores several positions
in one call, which sums in another order). Each call keeps 1..k+1 items. ``verify=False``
keeps every proposal unchecked: fewer calls, lists that may differ from greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from genrerank.decoding import mask_beyond_length
from genrerank.modules.attention import KV, DecoderLayer

if TYPE_CHECKING:
    from genrerank.data.dataset import Batch
    from genrerank.models.autoregressive import Autoregressive


class MTPHeads(nn.Module):
    """``k`` residual feed-forward heads in one set of batched weights: a handful of operations
    per call whatever k is (decoding at batch 1 costs per operation, not per multiply)."""

    def __init__(self, dim: int, k: int, ff_mult: int = 2) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"MTPHeads: need k >= 1 heads, got {k}")
        f = dim * ff_mult
        self.k = k
        scale = 1.0 / math.sqrt(dim)
        self.item_weight = nn.Parameter(torch.randn(dim, k * dim) * scale)  # k blocks of d
        self.item_bias = nn.Parameter(torch.zeros(k * dim))
        self.norm_weight = nn.Parameter(torch.ones(k, dim))
        self.norm_bias = nn.Parameter(torch.zeros(k, dim))
        self.in_weight = nn.Parameter(torch.randn(k, dim, f) * scale)
        self.in_bias = nn.Parameter(torch.zeros(k, 1, f))
        # Zero output layer: each head starts as the identity (see the module docstring).
        self.out_weight = nn.Parameter(torch.zeros(k, f, dim))
        self.out_bias = nn.Parameter(torch.zeros(k, 1, dim))

    def forward(self, h: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Head states ``[..., k, d]`` from decoder states ``h [..., d]`` and the encoded items
        ``item [..., d]`` chosen at those states."""
        lead, d = h.shape[:-1], h.shape[-1]
        base = h.reshape(-1, 1, d)  # [P, 1, d]
        u = base + torch.addmm(self.item_bias, item.reshape(-1, d), self.item_weight).view(
            -1, self.k, d)
        u = torch.addcmul(self.norm_bias, F.layer_norm(u, (d,)), self.norm_weight)
        u = F.gelu(torch.baddbmm(self.in_bias, u.transpose(0, 1), self.in_weight))  # [k, P, f]
        z = base + torch.baddbmm(self.out_bias, u, self.out_weight).transpose(0, 1)
        return z.reshape(*lead, self.k, d)


def _shift(x: torch.Tensor, i: int, fill: float | bool) -> torch.Tensor:
    """``x [B, N, M]`` moved i columns to the left along M (column t holds column t + i),
    ``fill`` past the end."""
    pad = x.new_full((*x.shape[:2], min(i, x.shape[2])), fill)
    return torch.cat([x[:, :, i:], pad], dim=2)


def teacher_forced_logits(
    model: Autoregressive, h: torch.Tensor, x: torch.Tensor, exposed: torch.Tensor,
    before: torch.Tensor, candidate_mask: torch.Tensor, context: torch.Tensor | None,
) -> torch.Tensor:
    """``mtp_logits [B, N, M, k]`` of the logged lists (see the module docstring).

    ``h [B, M, d]`` decoder states, ``x [B, N, d]`` encoded candidates, ``before [B, N, M]``
    the logged items before each (real) position, ``context [B, N, M]`` the teacher-forced list
    context or None. Columns whose target lies past the list keep only the padding mask (the
    loss ignores them; a fully masked column would make NaN gradients).
    """
    assert model.mtp is not None
    b, n, d = x.shape
    m = h.shape[1]
    k = model.mtp.k
    shown = x.gather(1, exposed.unsqueeze(-1).expand(-1, -1, d))  # [B, M, d] item at each t
    z = model.mtp(h, shown)  # [B, M, k, d]
    scores = model._pointer_logits(z.reshape(b, m * k, d), model.pointer_key(x))
    scores = scores.view(b, n, m, k)
    columns = []
    for i in range(1, k + 1):
        col = scores[..., i - 1]
        if context is not None:
            col = col + _shift(context, i, 0.0)
        blocked = _shift(before, i, False) | ~candidate_mask.unsqueeze(-1)
        columns.append(col.masked_fill(blocked, float("-inf")))
    return torch.stack(columns, dim=-1)


# ---------------------------------------------------------------------------- decoding


@dataclass
class SpeculativeStats:
    """What a self-speculative decode did.

    ``steps``: decoder calls in all (the first, at the start token, included; plain greedy
    makes one per position); ``steps_per_row [B]``: calls until each request's list was
    complete (0 for an empty list); ``proposed`` / ``accepted``: proposals checked and kept over
    the calls while each request was still being written.
    """

    steps: int
    steps_per_row: torch.Tensor
    proposed: int
    accepted: int

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")


def _block_step(
    layer: DecoderLayer, h: torch.Tensor, cache: KV | None, memory_kv: KV,
    memory_mask: torch.Tensor, mask: torch.Tensor | None,
) -> tuple[torch.Tensor, KV]:
    """:meth:`DecoderLayer.step` for ``T`` new positions ``h [R, T, d]`` at once: ``mask``
    ``[R | 1, 1, T, T_cache + T]`` (True = may attend) keeps the new positions causal and hides
    cache entries of rejected proposals; None = every cached position, one new position."""
    x = layer.self_norm(h)
    k, v = layer.self_attn.project_kv(x)
    if cache is not None:
        k = torch.cat([cache[0], k], dim=2)
        v = torch.cat([cache[1], v], dim=2)
    h = h + layer.drop(layer.self_attn.attend(x, (k, v), mask))
    return layer._rest(h, memory_kv, memory_mask), (k, v)


def _masked_log_probs(logits: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """``Autoregressive._masked_log_probs`` for every column of ``[R, N, T]`` at once (the
    same operations, so the same argmax as plain greedy)."""
    empty = blocked.all(1, keepdim=True)
    logits = logits.masked_fill(blocked & ~empty, float("-inf"))
    return torch.log_softmax(logits, dim=1)


class _Context:
    """:meth:`ListContext.step` with the decay and the clamped categories computed once per
    decode (the same values, so the same scores as plain greedy, in fewer operations)."""

    def __init__(self, model: Autoregressive, category: torch.Tensor) -> None:
        lc = model.list_context
        assert lc is not None
        self.pair = lc.pair
        self.decay = lc.decay
        self.category = lc._clamp(category)
        self.rows = torch.arange(category.shape[0], device=category.device)

    def step(self, context: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        effect = self.pair[self.category[self.rows, previous]].gather(1, self.category)
        return self.decay * context + effect


def _propose(
    model: Autoregressive, memory: torch.Tensor, keys: torch.Tensor, lc: _Context | None,
    blocked: torch.Tensor, h_last: torch.Tensor, last: torch.Tensor, context: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The heads' proposals at the newest position (state ``h_last [R, d]``, where item
    ``last [R]`` was chosen; list context ``context [R, N]`` there): head i scores the item at
    (newest position + i), without the ``blocked [R, N]`` candidates (chosen or padded) and the
    earlier proposals. Returns the proposals ``[R, k]`` and, for the k + 1 positions after the
    newest one (fed ``last`` and the proposals), what each may not pick ``[R, N, k + 1]`` and
    its list context ``[R, N, k + 1]`` (None without a list context)."""
    assert model.mtp is not None
    rows = torch.arange(last.shape[0], device=last.device)
    z = model.mtp(h_last, memory[rows, last])  # [R, k, d]
    head_scores = model._pointer_logits(z, keys)  # [R, N, k]
    proposals, masks, contexts = [], [blocked], []
    previous = last
    for i in range(model.mtp.k):
        score = head_scores[:, :, i]
        if lc is not None:
            context = lc.step(context, previous)
            contexts.append(context)
            score = score + context
        previous = score.masked_fill(blocked, float("-inf")).argmax(1)
        proposals.append(previous)
        blocked = blocked.scatter(1, previous.unsqueeze(1), True)
        masks.append(blocked)
    if lc is not None:
        contexts.append(lc.step(context, previous))
    return (torch.stack(proposals, 1), torch.stack(masks, 2),
            torch.stack(contexts, 2) if contexts else None)


@torch.inference_mode()
def speculative_greedy(
    model: Autoregressive, batch: Batch, lengths: torch.Tensor, width: int,
    verify: bool = True,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy lists ``[B, width]`` (-1 past each request's length) by self-speculative decoding
    with the model's MTP heads, and what it cost (see the module docstring)."""
    heads = model.mtp
    if heads is None:
        raise ValueError("autoregressive: MTP decoding needs a model built with mtp_heads >= 1")
    k, t_new = heads.k, heads.k + 1
    b = batch.batch_size
    device = lengths.device
    lists = torch.full((b, width + 2 * t_new), -1, dtype=torch.long, device=device)
    steps_per_row = torch.zeros(b, dtype=torch.long, device=device)
    if width == 0 or not bool((lengths > 0).any()):
        return lists[:, :width], SpeculativeStats(0, steps_per_row, 0, 0)

    state = model._start_state(batch, use_cache=True)
    memory, memory_kv, memory_mask = state.memory, state.memory_kv, state.memory_mask
    keys = state.pointer_keys
    padded = ~state.candidate_mask
    taken = state.chosen | padded  # what the next position may not pick
    lc = None if model.list_context is None else _Context(model, state.category)
    rows = torch.arange(b, device=device)
    offsets = torch.arange(t_new, device=device)
    last_position = model.max_positions - 1

    # First call: the start token at position 0, exactly as plain greedy's first step.
    h = (model.start + model.positions[0]).expand(b, 1, -1)
    cache: list[KV] = []
    for i, layer in enumerate(model.layers):
        h, kv = _block_step(layer, h, None, memory_kv[i], memory_mask, None)
        cache.append(kv)
    context = state.context  # list context at the newest position (zeros at position 0)
    logits = model._pointer_logits(h, keys)
    if lc is not None:
        logits = logits + context.unsqueeze(-1)
    last = _masked_log_probs(logits, taken.unsqueeze(-1)).argmax(1).squeeze(1)
    lists[:, 0] = last
    taken[rows, last] = True
    done_items = torch.ones(b, dtype=torch.long, device=device)  # items confirmed per row
    steps = 1
    finished = done_items >= lengths
    steps_per_row[finished & (lengths > 0)] = 1
    h_last = h[:, 0]
    # Attention of the k + 1 new positions over cache + themselves: entry (j, c) is allowed
    # when c <= t_cache + j (every cached position, the new ones causally); `valid` [R, T]
    # hides cache entries of rejected proposals once rows disagree on how many they kept.
    # Each call adds at most k + 1 cache entries, and there are at most `width` calls.
    reach = (torch.arange(width * t_new + t_new + 1, device=device).unsqueeze(0)
             - offsets.unsqueeze(1))  # [k + 1, L]: c - j
    valid: torch.Tensor | None = None

    while not bool(finished.all()):
        proposals, blocked, contexts = _propose(model, memory, keys, lc, taken, h_last, last,
                                                context)
        # Verify: one call over [confirmed item, k proposals] at the next k + 1 positions.
        fed = torch.cat([last.unsqueeze(1), proposals], dim=1)  # [R, k + 1]
        positions = (done_items.unsqueeze(1) + offsets).clamp(max=last_position)
        h = model.item_in(memory[rows.unsqueeze(1), fed]) + model.positions[positions]
        t_cache = cache[0][0].shape[2]
        mask = reach[:, : t_cache + t_new] <= t_cache  # [k + 1, T_cache + k + 1]
        if valid is not None:
            mask = mask & torch.cat([valid, valid.new_ones(b, t_new)], 1).unsqueeze(1)
        mask = mask.unsqueeze(-3)  # [R | 1, 1, k + 1, T]
        for i, layer in enumerate(model.layers):
            h, cache[i] = _block_step(layer, h, cache[i], memory_kv[i], memory_mask, mask)
        logits = model._pointer_logits(h, keys)  # [R, N, k + 1]
        if contexts is not None:
            logits = logits + contexts
        # The argmax of the masked scores is that of plain greedy's log-softmax of them (up to
        # rounding on exact ties); a column with nothing left lies past every list.
        picks = logits.masked_fill(blocked, float("-inf")).argmax(1)  # [R, k + 1]
        # Items of this call: the kept proposals, then the next-item head's own pick after them
        # (verified: the kept proposals ARE the head's picks; slots after them are overwritten
        # by the next call or lie past the list).
        if verify:
            kept = (picks[:, :k] == proposals).cumprod(1).sum(1)  # [R] agreeing prefix
            new = picks
        else:
            kept = torch.full((b,), k, dtype=torch.long, device=device)
            new = torch.cat([proposals, picks[:, -1:]], 1)
        lists.scatter_(1, done_items.unsqueeze(1) + offsets, new)
        steps += 1
        # Keep the cache up to the last kept position of any row still being written (rows
        # already complete follow along without hiding anything); hide the rest per row.
        if b > 1:
            top = int(kept.masked_fill(finished, -1).max())
            kept = kept.masked_fill(finished, top)
        else:
            top = int(kept)
        done_items = torch.where(finished, done_items, done_items + kept + 1)
        now = ~finished & (done_items >= lengths)
        steps_per_row.masked_fill_(now, steps)
        finished = finished | now
        keep_len = t_cache + top + 1
        cache = [(kk.narrow(2, 0, keep_len), vv.narrow(2, 0, keep_len)) for kk, vv in cache]
        if valid is not None or (b > 1 and top != int(kept.min())):
            old = valid if valid is not None else torch.ones(b, t_cache, dtype=torch.bool,
                                                             device=device)
            valid = torch.cat([old, offsets[: top + 1] <= kept.unsqueeze(1)], dim=1)
        h_last = h[rows, kept]
        last = new[rows, kept]
        taken = blocked[rows, :, kept]  # the earlier items and the kept proposals ...
        taken[rows, last] = True  # ... and the item chosen after them
        if contexts is not None:
            context = contexts[rows, :, kept]  # context at that position

    # Per row: calls after the first each proposed k items and kept all items beyond one.
    written = steps_per_row > 0
    proposed = int(k * (steps_per_row[written] - 1).sum())
    accepted = int((done_items[written] - steps_per_row[written]).sum())
    out = mask_beyond_length(lists[:, :width].clone(), lengths)
    return out, SpeculativeStats(steps, steps_per_row, proposed, accepted)
