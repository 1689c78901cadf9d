"""Beam search over positions for the K most likely distinct lists."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from genrerank.constraints.batch import apply_allowed, prepare_constraints
from genrerank.constraints.compile import RequestConstraints
from genrerank.decoding import (
    DecodedLists,
    list_log_prob,
    prepare_inputs,
    register_decoder,
)
from genrerank.decoding.greedy import greedy


@register_decoder("beam")
@torch.no_grad()
def beam(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
    *,
    beam_width: int = 4,
    k: int | None = None,
    include_greedy: bool = True,
    constraints: Sequence[RequestConstraints | None] | None = None,
) -> DecodedLists:
    """Beam search maximising ``sum_t log p(y_t | t)``, no item twice in a list.

    Keeps ``beam_width`` prefixes per request and returns the best ``k`` (default
    ``beam_width``, at most ``beam_width``) as :class:`DecodedLists` ``[B, k, m]``, best first.
    Lists are distinct by construction: a single root beam, and each beam's children differ in
    their last item. Lists that do not exist (fewer than k permutations) are -1 / ``-inf``.

    ``include_greedy``: because items are exclusive, plain beam search can drop the greedy
    prefix and end below greedy (a beam that spent an item greedy needs later); the greedy list
    then replaces the worst returned list, so the best list is never worse than greedy's.

    ``constraints``: each live beam extends only by the candidates they allow after its
    prefix (so every beam stays completable), and the greedy list is the constrained one.
    """
    if beam_width < 1:
        raise ValueError(f"beam: beam_width must be >= 1, got {beam_width}")
    k = beam_width if k is None else k
    if not 1 <= k <= beam_width:
        raise ValueError(f"beam: k must be in [1, beam_width={beam_width}], got {k}")
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    rcs = prepare_constraints(constraints, lengths, mask)
    b, n, _ = lp.shape
    w = beam_width
    device = lp.device
    neg_inf = float("-inf")
    # One live root beam; the others start dead (-inf) so no list is produced twice.
    scores = torch.full((b, w), neg_inf, device=device)
    scores[:, 0] = 0.0
    seqs = torch.full((b, w, m), -1, dtype=torch.long, device=device)
    if m > 0 and n > 0:
        columns = lp.permute(2, 0, 1)[:m].contiguous()  # [m, B, N]
        blocked = torch.zeros(b, n, device=device).masked_fill_(~mask, neg_inf)
        blocked = blocked[:, None, :].expand(b, w, n).contiguous()
        for t in range(m):
            active = t < lengths  # [B]; rows past their length keep their beams frozen
            if not bool(active.any()):
                break
            cand = (blocked + columns[t][:, None, :]).add_(scores[:, :, None])  # [B, W, N]
            if rcs is not None:  # live beams of rows still writing follow the constraints
                live = (active[:, None] & (scores > neg_inf)).reshape(-1)
                cand = apply_allowed(cand.reshape(b * w, n), rcs, seqs.reshape(b * w, m)[:, :t],
                                     live, torch.arange(b).repeat_interleave(w).numpy()
                                     ).reshape(b, w, n)
            top, flat = cand.reshape(b, w * n).topk(w, dim=1)
            parent, item = flat.div(n, rounding_mode="floor"), flat.remainder(n)
            new_blocked = blocked.gather(1, parent[:, :, None].expand(b, w, n))
            new_blocked.scatter_(2, item[:, :, None], neg_inf)
            new_seqs = seqs.gather(1, parent[:, :, None].expand(b, w, m))
            new_seqs[:, :, t] = item
            if bool(active.all()):
                scores, blocked, seqs = top, new_blocked, new_seqs
            else:
                scores = torch.where(active[:, None], top, scores)
                blocked = torch.where(active[:, None, None], new_blocked, blocked)
                seqs = torch.where(active[:, None, None], new_seqs, seqs)
    lists = seqs[:, :k].clone()
    alive = scores[:, :k] > neg_inf
    lists.masked_fill_(~alive[:, :, None], -1)
    # Re-score with the shared helper so every decoder reports identically summed scores.
    scores = torch.where(alive, list_log_prob(lp, lists), neg_inf)
    if include_greedy and m > 0:
        g = greedy(lp, mask, lengths if isinstance(list_length, torch.Tensor) else m,
                   constraints=rcs)
        g_score = list_log_prob(lp, g)
        present = (lists == g[:, None, :]).all(-1).any(-1)
        swap = ~present & (g_score > scores[:, -1])
        if bool(swap.any()):
            lists[swap, -1] = g[swap]
            scores[swap, -1] = g_score[swap]
            scores, order = scores.sort(dim=1, descending=True, stable=True)
            lists = lists.gather(1, order[:, :, None].expand_as(lists))
    return DecodedLists(lists, scores)
