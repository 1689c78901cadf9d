"""Impressions (long or wide rows, plus optional not-shown candidates) -> the requests table.

All steps are vectorised over rows (numpy sorts, Arrow dictionary encoding); nothing loops over
requests in Python. Steps, in order:

1. Wide tables are exploded into long rows (one per shown item; list order = display order).
2. Requests are the distinct request ids, in order of first appearance. A request's time is the
   earliest time of its rows; its user, user features and context features come from its first
   shown row (a request whose rows name different users is an error).
3. Positions (minus ``position_base``) must run 0, 1, ... without gaps inside each request; two
   different items at one position are an error. An item shown twice in a request is an error,
   or with ``[duplicates] policy = "drop"`` / ``"merge"`` only its first (lowest) position is
   kept (merge: each signal the max over its showings); positions are then renumbered.
4. Candidates not shown come from the candidates table; rows repeating a shown item of the same
   request are ignored (the shown row wins), repeats inside that table follow the duplicates
   policy, and a request id with no shown item is an error.
5. Candidates are ordered by upstream score, highest first, ties broken by a seeded random key;
   ``exposed`` lists each shown item's candidate index in display order. Without an
   ``upstream_score`` column the upstream order is taken to be the logged display order followed
   by the not-shown candidates in table order, with score ``1 / (1 + rank)`` (so ranks 0, 1, 2
   score 1, 1/2, 1/3). The candidate order then equals the logged list, so "keep the input
   order" replays it: compare re-rankers with each other, not with that baseline.
6. The split (:func:`pick_split`), then vocabularies from the **training** split only:
   categorical values are ranked by frequency among training rows (item features: every
   candidate of a training request; user and context features: one value per training
   request), ties by first appearance, and the top ``vocab_cap`` get indices 1..K; 0 is unknown
   (empty, or outside the vocabulary). With ``hash_buckets = B`` a value outside the vocabulary
   gets ``K + 1 + crc32(str(value)) % B`` instead (:func:`genrerank.data.ids.hash_item_id`).
   ``category`` and ``creator`` are encoded the same way without cap or hashing; absent, they
   are 0 and ``n_categories = n_creators = 1``. Tags become 0/1 dense features, one per tag
   among the ``top_k`` most frequent in training, named ``<feature>:<tag>``. Vocabularies
   passed to :func:`build` (``vocabularies``) are used as given instead (:func:`encode_fixed`).
7. ``is_cold_start`` / ``is_long_tail``, when not mapped, describe the item's creator (or the
   item itself when there is no creator column), like the loaders: cold start = no impression
   in the training split; long tail = training impressions below the ``long_tail_quantile``
   (0.8) quantile of the creators (items) shown in training. Rows with an empty creator get
   False for both.
8. Derived features (``[derived] names``, :mod:`genrerank.data.derived`) are computed after the
   split from training impressions only and appended as item dense features.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrerank.data.builder import Requests
from genrerank.data.ids import hash_item_id
from genrerank.data.importer.frame import Frame
from genrerank.data.importer.mapping import ITEM_ROLES, Feature, Mapping, Signal
from genrerank.data.loaders._common import long_tail_flags
from genrerank.data.schema import (
    SPLITS,
    CategoricalFeature,
    DataValidationError,
    FeatureSpec,
    _atomic_replace_dir,
    write_dataset,
)
from genrerank.data.splits import assign_split, check_splits, split_boundary_warnings

REPORT_FILE = "import_report.json"
VOCAB_FILE = "vocabularies.json"
_POSITION = "__position__"  # the display position of an exploded wide row


@dataclass
class ImportResult:
    """The in-memory data set plus what ``import_table`` writes next to it."""

    table: pa.Table
    spec: FeatureSpec
    #: feature -> raw values in index order (index 0 = None = unknown); tags: the tag of each
    #: dense column, in column order.
    vocabularies: dict[str, list[Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path, overwrite: bool = False,
              allow_missing_splits: bool = False) -> Path:
        """Validate and write the data set with the report and vocabularies, atomically: the
        folder appears complete or not at all. A data set without train or valid requests is
        refused unless ``allow_missing_splits`` (see :func:`~genrerank.data.schema.write_dataset`).
        """
        out_dir = Path(out_dir)
        if out_dir.exists() and not overwrite:
            raise FileExistsError(
                f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it"
            )
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.import-", dir=out_dir.parent))
        try:
            try:
                data = write_dataset(staging / "data", self.table, self.spec,
                                     allow_missing_splits=allow_missing_splits)
            except DataValidationError as exc:
                # Name the folder the user asked for, not the staging folder.
                raise DataValidationError(
                    str(exc).replace(str(staging / "data"), str(out_dir))
                ) from exc
            (data / REPORT_FILE).write_text(json.dumps(self.report, indent=2, default=_json))
            (data / VOCAB_FILE).write_text(json.dumps(self.vocabularies, default=_json))
            _atomic_replace_dir(data, out_dir, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out_dir


def _json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --------------------------------------------------------------------------- what to read


def read_plan(mapping: Mapping, table: str = "shown") -> tuple[dict[str, pa.DataType], set[str]]:
    """Columns to read from a text table (name -> type to parse as) and those that may be empty.

    ``table`` is ``"shown"`` (the impressions) or ``"candidates"`` (request id, item id, upstream
    score and item-level columns only, under their ``[candidates] columns`` names)."""
    c = mapping.columns
    wide = mapping.layout == "wide" and table == "shown"
    roles: list[tuple[str, pa.DataType, bool, bool]] = []  # column, type, nullable, per item

    def add(column: str | None, typ: pa.DataType, nullable: bool, per_item: bool) -> None:
        if column is not None:
            roles.append((column, typ, nullable, per_item))

    s, f64 = pa.string(), pa.float64()
    add(c["request_id"], s, False, False)
    add(c["item_id"], s, wide, True)  # an empty wide item list: "no shown item" below
    add(c.get("upstream_score"), f64, False, True)
    for role in ("category", "creator", "is_cold_start", "is_long_tail"):
        add(c.get(role), s, True, True)
    for feat in mapping.group("item"):
        add(feat.column, f64 if feat.kind == "dense" else s, True, True)
    if table == "shown":
        add(c["time"], s, False, False)
        add(c["user_id"], s, False, False)
        add(c.get("position"), pa.int64(), False, True)
        for sig in mapping.signals:
            add(sig.column, f64, sig.fill is not None, True)
        for feat in mapping.group("user") + mapping.group("context"):
            add(feat.column, f64 if feat.kind == "dense" else s, True, False)
        if mapping.split.method == "column":
            add(mapping.split.column, s, False, False)
    types: dict[str, pa.DataType] = {}
    nullable: dict[str, bool] = {}
    if table == "candidates":
        roles = [(mapping.candidate_columns.get(col, col), *rest) for col, *rest in roles]
    for column, typ, null, per_item in roles:
        typ = s if wide and per_item else typ  # list cells are text until split
        if column in types and types[column] != typ:
            typ = s  # one column in two roles: read as text, each role parses it
        types[column] = typ
        nullable[column] = nullable.get(column, True) and null
    return types, {col for col, ok in nullable.items() if ok}


def _per_item_columns(mapping: Mapping) -> set[str]:
    cols = {mapping.columns[r] for r in ITEM_ROLES if r in mapping.columns}
    cols |= {s.column for s in mapping.signals}
    cols |= {f.column for f in mapping.group("item")}
    return cols


# --------------------------------------------------------------------------- wide -> long


def explode_wide(frame: Frame, mapping: Mapping) -> Frame:
    """One row per shown item: list columns flattened, per-request columns repeated."""
    types, _ = read_plan(mapping)
    per_item = _per_item_columns(mapping)
    per_request = [c for c in types if c not in per_item]
    frame.require(list(types))
    item_col = mapping.columns["item_id"]
    items = _list_cells(frame, item_col, mapping.list_separator)
    lengths = pc.fill_null(items.value_lengths(), 0).to_numpy(zero_copy_only=False)
    frame.check(lengths == 0, item_col, "no shown item (empty item list): every request needs "
                "at least one shown item")
    rid_col = mapping.columns["request_id"]
    codes = pc.dictionary_encode(frame.ids(rid_col)).indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    repeat = np.ones(len(codes), bool)
    repeat[first] = False
    frame.check(repeat, rid_col, lambda i: f"request id {frame.column(rid_col)[i].as_py()!r} "
                f"repeats {_short(frame, int(first[codes[i]]))}; a wide table has one row per "
                "request")
    rows = np.repeat(np.arange(frame.num_rows), lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    element = np.arange(len(rows)) - offsets[rows]
    columns: dict[str, pa.Array] = {}
    for col in per_item:
        cells = items if col == item_col else _list_cells(frame, col, mapping.list_separator)
        n_vals = cells.value_lengths().to_numpy(zero_copy_only=False)
        null = cells.is_null().to_numpy(zero_copy_only=False)
        bad = ~null & (np.nan_to_num(n_vals, nan=0) != lengths)
        frame.check(bad, col, lambda i, cells=cells: f"{len(cells[i])} values for "
                    f"{lengths[i]} items in column {item_col!r}")
        if null.any():
            # An empty cell means no value for any of the request's items.
            start = np.concatenate([[0], np.cumsum(np.where(null, 0, lengths))])[:-1]
            take = start[rows] + element
            take = pa.array(take, mask=null[rows])
            columns[col] = cells.flatten().take(take)
        else:
            columns[col] = cells.flatten()
    idx = pa.array(rows)
    for col in per_request:
        columns[col] = frame.table.column(col).take(idx)
    columns[_POSITION] = pa.array(element, pa.int64())
    out = pa.table(columns)
    return Frame(out, frame.files, frame.file_index[rows], frame.number[rows], frame.units,
                 element + 1, list_columns=frozenset(per_item))


def _list_cells(frame: Frame, col: str, sep: str) -> pa.ListArray:
    arr = frame.column(col)
    if pa.types.is_list(arr.type):
        return arr
    if pa.types.is_string(arr.type):
        cells = pc.split_pattern(arr, sep)
        flat = pc.utf8_trim_whitespace(cells.flatten())
        flat = pc.if_else(pc.equal(flat, ""), pa.scalar(None, pa.string()), flat)
        offsets = np.concatenate([[0], np.cumsum(
            pc.fill_null(cells.value_lengths(), 0).to_numpy(zero_copy_only=False))])
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat,
                                        mask=cells.is_null())
    raise DataValidationError(
        f"{frame.where(0)}, column {col!r}: a wide table needs a list (or "
        f"{sep!r}-separated text) per request, found {arr.type}"
    )


def _short(frame: Frame, i: int) -> str:
    f = int(frame.file_index[i])
    return f"{frame.units[f]} {int(frame.number[i])}"


# --------------------------------------------------------------------------- the split seam


def pick_split(
    mapping: Mapping,
    *,
    request_time: np.ndarray,
    request_id: np.ndarray,
    user: np.ndarray,
    column: np.ndarray | None,
    fail: Callable[[int, str], None],
) -> tuple[np.ndarray, list[str]]:
    """The one place that assigns train / valid / test per request (and words the warnings).

    ``fail(request, message)`` raises naming the request's first row in the input."""
    rule = mapping.split
    values = None
    if rule.method == "column":
        assert column is not None
        values = {v: split for split, vals in rule.values.items() for v in vals} or None
        known = set(values) if values else set(SPLITS)
        raw = column.astype(str)
        distinct, inverse = np.unique(raw, return_inverse=True)
        unknown = ~np.isin(distinct, list(known))
        if unknown.any():
            r = int(np.flatnonzero(unknown[inverse.reshape(-1)])[0])
            fail(r, f"split value {raw[r]!r} is not listed in [split] values "
                 f"(known: {sorted(known)})")
    split = assign_split(rule.method, request_time=request_time, request_id=request_id,
                         user=user, column=column, fractions=rule.fractions, values=values)
    return split, check_splits(split)


# --------------------------------------------------------------------------- encodings


@dataclass
class _Encoded:
    index: np.ndarray  # int32 per row
    vocab: list[Any]  # raw values of indices 1..K
    size: int  # 1 + K + hash buckets
    outside: int  # non-empty rows outside the vocabulary (unknown or hashed)


def encode_categorical(values: pa.Array, train: np.ndarray, cap: int | None = None,
                       buckets: int = 0) -> _Encoded:
    """Vocabulary indices by training frequency (see the module docstring, step 6)."""
    enc = pc.dictionary_encode(values)
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    k = len(enc.dictionary)
    seen = train & (codes >= 0)
    counts = np.bincount(codes[seen], minlength=k)
    first = np.full(k, len(codes), dtype=np.int64)
    uniq, first_idx = np.unique(codes[seen], return_index=True)
    first[uniq] = np.flatnonzero(seen)[first_idx]
    order = np.lexsort((first, -counts))
    order = order[counts[order] > 0][:cap]
    index_of = np.zeros(k, dtype=np.int64)
    index_of[order] = np.arange(1, len(order) + 1)
    if buckets:
        rest = np.flatnonzero(index_of == 0)
        raw = enc.dictionary.take(pa.array(rest)).to_pylist()
        hashed = np.fromiter((hash_item_id(str(v)) % buckets for v in raw), np.int64,
                             count=len(raw))
        index_of[rest] = len(order) + 1 + hashed
    index = np.where(codes >= 0, index_of[np.maximum(codes, 0)], 0).astype(np.int32)
    outside = int(((codes >= 0) & ((index == 0) | (index > len(order)))).sum())
    vocab = enc.dictionary.take(pa.array(order)).to_pylist()
    return _Encoded(index, vocab, 1 + len(order) + buckets, outside)


def encode_fixed(values: pa.Array, vocab: list[Any], buckets: int = 0,
                 where: str = "vocabularies") -> _Encoded:
    """Indices from a given vocabulary (``vocabularies.json`` format: index 0 = None, then the
    values of indices 1..K), not fitted on the data. Values are matched as text, so integers
    and their decimal strings, or booleans and ``"true"`` / ``"false"``, name the same value.
    Values outside it are 0, or hashed into ``buckets`` as in :func:`encode_categorical`."""
    if not isinstance(vocab, list) or not vocab or vocab[0] is not None:
        raise DataValidationError(f"{where}: expected a list starting with None (index 0 = "
                                  f"unknown), got {vocab!r:.80}")
    try:
        keys = pc.cast(pa.array(vocab[1:]), pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise DataValidationError(f"{where}: values of mixed or unsupported types ({exc})") \
            from None
    if keys.null_count or len(pc.unique(keys)) != len(keys):
        raise DataValidationError(f"{where}: a vocabulary may hold None only at index 0 and "
                                  "no value twice")
    text = pc.cast(values, pa.string())
    index = pc.fill_null(pc.add(pc.index_in(text, value_set=keys), 1), 0) \
        .to_numpy(zero_copy_only=False).astype(np.int64)
    outside = (index == 0) & text.is_valid().to_numpy(zero_copy_only=False)
    if buckets and outside.any():
        rest = np.flatnonzero(outside)
        raw = values.take(pa.array(rest)).to_pylist()
        index[rest] = len(keys) + 1 + np.fromiter(
            (hash_item_id(str(v)) % buckets for v in raw), np.int64, count=len(raw))
    return _Encoded(index.astype(np.int32), list(vocab[1:]), len(vocab) + buckets,
                    int(outside.sum()))


def encode_tags(tags: pa.ListArray, train: np.ndarray, top_k: int) -> tuple[np.ndarray, list]:
    """0/1 matrix (rows, k) over the ``top_k`` most frequent training tags, and those tags."""
    flat = tags.flatten()
    parent = pc.list_parent_indices(tags).to_numpy(zero_copy_only=False)
    enc = encode_categorical(flat, train[parent] if len(parent) else np.zeros(0, bool), top_k)
    out = np.zeros((len(tags), len(enc.vocab)), dtype=np.float32)
    hit = enc.index > 0
    out[parent[hit], enc.index[hit] - 1] = 1.0
    return out, enc.vocab


def encode_tags_fixed(tags: pa.ListArray, vocab: list[Any], where: str) -> tuple[np.ndarray,
                                                                                list]:
    """0/1 matrix over a given tag list (``vocabularies.json`` format for tags: the tag of each
    column, no unknown entry); other tags set no column."""
    if not isinstance(vocab, list) or any(v is None for v in vocab) \
            or len(set(map(str, vocab))) != len(vocab):
        raise DataValidationError(f"{where}: expected a list of distinct tags, got {vocab!r:.80}")
    flat = pc.cast(tags.flatten(), pa.string())
    parent = pc.list_parent_indices(tags).to_numpy(zero_copy_only=False)
    column = pc.index_in(flat, value_set=pa.array([str(v) for v in vocab], pa.string()))
    column = pc.fill_null(column, -1).to_numpy(zero_copy_only=False)
    out = np.zeros((len(tags), len(vocab)), dtype=np.float32)
    hit = column >= 0
    out[parent[hit], column[hit]] = 1.0
    return out, list(vocab)


def _dense(frame: Frame, feat: Feature) -> np.ndarray:
    vals = frame.floats(feat.column, feat.fill)
    if feat.transform == "log1p":
        vals = np.sign(vals) * np.log1p(np.abs(vals))
    return vals


def _signal(frame: Frame, sig: Signal) -> np.ndarray:
    vals = frame.floats(sig.column, sig.fill)
    if sig.kind == "binary":
        frame.check((vals != 0) & (vals != 1), sig.column,
                    lambda i: f"value {vals[i]:g} of binary signal {sig.name!r} is not 0 or 1")
    else:
        frame.check(vals < 0, sig.column,
                    lambda i: f"value {vals[i]:g} of signal {sig.name!r} is negative (kind "
                    "nonnegative)")
    return vals


def _pool(shown: pa.Array | np.ndarray, cand: pa.Array | np.ndarray | None,
          shown_rows: np.ndarray, cand_rows: np.ndarray) -> Any:
    """Values of the candidate pool: shown rows (display order), then not-shown rows."""
    if isinstance(shown, np.ndarray):
        parts = [shown[shown_rows]]
        if cand is not None:
            parts.append(np.asarray(cand)[cand_rows])
        return np.concatenate(parts)
    parts_a = [shown.take(pa.array(shown_rows))]
    if cand is not None:
        part = cand.take(pa.array(cand_rows))
        if part.type != parts_a[0].type:  # text in one table, integers in the other
            parts_a = [parts_a[0].cast(pa.string())]
            part = part.cast(pa.string())
        parts_a.append(part)
    return pa.concat_arrays(parts_a)


# --------------------------------------------------------------------------- build


def build(shown: Frame, mapping: Mapping, candidates: Frame | None = None,
          vocabularies: dict[str, list[Any]] | None = None) -> ImportResult:
    """The data set of the impressions in ``shown`` (and not-shown ``candidates``).

    ``vocabularies`` (keys as in ``vocabularies.json``: ``group.feature``, ``category``,
    ``creator``) fixes the index order of those categoricals instead of fitting it on the
    training split (:func:`encode_fixed`; ``vocab_cap`` does not apply), and the tag columns of
    tags features (``top_k`` does not apply): to encode new logs like an earlier import, or a
    source whose vocabulary comes from its own catalogue."""
    m, c = mapping, mapping.columns
    fixed = dict(vocabularies or {})
    usable = {f.qualified for f in m.features if f.kind in ("categorical", "tags")} | {
        r for r in ("category", "creator") if r in c}
    unknown = sorted(set(fixed) - usable)
    if unknown:
        raise DataValidationError(f"{m.where}: vocabularies given for {unknown}, which are not "
                                  f"categoricals of the mapping ({', '.join(sorted(usable))})")
    warnings: list[str] = []
    rows_read = shown.num_rows
    if shown.num_rows == 0:
        raise DataValidationError(f"{shown.files[0]}: no data rows")
    if m.layout == "wide":
        shown = explode_wide(shown, m)
        pos_col, base = _POSITION, 0
    else:
        shown.require(list(read_plan(m)[0]))
        pos_col, base = c["position"], m.position_base
    if candidates is not None:
        candidates.alias = dict(m.candidate_columns)
        candidates.require(list(read_plan(m, "candidates")[0]), "candidates table")
    rid_col, item_col, user_col = c["request_id"], c["item_id"], c["user_id"]

    # Requests, items, positions.
    rid = shown.ids(rid_col)
    enc = pc.dictionary_encode(rid)
    req = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    request_ids = enc.dictionary
    n_req = len(request_ids)
    items = shown.ids(item_col)
    cand_items = candidates.ids(item_col) if candidates is not None else None
    all_items = items if cand_items is None else pa.concat_arrays([items, cand_items])
    item_enc = pc.dictionary_encode(all_items)
    item_codes = item_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    icode = item_codes[: len(items)]
    pos = shown.ints(pos_col) - base
    shown.check(pos < 0, pos_col,
                lambda i: f"position {pos[i] + base} is below position_base = {base}")
    n = shown.num_rows
    row = np.arange(n)

    def rid_of(i: int) -> str:
        return request_ids[int(req[i])].as_py()

    # One user per request.
    users = shown.ids(user_col)
    ucode = pc.dictionary_encode(users).indices.to_numpy(zero_copy_only=False)
    _, first_row = np.unique(req, return_index=True)
    other = ucode != ucode[first_row[req]]
    shown.check(other, user_col, lambda i: f"request {rid_of(i)!r} has user "
                f"{users[i].as_py()!r} here but {users[int(first_row[req[i]])].as_py()!r} at "
                f"{_short(shown, int(first_row[req[i]]))}")

    # Items shown twice in one request.
    order = np.lexsort((row, pos, icode, req))
    r_s, i_s = req[order], icode[order]
    dup = np.zeros(n, bool)
    dup[1:] = (r_s[1:] == r_s[:-1]) & (i_s[1:] == i_s[:-1])
    n_dup = int(dup.sum())
    if n_dup and m.duplicates == "error":
        group_start = np.maximum.accumulate(np.where(~dup, np.arange(n), 0))
        k = np.flatnonzero(dup)[np.argmin(order[dup])]
        j, first = int(order[k]), int(order[group_start[k]])
        shown.fail(j, item_col, f"item {items[j].as_py()!r} shown twice in request "
                   f"{rid_of(j)!r} (also at {_short(shown, first)}); set [duplicates] policy "
                   '= "drop" or "merge" to keep its first position')

    # Positions: contiguous from 0 in each request, one item per position.
    order_p = np.lexsort((row, icode, pos, req))
    r_p, p_p, i_p = req[order_p], pos[order_p], icode[order_p]
    same_req = np.zeros(n, bool)
    same_req[1:] = r_p[1:] == r_p[:-1]
    same_pos = same_req.copy()
    same_pos[1:] &= p_p[1:] == p_p[:-1]
    clash = same_pos.copy()
    clash[1:] &= i_p[1:] != i_p[:-1]
    if clash.any():
        k = int(np.flatnonzero(clash)[0])
        j, prev = int(order_p[k]), int(order_p[k - 1])
        shown.fail(j, pos_col, f"position {p_p[k] + base} of request {rid_of(j)!r} is also "
                   f"held by item {items[prev].as_py()!r} ({_short(shown, prev)})")
    unique_pos = np.cumsum(~same_pos) - 1
    req_start = unique_pos[~same_req]  # one per request, in code order
    rank = unique_pos - req_start[r_p]
    bad = p_p != rank
    if bad.any():
        first_bad = bad & ~np.concatenate([[False], bad[:-1] & same_req[1:]])
        ks = np.flatnonzero(first_bad)
        k = int(ks[np.argmin(order_p[ks])])
        j = int(order_p[k])
        if rank[k] == 0:
            what = f"request {rid_of(j)!r} starts at position {p_p[k] + base}, not {base} " \
                   f"(position_base = {base})"
        else:
            what = f"position {p_p[k] + base} follows position {p_p[k - 1] + base} in request " \
                   f"{rid_of(j)!r}: positions of a request must be contiguous"
        shown.fail(j, pos_col, what)

    # Signals, then duplicates dropped (first position kept) or merged (max per signal).
    signals = {s.name: _signal(shown, s) for s in m.signals}
    kept = order[~dup]
    if n_dup and m.duplicates == "merge":
        starts = np.flatnonzero(~dup)
        for name, vals in signals.items():
            merged = vals.copy()
            merged[kept] = np.maximum.reduceat(vals[order], starts)
            signals[name] = merged
    disp = kept[np.lexsort((pos[kept], req[kept]))]  # shown rows in display order
    req_shown = req[disp]
    m_len = np.bincount(req_shown, minlength=n_req)
    s_off = np.concatenate([[0], np.cumsum(m_len)])
    new_pos = np.arange(len(disp)) - s_off[req_shown]
    head = disp[s_off[:-1]]  # each request's first shown row

    times = shown.times(c["time"], m.time_format)
    request_time = np.minimum.reduceat(times[disp], s_off[:-1])
    request_user = users.take(pa.array(head))

    # Not-shown candidates.
    cand_rows = np.zeros(0, np.int64)
    creq = np.zeros(0, np.int64)
    n_already = n_cand_dup = 0
    if candidates is not None:
        crid = candidates.ids(rid_col)
        found = pc.index_in(crid, value_set=request_ids)
        candidates.check(found.is_null(), rid_col, lambda i: f"request {crid[i].as_py()!r} "
                         f"has no shown item in {shown.files[0]} (every request needs at least "
                         "one shown item)")
        creq_all = found.to_numpy(zero_copy_only=False).astype(np.int64)
        ccode = item_codes[len(items):]
        n_items = len(item_enc.dictionary)
        key_c = creq_all * n_items + ccode
        already = np.isin(key_c, req_shown * n_items + icode[disp])
        crow = np.arange(len(key_c))
        corder = np.lexsort((crow, key_c))
        cdup_sorted = np.zeros(len(key_c), bool)
        cdup_sorted[1:] = key_c[corder][1:] == key_c[corder][:-1]
        cdup = np.zeros(len(key_c), bool)
        cdup[corder] = cdup_sorted
        cdup &= ~already
        if cdup.any() and m.duplicates == "error":
            j = int(np.flatnonzero(cdup)[0])
            first = int(np.flatnonzero(key_c == key_c[j])[0])
            candidates.fail(j, item_col, f"item {cand_items[j].as_py()!r} listed twice for "
                            f"request {crid[j].as_py()!r} (also at {_short(candidates, first)});"
                            ' set [duplicates] policy = "drop" or "merge" to keep the first')
        n_already, n_cand_dup = int(already.sum()), int(cdup.sum())
        keep = np.flatnonzero(~already & ~cdup)
        cand_rows = keep[np.argsort(creq_all[keep], kind="stable")]
        creq = creq_all[cand_rows]
        item_pool_codes = np.concatenate([icode[disp], ccode[cand_rows]])
    else:
        item_pool_codes = icode[disp]
    n_shown = len(disp)
    pool_req = np.concatenate([req_shown, creq])
    pool_pos = np.concatenate([new_pos, np.full(len(creq), -1)])
    n_pool = len(pool_req)

    def pooled(fn: Callable[[Frame], Any]) -> Any:
        return _pool(fn(shown), fn(candidates) if candidates is not None else None, disp,
                     cand_rows)

    # Upstream score and candidate order.
    score_col = c.get("upstream_score")
    if score_col is not None:
        score = pooled(lambda fr: fr.floats(score_col))
        tie = np.random.default_rng(m.seed).random(n_pool)
        upstream_note = f"column {score_col!r}"
    else:
        c_first = np.concatenate([[0], np.cumsum(np.bincount(creq, minlength=n_req))])
        q = np.arange(len(creq)) - c_first[creq] if len(creq) else np.zeros(0, np.int64)
        score = 1.0 / (1.0 + np.concatenate([new_pos, m_len[creq] + q]))
        tie = np.zeros(n_pool)
        upstream_note = ("none logged: the upstream order is taken to be the display order, "
                         "then the not-shown candidates in table order; score 1 / (1 + rank)")
        warnings.append("no upstream_score column: candidates are stored in the logged display "
                        "order, so keeping the input order replays the logged list")
    perm = np.lexsort((tie, -score, pool_req))
    n_cand = np.bincount(pool_req, minlength=n_req)
    c_off = np.concatenate([[0], np.cumsum(n_cand)])
    slot = np.empty(n_pool, np.int64)
    slot[perm] = np.arange(n_pool)
    exposed = slot[:n_shown] - c_off[req_shown]

    # Split.
    split_values = None
    if m.split.method == "column":
        split_values = np.asarray(shown.column(m.split.column).take(pa.array(head))
                                  .cast(pa.string()).to_numpy(zero_copy_only=False))

    def split_fail(r: int, what: str) -> None:
        shown.fail(int(head[r]), m.split.column or "", what)

    split, split_warnings = pick_split(
        m, request_time=request_time,
        request_id=request_ids.to_numpy(zero_copy_only=False),
        user=request_user.to_numpy(zero_copy_only=False), column=split_values, fail=split_fail,
    )
    warnings += split_warnings
    if m.split.method == "time":
        warnings += split_boundary_warnings(split, request_time, req_shown, times[disp],
                                            request_id=request_ids.to_numpy(False))
    train_req = split == "train"
    pool_train = train_req[pool_req]

    # Features.
    vocabularies: dict[str, list[Any]] = {}
    vocab_sizes: dict[str, int] = {}
    out_of_vocab: dict[str, int] = {}
    groups: dict[str, dict[str, list]] = {
        g: {"cat": [], "cat_spec": [], "dense": [], "dense_names": []}
        for g in ("user", "item", "context")
    }
    def per_request(fn: Callable[[Frame], Any]) -> Any:
        vals = fn(shown)  # every row is checked, the request's first shown row is kept
        return vals[head] if isinstance(vals, np.ndarray) else vals.take(pa.array(head))

    for feat in m.features:
        g = groups[feat.group]
        get, train = (pooled, pool_train) if feat.group == "item" else (per_request, train_req)
        if feat.kind == "categorical":
            col = feat.column
            raw = get(lambda fr, col=col: fr.raw_values(col))
            if feat.qualified in fixed:
                e = encode_fixed(raw, fixed[feat.qualified], feat.hash_buckets,
                                 f"vocabularies[{feat.qualified!r}]")
            else:
                e = encode_categorical(raw, train, feat.vocab_cap, feat.hash_buckets)
            g["cat"].append(e.index)
            g["cat_spec"].append(CategoricalFeature(feat.name, e.size))
            vocabularies[feat.qualified] = [None, *e.vocab]
            vocab_sizes[feat.qualified] = e.size
            if e.outside:
                out_of_vocab[feat.qualified] = e.outside
        elif feat.kind == "dense":
            g["dense"].append(get(lambda fr, feat=feat: _dense(fr, feat)))
            g["dense_names"].append(feat.name)
        else:
            tags = get(lambda fr, feat=feat: fr.tags(feat.column, feat.sep))
            if feat.qualified in fixed:
                matrix, vocab = encode_tags_fixed(tags, fixed[feat.qualified],
                                                  f"vocabularies[{feat.qualified!r}]")
            else:
                matrix, vocab = encode_tags(tags, train, feat.top_k)
            g["dense"] += list(matrix.T)
            g["dense_names"] += [f"{feat.name}:{t}" for t in vocab]
            vocabularies[feat.qualified] = vocab
            vocab_sizes[feat.qualified] = len(vocab)

    entity_codes = None
    category = np.zeros(n_pool, np.int32)
    creator = np.zeros(n_pool, np.int32)
    n_categories = n_creators = 1
    for role in ("category", "creator"):
        col = c.get(role)
        if col is None:
            continue
        raw = pooled(lambda fr, col=col: fr.raw_values(col))
        e = encode_fixed(raw, fixed[role], where=f"vocabularies[{role!r}]") if role in fixed \
            else encode_categorical(raw, pool_train)
        vocabularies[role] = [None, *e.vocab]
        vocab_sizes[role] = e.size
        if role == "category":
            category, n_categories = e.index, e.size
        else:
            creator, n_creators = e.index, e.size
            entity_codes = pc.fill_null(pc.dictionary_encode(raw).indices, -1) \
                .to_numpy(zero_copy_only=False).astype(np.int64)
    if entity_codes is None:
        entity_codes = item_pool_codes
        entity = "item"
    else:
        entity = "creator"
    flags = {}
    impressions = np.bincount(entity_codes[pool_train & (pool_pos >= 0) & (entity_codes >= 0)],
                              minlength=max(int(entity_codes.max()) + 1, 1))
    known = entity_codes >= 0
    safe = np.maximum(entity_codes, 0)
    derived_flags = {
        "is_cold_start": known & (impressions[safe] == 0),
        "is_long_tail": known & long_tail_flags(impressions, m.long_tail_quantile)[safe],
    }
    flag_notes = {}
    for role in ("is_cold_start", "is_long_tail"):
        col = c.get(role)
        if col is not None:
            flags[role] = pooled(lambda fr, col=col: fr.bools(col))
            flag_notes[role] = f"column {col!r}"
        else:
            flags[role] = derived_flags[role]
            flag_notes[role] = (
                f"the {entity} has no impression in the training split" if role == "is_cold_start"
                else f"the {entity}'s training impressions are below the "
                f"{m.long_tail_quantile} quantile of the {entity}s shown in training"
            )

    if m.derived:
        derived = _derived(m, signals, disp, n_pool, pool_req, pool_pos, item_pool_codes,
                           request_time, split, request_user,
                           category if c.get("category") else None)
        for name in m.derived:
            groups["item"]["dense"].append(derived[name])
            groups["item"]["dense_names"].append(name)

    def matrix(cols: list[np.ndarray], rows: int, dtype: type) -> np.ndarray:
        if not cols:
            return np.zeros((rows, 0), dtype)
        return np.stack([np.asarray(v, dtype) for v in cols], axis=1)

    item_id = item_enc.dictionary.take(pa.array(item_pool_codes[perm]))
    spec = FeatureSpec(
        source=m.source,
        user_categorical=groups["user"]["cat_spec"],
        user_dense=groups["user"]["dense_names"],
        item_categorical=groups["item"]["cat_spec"],
        item_dense=groups["item"]["dense_names"],
        context_categorical=groups["context"]["cat_spec"],
        context_dense=groups["context"]["dense_names"],
        labels=[s.name for s in m.signals],
        label_kinds={s.name: s.kind for s in m.signals},
        gain_weights={s.name: s.gain for s in m.signals},
        n_categories=n_categories,
        n_creators=n_creators,
        extra={
            "import": {"layout": m.layout, "mapping": m.to_dict()},
            "split": f"{m.split.method} ({', '.join(map(str, m.split.fractions))})"
            if m.split.method != "column" else f"column {m.split.column!r}",
            "upstream_score": upstream_note,
            "candidate_order": "upstream score descending, ties by a seeded random key",
            "is_cold_start": flag_notes["is_cold_start"],
            "is_long_tail": flag_notes["is_long_tail"],
            "vocabularies": f"{VOCAB_FILE}: training-split frequency order, 0 = unknown"
            + (f"; given, not fitted: {', '.join(sorted(fixed))}" if fixed else ""),
            "seed": m.seed,
        },
    )
    reqs = Requests(
        request_id=request_ids,
        time=request_time,
        user_id=request_user,
        split=split,
        user_cat=matrix(groups["user"]["cat"], n_req, np.int32),
        user_dense=matrix(groups["user"]["dense"], n_req, np.float32),
        context_cat=matrix(groups["context"]["cat"], n_req, np.int32),
        context_dense=matrix(groups["context"]["dense"], n_req, np.float32),
        n=n_cand,
        item_id=item_id,
        item_cat=matrix(groups["item"]["cat"], n_pool, np.int32)[perm],
        item_dense=matrix(groups["item"]["dense"], n_pool, np.float32)[perm],
        upstream_score=np.asarray(score)[perm],
        category=category[perm],
        creator=creator[perm],
        is_cold_start=flags["is_cold_start"][perm],
        is_long_tail=flags["is_long_tail"][perm],
        m=m_len,
        exposed=exposed,
        labels={name: vals[disp] for name, vals in signals.items()},
    )
    table = reqs.to_table(spec)
    for name, count in out_of_vocab.items():
        rule = "hashed" if any(f.qualified == name and f.hash_buckets for f in m.features) \
            else "unknown (0)"
        warnings.append(f"{name}: {count} value(s) outside the training vocabulary, {rule}")
    report = {
        "rows_read": {"shown": rows_read,
                      "candidates": candidates.num_rows if candidates is not None else 0},
        "requests": n_req,
        "shown_items": n_shown,
        "candidates": n_pool,
        "not_shown_candidates": n_pool - n_shown,
        "duplicates": {
            "policy": m.duplicates,
            "dropped": n_dup + n_cand_dup if m.duplicates == "drop" else 0,
            "merged": n_dup + n_cand_dup if m.duplicates == "merge" else 0,
            "candidate_rows_already_shown": n_already,
        },
        "vocabulary_sizes": vocab_sizes,
        "splits": {s: int((split == s).sum()) for s in SPLITS},
        "labels": {s.name: {"kind": s.kind, "gain": s.gain,
                            "mean": float(np.mean(signals[s.name][disp]))}
                   for s in m.signals},
        "warnings": warnings,
    }
    return ImportResult(table, spec, vocabularies, report)


def _derived(m: Mapping, signals: dict[str, np.ndarray], disp: np.ndarray, n_pool: int,
             pool_req: np.ndarray, pool_pos: np.ndarray, item_codes: np.ndarray,
             request_time: np.ndarray, split: np.ndarray, request_user: pa.Array,
             category: np.ndarray | None) -> dict[str, np.ndarray]:
    try:
        from genrerank.data.derived import derived_features
    except ImportError as exc:  # optional module; the mapping check normally catches this
        raise DataValidationError(f"{m.where}: [derived] names: {exc}") from exc
    click_name = next((s.name for s in m.signals if s.name == "click"), None) or next(
        (s.name for s in m.signals if s.kind == "binary"), None)
    click = None
    if click_name is not None:
        click = np.zeros(n_pool)
        click[: len(disp)] = signals[click_name][disp]
    user = pc.dictionary_encode(request_user).indices.to_numpy(zero_copy_only=False)
    try:
        return derived_features(
            list(m.derived), request=pool_req, request_time=request_time, request_split=split,
            user=user, item=item_codes, position=pool_pos, click=click, category=category,
        )
    except ValueError as exc:
        raise DataValidationError(f"{m.where}: [derived] names: {exc}") from exc
