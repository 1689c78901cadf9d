"""Build a requests table column-wise from flat numpy / Arrow arrays.

:class:`Requests` holds per-request arrays (length R) and flat per-candidate arrays (sum(n) rows,
requests contiguous, in candidate order) plus the exposed lists and labels (sum(m) rows, display
order). :meth:`Requests.to_table` turns them into the format's Arrow table without a Python loop
over requests, which is what makes converting millions of impressions fast. For a handful of
requests, :func:`genrerank.data.schema.table_from_rows` (one dict per request) is simpler.

Example, two requests of 3 and 2 candidates::

    reqs = Requests(
        request_id=["r1", "r2"], time=[100, 200], user_id=["u1", "u2"],
        split=["train", "test"], user_cat=np.zeros((2, 0)), user_dense=np.zeros((2, 0)),
        n=[3, 2], item_id=["a", "b", "c", "a", "d"],
        item_cat=np.zeros((5, 0)), item_dense=np.zeros((5, 0)),
        upstream_score=[0.9, 0.5, 0.1, 0.8, 0.2],
        category=np.zeros(5), creator=np.zeros(5),
        is_cold_start=np.zeros(5, bool), is_long_tail=np.zeros(5, bool),
        m=[2, 1], exposed=[1, 0, 0], labels={"click": [1, 0, 0]},
    )
    table = reqs.to_table(spec)   # then schema.write_dataset(out, table, spec)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from genrerank.data.schema import FeatureSpec, arrow_schema

__all__ = ["Requests", "list_array", "matrix_array"]


def list_array(
    values: pa.Array | pa.ChunkedArray | np.ndarray | Any, lengths: np.ndarray,
    value_type: pa.DataType,
) -> pa.Array:
    """``list<value_type>`` from flat ``values`` and per-row ``lengths`` (zero copy where the
    types agree; a large list only when the values overflow int32 offsets)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif not isinstance(values, pa.Array):
        values = pa.array(values, type=value_type)
    if values.type != value_type:
        values = values.cast(value_type)
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


def matrix_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """``list<list<value_type>>`` from a (sum(lengths), k) matrix: k values per candidate."""
    values = np.asarray(values)
    k = values.shape[1]
    inner = list_array(values.reshape(-1), np.full(values.shape[0], k), value_type)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _per_request(values: Any, r: int, dtype: type) -> np.ndarray:
    """An (R, k) matrix; None means no features (k = 0)."""
    if values is None:
        return np.zeros((r, 0), dtype=dtype)
    return np.asarray(values, dtype=dtype).reshape(r, -1)


@dataclass
class Requests:
    """Column-wise requests: per-request arrays (length R) and flat per-candidate arrays.

    Candidate arrays hold sum(n) rows in candidate order (by upstream score, highest first, as
    the format requires); ``exposed`` and ``labels`` hold sum(m) rows in display order, with
    ``exposed`` the candidate index within the request. Ids may be numpy arrays, Python lists or
    Arrow arrays (Arrow string arrays avoid copying millions of ids).
    """

    request_id: pa.Array | np.ndarray
    time: np.ndarray
    user_id: pa.Array | np.ndarray
    split: np.ndarray
    user_cat: np.ndarray  # (R, k) int
    user_dense: np.ndarray  # (R, k) float
    n: np.ndarray
    item_id: pa.Array | np.ndarray
    item_cat: np.ndarray  # (N, k)
    item_dense: np.ndarray  # (N, k)
    upstream_score: np.ndarray
    category: np.ndarray
    creator: np.ndarray
    is_cold_start: np.ndarray
    is_long_tail: np.ndarray
    m: np.ndarray
    exposed: np.ndarray
    labels: dict[str, np.ndarray]
    #: Request context (R, k); None = no context features, as for sources without any.
    context_cat: np.ndarray | None = field(default=None)
    context_dense: np.ndarray | None = field(default=None)

    def to_table(self, spec: FeatureSpec) -> pa.Table:
        """The format's Arrow table for ``spec`` (not yet validated: write_dataset does that)."""
        i32, f32 = pa.int32(), pa.float32()
        n = np.asarray(self.n, dtype=np.int64)
        m = np.asarray(self.m, dtype=np.int64)
        r = len(n)

        def per_request(values: Any, k: int, dtype: type, value_type: pa.DataType) -> pa.Array:
            return list_array(_per_request(values, r, dtype).reshape(-1), np.full(r, k),
                              value_type)

        cols = {
            "request_id": pa.array(self.request_id, pa.string()),
            "time": pa.array(np.asarray(self.time, dtype=np.int64), pa.int64()),
            "user_id": pa.array(self.user_id, pa.string()),
            "split": pa.array(self.split, pa.string()),
            "user_cat": per_request(self.user_cat, len(spec.user_categorical), np.int32, i32),
            "user_dense": per_request(self.user_dense, len(spec.user_dense), np.float32, f32),
            "context_cat": per_request(
                self.context_cat, len(spec.context_categorical), np.int32, i32
            ),
            "context_dense": per_request(
                self.context_dense, len(spec.context_dense), np.float32, f32
            ),
            "item_id": list_array(self.item_id, n, pa.string()),
            "item_cat": matrix_array(np.asarray(self.item_cat, np.int32), n, i32),
            "item_dense": matrix_array(np.asarray(self.item_dense, np.float32), n, f32),
            "upstream_score": list_array(np.asarray(self.upstream_score, np.float32), n, f32),
            "category": list_array(np.asarray(self.category, np.int32), n, i32),
            "creator": list_array(np.asarray(self.creator, np.int32), n, i32),
            "is_cold_start": list_array(np.asarray(self.is_cold_start, bool), n, pa.bool_()),
            "is_long_tail": list_array(np.asarray(self.is_long_tail, bool), n, pa.bool_()),
            "exposed": list_array(np.asarray(self.exposed, np.int32), m, i32),
        }
        for name in spec.labels:
            cols[f"label_{name}"] = list_array(
                np.asarray(self.labels[name], np.float32), m, f32
            )
        schema = arrow_schema(spec)
        return pa.Table.from_arrays([cols[c] for c in schema.names], schema=schema)
