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

Logged clicks also follow position, which favours the logged order. ``clicks@k`` counts the
logged clicks of the model's top-k items whatever their position; given position propensities
(``position_propensities`` on the training split: a position-based click model fitted by EM),
``ips_clicks@k`` re-weights each by theta[new position] / theta[logged position] and
``ips_clicks_ratio@k`` divides it by the logged order's own (= 1.0 for the logged order). See
``genrerank.metrics.debiased`` for the assumptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader

from genrerank.constraints import (
    ConstraintSet,
    RequestConstraints,
    batch_item_ids,
    constraints_for_batch,
    constraints_from_config,
)
from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.data.schema import FeatureSpec
from genrerank.data.signals import click_signal, gain_weights, require_click_signal
from genrerank.decoding import DecodedLists, decode
from genrerank.metrics import (
    DEFAULT_GAIN_WEIGHTS,
    auc,
    fit_position_propensities,
    gauc,
    ips_clicks_at_k,
    ips_clicks_ratio_at_k,
    list_clicks_at_k,
    list_gain,
    logloss,
    ndcg_at_k,
    recall_at_k,
)
from genrerank.utils import distributed

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
    #: Gain weight per signal (:func:`genrerank.data.signals.gain_weights` of the data set);
    #: None = the library defaults for the built-in signals present.
    gain_weights: dict[str, float] | None = None
    #: The signal the click metrics read (:func:`genrerank.data.signals.click_signal`); they
    #: are left out when it is None or absent from ``labels``.
    click_signal: str | None = "click"
    #: With constraints: how many decoded lists break them (0 by construction); else None.
    constraint_violations: int | None = None


def _pad_cat(parts: list[np.ndarray], fill: Any) -> np.ndarray:
    width = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        pad = np.full((p.shape[0], width - p.shape[1], *p.shape[2:]), fill, dtype=p.dtype)
        out.append(np.concatenate([p, pad], axis=1))
    return np.concatenate(out)


@torch.inference_mode()
def decode_lists(
    model: torch.nn.Module,
    batch: Batch,
    decoder: str = "greedy",
    decoder_params: dict[str, Any] | None = None,
    out: Any = None,
    constraints: ConstraintSet | list[RequestConstraints | None] | None = None,
) -> torch.Tensor:
    """Each request's list ``[B, M]`` (candidate indices, -1 past its length) at the length of
    its ``position_mask``: the one decoding step that evaluation and ``rerank`` share. ``out``
    is the model's output on ``batch`` when the caller has it (matrix models decode it; the
    autoregressive model writes its lists step by step instead).

    ``constraints``: a set (compiled here, ids matched by hash) or compiled per-request
    constraints; None = a ``constraints`` entry of ``decoder_params`` (a run's
    ``decode.constraints``), if any."""
    lengths = batch.position_mask.sum(1)
    params = dict(decoder_params or {})
    default = constraints_from_config(params)
    params.pop("constraints", None)
    if constraints is None:
        constraints = default
    if isinstance(constraints, ConstraintSet):
        constraints = constraints_for_batch(constraints, batch, lengths)
    if constraints is not None:
        params["constraints"] = constraints
    if getattr(model, "stepwise", False):
        lists = model.generate(batch, lengths, decoder, **params)
    else:
        out = model(batch) if out is None else out
        extra = model.decoder_inputs(decoder, batch, out)
        lists = decode(decoder, out.log_probs, batch.candidate_mask, lengths,
                       **{**extra, **params})
    if isinstance(lists, DecodedLists):
        lists = lists.lists[:, 0]  # best of K
    return lists


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    dataset: RerankDataset,
    decoder: str = "greedy",
    decoder_params: dict[str, Any] | None = None,
    batch_size: int = 256,
    constraints: ConstraintSet | None = None,
    rows: Sequence[int] | None = None,
) -> Predictions:
    """Run ``model`` over ``dataset`` (or its requests ``rows``, in that order) and decode each
    request's list (logged length m), under ``constraints`` (or a run's
    ``decode.constraints`` in ``decoder_params``) when given: then ``constraint_violations``
    counts the lists that break them."""
    model.eval()
    decoder_params = dict(decoder_params or {})
    if constraints is None:
        constraints = constraints_from_config(decoder_params)
    decoder_params.pop("constraints", None)
    violations = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                        sampler=None if rows is None else list(rows))
    acc: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[np.ndarray]] = {s: [] for s in dataset.spec.labels}
    for batch in loader:
        out = model(batch)
        rcs = None
        if constraints is not None:
            rcs = dataset_constraints(constraints, dataset, batch)
        lists = decode_lists(model, batch, decoder, decoder_params, out, constraints=rcs)
        if rcs is not None:
            violations += count_violations(rcs, lists)
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
    preds = collect_predictions(acc, labels, dataset.spec)
    if constraints is not None:
        preds.constraint_violations = violations
    return preds


def predict_gathered(
    model: torch.nn.Module,
    dataset: RerankDataset,
    decoder: str = "greedy",
    decoder_params: dict[str, Any] | None = None,
    batch_size: int = 256,
    constraints: ConstraintSet | None = None,
) -> Predictions:
    """:func:`predict`, split among the processes of a ``torchrun`` job and gathered on each:
    rank r predicts requests r, r + W, ... (no padding), and the parts are put back in the data
    set's order, every request exactly once (a padded sampler's duplicates would bias the
    metrics). In one process it is :func:`predict`."""
    ctx = distributed.context()
    if not ctx.distributed:
        return predict(model, dataset, decoder, decoder_params, batch_size, constraints)
    shard = ctx.shard(len(dataset))
    part = None if len(shard) == 0 else predict(
        model, dataset, decoder, decoder_params, batch_size, constraints, rows=shard)
    return merge_predictions(distributed.all_gather_objects(part), len(dataset), dataset.spec)


def merge_predictions(
    parts: Sequence[Predictions | None], expected: int, spec: FeatureSpec | None = None
) -> Predictions:
    """The ranks' :class:`Predictions` as one, in request order; an error if a request is
    missing or repeated."""
    present = [p for p in parts if p is not None]
    acc: dict[str, list[np.ndarray]] = {}
    for name in ("request_index", "lists", "candidate_scores", "candidate_mask", "exposed",
                 "position_mask", "click_prob"):
        acc[name] = [getattr(p, name) for p in present]
    labels = {s: [p.labels[s] for p in present] for s in (present[0].labels if present else {})}
    merged = collect_predictions(acc, labels, spec)
    index = merged.request_index
    if len(index) != expected or len(np.unique(index)) != expected:
        raise RuntimeError(
            f"gathered predictions cover {len(np.unique(index))} distinct requests in "
            f"{len(index)} rows, expected {expected} once each"
        )
    order = np.argsort(index, kind="stable")
    for name in acc:
        setattr(merged, name, getattr(merged, name)[order])
    merged.labels = {s: v[order] for s, v in merged.labels.items()}
    violations = [p.constraint_violations for p in present if p.constraint_violations is not None]
    if violations:
        merged.constraint_violations = int(sum(violations))
    return merged


def dataset_constraints(cs: ConstraintSet, dataset: RerankDataset,
                        batch: Batch) -> list[RequestConstraints | None]:
    """``cs`` compiled for each request of a batch of ``dataset`` at its logged length (the
    position mask), with the request ids (for messages) and, when ``cs`` names items, the
    candidates' item ids."""
    ids, request_ids = batch_item_ids(dataset, batch, with_items=bool(cs.required
                                                                      or cs.forbidden))
    return constraints_for_batch(cs, batch, batch.position_mask.sum(1), item_ids=ids,
                                 request_ids=request_ids)


def count_violations(constraints: list[RequestConstraints | None],
                     lists: torch.Tensor) -> int:
    """How many of the lists ``[B, M]`` break their request's constraints."""
    rows = lists.cpu().tolist()
    return sum(1 for rc, row in zip(constraints, rows, strict=True)
               if rc is not None and rc.violations(row))


def collect_predictions(
    acc: dict[str, list[np.ndarray]], labels: dict[str, list[np.ndarray]],
    spec: FeatureSpec | None = None,
) -> Predictions:
    """Per-batch arrays (each field's list, as ``predict`` accumulates them) padded to the
    largest n and m and concatenated; ``spec`` (the data set's) names the gain weights and the
    click signal."""
    signals: dict[str, Any] = {}
    if spec is not None:
        signals = {"gain_weights": gain_weights(spec), "click_signal": click_signal(spec)}
    return Predictions(
        request_index=np.concatenate(acc["request_index"]),
        lists=_pad_cat(acc["lists"], -1),
        candidate_scores=_pad_cat(acc["candidate_scores"], -np.inf),
        candidate_mask=_pad_cat(acc["candidate_mask"], False),
        exposed=_pad_cat(acc["exposed"], 0),
        position_mask=_pad_cat(acc["position_mask"], False),
        click_prob=_pad_cat(acc["click_prob"], 0.5),
        labels={s: _pad_cat(v, 0.0) for s, v in labels.items()},
        **signals,
    )


def _per_candidate(p: Predictions, values: np.ndarray) -> np.ndarray:
    """Scatter per-position values [R, M] onto their candidates [R, N] (unexposed: 0)."""
    out = np.zeros(p.candidate_mask.shape, dtype=np.float64)
    rows, slots = np.nonzero(p.position_mask)
    out[rows, p.exposed[rows, slots]] = values[rows, slots]
    return out


def position_propensities(
    dataset: RerankDataset,
    *,
    split: str | None = "train",
    item_key: str | None = "item_id",
    max_position: int | None = None,
    iterations: int = 300,
    relevance_prior: float = 0.0,
) -> np.ndarray:
    """PBM examination propensities theta (``theta[0] == 1``) fitted on a data set's logs.

    Fit on the training split: ``position_propensities(RerankDataset(path, split="train"))``.
    Rows of other splits in ``dataset`` are skipped unless ``split`` is None. The item key is
    the ``item_id`` column (identifies an item across requests); ``item_key=None`` uses
    (request, candidate) instead, a relevance per impression under which EM cannot separate
    position from relevance, so the fit falls back to per-position CTR (with a warning).
    ``max_position`` defaults to the longest logged list; longer lists at evaluation use
    ``theta[-1]`` beyond it. ``relevance_prior``: see ``fit_position_propensities`` (for logs
    where items are seen only a few times each).
    """
    signal = require_click_signal(dataset.spec, "position_propensities")
    exposed = dataset._exposed
    lengths = np.diff(exposed.offsets)
    n_req = len(lengths)
    request = np.repeat(np.arange(n_req), lengths)
    position = np.arange(len(exposed.values)) - np.repeat(exposed.offsets[:-1], lengths)
    clicks = dataset._labels[signal].values.astype(np.float64)
    wanted = np.ones(n_req, dtype=bool)
    if split is not None:
        wanted = dataset.table.column("split").to_numpy(zero_copy_only=False) == split
    keep = wanted[request]
    if item_key is None:
        keys = np.stack([request, exposed.values], axis=1)
    else:
        ids = dataset.table.column(item_key).combine_chunks()
        cand_offsets = ids.offsets.to_numpy().astype(np.int64) - int(ids.offsets[0].as_py())
        codes = pc.dictionary_encode(ids.flatten()).indices.to_numpy(zero_copy_only=False)
        keys = codes[cand_offsets[request] + exposed.values]
    if max_position is None:
        max_position = int(lengths[wanted].max(initial=1))
    return fit_position_propensities(
        position[keep], clicks[keep], keys[keep], int(max_position), iterations,
        relevance_prior=relevance_prior,
    )


def offline_metrics(
    p: Predictions, ks: tuple[int, ...], propensities: np.ndarray | None = None
) -> dict[str, float]:
    """AUC, GAUC, LogLoss (click at logged positions); NDCG@k, Recall@k; list gain@m;
    clicks@k of the decoded list and, given ``propensities`` (theta, e.g. from
    :func:`position_propensities` on the training split), ips_clicks@k and
    ips_clicks_ratio@k.

    "Click" is ``p.click_signal`` (``click``, or e.g. ``purchase`` in a log without clicks); the
    click metrics are left out when the data set has none. Gains use ``p.gain_weights``."""
    metrics: dict[str, float] = {}
    signal = p.click_signal if p.click_signal in p.labels else None
    clicks = p.labels[signal] if signal is not None else None
    if clicks is not None:
        has_both = 0 < clicks[p.position_mask].sum() < p.position_mask.sum()
        metrics["auc"] = auc(p.click_prob, clicks, p.position_mask) if has_both \
            else float("nan")
        metrics["gauc"] = float(gauc(p.click_prob, clicks, p.position_mask))
        metrics["logloss"] = logloss(p.click_prob, clicks, p.position_mask)
    given = p.gain_weights if p.gain_weights is not None else DEFAULT_GAIN_WEIGHTS
    weights = {s: float(w) for s, w in given.items() if s in p.labels}
    item_gain = sum((w * p.labels[s] for s, w in weights.items()),
                    np.zeros(p.position_mask.shape))
    cand_gain = _per_candidate(p, item_gain)
    cand_click = _per_candidate(p, clicks) if clicks is not None else None
    scores = np.where(p.candidate_mask, p.candidate_scores, 0.0)
    for k in ks:
        metrics[f"ndcg@{k}"] = float(ndcg_at_k(scores, cand_gain, p.candidate_mask, k))
        if clicks is None:
            continue
        metrics[f"recall@{k}"] = float(recall_at_k(scores, cand_click, p.candidate_mask, k))
        metrics[f"clicks@{k}"] = float(
            list_clicks_at_k(p.lists, p.exposed, clicks, p.position_mask, k)
        )
        if propensities is not None:
            metrics[f"ips_clicks@{k}"] = float(
                ips_clicks_at_k(p.lists, p.exposed, clicks, p.position_mask, propensities, k)
            )
            metrics[f"ips_clicks_ratio@{k}"] = ips_clicks_ratio_at_k(
                p.lists, p.exposed, clicks, p.position_mask, propensities, k
            )
    # Gain of the model's own list, counting only labels the logs have (unexposed items: 0).
    listed = np.maximum(p.lists, 0)
    list_mask = p.lists >= 0
    signals = {
        s: np.take_along_axis(_per_candidate(p, p.labels[s]), listed, axis=1) for s in weights
    }
    metrics["list_gain"] = float(list_gain(signals, list_mask, weights=weights))
    return metrics
