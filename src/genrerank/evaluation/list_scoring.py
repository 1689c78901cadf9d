"""How good is a list evaluator? Item-level fit on logs, and list ranking under the oracle.

An evaluator (a model with ``kind == "evaluator"`` and ``score_lists``) is used to pick the best
of K candidate lists, so what matters is whether it ORDERS lists of one request as the true user
model does. Two views:

- **Logs** (any data set): per-item AUC and LogLoss of each predicted signal at the logged
  positions, and the Spearman correlation between the evaluator's score of each logged list and
  the list gain its logged labels give (noisy: one sampled outcome per list).
- **Oracle** (simulator data only): K candidate lists per request from cheap generators (the
  logged list, the upstream order, MMR at a few diversity weights, perturbations of the upstream
  order: adjacent swaps, random swaps inside the top m, swaps that bring in a candidate from
  beyond position m, and a few uniformly random lists). Each list is scored by the evaluator and
  by the oracle's exact expected gain. Reported: Spearman rank correlation pooled over all lists
  (easy: it rewards telling good requests from bad ones), the mean **within-request** Spearman
  (the one that matters for picking the best of K), and the oracle gain of the list the
  evaluator ranks first against the best of the K lists, the logged list, the upstream list and
  a random pick among the K.

Lists are m long with m = the request's logged list length; generation is seeded, so a call with
the same model, data and seed gives the same numbers.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch.utils.data import DataLoader

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.losses.base import list_utility
from genrerank.metrics import auc, logloss
from genrerank.models.heuristics import mmr, upstream_order

#: Default diversity weights of the MMR lists.
MMR_DIVERSITY = (0.2, 0.5, 0.8)


def _family(name: str) -> str:
    """Generator family of a list name (``bring_in_3`` -> ``bring_in``)."""
    head, _, tail = name.rpartition("_")
    return head if tail.isdigit() else name


def generator_names(
    mmr_diversity: tuple[float, ...] = MMR_DIVERSITY,
    adjacent_swaps: int = 3,
    random_swaps: int = 3,
    bring_ins: int = 6,
    random_lists: int = 3,
) -> list[str]:
    """Names of the K lists :func:`candidate_lists` builds, in order."""
    return (
        ["logged", "upstream"]
        + [f"mmr_{d:g}" for d in mmr_diversity]
        + [f"adjacent_swap_{i}" for i in range(adjacent_swaps)]
        + [f"random_swap_{i}" for i in range(random_swaps)]
        + [f"bring_in_{i}" for i in range(bring_ins)]
        + [f"random_{i}" for i in range(random_lists)]
    )


def candidate_lists(
    batch: Batch,
    rng: np.random.Generator,
    mmr_diversity: tuple[float, ...] = MMR_DIVERSITY,
    adjacent_swaps: int = 3,
    random_swaps: int = 3,
    bring_ins: int = 6,
    random_lists: int = 3,
) -> np.ndarray:
    """``[B, K, M]`` candidate lists (``-1`` = empty slot) in :func:`generator_names` order.

    Request b's lists have its logged length m_b. Perturbations start from the upstream order:
    one adjacent swap; one swap of two random positions; one random position replaced by a
    random candidate ranked beyond m_b (an item the upstream list does not show). Where a
    request is too small for a perturbation (m_b = 1, or n_b = m_b for a bring-in) the list
    falls back to a random swap, or to the upstream order.
    """
    scores = batch.upstream_score.cpu().numpy()
    cand_mask = batch.candidate_mask.cpu().numpy()
    category = batch.category.cpu().numpy()
    exposed = batch.exposed.cpu().numpy()
    pos_mask = batch.position_mask.cpu().numpy()
    b, big_m = exposed.shape
    lengths = pos_mask.sum(1)
    n_cands = cand_mask.sum(1)

    def cut(lists: np.ndarray) -> np.ndarray:  # each request keeps its own length
        return np.where(np.arange(big_m)[None, :] < lengths[:, None], lists, -1)

    upstream = cut(upstream_order(scores, cand_mask, big_m))
    out = [cut(np.where(pos_mask, exposed, -1)), upstream]
    out += [cut(mmr(scores, category, cand_mask, big_m, d)) for d in mmr_diversity]

    def perturbed(kind: str) -> np.ndarray:
        lists = upstream.copy()
        for r in range(b):
            m, n = int(lengths[r]), int(n_cands[r])
            row = lists[r]
            if kind == "bring_in" and n > m:
                row[rng.integers(m)] = m + rng.integers(n - m)
            elif kind == "adjacent" and m > 1:
                i = rng.integers(m - 1)
                row[[i, i + 1]] = row[[i + 1, i]]
            elif m > 1:  # random swap (also the fallback of a bring-in when n = m)
                i, j = rng.choice(m, size=2, replace=False)
                row[[i, j]] = row[[j, i]]
        return lists

    out += [perturbed("adjacent") for _ in range(adjacent_swaps)]
    out += [perturbed("swap") for _ in range(random_swaps)]
    out += [perturbed("bring_in") for _ in range(bring_ins)]
    for _ in range(random_lists):
        lists = np.full((b, big_m), -1, dtype=np.int64)
        for r in range(b):
            m, n = int(lengths[r]), int(n_cands[r])
            lists[r, :m] = rng.choice(n, size=m, replace=False)
        out.append(lists)
    return np.stack(out, axis=1).astype(np.int64)


def _loader(dataset: RerankDataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                      num_workers=0)


def _within_request_spearman(scores: np.ndarray, gains: np.ndarray, valid: np.ndarray
                             ) -> tuple[float, int]:
    """Mean over requests of the Spearman correlation of their lists' scores and gains, and
    the number of requests where it is defined (>= 3 lists, neither side constant)."""
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: undefined, skipped below
        for s, g, v in zip(scores, gains, valid, strict=True):
            if v.sum() < 3 or np.ptp(s[v]) == 0 or np.ptp(g[v]) == 0:
                continue
            rho = stats.spearmanr(s[v], g[v]).statistic
            if np.isfinite(rho):
                values.append(float(rho))
    return (float(np.mean(values)) if values else float("nan")), len(values)


def _pooled_spearman(scores: np.ndarray, gains: np.ndarray, valid: np.ndarray) -> float:
    if valid.sum() < 3:
        return float("nan")
    return float(stats.spearmanr(scores[valid], gains[valid]).statistic)


def _none_if_nan(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


@torch.inference_mode()
def log_metrics(model: torch.nn.Module, dataset: RerankDataset, batch_size: int = 256
                ) -> dict[str, Any]:
    """Per-item AUC / LogLoss of each signal at the logged positions, the mean predicted vs.
    observed rate, and the Spearman correlation of logged-list scores with logged list gains."""
    model.eval()
    probs: dict[str, list[np.ndarray]] = {s: [] for s in model.signals}
    labels: dict[str, list[np.ndarray]] = {s: [] for s in model.signals}
    masks: list[np.ndarray] = []
    list_scores, list_gains = [], []
    for batch in _loader(dataset, batch_size):
        out = model(batch)
        mask = batch.position_mask
        masks.append(mask.numpy().reshape(-1))
        for s in model.signals:
            probs[s].append(torch.sigmoid(out.signal_logits[s]).numpy().reshape(-1))
            lab = batch.labels.get(s, torch.zeros_like(batch.position_mask, dtype=torch.float))
            labels[s].append((lab > 0).numpy().reshape(-1))
        logged = torch.where(mask, batch.exposed, -1).unsqueeze(1)
        list_scores.append(model.score_lists(batch, logged)[:, 0].numpy())
        list_gains.append(list_utility(batch, model.gain_weights).numpy())
    mask = np.concatenate(masks)
    signals: dict[str, Any] = {}
    for s in model.signals:
        if s not in dataset.spec.labels:
            continue
        p, y = np.concatenate(probs[s]), np.concatenate(labels[s])
        try:
            value = auc(p, y, mask)
        except ValueError:  # one class only: AUC undefined
            value = float("nan")
        signals[s] = {
            "auc": _none_if_nan(value),
            "logloss": _none_if_nan(logloss(p, y, mask)),
            "mean_predicted": float(p[mask].mean()),
            "mean_observed": float(y[mask].mean()),
        }
    scores, gains = np.concatenate(list_scores), np.concatenate(list_gains)
    valid = np.isfinite(scores)
    return {
        "signals": signals,
        "logged_list_spearman": _none_if_nan(_pooled_spearman(scores, gains, valid)),
    }


@torch.inference_mode()
def oracle_metrics(
    model: torch.nn.Module,
    dataset: RerankDataset,
    seed: int = 0,
    batch_size: int = 256,
    **generators: Any,
) -> dict[str, Any]:
    """Evaluator vs. the simulator's exact expected gain on K generated lists per request
    (see the module docstring); ``generators`` go to :func:`candidate_lists`."""
    from genrerank.data.simulator import Simulator, request_index

    model.eval()
    sim = Simulator.from_spec(dataset.spec)
    state = sim.requests(request_index(dataset.request_ids))  # dataset order = loader order
    names = generator_names(**generators)
    k = len(names)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"score": [], "score_undiscounted": [], "gain": [],
                                          "valid": []}
    start = 0
    for batch in _loader(dataset, batch_size):
        lists = candidate_lists(batch, rng, **generators)  # [B, K, M]
        b, _, big_m = lists.shape
        lists_t = torch.from_numpy(lists)
        parts["score"].append(model.score_lists(batch, lists_t).numpy())
        parts["score_undiscounted"].append(
            model.score_lists(batch, lists_t, discount=False).numpy())
        rows = np.repeat(np.arange(start, start + b), k)
        flat = lists.reshape(b * k, big_m)
        gain = sim.expected_gain(state.take(rows), np.maximum(flat, 0), flat >= 0)
        parts["gain"].append(gain.reshape(b, k))
        parts["valid"].append((lists >= 0).any(-1))
        start += b
    score, score_u, gain, valid = (np.concatenate(parts[key]) for key in
                                   ("score", "score_undiscounted", "gain", "valid"))
    rows = np.arange(len(gain))

    def ranking(s: np.ndarray) -> dict[str, Any]:
        within, count = _within_request_spearman(s, gain, valid)
        pick = np.argmax(np.where(valid, s, -np.inf), axis=1)
        best = np.where(valid, gain, -np.inf).max(1)
        return {
            "spearman_pooled": _none_if_nan(_pooled_spearman(s, gain, valid)),
            "spearman_within_request": _none_if_nan(within),
            "spearman_within_request_n": count,
            "evaluator_pick_gain": float(gain[rows, pick].mean()),
            "pick_is_best_rate": float(np.mean(gain[rows, pick] >= best - 1e-9)),
            "picked_family_share": _shares([_family(names[i]) for i in pick]),
        }

    main = ranking(score)
    best = np.where(valid, gain, -np.inf).max(1)
    logged, upstream = gain[:, 0], gain[:, 1]
    mean_k = np.where(valid, gain, 0.0).sum(1) / np.maximum(valid.sum(1), 1)
    pick = main["evaluator_pick_gain"]
    span = float(best.mean() - logged.mean())
    undiscounted = ranking(score_u)
    families: dict[str, dict[str, float]] = {}
    for family in dict.fromkeys(_family(n) for n in names):
        cols = [i for i, n in enumerate(names) if _family(n) == family]
        families[family] = {"oracle_gain": float(gain[:, cols].mean()),
                            "evaluator_score": float(score[:, cols].mean())}
    return {
        "requests": len(gain),
        "lists_per_request": k,
        "generators": {f: sum(_family(n) == f for n in names)
                       for f in dict.fromkeys(map(_family, names))},  # family -> lists
        "seed": seed,
        **{key: v for key, v in main.items()},
        "best_of_k_gain": float(best.mean()),
        "logged_gain": float(logged.mean()),
        "upstream_gain": float(upstream.mean()),
        "random_pick_gain": float(mean_k.mean()),
        # Share of the logged -> best-of-K gap the evaluator's pick closes.
        "pick_gap_captured": _none_if_nan((pick - logged.mean()) / span if span > 0 else np.nan),
        "by_family": families,
        "undiscounted_score": {key: undiscounted[key] for key in
                               ("spearman_pooled", "spearman_within_request",
                                "evaluator_pick_gain", "pick_is_best_rate")},
    }


def _shares(labels: list[str]) -> dict[str, float]:
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {str(v): float(c / len(labels)) for v, c in zip(values, counts, strict=True)}


def evaluate_list_scorer(
    model: torch.nn.Module,
    dataset: RerankDataset,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Everything above for one data set split: ``{"requests", "offline", "oracle"?}``
    (``oracle`` only for simulator data)."""
    if getattr(model, "kind", None) != "evaluator" or not hasattr(model, "score_lists"):
        raise ValueError(f"evaluate_list_scorer needs a list evaluator, got {type(model).__name__}")
    if len(dataset) == 0:
        raise ValueError("evaluate_list_scorer: empty data set")
    result: dict[str, Any] = {"requests": len(dataset),
                              "offline": log_metrics(model, dataset, batch_size)}
    if "simulator" in dataset.spec.extra:
        result["oracle"] = oracle_metrics(model, dataset, seed=seed, batch_size=batch_size)
    return result
