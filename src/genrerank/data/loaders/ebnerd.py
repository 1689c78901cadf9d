"""EB-NeRD (Ekstra Bladet) loader: ``behaviors.parquet`` + ``history.parquet``.

- behaviors.parquet: one row per impression; used columns ``impression_id, impression_time,
  user_id, article_ids_inview, article_ids_clicked`` (required) and, where present,
  ``article_id`` (the article page the list was shown on, null = front page), ``device_type,
  is_sso_user, gender, postcode, age, is_subscriber``.
- history.parquet: ``user_id, article_id_fixed`` (+ ``read_time_fixed``): each user's reading in
  the weeks *before* the behaviour period, so features built from it use no logged outcome.

Mapping:

- One request per impression; request_id = impression_id. Candidates = ``article_ids_inview``, all
  exposed (m = n), ``exposed`` in in-view order. Labels: ``click`` only (1 for the articles in
  ``article_ids_clicked``). read_time / scroll belong to the clicked article, not to each shown
  item, so they are not used as labels.
- User categoricals (those present): ``device_type, is_sso_user, gender, postcode, age,
  is_subscriber`` and ``page`` (front page / article page); vocabularies are the sorted distinct
  values in behaviors.parquet, null -> 0 (unknown).
- User dense: ``log_history_length`` = log1p(articles in history), ``log_history_read_time`` =
  log1p(mean read time in history, seconds).
- Item dense: ``log_history_popularity`` = log1p(distinct users with the article in history). No
  item categoricals: article metadata is not part of the input, so ``category`` and ``creator``
  are 0 (unknown).
- Upstream score: EB-NeRD logs none; log1p(history popularity) stands in for it.
- Flags (per article, as creators are unknown): ``is_cold_start`` = in no history;
  ``is_long_tail`` = history popularity below the 80th percentile (``long_tail_quantile``).
- Split: :func:`genrerank.data.splits.assign_time_split` on impression time.

The conversion is two steps: :func:`ebnerd_impressions` reads the files and computes the
features and flags above into a long impressions table (one row per in-view article);
the importer (:mod:`genrerank.data.importer`) builds the data set from it with the shipped
mapping ``mappings/ebnerd.toml``, the path users' own logs take (``genrerank data import``).

Bad rows (null ids or times, an empty or repeating in-view list, a clicked article that is not in
view) raise DataValidationError naming the file, the row (0-based), its impression_id and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrerank.data.loaders._common import (
    build_vocab,
    fail_row,
    first_bad,
    first_duplicate_in_segments,
    log1p,
    long_tail_flags,
    map_keys,
    register_loader,
    require_dir,
    require_file,
)
from genrerank.data.loaders.mappings import import_source, source_mapping
from genrerank.data.schema import DataValidationError, FeatureSpec

REQUIRED = [
    "impression_id",
    "impression_time",
    "user_id",
    "article_ids_inview",
    "article_ids_clicked",
]
USER_CATEGORICAL = ["device_type", "is_sso_user", "gender", "postcode", "age", "is_subscriber"]


def _read(path: Path, required: list[str], optional: list[str]) -> pa.Table:
    try:
        names = pq.read_schema(path).names
    except pa.ArrowException as exc:
        raise DataValidationError(f"{path}: not a readable Parquet file: {exc}") from exc
    missing = [c for c in required if c not in names]
    if missing:
        raise DataValidationError(f"{path}: missing column(s) {missing}; found {names}")
    return pq.read_table(path, columns=required + [c for c in optional if c in names])


def _flat(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Values of a list column and the row index of each value."""
    arr = col.combine_chunks()
    return arr.flatten(), pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)


def ebnerd_impressions(
    input_dir: str | Path, *, long_tail_quantile: float = 0.8
) -> tuple[pa.Table, dict[str, list[Any]]]:
    """The EB-NeRD-specific step: a folder (behaviors.parquet, history.parquet) -> long
    impressions table.

    One row per in-view article, impressions in file order, articles in in-view order:
    ``impression_id, time`` (unix seconds, floored), ``user_id, article_id, position``
    (0-based), ``click``, the user attribute columns present in behaviors.parquet (raw values),
    ``page`` (``"front"`` / ``"article"``, when ``article_id`` is present),
    ``log_history_length, log_history_read_time, log_history_popularity, is_cold_start,
    is_long_tail``. Also returns the vocabularies for the importer (``vocabularies.json``
    format): the sorted distinct values of each attribute in behaviors.parquet."""
    folder = require_dir(input_dir)
    bpath = require_file(folder, "behaviors.parquet")
    hpath = require_file(folder, "history.parquet")
    beh = _read(bpath, REQUIRED, ["article_id", *USER_CATEGORICAL])
    hist = _read(hpath, ["user_id", "article_id_fixed"], ["read_time_fixed"])
    if beh.num_rows == 0:
        raise DataValidationError(f"{bpath}: no impressions")

    imp_ids = beh["impression_id"]

    def fail(row: int, field: str, what: str) -> NoReturn:
        fail_row(bpath, row, f"impression_id {imp_ids[row].as_py()}", field, what)

    for name in (
        "impression_id",
        "impression_time",
        "user_id",
        "article_ids_inview",
        "article_ids_clicked",
    ):
        i = first_bad(beh[name].is_null())
        if i is not None:
            fail(i, name, "null value")
    codes = pc.dictionary_encode(imp_ids).combine_chunks().indices.to_numpy()
    dup = first_duplicate_in_segments(np.zeros(len(codes), np.int64), codes)
    if dup is not None:
        fail(dup, "impression_id", "repeats an earlier impression")

    inview, row_of_view = _flat(beh["article_ids_inview"])
    n = np.bincount(row_of_view, minlength=beh.num_rows)
    i = first_bad(n == 0)
    if i is not None:
        fail(i, "article_ids_inview", "empty in-view list")
    i = first_bad(inview.is_null())
    if i is not None:
        fail(int(row_of_view[i]), "article_ids_inview", "null article id")
    view = inview.to_numpy(zero_copy_only=False).astype(np.int64)
    dup = first_duplicate_in_segments(row_of_view, view)
    if dup is not None:
        fail(int(row_of_view[dup]), "article_ids_inview", f"article {view[dup]} appears twice")

    clicked, row_of_click = _flat(beh["article_ids_clicked"])
    i = first_bad(clicked.is_null())
    if i is not None:
        fail(int(row_of_click[i]), "article_ids_clicked", "null article id")
    clicked_np = clicked.to_numpy(zero_copy_only=False).astype(np.int64)
    # (row, article) keys; a click must match an in-view (row, article).
    span = int(max(view.max(), clicked_np.max(initial=0))) + 1
    view_key = row_of_view.astype(np.int64) * span + view
    click_key = row_of_click.astype(np.int64) * span + clicked_np
    missing = ~np.isin(click_key, view_key)
    i = first_bad(missing)
    if i is not None:
        fail(
            int(row_of_click[i]),
            "article_ids_clicked",
            f"clicked article {clicked_np[i]} is not in article_ids_inview",
        )
    click = np.isin(view_key, click_key).astype(np.float32)

    # History: popularity = distinct users per article; per-user length and mean read time.
    i = first_bad(hist["user_id"].is_null())
    if i is not None:
        fail_row(hpath, i, "user_id null", "user_id", "null value")
    h_items, h_row = _flat(hist["article_id_fixed"])
    h_items = pc.fill_null(h_items, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    h_user = hist["user_id"].to_numpy(zero_copy_only=False).astype(np.int64)[h_row]
    ok = h_items >= 0
    pairs = np.unique(np.stack([h_items[ok], h_user[ok]], axis=1), axis=0)
    pop_items, pop_counts = np.unique(pairs[:, 0], return_counts=True)
    popularity = map_keys(pop_items, pop_counts, view, 0)
    tail_by_item = long_tail_flags(pop_counts, long_tail_quantile)

    h_users, h_inv = np.unique(h_user, return_inverse=True)
    h_len = np.bincount(h_inv, minlength=len(h_users)).astype(np.float64)
    h_read = np.zeros(len(h_users))
    if "read_time_fixed" in hist.column_names:
        rt, _ = _flat(hist["read_time_fixed"])
        rt = pc.fill_null(rt, np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        has = np.isfinite(rt) & (rt >= 0)
        rt_sum = np.bincount(h_inv[has], weights=rt[has], minlength=len(h_users))
        rt_n = np.bincount(h_inv[has], minlength=len(h_users))
        h_read = np.divide(rt_sum, rt_n, out=h_read, where=rt_n > 0)
    users = beh["user_id"].to_numpy(zero_copy_only=False).astype(np.int64)
    user_len = map_keys(h_users, h_len, users, 0.0)
    user_read = map_keys(h_users, h_read, users, 0.0)

    ts = beh["impression_time"]
    if not pa.types.is_timestamp(ts.type):
        raise DataValidationError(f"{bpath}: column 'impression_time' is {ts.type}, not timestamp")
    times = ts.cast(pa.timestamp("s"), safe=False).cast(pa.int64()).to_numpy()  # floor to s
    offsets = np.concatenate([[0], np.cumsum(n)])
    rows = pa.array(row_of_view)
    columns: dict[str, Any] = {
        "impression_id": pc.take(imp_ids, rows),
        "time": pa.array(times[row_of_view], pa.int64()),
        "user_id": pc.take(beh["user_id"], rows),
        "article_id": pa.array(view),
        "position": pa.array(np.arange(len(view)) - offsets[row_of_view], pa.int64()),
        "click": pa.array(click, pa.float32()),
    }
    # User attributes present in the file (raw values; the given vocabularies index them), plus
    # the page the list was shown on.
    vocabularies: dict[str, list[Any]] = {}
    for name in USER_CATEGORICAL:
        if name in beh.column_names:
            columns[name] = pc.take(beh[name], rows)
            vocabularies[f"user.{name}"] = [None, *build_vocab(beh[name]).to_pylist()]
    if "article_id" in beh.column_names:
        page = pc.if_else(beh["article_id"].is_null(), "front", "article")
        columns["page"] = pc.take(page, rows)
        vocabularies["user.page"] = [None, "front", "article"]
    columns |= {
        "log_history_length": pa.array(log1p(user_len)[row_of_view], pa.float32()),
        "log_history_read_time": pa.array(log1p(user_read)[row_of_view], pa.float32()),
        "log_history_popularity": pa.array(log1p(popularity), pa.float32()),
        "is_cold_start": pa.array(popularity == 0),
        "is_long_tail": pa.array(map_keys(pop_items, tail_by_item, view, True)),
    }
    return pa.table(columns), vocabularies


@register_loader("ebnerd")
def load_ebnerd(
    input_dir: str | Path,
    *,
    split_fractions: tuple[float, float, float] | None = None,
    long_tail_quantile: float = 0.8,
    seed: int = 0,
) -> tuple[pa.Table, FeatureSpec]:
    """Read an EB-NeRD folder (behaviors.parquet, history.parquet) into the request table."""
    table, vocabularies = ebnerd_impressions(input_dir, long_tail_quantile=long_tail_quantile)
    # The user attributes (and the page) are optional columns of behaviors.parquet.
    absent = [n for n in [*USER_CATEGORICAL, "page"] if n not in table.column_names]
    mapping = source_mapping("ebnerd", split_fractions=split_fractions, seed=seed,
                             drop_features=absent)
    extra = {
        "input": str(Path(input_dir)),
        "split": "assign_time_split on impression time",
        "split_fractions": list(split_fractions or (0.8, 0.1, 0.1)),
        "upstream_score": "log1p(history popularity): EB-NeRD logs no ranking score",
        "candidate_order": "upstream score descending, ties by seeded random key",
        "is_cold_start": "article in no user history",
        "is_long_tail": f"history popularity below the {long_tail_quantile} quantile",
        "seed": seed,
    }
    return import_source(mapping, table, vocabularies, extra)
