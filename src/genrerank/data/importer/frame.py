"""Input rows with their origin, and typed column access whose errors name file, row and column.

A :class:`Frame` is an Arrow table (the mapped columns, under their names in the input) plus,
per row, the file it came from and its number there: the 1-based *line* for CSV / TSV (the header
is line 1) or the 1-based data *row* for Parquet, Arrow tables and DataFrames. Rows exploded from
a wide table also carry the element index inside their list cell. Every accessor below checks
the whole column at once (vectorised) and, on a bad value, raises one
:class:`~genrerank.data.schema.DataValidationError` line such as
``data.csv: line 7, column 'clicked': value 2.0 of binary signal 'click' is not 0 or 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrerank.data.schema import DataValidationError, type_kind

# Times with a zone (Z or +hh:mm after the clock time) parse to UTC; those without are UTC too.
_ZONED = r"\d:\d\d(:\d\d(\.\d*)?)?\s*(Z|z|[+-]\d\d(:?\d\d)?)$"
_DIGITS = r"^\s*[+-]?\d+\s*$"
_TRUE = ("1", "true", "t", "yes", "y")
_FALSE = ("0", "false", "f", "no", "n")


@dataclass
class Frame:
    table: pa.Table
    files: list[str]
    file_index: np.ndarray  # int32 per row: index into files
    number: np.ndarray  # int64 per row: line (text files) or 1-based data row
    units: list[str]  # per file: "line" or "row"
    element: np.ndarray | None = None  # int64 per row: 1-based element of a list cell, or None
    #: Mapping column -> this table's name for it (a candidates table may name columns apart).
    alias: dict[str, str] = field(default_factory=dict)
    #: Columns exploded from list cells: their errors also name the element.
    list_columns: frozenset[str] = frozenset()

    @classmethod
    def from_arrow(cls, table: pa.Table, name: str, unit: str = "row", first: int = 1) -> Frame:
        n = table.num_rows
        return cls(table, [name], np.zeros(n, np.int32), np.arange(first, first + n), [unit])

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    # ------------------------------------------------------------------ errors

    def where(self, i: int, column: str | None = None) -> str:
        f = int(self.file_index[i])
        out = f"{self.files[f]}: {self.units[f]} {int(self.number[i])}"
        if self.element is not None and (column is None or column in self.list_columns):
            out += f", element {int(self.element[i])}"
        return out

    def fail(self, i: int, column: str, what: str) -> NoReturn:
        column = self.alias.get(column, column)
        raise DataValidationError(f"{self.where(i, column)}, column {column!r}: {what}")

    def check(self, bad: Any, column: str, what: str | Callable[[int], str]) -> None:
        """Fail on the first row where ``bad`` (bool mask, nulls = False) holds."""
        i = first_true(bad)
        if i is not None:
            self.fail(i, column, what(i) if callable(what) else what)

    def require(self, names: list[str], what: str = "table") -> None:
        """Every column in ``names`` (this table's own names) must be present."""
        missing = [c for c in dict.fromkeys(names) if c not in self.table.column_names]
        if missing:
            raise DataValidationError(
                f"{self.files[0]}: missing column(s) {missing} named in the mapping; the "
                f"{what} has {self.table.column_names}"
            )

    # ------------------------------------------------------------------ rows

    def take(self, rows: np.ndarray) -> Frame:
        idx = pa.array(np.asarray(rows, dtype=np.int64))
        return Frame(
            self.table.take(idx), self.files, self.file_index[rows], self.number[rows],
            self.units, None if self.element is None else self.element[rows], self.alias,
            self.list_columns,
        )

    @staticmethod
    def concat(frames: list[Frame]) -> Frame:
        """Stack frames of the same columns (the files of a folder)."""
        files: list[str] = []
        units: list[str] = []
        index = []
        for fr in frames:
            index.append(fr.file_index + len(files))
            files += fr.files
            units += fr.units
        table = pa.concat_tables([fr.table for fr in frames], promote_options="permissive")
        return Frame(
            table.combine_chunks(), files, np.concatenate(index).astype(np.int32),
            np.concatenate([fr.number for fr in frames]), units,
        )

    # ------------------------------------------------------------------ typed columns

    def column(self, name: str) -> pa.Array:
        """The column as one array; dictionary (pandas categorical) and large types unwrapped."""
        col = self.table.column(self.alias.get(name, name))
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if isinstance(arr, pa.ChunkedArray):  # combine_chunks of an empty chunked array
            arr = pa.array([], type=arr.type)
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        if pa.types.is_large_string(arr.type):
            arr = arr.cast(pa.string())
        if pa.types.is_large_list(arr.type):
            arr = arr.cast(pa.list_(arr.type.value_type))
        return arr

    def no_nulls(self, arr: pa.Array, name: str) -> None:
        if arr.null_count:
            self.check(arr.is_null(), name, "empty value")

    def ids(self, name: str) -> pa.Array:
        """Identifiers as strings: text, or integers written in decimal."""
        arr = self.column(name)
        self.no_nulls(arr, name)
        kind = type_kind(arr.type)
        if kind == "string":
            return arr
        if kind == "int":
            return pc.cast(arr, pa.string())
        if kind == "float":
            vals = arr.to_numpy(zero_copy_only=False)
            self.check(vals != np.round(vals), name,
                       lambda i: f"identifier {float(vals[i]):g} is not a whole number or text")
            return pc.cast(pc.cast(arr, pa.int64()), pa.string())
        raise self._wrong_type(name, kind, "text or integer identifiers")

    def raw_values(self, name: str) -> pa.Array:
        """Categorical values: text or integers (nulls allowed: unknown)."""
        arr = self.column(name)
        kind = type_kind(arr.type)
        if kind == "string":
            return arr
        if kind in ("int", "bool"):
            return pc.cast(arr, pa.int64() if kind == "int" else pa.string())
        if kind == "float":
            vals = arr.to_numpy(zero_copy_only=False)
            ok = np.isnan(vals) | (vals == np.round(vals))
            self.check(~ok, name, lambda i: f"categorical value {float(vals[i]):g} is not a whole "
                       "number or text")
            return pc.cast(arr, pa.int64())
        raise self._wrong_type(name, kind, "text or integer categories")

    def floats(self, name: str, fill: float | None = None) -> np.ndarray:
        """Finite float64 values; an empty cell takes ``fill`` or, without one, is an error."""
        arr = self._numeric(name, pa.float64())
        if arr.null_count:
            if fill is None:
                self.no_nulls(arr, name)
            arr = pc.fill_null(arr, fill)
        vals = arr.to_numpy(zero_copy_only=False)
        self.check(~np.isfinite(vals), name, lambda i: f"value {float(vals[i]):g} is not finite")
        return vals

    def ints(self, name: str) -> np.ndarray:
        arr = self._numeric(name, pa.float64() if self._is_float(name) else pa.int64())
        self.no_nulls(arr, name)
        vals = arr.to_numpy(zero_copy_only=False)
        if vals.dtype.kind == "f":
            self.check(~np.isfinite(vals) | (vals != np.round(vals)), name,
                       lambda i: f"value {float(vals[i]):g} is not a whole number")
            vals = vals.astype(np.int64)
        return vals.astype(np.int64)

    def bools(self, name: str) -> np.ndarray:
        """Flags: booleans, 0 / 1, or text true / false (yes / no); empty = False."""
        arr = self.column(name)
        kind = type_kind(arr.type)
        if kind == "bool":
            return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool)
        if kind in ("int", "float"):
            vals = pc.fill_null(arr.cast(pa.float64()), 0).to_numpy(zero_copy_only=False)
            self.check((vals != 0) & (vals != 1), name,
                       lambda i: f"flag value {float(vals[i]):g} is not 0 or 1")
            return vals == 1
        if kind == "string":
            low = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
            true = pc.is_in(low, pa.array(_TRUE)).to_numpy(zero_copy_only=False)
            false = pc.is_in(low, pa.array(_FALSE)).to_numpy(zero_copy_only=False)
            null = arr.is_null().to_numpy(zero_copy_only=False)
            self.check(~(true | false | null), name,
                       lambda i: f"flag value {arr[i].as_py()!r} is not true/false or 1/0")
            return true
        raise self._wrong_type(name, kind, "flags (true/false or 1/0)")

    def times(self, name: str, fmt: str | None) -> np.ndarray:
        """Unix seconds: integers as they are, timestamps and dates converted, text parsed with
        ``fmt`` (strptime) or as ISO 8601. Times without a zone are read as UTC."""
        arr = self.column(name)
        self.no_nulls(arr, name)
        t = arr.type
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            if pa.types.is_date(t):
                arr = arr.cast(pa.timestamp("s"))
            unit = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[arr.type.unit]
            raw = arr.cast(pa.int64()).to_numpy(zero_copy_only=False)
            return np.floor_divide(raw, unit)
        kind = type_kind(t)
        if kind in ("int", "float"):
            return self.ints(name)
        if kind != "string":
            raise self._wrong_type(name, kind, "unix seconds or time text")
        if fmt is not None:
            ts = pc.strptime(arr, format=fmt, unit="s", error_is_null=True)
            self.check(ts.is_null(), name,
                       lambda i: f"{arr[i].as_py()!r} does not match time_format {fmt!r}")
            return ts.cast(pa.int64()).to_numpy(zero_copy_only=False)
        if pc.all(pc.match_substring_regex(arr, _DIGITS)).as_py():
            return pc.cast(pc.utf8_trim_whitespace(arr), pa.int64()).to_numpy()
        zoned = pc.match_substring_regex(arr, _ZONED).to_numpy(zero_copy_only=False)
        out = np.empty(len(arr), dtype=np.int64)
        for mask, typ in ((zoned, pa.timestamp("ns", tz="UTC")), (~zoned, pa.timestamp("ns"))):
            rows = np.flatnonzero(mask)
            if len(rows) == 0:
                continue
            part = arr.take(pa.array(rows))
            parsed, bad = _cast_or_locate(part, typ)
            if bad is not None:
                self.fail(int(rows[bad]), name, f"{part[bad].as_py()!r} is not an ISO 8601 "
                          "time; declare time_format (strptime) in the mapping if it is another "
                          "format")
            out[rows] = np.floor_divide(parsed.cast(pa.int64()).to_numpy(), 10**9)
        return out

    def tags(self, name: str, sep: str) -> pa.ListArray:
        """Tags of each row: a list cell, or text split at ``sep``; empty tags dropped."""
        arr = self.column(name)
        if pa.types.is_list(arr.type):
            inner = arr.type.value_type
            if pa.types.is_list(inner) or pa.types.is_large_list(inner):
                arr = pc.list_flatten(arr)  # list<list<str>> of a wide table: one level down
            if type_kind(arr.type) != "list<string>":
                raise self._wrong_type(name, type_kind(arr.type), "tag text or lists of text")
        elif type_kind(arr.type) == "string":
            arr = pc.split_pattern(arr, sep)
        else:
            raise self._wrong_type(name, type_kind(arr.type), "tag text or lists of text")
        arr = pc.if_else(arr.is_null(), pa.scalar([], arr.type), arr)
        flat = pc.utf8_trim_whitespace(arr.flatten())
        parent = pc.list_parent_indices(arr)
        keep = pc.not_equal(flat, "")
        keep = pc.fill_null(keep, False)
        flat, parent = flat.filter(keep), parent.filter(keep)
        lengths = np.bincount(parent.to_numpy(zero_copy_only=False), minlength=len(arr))
        offsets = np.zeros(len(arr) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), flat)

    # ------------------------------------------------------------------ helpers

    def _is_float(self, name: str) -> bool:
        return type_kind(self.column(name).type) == "float"

    def _numeric(self, name: str, to: pa.DataType) -> pa.Array:
        arr = self.column(name)
        kind = type_kind(arr.type)
        if kind in ("int", "float", "bool"):
            return arr.cast(to) if arr.type != to else arr
        if kind == "string":
            # Numbers written as text (a DataFrame of object columns, a wide list cell).
            trimmed = pc.utf8_trim_whitespace(arr)
            trimmed = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)
            parsed, bad = _cast_or_locate(trimmed, to)
            if bad is not None:
                self.fail(bad, name, f"{arr[bad].as_py()!r} is not a number (the column "
                          "should hold numbers)")
            return parsed
        raise self._wrong_type(name, kind, "numbers")

    def _wrong_type(self, name: str, kind: str, expected: str) -> DataValidationError:
        name = self.alias.get(name, name)
        first = self.where(0) if self.num_rows else self.files[0]
        return DataValidationError(
            f"{first}, column {name!r}: has type {kind}, expected {expected}"
        )


def first_true(mask: Any) -> int | None:
    """Index of the first True of a numpy or Arrow mask (Arrow nulls count as False)."""
    if isinstance(mask, pa.Array | pa.ChunkedArray):
        mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _cast_or_locate(arr: pa.Array, to: pa.DataType) -> tuple[pa.Array, int | None]:
    """``arr`` cast to ``to``, or (None, index of the first value that does not cast).

    The cast is all-or-nothing in Arrow; on failure a bisection finds the first bad value with
    O(log n) casts of shrinking halves, so the error path stays vectorised too."""
    try:
        return pc.cast(arr, to), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    lo, hi = 0, len(arr)  # the first bad value lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(arr.slice(lo, mid - lo), to)
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    return None, lo  # type: ignore[return-value]
