"""Offline evaluation on logs, and the prediction step every evaluation shares.

A model is asked for three things per request:

- a **list** (decoded from its ``[N, M]`` matrix with a named decoding strategy), of the logged
  length m;
- a **ranking score per candidate** for top-k metrics with k > m: the decoded list first, in its
  order, then the remaining candidates by their total assignment probability
  ``log sum_j p_ij`` (for item-scoring models this is exactly their score order);
- a **click probability for each exposed item at its logged position**: ``sigmoid`` of the
  model's click head at (candidate, position). Every model has one (nar4rec: a bilinear head on
  the encoded candidate and position; pointwise and PRM: item score + position bias).

Offline metrics then use only what the logs know: labels of the exposed items. Unexposed
candidates count as unlabelled negatives in NDCG / Recall, which is how the NAR4Rec paper
computes Recall@k; that bias is why the simulator's online evaluation exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from genrerank.data.dataset import RerankDataset, collate
from genrerank.decoding import DecodedLists, decode
from genrerank.metrics import (
    DEFAULT_GAIN_WEIGHTS,
    auc,
    gauc,
    list_gain,
    logloss,
    ndcg_at_k,
    recall_at_k,
)

_LIST_BONUS = 1e6  # decoded items rank above every other candidate


@dataclass
class Predictions:
    """A model's outputs over a data set, padded to the largest n and m seen."""

    request_index: np.ndarray  # [R]
    lists: np.ndarray  # [R, M] candidate indices, -1 = empty
    candidate_scores: np.ndarray  # [R, N] ranking score, -inf at padding
    candidate_mask: np.ndarray  # [R, N]
    exposed: np.ndarray  # [R, M]
    position_mask: np.ndarray  # [R, M]
    click_prob: np.ndarray  # [R, M] at the logged (candidate, position)
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # [R, M]


def _pad_cat(parts: list[np.ndarray], fill: Any) -> np.ndarray:
    width = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        pad = np.full((p.shape[0], width - p.shape[1], *p.shape[2:]), fill, dtype=p.dtype)
        out.append(np.concatenate([p, pad], axis=1))
    return np.concatenate(out)


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    dataset: RerankDataset,
    decoder: str = "greedy",
    decoder_params: dict[str, Any] | None = None,
    batch_size: int = 256,
) -> Predictions:
    """Run ``model`` over ``dataset`` and decode each request's list (logged length m)."""
    model.eval()
    decoder_params = dict(decoder_params or {})
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    acc: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[np.ndarray]] = {s: [] for s in dataset.spec.labels}
    for batch in loader:
        out = model(batch)
        lengths = batch.position_mask.sum(1)
        if getattr(model, "stepwise", False):
            lists = model.generate(batch, lengths, decoder, **decoder_params)
        else:
            if decoder == "contrastive":
                decoder_params["item_repr"] = out.item_repr
            lists = decode(decoder, out.log_probs, batch.candidate_mask, lengths,
                           **decoder_params)
        if isinstance(lists, DecodedLists):
            lists = lists.lists[:, 0]  # best of K
        mass = torch.logsumexp(out.log_probs.masked_fill(~batch.position_mask[:, None, :],
                                                         float("-inf")), dim=2)
        scores = mass.masked_fill(~batch.candidate_mask, float("-inf"))
        rows, slots = torch.nonzero(lists >= 0, as_tuple=True)
        scores[rows, lists[rows, slots]] = _LIST_BONUS - slots.to(scores.dtype)
        click_logit = torch.gather(out.click_logits, 1, batch.exposed.unsqueeze(1)).squeeze(1)
        for name, value in (
            ("request_index", batch.request_index),
            ("lists", lists),
            ("candidate_scores", scores),
            ("candidate_mask", batch.candidate_mask),
            ("exposed", batch.exposed),
            ("position_mask", batch.position_mask),
            ("click_prob", torch.sigmoid(click_logit)),
        ):
            acc.setdefault(name, []).append(value.cpu().numpy())
        for s in labels:
            labels[s].append(batch.labels[s].numpy())
    return collect_predictions(acc, labels)


def collect_predictions(
    acc: dict[str, list[np.ndarray]], labels: dict[str, list[np.ndarray]]
) -> Predictions:
    """Per-batch arrays (each field's list, as ``predict`` accumulates them) padded to the
    largest n and m and concatenated."""
    return Predictions(
        request_index=np.concatenate(acc["request_index"]),
        lists=_pad_cat(acc["lists"], -1),
        candidate_scores=_pad_cat(acc["candidate_scores"], -np.inf),
        candidate_mask=_pad_cat(acc["candidate_mask"], False),
        exposed=_pad_cat(acc["exposed"], 0),
        position_mask=_pad_cat(acc["position_mask"], False),
        click_prob=_pad_cat(acc["click_prob"], 0.5),
        labels={s: _pad_cat(v, 0.0) for s, v in labels.items()},
    )


def _per_candidate(p: Predictions, values: np.ndarray) -> np.ndarray:
    """Scatter per-position values [R, M] onto their candidates [R, N] (unexposed: 0)."""
    out = np.zeros(p.candidate_mask.shape, dtype=np.float64)
    rows, slots = np.nonzero(p.position_mask)
    out[rows, p.exposed[rows, slots]] = values[rows, slots]
    return out


def offline_metrics(p: Predictions, ks: tuple[int, ...]) -> dict[str, float]:
    """AUC, GAUC, LogLoss (click at logged positions); NDCG@k, Recall@k; list gain@m."""
    clicks = p.labels["click"]
    metrics: dict[str, float] = {}
    has_both = 0 < clicks[p.position_mask].sum() < p.position_mask.sum()
    metrics["auc"] = auc(p.click_prob, clicks, p.position_mask) if has_both else float("nan")
    metrics["gauc"] = float(gauc(p.click_prob, clicks, p.position_mask))
    metrics["logloss"] = logloss(p.click_prob, clicks, p.position_mask)
    weights = {s: w for s, w in DEFAULT_GAIN_WEIGHTS.items() if s in p.labels}
    item_gain = sum(w * p.labels[s] for s, w in weights.items())
    cand_gain = _per_candidate(p, item_gain)
    cand_click = _per_candidate(p, clicks)
    scores = np.where(p.candidate_mask, p.candidate_scores, 0.0)
    for k in ks:
        metrics[f"ndcg@{k}"] = float(ndcg_at_k(scores, cand_gain, p.candidate_mask, k))
        metrics[f"recall@{k}"] = float(recall_at_k(scores, cand_click, p.candidate_mask, k))
    # Gain of the model's own list, counting only labels the logs have (unexposed items: 0).
    listed = np.maximum(p.lists, 0)
    list_mask = p.lists >= 0
    signals = {
        s: np.take_along_axis(_per_candidate(p, p.labels[s]), listed, axis=1) for s in weights
    }
    metrics["list_gain"] = float(list_gain(signals, list_mask, weights=weights))
    return metrics
