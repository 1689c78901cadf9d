"""Torch dataset over a data set folder, and the padded batch every model consumes.

Requests differ in n (candidates) and m (exposed list length), so a batch is padded to the
largest n and m inside it and carries masks: ``candidate_mask[b, i]`` is True for a real
candidate, ``position_mask[b, j]`` for a real exposed position. Padded slots hold zeros (indices
0, features 0.0, labels 0.0); every model, loss and metric must read the masks, never the zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from genrerank.data.ids import hash_item_ids
from genrerank.data.schema import SPLITS, FeatureSpec, read_dataset


@dataclass
class Batch:
    """A padded batch. B = requests, N = max candidates, M = max list length."""

    request_index: torch.Tensor  # [B] long: row of the request in its data set
    user_cat: torch.Tensor  # [B, Fuc] long
    user_dense: torch.Tensor  # [B, Fud] float
    context_cat: torch.Tensor  # [B, Fcc] long: request context (query, device, page), 0 = unknown
    context_dense: torch.Tensor  # [B, Fcd] float
    item_cat: torch.Tensor  # [B, N, Fic] long
    item_dense: torch.Tensor  # [B, N, Fid] float
    upstream_score: torch.Tensor  # [B, N] float
    category: torch.Tensor  # [B, N] long
    creator: torch.Tensor  # [B, N] long
    is_cold_start: torch.Tensor  # [B, N] bool
    is_long_tail: torch.Tensor  # [B, N] bool
    candidate_mask: torch.Tensor  # [B, N] bool
    exposed: torch.Tensor  # [B, M] long: candidate index shown at each position
    position_mask: torch.Tensor  # [B, M] bool
    labels: dict[str, torch.Tensor]  # signal -> [B, M] float; only signals the source has
    #: [B, N, d]: precomputed request-independent item embeddings (serving's item cache), used
    #: instead of item_cat / item_dense when set. Only for the model that produced them.
    item_static: torch.Tensor | None = None
    #: [B, N] long: stable hash of each candidate's item id (:mod:`genrerank.data.ids`), for
    #: hashed item-id embeddings; 0 for padding.
    item_hash: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.candidate_mask.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                moved[f.name] = {k: v.to(device) for k, v in value.items()}
            elif isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device)
            else:  # None, or a plain number of a subclass (a rollout's group size)
                moved[f.name] = value
        return type(self)(**moved)  # subclasses (preference batches) keep their fields

    def exposed_attribute(self, values: torch.Tensor) -> torch.Tensor:
        """Gather a per-candidate tensor [B, N, ...] at the exposed positions -> [B, M, ...]."""
        index = self.exposed
        for _ in range(values.dim() - 2):
            index = index.unsqueeze(-1)
        index = index.expand(*self.exposed.shape, *values.shape[2:])
        return torch.gather(values, 1, index)


class _Ragged:
    """A list column flattened to values + offsets, for O(1) slicing per request."""

    def __init__(self, column: pa.ChunkedArray, depth: int, dtype: np.dtype, width: int = 0):
        arr = column.combine_chunks()
        self.offsets = arr.offsets.to_numpy().astype(np.int64) - int(arr.offsets[0].as_py())
        inner = arr.flatten()  # depth 2: one entry per candidate
        values = inner.flatten() if depth == 2 else inner
        flat = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        if depth == 2:
            # Rows = candidates, not flat size / width: a source with no features of this kind
            # (EB-NeRD has no item categoricals) has width 0 and an empty flat array.
            self.values = flat.reshape(len(inner), width)
        else:
            self.values = flat

    @classmethod
    def like(cls, other: _Ragged, values: np.ndarray) -> _Ragged:
        """Per-candidate ``values`` sliced with the row offsets of ``other``."""
        out = cls.__new__(cls)
        out.offsets, out.values = other.offsets, values
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def _context_column(table: pa.Table, spec: FeatureSpec, name: str) -> pa.ChunkedArray:
    """A context column; empty lists for an in-memory table built before the context columns
    existed (read_dataset adds them itself), when the spec declares no such features."""
    if name in table.column_names:
        return table.column(name)
    declared = spec.context_categorical if name == "context_cat" else spec.context_dense
    if declared:
        raise ValueError(f"table has no column {name!r} but the spec declares {len(declared)} "
                         "such feature(s)")
    value_type = pa.int32() if name == "context_cat" else pa.float32()
    return pa.chunked_array([pa.array([[]] * table.num_rows, type=pa.list_(value_type))])


class RerankDataset(Dataset):
    """Requests of one split (or all), held in memory as flat arrays."""

    def __init__(
        self,
        source: str | Path | tuple[pa.Table, FeatureSpec],
        split: str | Sequence[str] | None = None,
    ) -> None:
        table, spec = read_dataset(source) if isinstance(source, str | Path) else source
        if split is not None:
            wanted = [split] if isinstance(split, str) else list(split)
            bad = [s for s in wanted if s not in SPLITS]
            if bad:
                raise ValueError(f"unknown split(s) {bad}; choose from {SPLITS}")
            mask = np.isin(table.column("split").to_numpy(zero_copy_only=False), wanted)
            self.rows = np.flatnonzero(mask)
            table = table.filter(pa.array(mask))
        else:
            self.rows = np.arange(table.num_rows)
        self.spec = spec
        self.table = table
        self.request_ids = table.column("request_id").to_numpy(zero_copy_only=False)
        col = table.column
        self._user_cat = _Ragged(col("user_cat"), 1, np.int64)
        self._user_dense = _Ragged(col("user_dense"), 1, np.float32)
        self._context_cat = _Ragged(_context_column(table, spec, "context_cat"), 1, np.int64)
        self._context_dense = _Ragged(
            _context_column(table, spec, "context_dense"), 1, np.float32
        )
        self._item_cat = _Ragged(col("item_cat"), 2, np.int64, len(spec.item_categorical))
        self._item_dense = _Ragged(col("item_dense"), 2, np.float32, len(spec.item_dense))
        self._per_candidate = {
            "upstream_score": _Ragged(col("upstream_score"), 1, np.float32),
            "category": _Ragged(col("category"), 1, np.int64),
            "creator": _Ragged(col("creator"), 1, np.int64),
            "is_cold_start": _Ragged(col("is_cold_start"), 1, np.bool_),
            "is_long_tail": _Ragged(col("is_long_tail"), 1, np.bool_),
        }
        self._exposed = _Ragged(col("exposed"), 1, np.int64)
        self._item_hash = _Ragged.like(
            self._item_dense, hash_item_ids(col("item_id").combine_chunks().flatten())
        )
        self._labels = {s: _Ragged(col(f"label_{s}"), 1, np.float32) for s in spec.labels}

    def __len__(self) -> int:
        return len(self.rows)

    def logged_lists(self) -> np.ndarray:
        """``[R, M]`` the logged (exposed) list of every request, ``-1`` after its end;
        ``M = spec.max_list_length``."""
        out = np.full((len(self), max(self.spec.max_list_length, 1)), -1, dtype=np.int64)
        for i in range(len(self)):
            shown = self._exposed[i]
            out[i, : len(shown)] = shown
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "request_index": int(self.rows[i]),
            "user_cat": self._user_cat[i],
            "user_dense": self._user_dense[i],
            "context_cat": self._context_cat[i],
            "context_dense": self._context_dense[i],
            "item_cat": self._item_cat[i],
            "item_dense": self._item_dense[i],
            "item_hash": self._item_hash[i],
            "exposed": self._exposed[i],
            "labels": {s: r[i] for s, r in self._labels.items()},
        }
        for name, ragged in self._per_candidate.items():
            item[name] = ragged[i]
        return item


def take_rows(batch: Batch, rows: torch.Tensor, **replace: Any) -> Batch:
    """A plain :class:`Batch` of the requests ``rows`` (indices into ``batch``, repeats allowed)
    with the fields in ``replace`` swapped in, e.g. ``exposed`` / ``position_mask`` for other
    lists of the same requests."""
    picked: dict[str, Any] = {}
    for f in fields(Batch):
        if f.name in replace:
            picked[f.name] = replace[f.name]
            continue
        value = getattr(batch, f.name)
        if isinstance(value, dict):
            picked[f.name] = {k: v.index_select(0, rows) for k, v in value.items()}
        elif isinstance(value, torch.Tensor):
            picked[f.name] = value.index_select(0, rows)
        else:
            picked[f.name] = value
    return Batch(**picked)


def collate(items: Sequence[dict[str, Any]]) -> Batch:
    """Pad a list of requests (from RerankDataset) into one Batch with masks."""
    if not items:
        raise ValueError("collate: empty batch")
    b = len(items)
    n_max = max(len(it["upstream_score"]) for it in items)
    m_max = max(len(it["exposed"]) for it in items)
    fic = items[0]["item_cat"].shape[1]
    fid = items[0]["item_dense"].shape[1]

    def pad(name: str, width: int, dtype: np.dtype, trailing: tuple[int, ...] = ()) -> np.ndarray:
        out = np.zeros((b, width, *trailing), dtype=dtype)
        for k, it in enumerate(items):
            v = it[name]
            out[k, : len(v)] = v
        return out

    cand_mask = np.zeros((b, n_max), dtype=np.bool_)
    pos_mask = np.zeros((b, m_max), dtype=np.bool_)
    labels = {s: np.zeros((b, m_max), dtype=np.float32) for s in items[0]["labels"]}
    for k, it in enumerate(items):
        cand_mask[k, : len(it["upstream_score"])] = True
        m = len(it["exposed"])
        pos_mask[k, :m] = True
        for s, v in it["labels"].items():
            labels[s][k, :m] = v

    t = torch.from_numpy

    def per_request(name: str, dtype: np.dtype) -> torch.Tensor:
        # reshape(b, -1): a source without such features has width 0, not a missing axis.
        return t(np.stack([it[name] for it in items]).astype(dtype)).reshape(b, -1)

    return Batch(
        request_index=torch.tensor([it["request_index"] for it in items], dtype=torch.long),
        user_cat=per_request("user_cat", np.int64),
        user_dense=per_request("user_dense", np.float32),
        context_cat=per_request("context_cat", np.int64),
        context_dense=per_request("context_dense", np.float32),
        item_cat=t(pad("item_cat", n_max, np.int64, (fic,))),
        item_dense=t(pad("item_dense", n_max, np.float32, (fid,))),
        item_hash=t(pad("item_hash", n_max, np.int64)) if "item_hash" in items[0] else None,
        upstream_score=t(pad("upstream_score", n_max, np.float32)),
        category=t(pad("category", n_max, np.int64)),
        creator=t(pad("creator", n_max, np.int64)),
        is_cold_start=t(pad("is_cold_start", n_max, np.bool_)),
        is_long_tail=t(pad("is_long_tail", n_max, np.bool_)),
        candidate_mask=t(cand_mask),
        exposed=t(pad("exposed", m_max, np.int64)),
        position_mask=t(pos_mask),
        labels={s: t(v) for s, v in labels.items()},
    )
