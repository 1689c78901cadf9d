"""Hand-built padded batches and model outputs for the loss tests."""

from __future__ import annotations

import torch

from genrerank.data.dataset import Batch
from genrerank.losses import ModelOutput

GARBAGE_LABEL = 1e3  # huge label at padded positions: would flip R if a loss read it


def make_batch(
    n_candidates: list[int],
    exposed: list[list[int]],
    labels: dict[str, list[list[float]]] | None = None,
    *,
    extra_n: int = 0,
    extra_m: int = 0,
    garbage: bool = False,
) -> Batch:
    """A Batch padded to max(n) + extra_n candidates and max(m) + extra_m positions.

    With ``garbage`` the padded slots hold junk instead of zeros (exposed index = last
    candidate, labels = GARBAGE_LABEL), to prove that losses read the masks only.
    """
    b = len(n_candidates)
    n = max(n_candidates) + extra_n
    m = max(len(e) for e in exposed) + extra_m
    candidate_mask = torch.zeros(b, n, dtype=torch.bool)
    position_mask = torch.zeros(b, m, dtype=torch.bool)
    exp = torch.full((b, m), n - 1 if garbage else 0, dtype=torch.long)
    fill = GARBAGE_LABEL if garbage else 0.0
    lab = {s: torch.full((b, m), fill) for s in (labels or {})}
    for k in range(b):
        candidate_mask[k, : n_candidates[k]] = True
        position_mask[k, : len(exposed[k])] = True
        exp[k, : len(exposed[k])] = torch.tensor(exposed[k], dtype=torch.long)
        for s, rows in (labels or {}).items():
            lab[s][k, : len(rows[k])] = torch.tensor(rows[k], dtype=torch.float32)
    return Batch(
        request_index=torch.arange(b),
        user_cat=torch.zeros(b, 1, dtype=torch.long),
        user_dense=torch.zeros(b, 1),
        context_cat=torch.zeros(b, 0, dtype=torch.long),
        context_dense=torch.zeros(b, 0),
        item_cat=torch.zeros(b, n, 1, dtype=torch.long),
        item_dense=torch.zeros(b, n, 1),
        upstream_score=torch.zeros(b, n),
        category=torch.zeros(b, n, dtype=torch.long),
        creator=torch.zeros(b, n, dtype=torch.long),
        is_cold_start=torch.zeros(b, n, dtype=torch.bool),
        is_long_tail=torch.zeros(b, n, dtype=torch.bool),
        candidate_mask=candidate_mask,
        exposed=exp,
        position_mask=position_mask,
        labels=lab,
    )


def embed(blocks: list[torch.Tensor], shape: tuple[int, ...], fill: float) -> torch.Tensor:
    """Stack per-request tensors (each a leading-corner block) into a ``[B, *shape]`` tensor
    filled with ``fill`` elsewhere; differentiable w.r.t. the blocks."""
    rows = []
    for block in blocks:
        pads: list[int] = []
        for size, full in zip(reversed(block.shape), reversed(shape), strict=True):
            pads += [0, full - size]
        rows.append(torch.nn.functional.pad(block, pads, value=fill))
    return torch.stack(rows)


def masked_log_softmax(logits: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """Column log-softmax over candidates with padded candidates at -inf (the model contract)."""
    masked = logits.masked_fill(~candidate_mask.unsqueeze(-1), float("-inf"))
    return torch.log_softmax(masked, dim=1)


def log_probs_from_logits(
    logits: list[torch.Tensor], batch: Batch, garbage: bool = False
) -> torch.Tensor:
    """``[B, N, M]`` log-probs from per-request ``[n_b, m_b]`` logits.

    With ``garbage`` padded candidates get huge logits (removed by the mask, as a model
    would) and padded position columns get NaN (arbitrary by contract).
    """
    n, m = batch.candidate_mask.shape[1], batch.position_mask.shape[1]
    full = embed(logits, (n, m), 1e4 if garbage else 0.0)
    lp = masked_log_softmax(full, batch.candidate_mask)
    if garbage:
        lp = torch.where(batch.position_mask.unsqueeze(1), lp, float("nan"))
    return lp


def output(log_probs: torch.Tensor, **kwargs: torch.Tensor) -> ModelOutput:
    return ModelOutput(log_probs=log_probs, **kwargs)
