"""Top-k / temperature sampling of K distinct lists per request."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from genrerank.constraints.batch import apply_allowed, prepare_constraints
from genrerank.constraints.compile import RequestConstraints
from genrerank.decoding import (
    DecodedLists,
    list_log_prob,
    mask_beyond_length,
    prepare_inputs,
    register_decoder,
)


def _draw(
    lp: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    m: int,
    copies: int,
    top_k: int | None,
    temperature: float,
    generator: torch.Generator | None,
    constraints: Sequence[RequestConstraints | None] | None = None,
) -> torch.Tensor:
    """``copies`` independent lists per request -> ``[B, copies, m]`` (-1 beyond lengths);
    with ``constraints`` (one per request) each draw is among the allowed candidates."""
    b, n, _ = lp.shape
    rows = b * copies
    out = torch.full((rows, m), -1, dtype=torch.long, device=lp.device)
    logits = (lp.permute(2, 0, 1)[:m] / temperature).contiguous()  # [m, B, N]
    blocked = torch.zeros(b, n, device=lp.device).masked_fill_(~mask, float("-inf"))
    blocked = blocked.repeat_interleave(copies, dim=0)  # row r = request r // copies
    truncate = top_k is not None and top_k < n
    for t in range(m):
        step = logits[t].repeat_interleave(copies, dim=0) + blocked
        if constraints is not None:
            active = (t < lengths).repeat_interleave(copies)
            step = apply_allowed(step, constraints, out[:, :t], active,
                                 torch.arange(b).repeat_interleave(copies).numpy())
        if truncate:
            kth = step.topk(top_k, dim=1).values[:, -1:]
            step = step.masked_fill_(step < kth, float("-inf"))
        # Gumbel-max: argmax(logit - log E), E = -log U ~ Exp(1), samples softmax(logit)
        # exactly. uniform_ + two logs is ~4x faster than exponential_ on CPU; the clamp keeps
        # E finite so no row can end up all -inf (or NaN).
        e = torch.empty_like(step).uniform_(generator=generator).clamp_(min=1e-30)
        pick = step.sub_(e.log_().neg_().log_()).argmax(1)
        out[:, t] = pick
        blocked.scatter_(1, pick[:, None], float("-inf"))
    out = out.reshape(b, copies, m)
    return mask_beyond_length(out, lengths)


def _list_keys(lists: torch.Tensor, n: int) -> torch.Tensor:
    """Exact int64 keys for ``[..., m]`` lists -> ``[..., C]``: equal keys iff equal lists.

    Entries lie in ``[-1, n - 1]``; ``C`` chunks of positions are packed base ``n + 1``, each
    chunk short enough to stay below 2**62. Keys make duplicate detection cost ``P^2 C`` rather
    than ``P^2 m`` memory.
    """
    base = max(n + 1, 2)
    per = max(1, int(62 // math.log2(base)))
    m = lists.shape[-1]
    keys = []
    for start in range(0, m, per):
        chunk = lists[..., start : start + per] + 1
        weights = base ** torch.arange(chunk.shape[-1], device=lists.device, dtype=torch.long)
        keys.append((chunk * weights).sum(-1))
    if not keys:  # m = 0: every list is the empty list
        return lists.new_zeros((*lists.shape[:-1], 1))
    return torch.stack(keys, dim=-1)


def _support_bound(
    mask: torch.Tensor, lengths: torch.Tensor, m: int, top_k: int | None, cap: int
) -> torch.Tensor:
    """Upper bound on the number of distinct lists each request can yield, capped at ``cap``."""
    real = mask.sum(1)
    bound = torch.ones_like(real)
    for t in range(m):
        choices = real - t if top_k is None else torch.clamp(real - t, max=top_k)
        bound = torch.where(t < lengths, bound * choices, bound).clamp_(max=cap)
    return bound


@register_decoder("sample")
@torch.no_grad()
def sample(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
    *,
    k: int = 4,
    top_k: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_draws: int | None = None,
    constraints: Sequence[RequestConstraints | None] | None = None,
) -> DecodedLists:
    """Sample ``k`` distinct lists per request -> :class:`DecodedLists` ``[B, k, m]``.

    Each position draws from ``softmax(log p(. | t) / temperature)`` renormalised over the
    unchosen real candidates, truncated to the ``top_k`` most likely of those (``None`` = no
    truncation). Lists are drawn in rounds (``2k`` per request still short of ``k`` distinct
    lists, doubling up to ``8k``) and deduplicated (first occurrences kept), until every
    request has ``k`` or as many as can exist (an upper bound from ``n``, ``L_b`` and
    ``top_k``), or ``max_draws`` (default ``32k``) draws per request are spent. A request may
    so end with fewer than ``k`` lists: n = m = 1 has one list, and very peaked distributions
    rarely show their tail. Missing lists are all -1 with score ``-inf`` (``.valid`` False).
    Returned lists are sorted by log-prob, best first (ties: draw order).

    Randomness: ``generator`` if given, else a fresh generator seeded with ``seed``, else
    torch's global generator. Same seed, same inputs -> same lists.

    ``constraints``: every position draws among the candidates they allow (top-k after that
    mask), so every list satisfies them; fewer distinct lists than the bound may exist then,
    and the rounds end at ``max_draws``.
    """
    if k < 1:
        raise ValueError(f"sample: k must be >= 1, got {k}")
    if not temperature > 0.0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"sample: top_k must be >= 1 or None, got {top_k}")
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    rcs = prepare_constraints(constraints, lengths, mask)
    b, n, _ = lp.shape
    device = lp.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    max_draws = 32 * k if max_draws is None else max_draws
    if max_draws < 1:
        raise ValueError(f"sample: max_draws must be >= 1, got {max_draws}")
    per_round = 2 * k  # doubles each round (up to 8k): few rounds even for peaked requests
    target = _support_bound(mask, lengths, m, top_k, k)  # >= 1: the empty list counts
    found = torch.full((b, k, m), -1, dtype=torch.long, device=device)
    n_found = torch.zeros(b, dtype=torch.long, device=device)
    slots = torch.arange(k, device=device)
    drawn = 0
    while drawn < max_draws:
        need = (n_found < target).nonzero().squeeze(1)
        if need.numel() == 0:
            break
        copies = min(per_round, max_draws - drawn)
        drawn += copies
        per_round = min(2 * per_round, 8 * k)
        sub = None if rcs is None else [rcs[i] for i in need.tolist()]
        new = _draw(lp[need], mask[need], lengths[need], m, copies, top_k, temperature, generator,
                    sub)
        # Pool = lists found so far (distinct, first) + the new draws; keep first occurrences.
        pool = torch.cat([found[need], new], dim=1)  # [b', P, m]
        fresh = torch.ones(need.numel(), copies, dtype=torch.bool, device=device)
        real = torch.cat([slots < n_found[need, None], fresh], dim=1)
        p = pool.shape[1]
        keys = _list_keys(pool, n)  # [b', P, C]
        same = (keys[:, :, None, :] == keys[:, None, :, :]).all(-1)  # [b', P, P]
        order = torch.arange(p, device=device)
        earlier = order[None, :] < order[:, None]  # earlier[i, j]: draw j came before i
        dup = (same & earlier & real[:, None, :]).any(-1)
        first = real & ~dup
        rank = first.long().cumsum(1) - 1
        keep = first & (rank < k)
        dest = torch.where(keep, rank, k)  # slot k = dump for everything not kept
        buf = torch.full((need.numel(), k + 1, m), -1, dtype=torch.long, device=device)
        buf.scatter_(1, dest[:, :, None].expand_as(pool), pool)
        found[need] = buf[:, :k]
        n_found[need] = keep.sum(1)
    valid = slots < n_found[:, None]
    scores = torch.where(valid, list_log_prob(lp, found), float("-inf"))
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return DecodedLists(found.gather(1, order[:, :, None].expand_as(found)), scores)
