"""Read an impressions table: CSV, TSV or Parquet, one file or a folder of files.

The format comes from the extension (``.csv``, ``.tsv`` / ``.tab``, ``.parquet`` / ``.pq``) or
from ``fmt``. A folder is read as the concatenation of its files of that format, in name order
(hidden files skipped). Only the columns the mapping names are read. Text files go through the
loaders' :func:`~genrerank.data.loaders._common.read_delimited` (pyarrow, multi-threaded,
streamed in blocks): rows with the wrong number of fields and numbers that do not parse are
reported with file, line and column there. CSV may quote fields; TSV is read unquoted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrerank.data.importer.frame import Frame
from genrerank.data.loaders._common import LINE, read_delimited
from genrerank.data.schema import DataValidationError

FORMATS = ("csv", "tsv", "parquet")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet",
               ".pq": "parquet"}


def format_of(path: Path) -> str | None:
    return _EXTENSIONS.get(path.suffix.lower())


def input_files(path: str | Path, fmt: str | None = None) -> tuple[list[Path], str]:
    """The files to read and their format."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose from {', '.join(FORMATS)}")
    if path.is_file():
        found = fmt or format_of(path)
        if found is None:
            raise ValueError(
                f"{path}: cannot tell the format from the extension {path.suffix!r}; pass "
                f"--format ({', '.join(FORMATS)})"
            )
        return [path], found
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: input table not found")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    formats = {format_of(p) for p in files} - {None}
    if fmt is None:
        if len(formats) > 1:
            raise ValueError(
                f"{path}: folder mixes formats {sorted(formats)}; pass --format to pick one"
            )
        fmt = formats.pop() if formats else None
    chosen = [p for p in files if format_of(p) == fmt] if fmt else []
    if not chosen:
        raise FileNotFoundError(
            f"{path}: no {fmt or 'CSV, TSV or Parquet'} files in the folder"
        )
    return chosen, fmt  # type: ignore[return-value]


def read_frame(
    path: str | Path,
    columns: dict[str, pa.DataType],
    nullable: set[str],
    fmt: str | None = None,
) -> Frame:
    """Read ``columns`` (name -> type to read text as) of the table at ``path``.

    Text files are parsed to those types; Parquet columns keep their own types (checked later).
    Columns not in ``nullable`` may not hold empty values in text files (one line naming it).
    """
    files, fmt = input_files(path, fmt)
    frames = []
    for file in files:
        if fmt == "parquet":
            frames.append(_read_parquet(file, list(columns)))
        else:
            frames.append(_read_text(file, columns, nullable, fmt))
    if len(frames) == 1:
        return frames[0]
    try:
        return Frame.concat(frames)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataValidationError(
            f"{path}: the files of the folder disagree on column types ({exc})"
        ) from exc


def _read_text(file: Path, columns: dict[str, pa.DataType], nullable: set[str],
               fmt: str) -> Frame:
    try:
        table = read_delimited(
            file, columns, delimiter="\t" if fmt == "tsv" else ",", header=True,
            quoted=fmt == "csv", nullable=nullable,
        )
    except DataValidationError as exc:
        # The loaders say "field"; the importer's messages say "column" throughout.
        raise DataValidationError(str(exc).replace(", field '", ", column '", 1)) from None
    lines = table[LINE].to_numpy()
    table = table.drop_columns([LINE])
    return Frame(table, [str(file)], np.zeros(len(lines), np.int32), lines, ["line"])


def _read_parquet(file: Path, columns: list[str]) -> Frame:
    try:
        names = pq.read_schema(file).names
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(f"{file}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataValidationError(
            f"{file}: missing column(s) {missing} named in the mapping; found {names}"
        )
    try:
        table = pq.read_table(file, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(f"{file}: not a readable Parquet file ({exc})") from exc
    return Frame.from_arrow(table, str(file), unit="row")
