"""Decoding an n x m score matrix into lists of candidate indices.

Every non-autoregressive model (NAR4Rec and friends) ends in ``log_probs [B, N, M]``: for each
position column ``j`` a log-softmax over the ``N`` (padded) candidates. A decoder turns it into
lists. All decoders share one calling convention::

    decode(name, log_probs, candidate_mask, list_length, constraints=None, **params)
    DECODERS[name](log_probs, candidate_mask, list_length, constraints=None, **params)

Inputs
    ``log_probs`` ``[B, N, M]`` float. Padded candidates may hold anything: ``candidate_mask``
    ``[B, N]`` bool (``None`` = all real) decides, never the values. NaN and ``-inf`` count as
    :data:`LOG_PROB_FLOOR` so that a decoder forced to take an impossible item still yields
    finite scores (``-inf`` is reserved for "no list", see below).
    ``list_length`` an ``int`` m (``0 <= m <= M``), or a LongTensor ``[B]`` of per-request
    lengths (e.g. a predicted length or ``batch.position_mask.sum(1)``), each in ``[0, M]``.

Outputs
    Width ``m`` = ``list_length`` when it is an int, ``M`` when it is a tensor (so the result
    lines up with ``batch.exposed`` / ``position_mask``). Request ``b`` gets exactly
    ``L_b = min(length_b, number of real candidates_b)`` items in slots ``0..L_b-1``, all
    distinct and real, then ``-1`` in the remaining slots.

    - single-list decoders (``greedy``, ``contrastive``, ``hungarian``) return a LongTensor
      ``[B, m]``;
    - multi-list decoders (``beam``, ``sample``) return :class:`DecodedLists`: ``lists``
      LongTensor ``[B, K, m]`` (K distinct lists per request, best first) and ``scores``
      ``[B, K]`` = :func:`list_log_prob` of each list, ``-inf`` for an unavailable list (fewer
      than K distinct lists exist or were found), whose slots are all ``-1``.
      ``DecodedLists.valid`` is the ``[B, K]`` mask of available lists (an available list may
      be empty, when ``L_b = 0``, so test ``valid``, not ``lists[..., 0] >= 0``).

Constraints
    ``constraints``: None, or one :class:`~genrerank.constraints.RequestConstraints` (or
    None) per request, from :func:`genrerank.constraints.constraints_for_batch`. Every
    decoder checks them feasible before decoding (raising
    :class:`~genrerank.constraints.InfeasibleConstraints`) and, at each step, lets a
    constrained request pick only among the candidates ``allowed(prefix)`` returns: those
    that keep a completion satisfying every constraint, so a decoder never gets stuck and
    every list satisfies them. None, or None / empty for every request, runs exactly the
    unconstrained code (bit-identical lists); unconstrained requests of a constrained batch
    decode as they would alone. ``hungarian`` is exact only for required / forbidden ids
    (see its docstring).

Everything runs under ``torch.no_grad`` on the input's device and is vectorised over the
batch: Python loops run over positions / beam steps only (``hungarian`` loops over requests).

Register a new decoder with ``@register_decoder("name")``. The decoder functions live in the
submodules (``genrerank.decoding.greedy.greedy``, ...); they are not re-exported here because
``beam``, ``greedy`` and ``contrastive`` share their module's name and would shadow it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from genrerank.constraints import RequestConstraints

__all__ = [
    "DECODERS",
    "LOG_PROB_FLOOR",
    "DecodedLists",
    "Decoder",
    "decode",
    "list_log_prob",
    "mask_beyond_length",
    "prepare_inputs",
    "random_lists",
    "register_decoder",
]

# Finite stand-in for -inf log-probs: sums over 50 positions stay finite in float32, and
# float64 (scipy) keeps ~1e-7 absolute precision next to it.
LOG_PROB_FLOOR = -1e9


class DecodedLists(NamedTuple):
    """K lists per request from a multi-list decoder (unpacks as ``lists, scores``)."""

    lists: torch.Tensor  # [B, K, m] long, -1 = empty slot / unavailable list
    scores: torch.Tensor  # [B, K] float, sum of log-probs; -inf = unavailable list

    @property
    def valid(self) -> torch.Tensor:
        """``[B, K]`` bool: True where a list is available."""
        return self.scores > float("-inf")


Decoder = Callable[..., "torch.Tensor | DecodedLists"]
DECODERS: dict[str, Decoder] = {}


def register_decoder(name: str) -> Callable[[Decoder], Decoder]:
    """Class-free registry: ``@register_decoder("greedy")`` adds the function to DECODERS."""

    def wrap(fn: Decoder) -> Decoder:
        if name in DECODERS:
            raise ValueError(f"decoder {name!r} is already registered")
        DECODERS[name] = fn
        return fn

    return wrap


def decode(
    name: str,
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
    constraints: Sequence[RequestConstraints | None] | None = None,
    **params: object,
) -> torch.Tensor | DecodedLists:
    """Run the decoder registered as ``name`` (see the module docstring for shapes and
    ``constraints``)."""
    try:
        fn = DECODERS[name]
    except KeyError:
        raise ValueError(f"unknown decoder {name!r}; known decoders: {sorted(DECODERS)}") from None
    if constraints is not None:  # only then: decoders registered elsewhere may lack it
        params["constraints"] = constraints
    return fn(log_probs, candidate_mask, list_length, **params)


def _floored(log_probs: torch.Tensor) -> torch.Tensor:
    """float32 copy with NaN / -inf / anything below the floor set to LOG_PROB_FLOOR."""
    lp = log_probs.detach().float()
    return torch.nan_to_num(
        lp, nan=LOG_PROB_FLOOR, posinf=-LOG_PROB_FLOOR, neginf=LOG_PROB_FLOOR
    ).clamp_(min=LOG_PROB_FLOOR)


def prepare_inputs(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Validate and normalise decoder inputs.

    Returns ``(lp, mask, lengths, m)``: ``lp`` float32 ``[B, N, M]`` with non-finite values
    floored, ``mask`` bool ``[B, N]``, ``lengths`` long ``[B]`` = items each request gets
    (already capped by its number of real candidates) and ``m`` the output width.
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [B, N, M], got shape {tuple(log_probs.shape)}")
    b, n, big_m = log_probs.shape
    device = log_probs.device
    if candidate_mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
    else:
        if tuple(candidate_mask.shape) != (b, n):
            raise ValueError(
                f"candidate_mask must be [B, N] = {(b, n)}, got {tuple(candidate_mask.shape)}"
            )
        mask = candidate_mask.to(device=device, dtype=torch.bool)
    if isinstance(list_length, torch.Tensor):
        if list_length.is_floating_point() or list_length.dtype == torch.bool:
            raise ValueError("list_length tensor must hold integers")
        if list_length.dim() == 0:
            list_length = int(list_length)  # one length for the whole batch
    if isinstance(list_length, torch.Tensor):
        if tuple(list_length.shape) != (b,):
            raise ValueError(
                f"list_length tensor must be [B] = ({b},), got {tuple(list_length.shape)}"
            )
        lengths = list_length.to(device=device, dtype=torch.long)
        if b and (int(lengths.min()) < 0 or int(lengths.max()) > big_m):
            raise ValueError(f"list_length values must lie in [0, M={big_m}]")
        width = big_m
    else:
        width = int(list_length)
        if width != list_length or not 0 <= width <= big_m:
            raise ValueError(f"list_length must be an int in [0, M={big_m}], got {list_length}")
        lengths = torch.full((b,), width, dtype=torch.long, device=device)
    lengths = torch.minimum(lengths, mask.sum(1))
    lp = _floored(log_probs)
    return lp, mask, lengths, width


def random_lists(candidate_mask: torch.Tensor, m: int, k: int, seed: int) -> torch.Tensor:
    """``[B, K, m]`` random lists of each request's real candidates (-1 where it has < m)."""
    b, n = candidate_mask.shape
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(b, k, n, generator=gen).masked_fill(~candidate_mask[:, None, :], 2.0)
    order = keys.argsort(-1)[..., :m]  # real candidates first, in random order
    real = candidate_mask.gather(1, order.reshape(b, -1)).reshape(order.shape)
    return torch.where(real, order, -1)


def mask_beyond_length(lists: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Set slots ``t >= lengths[b]`` of ``[B, m]`` or ``[B, K, m]`` lists to -1 (in place)."""
    m = lists.shape[-1]
    beyond = torch.arange(m, device=lists.device) >= lengths[:, None]  # [B, m]
    if lists.dim() == 3:
        beyond = beyond[:, None, :]
    return lists.masked_fill_(beyond, -1)


def list_log_prob(log_probs: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """Sum over filled slots of ``log p(y_t | t)``, with log-probs floored as in decoding.

    ``lists`` is ``[B, m]`` (-> ``[B]``) or ``[B, K, m]`` (-> ``[B, K]``); ``-1`` slots add 0.
    """
    b, n, big_m = log_probs.shape
    lp = _floored(log_probs)
    m = lists.shape[-1]
    filled = lists >= 0
    # Flat index into [N * M] so one gather serves both list shapes.
    flat = lists.clamp(min=0) * big_m + torch.arange(m, device=lists.device)
    picked = lp.reshape(b, n * big_m).gather(1, flat.reshape(b, -1)).reshape(lists.shape)
    return torch.where(filled, picked, 0.0).sum(-1)


# Importing the submodules registers their decoders (they import the helpers above).
from genrerank.decoding import (  # noqa: E402, F401
    assignment,
    beam,
    context,
    contrastive,
    greedy,
    sampling,
    satiation,
)
