"""The one on-disk format for logged re-ranking requests.

A data set is a folder holding:

- ``requests.parquet``: one row per request (columns below), the schema version and the feature
  spec in the Parquet key-value metadata; or, for data larger than memory, *shards*:
  ``requests/part-00000.parquet``, ``requests/part-00001.parquet``, ... (the same columns and
  the same metadata in every shard; the rows of the data set are the shards' rows in file-name
  order). :class:`ShardedDatasetWriter` writes them shard by shard with bounded memory;
  :func:`read_dataset` reads either layout into memory, and
  :class:`genrerank.data.streaming.StreamingRerankDataset` streams them by row groups;
- ``feature_spec.json``: the same feature spec, readable without pyarrow. A
  ``requests.parquet`` written by another tool (pandas' ``to_parquet``) has no genrerank
  metadata: the JSON file is then the spec (:func:`read_dataset`).

Columns (``n`` = candidates of the request, ``m`` = length of the exposed list, ``m <= n``):

============== ======================== =====================================================
column         type                     meaning
============== ======================== =====================================================
request_id     string                   unique id of the request
time           int64                    unix time in seconds
user_id        string                   user id as the source spells it
split          string                   ``train`` / ``valid`` / ``test`` (see ``splits.py``)
user_cat       list<int32>              one index per ``spec.user_categorical`` (0 = unknown)
user_dense     list<float32>            one value per ``spec.user_dense``
context_cat    list<int32>              one index per ``spec.context_categorical`` (request
                                        context: query, device, page type; 0 = unknown)
context_dense  list<float32>            one value per ``spec.context_dense``
item_id        list<string>             the n candidate ids, unique within the request
item_cat       list<list<int32>>        n x len(spec.item_categorical), 0 = unknown
item_dense     list<list<float32>>      n x len(spec.item_dense)
upstream_score list<float32>            the ranking stage's score for each candidate
category       list<int32>              item category (0 = unknown), for objectives
creator        list<int32>              item creator (0 = unknown), for objectives
is_cold_start  list<bool>               the item's creator is cold-start
is_long_tail   list<bool>               the item's creator is long-tail
exposed        list<int32>              candidate indices in display order (length m)
label_<name>   list<float32>            one value per exposed position, for each signal in
                                        ``spec.labels`` only
============== ======================== =====================================================

Candidates are stored by upstream score, highest first, ties in any order (the upstream order:
PRM and the ``upstream`` baseline read it from the candidate index; :func:`validate_table` checks
it). :func:`write_dataset` wants requests in both the ``train`` and ``valid`` splits.

A signal the source does not have is *absent*: no ``label_<name>`` column and not listed in
``spec.labels``; it is never filled with zeros. Any lowercase identifier names a signal; its kind
(``binary``: 0 or 1; ``nonnegative``: any value >= 0, e.g. seconds) is ``spec.label_kinds[name]``,
or for the four built-in names click / like / long_view (binary) and watch_time (nonnegative)
their default. ``spec.gain_weights`` (signal -> weight of the list gain) overrides the library's
default gains where set.

Data sets written before the context columns existed read as having no context features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
REQUESTS_FILE = "requests.parquet"
#: The folder of a sharded data set's Parquet files, and the name of shard ``i``.
SHARDS_DIR = "requests"
SHARD_PATTERN = "part-{:05d}.parquet"
SPEC_FILE = "feature_spec.json"
METADATA_VERSION_KEY = b"genrerank.schema_version"
METADATA_SPEC_KEY = b"genrerank.feature_spec"

#: Built-in signals and their kinds. Binary ones must be 0 or 1; watch_time is seconds >= 0.
#: Other signal names are allowed when the spec declares their kind in ``label_kinds``.
BINARY_LABELS = ("click", "like", "long_view")
KNOWN_LABELS = (*BINARY_LABELS, "watch_time")
DEFAULT_LABEL_KINDS = {**{name: "binary" for name in BINARY_LABELS}, "watch_time": "nonnegative"}
LABEL_KINDS = ("binary", "nonnegative")
SPLITS = ("train", "valid", "test")
_LABEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class DataValidationError(ValueError):
    """Bad input data; the message names the file, the row or request, and the field."""


@dataclass
class CategoricalFeature:
    name: str
    vocab_size: int  # indices run 0..vocab_size-1, 0 meaning unknown


@dataclass
class FeatureSpec:
    """Names, kinds and vocabulary sizes of everything a model may read."""

    source: str
    user_categorical: list[CategoricalFeature] = field(default_factory=list)
    user_dense: list[str] = field(default_factory=list)
    item_categorical: list[CategoricalFeature] = field(default_factory=list)
    item_dense: list[str] = field(default_factory=list)
    #: Request context (query, device, page type): one value per request, like user features.
    context_categorical: list[CategoricalFeature] = field(default_factory=list)
    context_dense: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=lambda: ["click"])
    #: Kind of each signal not built in (``binary`` or ``nonnegative``); built-ins may be omitted.
    label_kinds: dict[str, str] = field(default_factory=dict)
    #: Gain weight per signal for list metrics and gain losses; empty = the library's defaults.
    gain_weights: dict[str, float] = field(default_factory=dict)
    n_categories: int = 1
    n_creators: int = 1
    max_candidates: int = 0
    max_list_length: int = 0
    schema_version: int = SCHEMA_VERSION
    #: Free-form provenance, e.g. the simulator preset and seed, or the split rule used.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.user_categorical = [_as_cat(c) for c in self.user_categorical]
        self.item_categorical = [_as_cat(c) for c in self.item_categorical]
        self.context_categorical = [_as_cat(c) for c in self.context_categorical]
        bad_names = [s for s in self.labels if not isinstance(s, str) or not _LABEL_NAME.match(s)]
        if bad_names:
            raise DataValidationError(
                f"feature spec: label name(s) {bad_names} are not lowercase identifiers "
                "(letters, digits, underscores, starting with a letter)"
            )
        for name, kind in self.label_kinds.items():
            if kind not in LABEL_KINDS:
                raise DataValidationError(
                    f"feature spec: label_kinds[{name!r}] is {kind!r}; choose from {LABEL_KINDS}"
                )
        undeclared = [s for s in self.labels if self.label_kind(s) is None]
        if undeclared:
            raise DataValidationError(
                f"feature spec: label(s) {undeclared} need a kind in label_kinds "
                f"({' or '.join(LABEL_KINDS)}); only {list(KNOWN_LABELS)} have a default"
            )
        for name, weight in self.gain_weights.items():
            if not isinstance(weight, int | float) or not np.isfinite(weight):
                raise DataValidationError(
                    f"feature spec: gain_weights[{name!r}] must be a finite number, got {weight!r}"
                )

    def label_kind(self, name: str) -> str | None:
        """``binary`` or ``nonnegative`` for a signal; None when neither declared nor built in."""
        return self.label_kinds.get(name, DEFAULT_LABEL_KINDS.get(name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataValidationError(
                f"feature spec has schema_version {version!r}; this genrerank reads "
                f"version {SCHEMA_VERSION}"
            )
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataValidationError(f"{path}: not a valid feature spec: {exc}") from exc


def _as_cat(c: CategoricalFeature | dict[str, Any]) -> CategoricalFeature:
    return c if isinstance(c, CategoricalFeature) else CategoricalFeature(**c)


def arrow_schema(spec: FeatureSpec) -> pa.Schema:
    """The Arrow schema of ``requests.parquet`` for this spec."""
    i32, f32 = pa.int32(), pa.float32()
    fields = [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("time", pa.int64(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("user_cat", pa.list_(i32)),
        pa.field("user_dense", pa.list_(f32)),
        pa.field("context_cat", pa.list_(i32)),
        pa.field("context_dense", pa.list_(f32)),
        pa.field("item_id", pa.list_(pa.string())),
        pa.field("item_cat", pa.list_(pa.list_(i32))),
        pa.field("item_dense", pa.list_(pa.list_(f32))),
        pa.field("upstream_score", pa.list_(f32)),
        pa.field("category", pa.list_(i32)),
        pa.field("creator", pa.list_(i32)),
        pa.field("is_cold_start", pa.list_(pa.bool_())),
        pa.field("is_long_tail", pa.list_(pa.bool_())),
        pa.field("exposed", pa.list_(i32)),
    ]
    fields += [pa.field(f"label_{name}", pa.list_(f32)) for name in spec.labels]
    return pa.schema(fields)


def table_from_rows(rows: list[dict[str, Any]], spec: FeatureSpec) -> pa.Table:
    """Build a requests table from Python dicts (one per request; keys = column names).

    Convenient for small data; :class:`genrerank.data.builder.Requests` builds large tables from
    arrays, and ``genrerank data import`` from an impressions table. Columns a source does not
    have may be omitted: user and context features (when the spec declares none), category and
    creator (0 = unknown), cold-start and long-tail flags (False).
    """
    schema = arrow_schema(spec)
    columns: dict[str, list[Any]] = {}
    for name in schema.names:
        values = []
        for i, row in enumerate(rows):
            if name in row:
                values.append(row[name])
            elif name in _OPTIONAL_COLUMNS:
                values.append(_OPTIONAL_COLUMNS[name](len(row.get("item_id", ()))))
            else:
                raise DataValidationError(
                    f"row {i} (request_id {row.get('request_id')!r}): missing key {name!r}; "
                    f"required keys are {[n for n in schema.names if n not in _OPTIONAL_COLUMNS]}"
                )
        columns[name] = values
    return pa.Table.from_pydict(columns, schema=schema)


#: Columns :func:`table_from_rows` may omit, with their default for a request of n candidates:
#: nothing known about categories, creators or request context.
_OPTIONAL_COLUMNS: dict[str, Any] = {
    "user_cat": lambda n: [],
    "user_dense": lambda n: [],
    "context_cat": lambda n: [],
    "context_dense": lambda n: [],
    "category": lambda n: [0] * n,
    "creator": lambda n: [0] * n,
    "is_cold_start": lambda n: [False] * n,
    "is_long_tail": lambda n: [False] * n,
}


def list_column(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A list<value_type> Arrow array from flat ``values`` and per-row ``lengths``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def nested_list_column(
    values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType
) -> pa.ListArray:
    """A list<list<value_type>> Arrow array from ``values`` of shape (sum(lengths), k)."""
    k = values.shape[1]
    inner = list_column(values.reshape(-1), np.full(values.shape[0], k), value_type)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


# --------------------------------------------------------------------------- validation


def _lengths(table: pa.Table, name: str) -> np.ndarray:
    """Per-row lengths of a list column (no value conversion: item ids are millions of strings)."""
    col = table.column(name).combine_chunks()
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataValidationError(f"row {row}: field {name!r} is null")
    return col.value_lengths().to_numpy(zero_copy_only=False)


def _flat(table: pa.Table, name: str, depth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and per-row lengths of a numeric list column (``depth`` = nesting)."""
    lengths = _lengths(table, name)
    values = table.column(name).combine_chunks().flatten()
    for _ in range(depth - 1):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False), lengths


def _row_of(flat_index: int, lengths: np.ndarray) -> int:
    return int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))


def _check_no_null_values(table: pa.Table, name: str, fail: Any) -> None:
    """Fail on a null list, or a null value inside a (nested) list column, naming its row."""
    col = table.column(name).combine_chunks()
    if not pa.types.is_list(col.type):
        return
    if col.null_count:
        fail(int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]), name,
             "null list")
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    values = col.flatten()
    if pa.types.is_list(values.type):
        if values.null_count:
            k = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            fail(_row_of(k, lengths), name, "null candidate row")
        if values.flatten().null_count:
            inner = values.value_lengths().to_numpy(zero_copy_only=False)
            k = int(np.flatnonzero(values.flatten().is_null().to_numpy(zero_copy_only=False))[0])
            fail(_row_of(_row_of(k, inner), lengths), name, "null value")
    elif values.null_count:
        k = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        fail(_row_of(k, lengths), name, "null value")


def type_kind(t: pa.DataType) -> str:
    """A coarse type name (``int``, ``float``, ``bool``, ``string``, ``list<...>``): what matters
    when deciding whether a column can be read as another."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{type_kind(t.value_type)}>"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return str(t)


def _with_empty_context(table: pa.Table, spec: FeatureSpec) -> pa.Table:
    """Data sets written before the context columns existed: empty context lists, when the spec
    declares no context features (otherwise the columns are missing, an error)."""
    for name, feats, value_type in (("context_cat", spec.context_categorical, pa.int32()),
                                    ("context_dense", spec.context_dense, pa.float32())):
        if name not in table.column_names and not feats:
            empty = pa.array([[]] * table.num_rows, type=pa.list_(value_type))
            table = table.append_column(pa.field(name, empty.type), empty)
    return table


def conform_types(table: pa.Table, spec: FeatureSpec, where: str = "requests") -> pa.Table:
    """Cast ``table`` to the format's Arrow schema where that loses nothing (int64 -> int32,
    float64 -> float32, int -> float, large lists and strings), and refuse with one line naming
    the column otherwise: numbers stored as strings are an error, never silently parsed."""
    expected = arrow_schema(spec)
    table = _with_empty_context(table, spec)
    missing = [n for n in expected.names if n not in table.column_names]
    if missing:
        raise DataValidationError(f"{where}: missing column(s) {missing}")
    for f in expected:
        actual = type_kind(table.schema.field(f.name).type)
        want = type_kind(f.type)
        # An all-empty list column written by pandas has value type null: it casts to anything.
        leaf = want.replace("list<", "").rstrip(">")
        compatible = actual in (want, want.replace("float", "int"), want.replace(leaf, "null"))
        if not compatible:
            raise DataValidationError(
                f"{where}: field {f.name!r} has type {actual}, expected {want}"
            )
    try:
        return table.select(expected.names).cast(expected)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataValidationError(f"{where}: cannot read the columns as {expected}: {exc}") \
            from exc


def _check_upstream_order(table: pa.Table, n: np.ndarray, fail: Any) -> None:
    """Candidates must be stored by upstream score, highest first (ties fine): PRM and the
    ``upstream`` baseline read the upstream order from the candidate index."""
    scores, _ = _flat(table, "upstream_score")
    scores = scores.astype(np.float64)
    starts = np.repeat(np.cumsum(n) - n, n)
    rises = np.flatnonzero(scores[1:] > scores[:-1]) + 1  # flat index of the higher score
    rises = rises[rises != starts[rises]]  # a rise across two requests is no error
    if rises.size:
        k = int(rises[0])
        i = k - int(starts[k])
        fail(_row_of(k, n), "upstream_score",
             f"candidates must be stored by upstream score, highest first: candidate {i} "
             f"({scores[k]:g}) scores above candidate {i - 1} ({scores[k - 1]:g}); sort each "
             "request's candidates by upstream score (descending) and renumber exposed")


def validate_table(table: pa.Table, spec: FeatureSpec, where: str = "requests") -> None:
    """Check every invariant of the format; raise DataValidationError naming row and field.

    Vectorised, so 100k requests x 60 candidates take well under a second.
    """
    expected = arrow_schema(spec)
    table = _with_empty_context(table, spec)
    missing = [n for n in expected.names if n not in table.column_names]
    if missing:
        raise DataValidationError(f"{where}: missing column(s) {missing}")
    extra_labels = [
        n for n in table.column_names if n.startswith("label_") and n not in expected.names
    ]
    if extra_labels:
        raise DataValidationError(
            f"{where}: label column(s) {extra_labels} are not declared in spec.labels"
        )
    if table.num_rows == 0:
        raise DataValidationError(f"{where}: no requests")

    def fail(row: int, name: str, what: str) -> None:
        rid = table.column("request_id")[row].as_py()
        raise DataValidationError(
            f"{where}: row {row} (request_id {rid!r}), field {name!r}: {what}"
        )

    for name in ("request_id", "time", "user_id", "split"):
        col = table.column(name)
        if col.null_count:
            fail(int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]), name,
                 "null value")
    for name in expected.names:
        _check_no_null_values(table, name, fail)

    ids = table.column("request_id").to_numpy(zero_copy_only=False)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        rows = np.flatnonzero(ids == dup)[:2]
        fail(int(rows[1]), "request_id", f"duplicate of row {int(rows[0])}")
    splits = table.column("split").to_numpy(zero_copy_only=False)
    bad = ~np.isin(splits, SPLITS)
    if bad.any():
        fail(int(np.flatnonzero(bad)[0]), "split", f"must be one of {SPLITS}")

    n = _lengths(table, "item_id")
    if (n == 0).any():
        fail(int(np.flatnonzero(n == 0)[0]), "item_id", "no candidates")
    for name in ("upstream_score", "category", "creator", "is_cold_start", "is_long_tail"):
        ln = _lengths(table, name)
        if (ln != n).any():
            r = int(np.flatnonzero(ln != n)[0])
            fail(r, name, f"has {ln[r]} values for {n[r]} candidates")
    for name, feats in (("item_cat", spec.item_categorical), ("item_dense", spec.item_dense)):
        ln = _lengths(table, name)
        if (ln != n).any():
            r = int(np.flatnonzero(ln != n)[0])
            fail(r, name, f"has {ln[r]} rows for {n[r]} candidates")
        inner = table.column(name).combine_chunks().flatten().value_lengths().to_numpy()
        if (inner != len(feats)).any():
            r = _row_of(int(np.flatnonzero(inner != len(feats))[0]), n)
            fail(r, name, f"each candidate needs {len(feats)} values")
    for name, feats in (("user_cat", spec.user_categorical), ("user_dense", spec.user_dense),
                        ("context_cat", spec.context_categorical),
                        ("context_dense", spec.context_dense)):
        ln = _lengths(table, name)
        if (ln != len(feats)).any():
            r = int(np.flatnonzero(ln != len(feats))[0])
            fail(r, name, f"has {ln[r]} values, spec declares {len(feats)}")

    # Duplicate candidate ids inside one request; integer codes keep this fast for millions of ids.
    encoded = pc.dictionary_encode(table.column("item_id").combine_chunks().flatten())
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    row_of_item = np.repeat(np.arange(len(n)), n)
    order = np.lexsort((codes, row_of_item))
    same = (row_of_item[order][1:] == row_of_item[order][:-1]) & (
        codes[order][1:] == codes[order][:-1]
    )
    if same.any():
        k = int(np.flatnonzero(same)[0])
        dup = encoded.dictionary[int(codes[order][k])].as_py()
        fail(int(row_of_item[order][k]), "item_id", f"duplicate candidate {dup!r}")

    for name in ("user_dense", "context_dense", "upstream_score"):
        vals, ln = _flat(table, name)
        bad = ~np.isfinite(vals.astype(np.float64))
        if bad.any():
            fail(_row_of(int(np.flatnonzero(bad)[0]), ln), name, "NaN or infinite value")
    vals, _ = _flat(table, "item_dense", depth=2)
    bad = ~np.isfinite(vals.astype(np.float64))
    if bad.any():
        k = len(spec.item_dense)
        fail(_row_of(int(np.flatnonzero(bad)[0]) // k, n), "item_dense", "NaN or infinite value")
    _check_upstream_order(table, n, fail)

    def check_vocab(vals: np.ndarray, vocab: np.ndarray, lengths: np.ndarray, name: str) -> None:
        bad = (vals < 0) | (vals >= vocab)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            fail(_row_of(k, lengths), name, f"index {int(vals[k])} outside vocabulary")

    if spec.user_categorical:
        vals, ln = _flat(table, "user_cat")
        vocab = np.tile([c.vocab_size for c in spec.user_categorical], len(ln))
        check_vocab(vals, vocab, ln, "user_cat")
    if spec.context_categorical:
        vals, ln = _flat(table, "context_cat")
        vocab = np.tile([c.vocab_size for c in spec.context_categorical], len(ln))
        check_vocab(vals, vocab, ln, "context_cat")
    if spec.item_categorical:
        vals, _ = _flat(table, "item_cat", depth=2)
        k = len(spec.item_categorical)
        vocab = np.tile([c.vocab_size for c in spec.item_categorical], len(vals) // k)
        check_vocab(vals, vocab, n * k, "item_cat")
    vals, _ = _flat(table, "category")
    check_vocab(vals, np.full(len(vals), spec.n_categories), n, "category")
    vals, _ = _flat(table, "creator")
    check_vocab(vals, np.full(len(vals), spec.n_creators), n, "creator")

    exposed, m = _flat(table, "exposed")
    if (m == 0).any():
        fail(int(np.flatnonzero(m == 0)[0]), "exposed", "empty exposed list")
    if (m > n).any():
        r = int(np.flatnonzero(m > n)[0])
        fail(r, "exposed", f"{m[r]} exposed items but only {n[r]} candidates")
    n_of_pos = np.repeat(n, m)
    bad = (exposed < 0) | (exposed >= n_of_pos)
    if bad.any():
        fail(_row_of(int(np.flatnonzero(bad)[0]), m), "exposed", "candidate index out of range")
    row_of_pos = np.repeat(np.arange(len(m)), m)
    order = np.lexsort((exposed, row_of_pos))
    same = (row_of_pos[order][1:] == row_of_pos[order][:-1]) & (
        exposed[order][1:] == exposed[order][:-1]
    )
    if same.any():
        fail(int(row_of_pos[order][int(np.flatnonzero(same)[0])]), "exposed", "repeated candidate")

    for label in spec.labels:
        name = f"label_{label}"
        vals, ln = _flat(table, name)
        if (ln != m).any():
            r = int(np.flatnonzero(ln != m)[0])
            fail(r, name, f"has {ln[r]} values for {m[r]} exposed items")
        vals = vals.astype(np.float64)
        bad = ~np.isfinite(vals)
        if spec.label_kind(label) == "binary":
            bad |= (vals != 0) & (vals != 1)
        else:
            bad |= vals < 0
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            fail(_row_of(k, m), name, f"invalid value {float(vals[k])!r}")

    if spec.max_candidates and int(n.max()) > spec.max_candidates:
        fail(int(np.argmax(n)), "item_id", f"more than max_candidates={spec.max_candidates}")


# --------------------------------------------------------------------------- read / write


def _atomic_replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a finished ``tmp`` folder to ``out_dir`` so readers never see half a data set."""
    if out_dir.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(
                f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it"
            )
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def write_dataset(
    out_dir: str | Path, table: pa.Table, spec: FeatureSpec, overwrite: bool = False,
    allow_missing_splits: bool = False,
) -> Path:
    """Validate and write a data set folder atomically: all of it on success, nothing on error.

    Training needs requests in both the ``train`` and ``valid`` splits, so a table without
    either is refused unless ``allow_missing_splits`` (a data set only re-ranked or evaluated).
    """
    out_dir = Path(out_dir)
    table = conform_types(table, spec, where=str(out_dir))
    validate_table(table, spec, where=str(out_dir))
    if not allow_missing_splits:
        _check_train_and_valid(table, where=str(out_dir))
    n = table.column("item_id").combine_chunks().value_lengths().to_numpy()
    m = table.column("exposed").combine_chunks().value_lengths().to_numpy()
    spec.max_candidates = max(spec.max_candidates, int(n.max()))
    spec.max_list_length = max(spec.max_list_length, int(m.max()))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        metadata = {
            METADATA_VERSION_KEY: str(SCHEMA_VERSION).encode(),
            METADATA_SPEC_KEY: spec.to_json().encode(),
        }
        table = table.replace_schema_metadata(metadata)
        pq.write_table(table, tmp / REQUESTS_FILE, compression="zstd")
        (tmp / SPEC_FILE).write_text(spec.to_json())
        _atomic_replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_train_and_valid(table: pa.Table, where: str) -> None:
    present = set(pc.unique(table.column("split")).to_pylist())
    missing = [s for s in ("train", "valid") if s not in present]
    if missing:
        raise DataValidationError(
            f"{where}: no request in the {' or '.join(repr(s) for s in missing)} split (splits "
            f"present: {sorted(present)}); fill the split column with "
            "genrerank.data.splits.assign_time_split or the [split] options of "
            "`genrerank data import`, or pass allow_missing_splits=True for a data set only "
            "re-ranked or evaluated"
        )


#: Whether :func:`read_dataset` validates by default (``--no-validate`` turns it off for trusted
#: data), and the files already validated in this process: (path, mtime, size), so that reading
#: the train, valid and test splits of one data set validates it once.
_validate_on_read = True
_validated: set[tuple[Any, ...]] = set()


def set_validate_on_read(enabled: bool) -> None:
    """Turn validation on read on or off for this process (the CLI's ``--no-validate``)."""
    global _validate_on_read
    _validate_on_read = enabled


def _check_spec_file(data_dir: Path, spec: FeatureSpec, parquet: Path) -> None:
    """``feature_spec.json``, when present, must parse and agree with the Parquet metadata."""
    path = data_dir / SPEC_FILE
    if not path.exists():
        return
    differs = _spec_difference(FeatureSpec.load(path), spec)
    if differs is not None:
        key, on_disk, in_parquet = differs
        raise DataValidationError(
            f"{path}: field {key!r} disagrees with {parquet.relative_to(data_dir)}'s "
            f"metadata ({on_disk} vs {in_parquet}); rewrite the data set or fix the file"
        )


def _spec_difference(a: FeatureSpec, b: FeatureSpec) -> tuple[str, str, str] | None:
    """The first field (by name) where two specs differ, with both values shown briefly."""
    da, db = a.to_dict(), b.to_dict()
    for key in sorted(set(da) | set(db)):
        if da.get(key) != db.get(key):
            return key, repr(da.get(key))[:80], repr(db.get(key))[:80]
    return None


def dataset_files(data_dir: str | Path) -> list[Path]:
    """The Parquet files of a data set folder in row order: ``[requests.parquet]``, or the
    shards ``requests/*.parquet`` by name (``part-00000.parquet`` first)."""
    data_dir = Path(data_dir)
    single, shard_dir = data_dir / REQUESTS_FILE, data_dir / SHARDS_DIR
    if single.exists() and shard_dir.is_dir():
        raise DataValidationError(
            f"{data_dir}: holds both {REQUESTS_FILE} and a {SHARDS_DIR}/ folder of shards; a data "
            "set has one layout: remove one of them"
        )
    if single.exists():
        return [single]
    if not shard_dir.is_dir():
        raise FileNotFoundError(
            f"{data_dir}: no {REQUESTS_FILE} (nor a {SHARDS_DIR}/ folder of shards); is this a "
            "genrerank data set?"
        )
    # Hidden files are a writer's leftovers, never shards; (length, name) keeps part-100000
    # after part-99999.
    shards = sorted((p for p in shard_dir.iterdir()
                     if p.suffix == ".parquet" and not p.name.startswith(".")),
                    key=lambda p: (len(p.name), p.name))
    if not shards:
        raise DataValidationError(f"{shard_dir}: no .parquet shard in this folder")
    return shards


def _file_spec(path: Path, data_dir: Path) -> tuple[FeatureSpec, bool]:
    """The feature spec of one Parquet file of a data set, and whether it came from the folder's
    ``feature_spec.json`` (a file written by another tool, without genrerank metadata)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(
            f"{path}: not a readable Parquet file ({' '.join(str(exc).split())})"
        ) from exc
    version = meta.get(METADATA_VERSION_KEY)
    if version is None and METADATA_SPEC_KEY not in meta:
        # A Parquet written by another tool (pandas' to_parquet): the JSON file is the spec.
        if not (data_dir / SPEC_FILE).exists():
            raise DataValidationError(
                f"{path} has no genrerank metadata and {data_dir} has no {SPEC_FILE}: a data "
                f"set needs its feature spec; write it with genrerank.data.schema.write_dataset "
                f"or `genrerank data import`, or add a {SPEC_FILE} (FeatureSpec.to_json)"
            )
        return FeatureSpec.load(data_dir / SPEC_FILE), True
    if version is None or version.decode(errors="replace") != str(SCHEMA_VERSION):
        raise DataValidationError(
            f"{path}: schema version {version!r}, this genrerank reads {SCHEMA_VERSION}"
        )
    try:
        spec = FeatureSpec.from_dict(json.loads(meta[METADATA_SPEC_KEY]))
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, DataValidationError):
            raise DataValidationError(f"{path}: {exc}") from exc
        raise DataValidationError(
            f"{path}: no valid feature spec in the metadata ({exc})") from exc
    return spec, False


def read_dataset_spec(data_dir: str | Path) -> tuple[list[Path], FeatureSpec, bool]:
    """The files of a data set (:func:`dataset_files`), its feature spec and whether the spec
    came from ``feature_spec.json`` alone, reading only metadata: every shard must carry the
    same spec, and the JSON file must agree with it."""
    data_dir = Path(data_dir)
    files = dataset_files(data_dir)
    spec, from_json = _file_spec(files[0], data_dir)
    if not from_json:
        _check_spec_file(data_dir, spec, files[0])
    for path in files[1:]:
        other, other_json = _file_spec(path, data_dir)
        from_json = from_json or other_json
        differs = _spec_difference(other, spec)
        if differs is not None:
            key, theirs, first = differs
            raise DataValidationError(
                f"{path}: field {key!r} of its feature spec differs from that of "
                f"{files[0].relative_to(data_dir)} ({theirs} vs {first}); every shard "
                "of a data set must carry the same spec"
            )
    return files, spec, from_json


def _check_ids_across_files(files: list[Path], ids: list[np.ndarray]) -> None:
    """Request ids must be unique across shards too (each shard is validated on its own)."""
    flat = np.concatenate(ids)
    uniq, counts = np.unique(flat, return_counts=True)
    if not (counts > 1).any():
        return
    dup = uniq[counts > 1][0]
    rows = np.flatnonzero(flat == dup)[:2]
    starts = np.cumsum([0] + [len(a) for a in ids])
    (fa, ra), (fb, rb) = ((int(np.searchsorted(starts, r, side="right")) - 1, r) for r in rows)
    raise DataValidationError(
        f"{files[fb]}: row {int(rb - starts[fb])} (request_id {str(dup)!r}), field "
        f"'request_id': duplicate of {files[fa]} row {int(ra - starts[fa])}"
    )


def read_dataset(
    data_dir: str | Path, validate: bool | None = None
) -> tuple[pa.Table, FeatureSpec]:
    """Read a data set folder into memory: schema version first, then the feature spec (the JSON
    file must agree with the Parquet metadata), column types, and (by default, once per file and
    process) every invariant of :func:`validate_table`. Errors name the file, row, request and
    field.

    Either layout reads: one ``requests.parquet``, or shards ``requests/part-*.parquet`` (every
    shard must carry the same spec; rows are checked shard by shard, request ids across shards;
    the table is the shards' rows in file-name order). Data larger than memory is read with
    :class:`genrerank.data.streaming.StreamingRerankDataset` instead.

    A ``requests.parquet`` without genrerank metadata (written by pandas' ``to_parquet`` or
    another tool) reads when ``feature_spec.json`` is next to it: the JSON is then the spec, and
    the columns are conformed and validated the same way."""
    data_dir = Path(data_dir)
    files, spec, from_json = read_dataset_spec(data_dir)
    tables = []
    for path in files:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataValidationError(
                f"{path}: not a readable Parquet file ({' '.join(str(exc).split())})"
            ) from exc
        tables.append(conform_types(table, spec, where=str(path)))
    if validate is None:
        validate = _validate_on_read
    if validate:
        key: tuple[Any, ...] = ()
        for path in files:
            stat = path.stat()
            key += (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if from_json:  # the JSON is the spec: editing it must validate again
            spec_stat = (data_dir / SPEC_FILE).stat()
            key += (spec_stat.st_mtime_ns, spec_stat.st_size)
        if key not in _validated:
            for path, table in zip(files, tables, strict=True):
                validate_table(table, spec, where=str(path))
            if len(files) > 1:
                _check_ids_across_files(files, [
                    t.column("request_id").to_numpy(zero_copy_only=False) for t in tables])
            _validated.add(key)
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    if from_json:  # list sizes a hand-written spec may leave at 0, as write_dataset records them
        for name, attr in (("item_id", "max_candidates"), ("exposed", "max_list_length")):
            lengths = table.column(name).combine_chunks().value_lengths().to_numpy()
            setattr(spec, attr, max(getattr(spec, attr), int(lengths.max(initial=0))))
    return table, spec


# --------------------------------------------------------------------------- sharded writing


def _id_hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of request ids: 8 bytes per request to check uniqueness across shards
    without holding millions of strings (a match is confirmed on the strings)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(s).encode("utf-8"), digest_size=8).digest(), "little")
         for s in ids), dtype=np.uint64, count=len(ids))


class ShardedDatasetWriter:
    """Write a data set folder as shards (``requests/part-00000.parquet``, ...), table by table,
    with memory bounded by one table and one row group, whatever the data set's size.

    ::

        with ShardedDatasetWriter(out, spec, shard_requests=200_000) as writer:
            for table in tables:          # e.g. the simulator's chunks
                writer.write(table)

    Each table is conformed and validated (every invariant of :func:`validate_table`) when
    written; request ids are checked across tables by 64-bit hashes kept in memory (8 bytes a
    request). Everything goes to a hidden temporary folder beside ``out_dir`` that is renamed
    into place only when the block ends without an error (with ``feature_spec.json`` and, unless
    ``allow_missing_splits``, requests in both the ``train`` and ``valid`` splits); on an error
    it is removed and whatever was at ``out_dir`` stays. Every shard carries the same spec in its
    metadata, so the spec's ``max_candidates`` and ``max_list_length`` must be set before the
    first shard and bound every request (a request above them is refused).
    """

    def __init__(
        self,
        out_dir: str | Path,
        spec: FeatureSpec,
        *,
        shard_requests: int = 200_000,
        row_group_requests: int = 8192,
        overwrite: bool = False,
        allow_missing_splits: bool = False,
    ) -> None:
        if shard_requests < 1 or row_group_requests < 1:
            raise ValueError("shard_requests and row_group_requests must be >= 1")
        if spec.max_candidates < 1 or spec.max_list_length < 1:
            raise ValueError(
                "ShardedDatasetWriter: set spec.max_candidates and spec.max_list_length first "
                "(every shard's metadata carries the spec, so it cannot grow afterwards)")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} exists; pass --overwrite (overwrite=True) to replace it")
        self.spec = spec
        self.shard_requests = shard_requests
        self.row_group_requests = row_group_requests
        self.overwrite = overwrite
        self.allow_missing_splits = allow_missing_splits
        self.schema = arrow_schema(spec).with_metadata({
            METADATA_VERSION_KEY: str(SCHEMA_VERSION).encode(),
            METADATA_SPEC_KEY: spec.to_json().encode(),
        })
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-",
                                          dir=self.out_dir.parent))
        (self._tmp / SHARDS_DIR).mkdir()
        self._writer: pq.ParquetWriter | None = None
        self._shard = -1
        self._shard_rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._hashes: list[np.ndarray] = []
        self.num_requests = 0  #: requests accepted so far
        self.split_counts: dict[str, int] = {}
        self.shard_paths: list[Path] = []  #: final paths of the shards written
        self._done = False

    def __enter__(self) -> ShardedDatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, table: pa.Table) -> None:
        """Validate ``table`` (requests in the data set's row order) and append it."""
        if self._done:
            raise RuntimeError("ShardedDatasetWriter: already closed")
        if table.num_rows == 0:
            return
        first = self.num_requests
        where = f"{self.out_dir} (requests {first} to {first + table.num_rows - 1})"
        table = conform_types(table, self.spec, where=where)
        validate_table(table, self.spec, where=where)
        m = table.column("exposed").combine_chunks().value_lengths().to_numpy()
        if int(m.max()) > self.spec.max_list_length:
            r = int(np.argmax(m))
            raise DataValidationError(
                f"{where}: row {r}, field 'exposed': {int(m[r])} exposed items, more than the "
                f"spec's max_list_length={self.spec.max_list_length}")
        ids = table.column("request_id").to_numpy(zero_copy_only=False)
        self._hashes.append(_id_hashes(ids))
        names, counts = np.unique(table.column("split").to_numpy(zero_copy_only=False),
                                  return_counts=True)
        for name, count in zip(names, counts, strict=True):
            self.split_counts[str(name)] = self.split_counts.get(str(name), 0) + int(count)
        self.num_requests += table.num_rows
        self._pending.append(table.replace_schema_metadata(None))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._next_group_size():
            self._flush(self._next_group_size())

    def _next_group_size(self) -> int:
        room = self.shard_requests - self._shard_rows if self._writer is not None \
            else self.shard_requests
        return min(self.row_group_requests, room)

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` pending requests as one row group of the current shard."""
        pending = pa.concat_tables(self._pending)
        group, rest = pending.slice(0, rows), pending.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        if self._writer is None:
            self._shard += 1
            name = SHARD_PATTERN.format(self._shard)
            self._writer = pq.ParquetWriter(self._tmp / SHARDS_DIR / name, self.schema,
                                            compression="zstd")
            self.shard_paths.append(self.out_dir / SHARDS_DIR / name)
            self._shard_rows = 0
        self._writer.write_table(group.cast(self.schema), row_group_size=rows)
        self._shard_rows += rows
        if self._shard_rows >= self.shard_requests:
            self._writer.close()
            self._writer = None

    def close(self) -> Path:
        """Finish the last shard, check splits and request ids, and move the folder into
        place; returns ``out_dir``."""
        if self._done:
            return self.out_dir
        try:
            while self._pending_rows:
                self._flush(min(self._pending_rows, self._next_group_size()))
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if not self.num_requests:
                raise DataValidationError(f"{self.out_dir}: no requests")
            if not self.allow_missing_splits:
                missing = [s for s in ("train", "valid") if not self.split_counts.get(s)]
                if missing:
                    raise DataValidationError(
                        f"{self.out_dir}: no request in the "
                        f"{' or '.join(repr(s) for s in missing)} split (splits present: "
                        f"{sorted(self.split_counts)}); pass allow_missing_splits=True for a "
                        "data set only re-ranked or evaluated")
            self._check_unique_ids()
            (self._tmp / SPEC_FILE).write_text(self.spec.to_json())
            _atomic_replace_dir(self._tmp, self.out_dir, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written: ``out_dir`` keeps what it held before."""
        self._done = True
        if self._writer is not None:
            # The folder goes anyway, and the error that brought us here is the one to show.
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _check_unique_ids(self) -> None:
        hashes = np.concatenate(self._hashes)
        self._hashes = []
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        if not same.size:
            return
        # Equal hashes: confirm on the strings (a 64-bit collision is possible, if unlikely).
        suspects = np.unique(np.concatenate([order[same], order[same + 1]]))
        files = dataset_files(self._tmp)
        sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
        starts = np.cumsum([0, *sizes])
        found: dict[str, int] = {}
        for row in suspects:
            k = int(np.searchsorted(starts, row, side="right")) - 1
            local = int(row - starts[k])
            rid = pq.read_table(files[k], columns=["request_id"]).column(0)[local].as_py()
            if rid in found:
                first = int(found[rid])
                kf = int(np.searchsorted(starts, first, side="right")) - 1
                raise DataValidationError(
                    f"{self.shard_paths[k]}: row {local} (request_id {rid!r}), field "
                    f"'request_id': duplicate of {self.shard_paths[kf]} row "
                    f"{int(first - starts[kf])}")
            found[rid] = int(row)
