"""Import your own impression logs: any impressions table + a TOML mapping -> a data set folder.

``genrerank data import --input TABLE --mapping MAPPING --out DIR [--candidates TABLE2]``, or in
Python :func:`import_table`, :func:`from_pandas`, :func:`from_arrow`.

TABLE is CSV, TSV or Parquet, a file or a folder of files (format from the extension or
``--format``), in one of two layouts:

- **long** (default): one row per shown item: request id, time, user id, item id, position, one
  column per signal, feature columns;
- **wide**: one row per request; item ids, per-item features and per-position signals are list
  columns (Parquet lists, or text cells split at ``list_separator``, default ``";"``).

Candidates that were not shown may come from a second, long table (request id, item id, the
mapped item-level columns: upstream score when mapped, category, creator, item features); they
have no position and no labels.

The mapping (TOML, or a dict of the same shape)::

    layout = "long"            # or "wide"
    source = "my_shop"         # the data set's name in its feature spec
    position_base = 1          # positions start at 1 (or 0); gaps are an error
    # time_format = "%d/%m/%Y %H:%M:%S"   # default: integers = unix seconds, text = ISO 8601

    [columns]
    request_id = "request_id"
    time = "ts"
    user_id = "user"
    item_id = "item"
    position = "pos"
    upstream_score = "score"   # optional: without it the display order stands in for it
    category = "item_cat"      # optional (0 = unknown, n_categories = 1 when absent)
    creator = "seller"         # optional
    # is_cold_start = "new_seller"   # optional flags; derived from training impressions if absent
    # is_long_tail = "tail"

    [signals]                  # label_<name> columns; kind binary (0/1) or nonnegative
    click = {column = "clicked", kind = "binary", gain = 1.0}
    dwell = {column = "dwell_s", kind = "nonnegative", gain = 0.0, fill = 0.0}

    [features.item]
    item_cat = {column = "item_cat", kind = "categorical", vocab_cap = 1000}
    price = {column = "item_price", kind = "dense", fill = 0.0, transform = "log1p"}
    tags = {column = "item_tags", kind = "tags", sep = "|", top_k = 16}

    [features.user]
    segment = {column = "segment", kind = "categorical"}

    [features.context]         # one value per request: query, device, page type
    query = {column = "query", kind = "categorical", vocab_cap = 5000, hash_buckets = 256}
    device = {column = "device", kind = "categorical"}

    [split]                    # "time" (default), "user" (fractions of users) or "column"
    method = "time"
    fractions = [0.8, 0.1, 0.1]
    # method = "column", column = "fold", values = {train = ["a", "b"], valid = ["c"], test = ["d"]}

    [derived]                  # leakage-free statistics, genrerank.data.derived
    names = ["item_ctr", "item_impressions"]

    [duplicates]               # an item shown twice in one request
    policy = "error"           # or "drop" (keep the first position) or "merge" (signals: max)

Feature kinds: ``categorical`` (text or integers -> indices 1..K by training-split frequency, 0 =
unknown; ``vocab_cap`` keeps the K most frequent; ``hash_buckets`` gives values outside the
vocabulary ``K + 1 + crc32(str(value)) % buckets`` instead of 0); ``dense`` (float; an empty cell
takes ``fill``; NaN / inf is an error; ``transform = "log1p"`` applies sign(x) log1p(|x|));
``tags`` (a cell of tags split at ``sep``, or a list cell -> one 0/1 dense feature per tag among
the ``top_k`` most frequent in training, named ``<feature>:<tag>``). User and context features
take the value of the request's first shown row. How requests, positions, duplicates, the
upstream order, vocabularies and the fairness flags are built: :mod:`.build`.

Every data or mapping error is one :class:`~genrerank.data.schema.DataValidationError` line
naming the file, the line (text files; the header is line 1) or the 1-based data row (Parquet,
DataFrames), and the column; nothing is written. The output folder holds the data set plus
``import_report.json`` (rows read, requests, duplicates, vocabulary sizes, split counts,
warnings) and ``vocabularies.json`` (feature -> raw values in index order, index 0 = None), so
serving requests can be encoded the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from genrerank.data.importer.build import REPORT_FILE, VOCAB_FILE, ImportResult, build, read_plan
from genrerank.data.importer.frame import Frame
from genrerank.data.importer.mapping import Mapping, load_mapping
from genrerank.data.importer.read import FORMATS, read_frame
from genrerank.data.schema import FeatureSpec

__all__ = [
    "FORMATS", "REPORT_FILE", "VOCAB_FILE", "ImportResult", "Mapping", "from_arrow",
    "from_pandas", "import_arrow", "import_result", "import_table", "load_mapping", "read_tables",
    "summary_lines",
]

MappingLike = str | Path | dict[str, Any] | Mapping


def read_tables(
    input: str | Path, mapping: MappingLike, candidates: str | Path | None = None,
    fmt: str | None = None,
) -> tuple[Frame, Frame | None]:
    """Read the impressions table (and the candidates table) at the given paths."""
    mp = load_mapping(mapping)
    types, nullable = read_plan(mp)
    shown = read_frame(input, types, nullable, fmt)
    cand = None
    if candidates is not None:
        ctypes, cnullable = read_plan(mp, "candidates")
        cand = read_frame(candidates, ctypes, cnullable, fmt)
    return shown, cand


def import_arrow(
    table: pa.Table, mapping: MappingLike, candidates: pa.Table | None = None,
    name: str = "table", vocabularies: dict[str, list[Any]] | None = None,
) -> ImportResult:
    """The data set of an Arrow impressions table, with its vocabularies and import report.

    ``vocabularies`` (``vocabularies.json`` format) fixes categorical encodings instead of
    fitting them on the training split; see :func:`~genrerank.data.importer.build.build`."""
    mp = load_mapping(mapping)
    shown = Frame.from_arrow(table, name)
    cand = None if candidates is None else Frame.from_arrow(candidates, f"{name} (candidates)")
    return build(shown, mp, cand, vocabularies)


def from_arrow(
    table: pa.Table, mapping: MappingLike, candidates: pa.Table | None = None,
    vocabularies: dict[str, list[Any]] | None = None,
) -> tuple[pa.Table, FeatureSpec]:
    """The in-memory data set (then ``schema.write_dataset(out, table, spec)``)."""
    result = import_arrow(table, mapping, candidates, vocabularies=vocabularies)
    return result.table, result.spec


def from_pandas(
    df: Any, mapping: MappingLike, candidates: Any = None
) -> tuple[pa.Table, FeatureSpec]:
    """Like :func:`from_arrow` for pandas DataFrames; errors name 1-based DataFrame rows."""
    def arrow(frame: Any) -> pa.Table:
        return pa.Table.from_pandas(frame, preserve_index=False)

    result = import_arrow(arrow(df), mapping, None if candidates is None else arrow(candidates),
                          name="DataFrame")
    return result.table, result.spec


def import_table(
    input: str | Path,
    mapping: MappingLike,
    out_dir: str | Path,
    overwrite: bool = False,
    candidates: str | Path | None = None,
    *,
    fmt: str | None = None,
    max_candidates: int | None = None,
    drop_oversized: bool = False,
    allow_missing_splits: bool = False,
    vocabularies: dict[str, list[Any]] | None = None,
) -> Path:
    """Read ``input`` (and ``candidates``), build the data set, write it to ``out_dir``.

    Requests with more than ``max_candidates`` candidates are an error naming the first, or are
    dropped with ``drop_oversized`` (counted in the report), as in ``data convert``. A data set
    without train or valid requests is refused unless ``allow_missing_splits``. ``vocabularies``
    (``vocabularies.json`` format, e.g. an earlier import's) fixes categorical encodings."""
    result = import_result(input, mapping, out_dir, overwrite, candidates, fmt=fmt,
                           max_candidates=max_candidates, drop_oversized=drop_oversized,
                           vocabularies=vocabularies)
    return result.write(out_dir, overwrite=overwrite, allow_missing_splits=allow_missing_splits)


def import_result(
    input: str | Path,
    mapping: MappingLike,
    out_dir: str | Path,
    overwrite: bool = False,
    candidates: str | Path | None = None,
    *,
    fmt: str | None = None,
    max_candidates: int | None = None,
    drop_oversized: bool = False,
    vocabularies: dict[str, list[Any]] | None = None,
) -> ImportResult:
    """:func:`import_table` without the write (the CLI prints the report after writing)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        # Fail before reading a large table, not after.
        raise FileExistsError(f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it")
    mp = load_mapping(mapping)
    shown, cand = read_tables(input, mp, candidates, fmt)
    result = build(shown, mp, cand, vocabularies)
    if max_candidates is not None:
        from genrerank.data.loaders import cap_candidates

        table, dropped = cap_candidates(result.table, max_candidates, drop_oversized,
                                        where=str(input))
        if dropped:
            result.table = table
            split = table.column("split").to_numpy(zero_copy_only=False)
            result.report["requests"] = table.num_rows
            result.report["splits"] = {s: int((split == s).sum()) for s in result.report["splits"]}
            result.report["dropped_oversized_requests"] = dropped
            result.spec.extra["dropped_oversized_requests"] = dropped
    return result


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: what was read, built and warned about."""
    rows = report["rows_read"]
    read = f"read {rows['shown']:,} rows"
    if rows["candidates"]:
        read += f" and {rows['candidates']:,} candidate rows"
    splits = " / ".join(f"{k} {v:,}" for k, v in report["splits"].items())
    lines = [
        read,
        f"{report['requests']:,} requests ({splits}), {report['shown_items']:,} shown items, "
        f"{report['not_shown_candidates']:,} not-shown candidates",
    ]
    dup = report["duplicates"]
    if dup["dropped"] or dup["merged"]:
        lines.append(f"duplicates: {dup['dropped']:,} dropped, {dup['merged']:,} merged")
    if dup["candidate_rows_already_shown"]:
        lines.append(f"{dup['candidate_rows_already_shown']:,} candidate rows repeat a shown "
                     "item (ignored)")
    if report.get("dropped_oversized_requests"):
        lines.append(f"dropped {report['dropped_oversized_requests']:,} oversized request(s)")
    if report["vocabulary_sizes"]:
        lines.append("vocabularies: " + ", ".join(
            f"{k} {v:,}" for k, v in report["vocabulary_sizes"].items()))
    lines += [f"warning: {w}" for w in report["warnings"]]
    return lines
