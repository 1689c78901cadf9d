"""Preference pairs of lists: the file the near-line job writes, the rule that picks its pairs,
and the torch data set DPO trains on.

File (Parquet, one row per request, written atomically like a data set)::

    request_id   string              the request in the data set folder it was made from
    split        string              train or valid (test requests are never paired)
    lists        list<list<int32>>   the K scored lists (candidate indices, request's length)
    generators   list<string>        which generator proposed each list
    reward       list<float64>       the list reward of each list (weighted sum of the terms)
    reward_<t>   list<float64>       each reward term t, unweighted (to re-weight without
                                     re-generating: :func:`reselect_pairs`)
    pairs        list<list<int32>>   (winner, loser) indices into ``lists``

The schema metadata ``genrerank.pairs`` (JSON) records the reward config and its source, the
generator and evaluator runs, the data folder and the pair rule. A reward that comes from the
simulator's oracle is refused on reading (:func:`read_pairs`): the oracle evaluates, it never
trains.

Pair rule (:func:`select_pairs`): the request's best list is the winner; every list whose reward
is more than ``delta`` below it and that differs from it in at least ``min_diff`` slots is a
loser (re-ranked lists of one request share most items, and pairs that differ in one swap are
where DPO's "likelihood displacement" is worst); the ``max_pairs`` losers closest in reward to
the winner are kept (the hardest pairs the margin allows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.utils.io import write_table_atomic

PAIRS_FORMAT = 1
META_KEY = b"genrerank.pairs"
#: Reward sources that may train a model (see :mod:`genrerank.rewards`).
TRAINING_SOURCES = ("evaluator", "logged")
REQUIRED_COLUMNS = ("request_id", "split", "lists", "generators", "reward", "pairs")


@dataclass
class PairRule:
    """How pairs are chosen among a request's scored lists (see the module docstring)."""

    delta: float = 0.1
    max_pairs: int = 4
    min_diff: int = 2

    def __post_init__(self) -> None:
        if not (np.isfinite(self.delta) and self.delta >= 0):
            raise ValueError(f"pairs: delta must be >= 0, got {self.delta}")
        if self.max_pairs < 1:
            raise ValueError(f"pairs: max_pairs must be >= 1, got {self.max_pairs}")
        if self.min_diff < 1:
            raise ValueError(f"pairs: min_diff must be >= 1, got {self.min_diff}")


def select_pairs(rewards: np.ndarray, lists: Sequence[np.ndarray], rule: PairRule
                 ) -> list[tuple[int, int]]:
    """(winner, loser) pairs of one request's lists under ``rule``; ``[]`` when none qualifies."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.size < 2 or not np.isfinite(rewards).any():
        return []
    best = int(np.nanargmax(np.where(np.isfinite(rewards), rewards, -np.inf)))
    winner = np.asarray(lists[best])
    losers = []
    for k, r in enumerate(rewards):
        if k == best or not np.isfinite(r) or r >= rewards[best] - rule.delta:
            continue
        other = np.asarray(lists[k])
        width = max(len(winner), len(other))
        a = np.pad(winner, (0, width - len(winner)), constant_values=-1)
        b = np.pad(other, (0, width - len(other)), constant_values=-1)
        if int((a != b).sum()) >= rule.min_diff:
            losers.append(k)
    losers.sort(key=lambda k: (-rewards[k], k))  # closest first; ties: proposal order
    return [(best, k) for k in losers[: rule.max_pairs]]


def pairs_table(rows: Sequence[Mapping[str, Any]], term_names: Sequence[str]) -> pa.Table:
    """The pairs table of per-request rows (keys: the columns of the module docstring, with
    ``terms`` a mapping term -> per-list values)."""
    columns: dict[str, pa.Array] = {
        "request_id": pa.array([str(r["request_id"]) for r in rows], pa.string()),
        "split": pa.array([r["split"] for r in rows], pa.string()),
        "lists": pa.array([[list(map(int, x)) for x in r["lists"]] for r in rows],
                          pa.list_(pa.list_(pa.int32()))),
        "generators": pa.array([list(r["generators"]) for r in rows], pa.list_(pa.string())),
        "reward": pa.array([list(map(float, r["reward"])) for r in rows],
                           pa.list_(pa.float64())),
    }
    for name in term_names:
        columns[f"reward_{name}"] = pa.array([list(map(float, r["terms"][name])) for r in rows],
                                             pa.list_(pa.float64()))
    columns["pairs"] = pa.array([[list(p) for p in r["pairs"]] for r in rows],
                                pa.list_(pa.list_(pa.int32())))
    return pa.table(columns)


def write_pairs(table: pa.Table, meta: Mapping[str, Any], out_file: str | Path,
                overwrite: bool = False) -> Path:
    """Write a pairs table with its metadata, atomically (the old file or the new, never half)."""
    full = {"format": PAIRS_FORMAT, **meta}
    table = table.replace_schema_metadata({META_KEY: json.dumps(full).encode()})
    return write_table_atomic(table, out_file, overwrite=overwrite)


def read_pairs(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """``(table, metadata)`` of a pairs file; one-line errors for a file that is not one, or
    whose reward came from a source that may not train (the oracle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: no genrerank.pairs metadata; write pairs with "
                         "`genrerank nearline`")
    meta = json.loads(raw)
    if meta.get("format") != PAIRS_FORMAT:
        raise ValueError(f"{path}: pairs format {meta.get('format')!r}, this genrerank reads "
                         f"{PAIRS_FORMAT}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    source = meta.get("reward_source")
    if source not in TRAINING_SOURCES:
        raise ValueError(f"{path}: the lists were scored by the {source!r} reward, which may not "
                         f"train a model (allowed: {list(TRAINING_SOURCES)}); the simulator's "
                         "oracle is for evaluation only")
    return table, meta


def term_names(table: pa.Table) -> list[str]:
    return [c[len("reward_"):] for c in table.column_names if c.startswith("reward_")]


def reselect_pairs(table: pa.Table, weights: Mapping[str, float], rule: PairRule) -> pa.Table:
    """The same lists with rewards recomputed from the stored terms under other ``weights``,
    and pairs chosen again (a Pareto sweep without re-generating lists)."""
    names = term_names(table)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"pairs: no stored reward term(s) {unknown}; the file has {names}")
    terms = {n: table.column(f"reward_{n}").to_pylist() for n in names}
    lists = table.column("lists").to_pylist()
    rewards, pairs = [], []
    for i, request_lists in enumerate(lists):
        total = np.zeros(len(request_lists))
        for name, w in weights.items():
            total += float(w) * np.asarray(terms[name][i], dtype=np.float64)
        rewards.append(total.tolist())
        pairs.append([list(p) for p in select_pairs(total, request_lists, rule)])
    out = table.set_column(table.column_names.index("reward"), "reward",
                           pa.array(rewards, pa.list_(pa.float64())))
    return out.set_column(out.column_names.index("pairs"), "pairs",
                          pa.array(pairs, pa.list_(pa.list_(pa.int32()))))


@dataclass
class PreferenceBatch(Batch):
    """A batch of P preference pairs as 2P lists: rows ``0..P-1`` hold the winners, rows
    ``P..2P-1`` the losers of the same requests (same order). ``exposed`` / ``position_mask``
    are the lists; ``ref_log_prob [2P]`` their log-probability under the frozen reference."""

    pairs: int = 0
    ref_log_prob: torch.Tensor | None = None
    reward: torch.Tensor | None = None  # [2P] the lists' rewards (reported, not trained on)


class PairDataset(Dataset):
    """The pairs of one split of a pairs file, joined with the requests they were made from.

    Item i is pair i; :attr:`collate_fn` batches items as a :class:`PreferenceBatch`. The
    reference log-probabilities are filled in by the fine-tuning job
    (:meth:`set_reference_log_probs`) before training.
    """

    def __init__(self, requests: RerankDataset, table: pa.Table, split: str) -> None:
        self.requests = requests
        rows = table.filter(pc.equal(table.column("split"), split))
        position = {str(rid): i for i, rid in enumerate(requests.request_ids)}
        ids = rows.column("request_id").to_pylist()
        missing = [rid for rid in ids if rid not in position]
        if missing:
            raise ValueError(f"pairs: {len(missing)} {split} request(s) are not in the data set's "
                             f"{split} split (first: {missing[0]!r}); pair lists and data must "
                             "come from the same folder")
        lists = rows.column("lists").to_pylist()
        rewards = rows.column("reward").to_pylist()
        self.request: list[int] = []
        self.winner: list[np.ndarray] = []
        self.loser: list[np.ndarray] = []
        self.rewards: list[tuple[float, float]] = []
        for rid, request_lists, request_rewards, request_pairs in zip(
                ids, lists, rewards, rows.column("pairs").to_pylist(), strict=True):
            n = len(requests[position[rid]]["upstream_score"])  # its candidates
            for w, lo in request_pairs:
                win, lose = np.asarray(request_lists[w]), np.asarray(request_lists[lo])
                if win.size == 0 or lose.size == 0 or max(win.max(), lose.max()) >= n \
                        or min(win.min(), lose.min()) < 0:
                    raise ValueError(f"pairs: request {rid!r} has a list outside its {n} "
                                     "candidates, or an empty one")
                self.request.append(position[rid])
                self.winner.append(win.astype(np.int64))
                self.loser.append(lose.astype(np.int64))
                self.rewards.append((request_rewards[w], request_rewards[lo]))
        self.ref_log_probs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.request)

    def set_reference_log_probs(self, values: np.ndarray) -> None:
        """``[P, 2]`` (winner, loser) log-probabilities under the frozen reference."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(self), 2) or not np.isfinite(values).all():
            raise ValueError(f"reference log-probs must be finite, shape {(len(self), 2)}; got "
                             f"{values.shape}")
        self.ref_log_probs = values

    def __getitem__(self, i: int) -> dict[str, Any]:
        ref = (np.zeros(2, np.float32) if self.ref_log_probs is None
               else self.ref_log_probs[i])
        return {"request": self.requests[self.request[i]], "winner": self.winner[i],
                "loser": self.loser[i], "ref": ref, "reward": self.rewards[i]}

    @staticmethod
    def collate_fn(items: Sequence[dict[str, Any]]) -> PreferenceBatch:
        """Winners first, then losers; logged labels are dropped (the pair is the label)."""
        lists = [{**it["request"], "exposed": it[side], "labels": {}}
                 for side in ("winner", "loser") for it in items]
        batch = collate(lists)
        ref = np.array([it["ref"][s] for s in (0, 1) for it in items], dtype=np.float32)
        reward = np.array([it["reward"][s] for s in (0, 1) for it in items], dtype=np.float32)
        return PreferenceBatch(**{f: getattr(batch, f) for f in batch.__dataclass_fields__},
                               pairs=len(items), ref_log_prob=torch.from_numpy(ref),
                               reward=torch.from_numpy(reward))
