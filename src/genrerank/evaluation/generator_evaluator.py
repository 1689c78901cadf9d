"""Evaluating the generator-evaluator pipeline: what it serves, and how that grows with K.

:func:`evaluate_pipeline` runs a :class:`~genrerank.pipeline.Pipeline` over a split and reports
the usual offline metrics (the served lists; click probabilities from the evaluator's click head
at the logged positions) and, on simulator data, the oracle's expected gain and headroom, plus
two diagnostics: the best of the proposed lists under the oracle ("oracle pick", what a perfect
evaluator would serve) and the number of distinct lists proposed.

:func:`k_curve` repeats that for K = 1, 2, 4, ... per generator family, to show where more
proposals stop paying. Only the test split is read; nothing is selected on it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.signals import click_signal
from genrerank.evaluation.offline import (
    _LIST_BONUS,
    Predictions,
    collect_predictions,
    offline_metrics,
)
from genrerank.evaluation.online import headroom_captured
from genrerank.pipeline import ListGenerator, Pipeline, Reranked

#: K values of the K curve (powers of two up to 64).
K_VALUES = (1, 2, 4, 8, 16, 32, 64)


def _served(pipe: Pipeline, dataset: RerankDataset, batch_size: int,
            oracle: Any | None = None) -> tuple[Predictions, dict[str, np.ndarray]]:
    """The pipeline's lists as Predictions; with ``oracle = (sim, state)`` also the oracle gain
    of every proposal (for the oracle pick). Lists have each request's logged length."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    acc: dict[str, list[np.ndarray]] = {}
    extra: dict[str, list[np.ndarray]] = {"oracle_best": [], "distinct": []}
    labels: dict[str, list[np.ndarray]] = {s: [] for s in dataset.spec.labels}
    signal = click_signal(dataset.spec)  # the evaluator's head for the click metrics
    start = 0
    for batch in loader:
        lengths = batch.position_mask.sum(1)
        served: Reranked = pipe.rerank(batch, lengths)
        lists = served.lists
        # Ranking scores for top-k metrics beyond m: the served list, then upstream order.
        scores = batch.upstream_score.float().masked_fill(~batch.candidate_mask, float("-inf"))
        rows, slots = torch.nonzero(lists >= 0, as_tuple=True)
        scores[rows, lists[rows, slots]] = _LIST_BONUS - slots.float()
        with torch.inference_mode():
            logits = pipe.evaluator(batch).signal_logits  # type: ignore[misc]
        click = torch.sigmoid(logits[signal]) if signal in logits else torch.full(
            batch.position_mask.shape, 0.5)
        for name, value in (("request_index", batch.request_index), ("lists", lists),
                            ("candidate_scores", scores),
                            ("candidate_mask", batch.candidate_mask),
                            ("exposed", batch.exposed), ("position_mask", batch.position_mask),
                            ("click_prob", click)):
            acc.setdefault(name, []).append(value.cpu().numpy())
        for s in labels:
            labels[s].append(batch.labels[s].numpy())
        valid = served.proposals.valid
        extra["distinct"].append(valid.sum(1).numpy())
        if oracle is not None:
            sim, state = oracle
            b, k, m = served.proposals.lists.shape
            idx = np.arange(start, start + b)
            sub = state.take(idx)
            flat = served.proposals.lists.reshape(b * k, m).numpy()
            rep = sub.take(np.repeat(np.arange(b), k))
            gains = sim.expected_gain(rep, np.maximum(flat, 0), flat >= 0).reshape(b, k)
            gains = np.where(valid.numpy(), gains, -np.inf)
            extra["oracle_best"].append(gains.max(1))
        start += batch.batch_size
    preds = collect_predictions(acc, labels, dataset.spec)
    return preds, {k: np.concatenate(v) for k, v in extra.items() if v}


def _oracle(dataset: RerankDataset) -> tuple[Any, Any]:
    from genrerank.data.simulator import Simulator, request_index

    sim = Simulator.from_spec(dataset.spec)
    return sim, sim.requests(request_index(dataset.request_ids))


def evaluate_pipeline(
    pipe: Pipeline,
    dataset: RerankDataset,
    batch_size: int = 256,
    upper_bound_beam_width: int = 16,
    name: str = "generator-evaluator",
) -> dict[str, Any]:
    """Offline metrics of the served lists; online ones under the oracle for simulator data."""
    from genrerank.experiment import online_metrics, top_k_cutoffs

    simulated = "simulator" in dataset.spec.extra
    oracle = _oracle(dataset) if simulated else None
    preds, extra = _served(pipe, dataset, batch_size, oracle)
    result: dict[str, Any] = {
        "requests": len(dataset),
        "generators": [g.label for g in pipe.generators],
        "counts": [g.count for g in pipe.generators],
        "lists_proposed": pipe.total_lists,
        "distinct_lists_mean": float(extra["distinct"].mean()),
        "offline": offline_metrics(preds, top_k_cutoffs(dataset)),
    }
    if oracle is not None:
        online = online_metrics(dataset, preds, name, upper_bound_beam_width)
        best = float(extra["oracle_best"].mean())
        online["oracle_pick_expected_gain"] = best
        online["oracle_pick_headroom_captured"] = headroom_captured(
            best, online["logging_expected_gain"], online["upper_bound_expected_gain"])
        result["online"] = online
    return result


def split_counts(total: int, generators: Sequence[ListGenerator]) -> list[int]:
    """Share ``total`` proposals among generators round-robin, in order; a generator that can
    only make one list (the upstream order) gets at most one."""
    counts = [0] * len(generators)
    caps = [1 if g.type == "logging" else total for g in generators]
    given = 0
    while given < total:
        before = given
        for i in range(len(generators)):
            if given < total and counts[i] < caps[i]:
                counts[i] += 1
                given += 1
        if given == before:
            break
    return counts


def with_counts(generators: Sequence[ListGenerator], counts: Sequence[int]) -> list[ListGenerator]:
    out = []
    for gen, count in zip(generators, counts, strict=True):
        if count > 0:
            clone = copy.copy(gen)  # shares the model; only the count differs
            clone.count = count
            out.append(clone)
    return out


def k_curve(
    dataset: RerankDataset,
    families: Mapping[str, Sequence[ListGenerator]],
    evaluator: torch.nn.Module,
    ks: Sequence[int] = K_VALUES,
    batch_size: int = 256,
    upper_bound_beam_width: int = 16,
) -> dict[str, Any]:
    """Served (evaluator's pick) and oracle-pick expected gain for each family and K.

    Returns ``{"logging_expected_gain", "upper_bound_expected_gain", "families": {family:
    [{"k", "expected_gain", "headroom_captured", "oracle_pick_expected_gain",
    "oracle_pick_headroom_captured", "distinct_lists_mean"}, ...]}}``.
    """
    if "simulator" not in dataset.spec.extra:
        raise ValueError("k_curve needs simulator data (the oracle scores every list)")
    sim, state = _oracle(dataset)
    _, upper = sim.upper_bound(state, beam_width=upper_bound_beam_width)
    upper_gain = float(upper.mean())
    logged_gain: float | None = None
    out: dict[str, Any] = {"ks": list(ks), "families": {}}
    for family, generators in families.items():
        rows = []
        for k in ks:
            pipe = Pipeline(with_counts(generators, split_counts(k, generators)), evaluator)
            preds, extra = _served(pipe, dataset, batch_size, (sim, state))
            if logged_gain is None:
                logged = np.where(preds.position_mask, preds.exposed, -1)
                logged_gain = float(sim.expected_gain(state, np.maximum(logged, 0),
                                                      logged >= 0).mean())
            gain = float(sim.expected_gain(state, np.maximum(preds.lists, 0),
                                           preds.lists >= 0).mean())
            best = float(extra["oracle_best"].mean())
            rows.append({
                "k": k,
                "expected_gain": gain,
                "headroom_captured": headroom_captured(gain, logged_gain, upper_gain),
                "oracle_pick_expected_gain": best,
                "oracle_pick_headroom_captured": headroom_captured(best, logged_gain, upper_gain),
                "distinct_lists_mean": float(extra["distinct"].mean()),
            })
        out["families"][family] = rows
    out["logging_expected_gain"] = logged_gain
    out["upper_bound_expected_gain"] = upper_gain
    out["upper_bound_beam_width"] = upper_bound_beam_width
    return out


def evaluate_pipeline_config(
    config: str | Path,
    data_dir: str | Path,
    out_file: str | Path | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """What ``genrerank evaluate --pipeline CONFIG`` does: build, run on ``split``, save."""
    from genrerank.utils.io import atomic_write_json

    pipe = Pipeline.from_config(config)
    if pipe.evaluator is None:
        raise ValueError(f"{config}: the pipeline needs an 'evaluator' run to choose lists")
    dataset = RerankDataset(data_dir, split=split)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: the {split!r} split is empty")
    result = {"pipeline": str(config), "data": str(data_dir), "split": split,
              **evaluate_pipeline(pipe, dataset)}
    if out_file is not None:
        atomic_write_json(out_file, result)
    return result
