"""Helpers shared by the real-log loaders.

Reading
    :func:`read_delimited` reads a TSV/CSV with pyarrow (multi-threaded, typed, streamed in
    blocks) and adds a ``_line`` column holding each kept row's 1-based line number in the file
    (the header counts as line 1). Every later check can therefore name file, line and field.
    A conversion error is diagnosed on a slow second pass over that one column, so the fast path
    stays fast and the slow path names the line.

Vocabularies
    :func:`build_vocab` maps the sorted distinct values of an attribute to 1..k (0 = unknown).
    Vocabularies are built on *all* rows of catalogue / metadata files (news categories, ad
    categories, video authors, user attributes). They describe items and users, never outcomes,
    so building them on every row leaks no label information; a value that only occurs in the
    test period gets an index whose embedding simply stays untrained.

Popularity and fairness flags
    Counts that feed features or the ``is_cold_start`` / ``is_long_tail`` flags come only from data
    that precedes the requests (MIND / EB-NeRD reading histories) or from the training split
    (Avito, KuaiRand), so no test outcome shapes a feature. See :func:`long_tail_flags`.

Candidate order
    The logs give only the shown list, in display order. If candidates were stored in that order,
    "keep the input order" would replay the logged list exactly and look like a perfect re-ranker.
    :func:`order_candidates` therefore orders candidates as a ranking stage would hand them over:
    by upstream score, descending, ties broken by a seeded random key; ``exposed`` keeps the
    logged display order as indices into that candidate list.
"""

from __future__ import annotations

import csv
import functools
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from genrerank.data.builder import Requests, list_array, matrix_array  # noqa: F401 (re-export)
from genrerank.data.schema import DataValidationError, FeatureSpec, type_kind
from genrerank.data.splits import DEFAULT_FRACTIONS, assign_time_split

logger = logging.getLogger("genrerank.data.loaders")

Loader = Callable[..., tuple[pa.Table, FeatureSpec]]
#: format name -> loader(input_dir, **options) returning (table, spec)
LOADERS: dict[str, Loader] = {}

LINE = "_line"
_BLOCK_SIZE = 16 << 20


def register_loader(name: str) -> Callable[[Loader], Loader]:
    """Class-free registry: ``@register_loader("mind")`` adds the function to :data:`LOADERS`."""

    def decorate(fn: Loader) -> Loader:
        if name in LOADERS:
            raise ValueError(f"loader {name!r} is registered twice")
        LOADERS[name] = fn
        return fn

    return decorate


# --------------------------------------------------------------------------- errors and files


def fail(file: str | Path, line: int, field: str, what: str) -> NoReturn:
    """Raise the standard message: ``"{file}: line {n}, field {name!r}: {what}"``."""
    raise DataValidationError(f"{file}: line {line}, field {field!r}: {what}")


def fail_row(file: str | Path, row: int, key: str, field: str, what: str) -> NoReturn:
    """Like :func:`fail` for Parquet input: rows are 0-based, ``key`` names the record."""
    raise DataValidationError(f"{file}: row {row} ({key}), field {field!r}: {what}")


def require_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: expected file {name!r} not found")
    return path


def require_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: input folder not found")
    return path


def first_bad(mask: np.ndarray | pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first True in a boolean mask (nulls count as False), or None."""
    if isinstance(mask, pa.ChunkedArray | pa.Array):
        mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def check_rows(
    table: pa.Table,
    file: Path,
    field: str,
    bad: np.ndarray | pa.Array | pa.ChunkedArray,
    what: str | Callable[[int], str],
) -> None:
    """Fail on the first row of ``table`` (read by :func:`read_delimited`) where ``bad`` holds.

    ``what`` words the problem, or ``what(i)`` does for row ``i`` (built only on failure).
    """
    i = first_bad(bad)
    if i is not None:
        fail(file, int(table[LINE][i].as_py()), field, what(i) if callable(what) else what)


# --------------------------------------------------------------------------- reading text files

_VALID_TEXT = {
    "int": re.compile(r"^\s*[+-]?\d+\s*$"),
    "float": re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"),
}


def _header(path: Path, delimiter: str, quoted: bool) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        first = fh.readline().rstrip("\r\n")
    if quoted:
        return next(csv.reader([first], delimiter=delimiter))
    return first.split(delimiter)


def _line_of_text(path: Path, text: str, skip: int) -> int | None:
    """Line number of the first line equal to ``text`` (slow; used only to word an error)."""
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        for n, line in enumerate(fh, start=1):
            if n > skip and line.rstrip("\r\n") == text.rstrip("\r\n"):
                return n
    return None


@dataclass
class _BadRow:
    rows: list = field(default_factory=list)

    def __call__(self, row) -> str:
        self.rows.append(row)
        return "error"


def _iter_batches(path, names, header, delimiter, quoted, types, handler, include):
    read = pacsv.ReadOptions(
        column_names=None if header else names,
        block_size=_BLOCK_SIZE,
        use_threads=True,
        encoding="utf8",
    )
    parse = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if quoted else False,
        ignore_empty_lines=False,  # keeps one row per line, so row index -> line number
        invalid_row_handler=handler,
    )
    conv = pacsv.ConvertOptions(
        column_types=types,
        include_columns=include,
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    with pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=conv) as r:
        yield from r


def read_delimited(
    path: Path,
    columns: dict[str, pa.DataType],
    *,
    delimiter: str,
    header: bool = True,
    names: list[str] | None = None,
    quoted: bool = False,
    nullable: Iterable[str] = (),
    row_filter: Callable[[pa.Table], pa.Array | pa.ChunkedArray] | None = None,
) -> pa.Table:
    """Read ``columns`` (name -> Arrow type) of a delimited text file, checking as it goes.

    - ``header=True``: the first line names the columns (all of ``columns`` must be there);
      otherwise ``names`` lists every column of the file in order.
    - Rows with the wrong number of fields, values that do not parse as their type, and empty
      values in columns not listed in ``nullable`` raise :class:`DataValidationError` naming the
      file, the line and the field. Blank lines (every read column empty) are skipped.
    - ``row_filter(table)`` may return a boolean mask of rows to keep (applied before the
      empty-value check, so a column may be required only in kept rows; a filter should keep
      rows whose key is empty, mask null -> True, so that they fail that check).

    Returns the kept rows plus ``_line`` (int64, 1-based line number in the file).
    """
    if header:
        file_names = _header(path, delimiter, quoted)
        missing = [c for c in columns if c not in file_names]
        if missing:
            raise DataValidationError(
                f"{path}: line 1 (header): missing column(s) {missing}; found {file_names}"
            )
    else:
        assert names is not None, "headerless files need names"
        file_names = list(names)
    skip = 1 if header else 0
    include = list(columns)
    nullable = set(nullable)
    bad_rows = _BadRow()
    pieces: list[pa.Table] = []
    offset = 0
    try:
        for batch in _iter_batches(
            path, file_names, header, delimiter, quoted, columns, bad_rows, include
        ):
            lines = pa.array(np.arange(offset, offset + batch.num_rows) + skip + 1, pa.int64())
            offset += batch.num_rows
            table = pa.Table.from_batches([batch]).append_column(LINE, lines)
            # Blank lines (kept above only so that rows map to lines) are skipped.
            blank = functools.reduce(pc.and_, [table[c].is_null() for c in include])
            if pc.any(blank).as_py():
                table = table.filter(pc.invert(blank))
            if row_filter is not None:
                table = table.filter(row_filter(table))
            for name in include:
                if name not in nullable and table[name].null_count:
                    i = first_bad(table[name].is_null())
                    fail(path, int(table[LINE][i].as_py()), name, "empty value")
            pieces.append(table)
    except pa.ArrowInvalid as exc:
        if bad_rows.rows:
            row = bad_rows.rows[0]
            line = row.number if row.number is not None else _line_of_text(path, row.text, skip)
            where = f"line {line}" if line is not None else "a line"
            sep = "tab" if delimiter == "\t" else repr(delimiter)
            raise DataValidationError(
                f"{path}: {where}: expected {row.expected_columns} {sep}-separated fields "
                f"({', '.join(file_names)}), got {row.actual_columns}"
            ) from None
        _diagnose(path, exc, file_names, header, delimiter, quoted, columns)
        raise DataValidationError(f"{path}: {exc}") from exc
    if not pieces:
        empty = pa.schema([pa.field(n, t) for n, t in columns.items()] + [(LINE, pa.int64())])
        return empty.empty_table()
    return pa.concat_tables(pieces).combine_chunks()


def _diagnose(path, exc, file_names, header, delimiter, quoted, columns) -> None:
    """Find the line of a value pyarrow could not convert (second pass, strings only)."""
    m = re.search(r"column #(\d+)", str(exc))
    if not m or int(m.group(1)) >= len(file_names):
        return
    name = file_names[int(m.group(1))]
    if name not in columns:
        return
    kind = type_kind(columns[name])
    pattern = _VALID_TEXT.get(kind)  # only int and float have one
    if pattern is None:
        return
    offset = 0
    skip = 1 if header else 0
    batches = _iter_batches(
        path, file_names, header, delimiter, quoted, {name: pa.string()}, _BadRow(), [name]
    )
    for batch in batches:
        values = batch.column(0)
        ok = pc.match_substring_regex(values, pattern.pattern)
        bad = pc.and_(pc.invert(pc.fill_null(ok, True)), pc.is_valid(values))
        i = first_bad(bad)
        if i is not None:
            fail(path, offset + i + skip + 1, name, f"{values[i].as_py()!r} is not a valid {kind}")
        offset += batch.num_rows


# --------------------------------------------------------------------------- vocabularies


def build_vocab(values: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Array:
    """Sorted distinct non-null values; value ``vocab[k]`` gets index ``k + 1`` (0 = unknown)."""
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
    uniq = pc.unique(arr.drop_null() if hasattr(arr, "drop_null") else arr)
    if isinstance(uniq, pa.ChunkedArray):
        uniq = uniq.combine_chunks()
    return pc.take(uniq, pc.sort_indices(uniq))


def lookup(values: pa.Array | pa.ChunkedArray | np.ndarray, vocab: pa.Array) -> np.ndarray:
    """Index of each value in ``vocab`` plus one; 0 for null or out-of-vocabulary values."""
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
    if arr.type != vocab.type:
        arr = arr.cast(vocab.type)
    idx = pc.index_in(arr, value_set=vocab)
    return pc.fill_null(pc.add(idx, 1), 0).to_numpy(zero_copy_only=False).astype(np.int32)


# --------------------------------------------------------------------------- popularity and flags


def long_tail_flags(counts: np.ndarray, quantile: float = 0.8) -> np.ndarray:
    """True where ``counts`` is below the ``quantile`` of the counts of entities seen at least once.

    Entities never seen (count 0) are long-tail. With the default 0.8 the most popular ~20 % of
    the entities (by count) form the head, the rest the long tail.
    """
    counts = np.asarray(counts, dtype=np.float64)
    seen = counts[counts > 0]
    if len(seen) == 0:
        return np.ones(len(counts), dtype=bool)
    return counts < np.quantile(seen, quantile)


def split_requests(
    times: np.ndarray, request_ids: np.ndarray, fractions: Iterable[float] | None
) -> np.ndarray:
    fr = tuple(float(f) for f in (fractions if fractions is not None else DEFAULT_FRACTIONS))
    if len(fr) != 3:
        raise ValueError(f"split_fractions needs three numbers (train, valid, test), got {fr}")
    return assign_time_split(times, request_ids, fr)  # type: ignore[arg-type]


def order_candidates(
    offsets: np.ndarray, score: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate order for requests whose rows are stored contiguously in logged display order.

    ``offsets`` (R + 1) delimit the requests in the flat arrays; ``score`` is the upstream score of
    each flat row. Returns ``perm`` (flat row index of each candidate slot, requests kept
    contiguous) and ``exposed`` (for each flat row in display order, its candidate index within
    its request).
    """
    n_rows = int(offsets[-1])
    lengths = np.diff(offsets)
    req = np.repeat(np.arange(len(lengths)), lengths)
    tie = np.random.default_rng(seed).random(n_rows)
    perm = np.lexsort((tie, -np.asarray(score, dtype=np.float64), req))
    slot = np.empty(n_rows, dtype=np.int64)
    slot[perm] = np.arange(n_rows)
    exposed = (slot - offsets[:-1][req]).astype(np.int32)
    return perm, exposed


# --------------------------------------------------------------------------- building the table

# The table builder is public API in genrerank.data.builder; the loaders import it from here.
_list = list_array
_matrix = matrix_array


def take_rows(values: np.ndarray, rows: np.ndarray, default: float) -> np.ndarray:
    """``values[rows]`` where ``rows >= 0``, ``default`` where ``rows == -1`` (absent)."""
    values = np.asarray(values)
    out = np.full(len(rows), default, dtype=np.result_type(values.dtype, np.asarray(default)))
    hit = rows >= 0
    out[hit] = values[rows[hit]]
    return out


def int_strings(values: np.ndarray) -> pa.Array:
    """Integer ids as an Arrow string array (much faster than ``ndarray.astype(str)``)."""
    return pc.cast(pa.array(np.asarray(values, dtype=np.int64)), pa.string())


def log1p(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(x, dtype=np.float64), 0.0)).astype(np.float32)


def map_keys(
    keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: float | bool
) -> np.ndarray:
    """``values[k]`` where ``query == keys[k]`` (``keys`` sorted and unique), else ``default``."""
    query = np.asarray(query)
    if len(keys) == 0:
        return np.full(len(query), default, dtype=np.asarray(values).dtype)
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[pos] == query, values[pos], default)


def segment_ids(lengths: np.ndarray) -> np.ndarray:
    """Segment index of each flat row, for contiguous segments of the given lengths."""
    return np.repeat(np.arange(len(lengths)), lengths)


def first_duplicate_in_segments(segment: np.ndarray, key: np.ndarray) -> int | None:
    """Flat index of the first row whose ``key`` already occurred earlier in its segment."""
    idx = np.arange(len(key))
    order = np.lexsort((idx, key, segment))
    same = (segment[order][1:] == segment[order][:-1]) & (key[order][1:] == key[order][:-1])
    if not same.any():
        return None
    return int(order[1:][same].min())


def summary_line(name: str, summary: dict) -> str:
    return f"{name}: " + ", ".join(f"{k}={v}" for k, v in summary.items())
