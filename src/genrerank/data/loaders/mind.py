"""MIND (Microsoft News) loader: ``behaviors.tsv`` + ``news.tsv``, tab-separated, no header.

- behaviors.tsv: ``impression_id, user_id, time, history, impressions``; time like
  ``11/11/2019 9:05:58 AM`` (no zone given; read as UTC); history = space-separated news ids
  (may be empty); impressions = ``N123-1 N456-0 ...`` (1 = clicked).
- news.tsv: ``id, category, subcategory, title, abstract, url, title_entities, abstract_entities``.

Mapping:

- One request per impression row; request_id = impression_id. Candidates = the impression's items,
  all exposed (m = n). ``exposed`` follows the logged order, which the MIND README says is *not
  guaranteed* to be the on-screen order: position effects learnt from MIND are unreliable.
- Labels: ``click`` only (like / long_view / watch_time are absent).
- Item features: categorical ``category``, ``subcategory`` (vocabularies from news.tsv; items
  missing from news.tsv, most of them, get 0 = unknown); dense ``log_history_popularity`` =
  log1p(number of distinct users whose click history holds the item). Histories precede the
  impressions, so this uses no outcome of any logged request.
- Upstream score: MIND has none; the history popularity (log1p) stands in for it.
- User features: dense ``log_history_length`` = log1p(history length). No user categoricals.
- ``category`` column = category index; ``creator`` = 0 (MIND has no publishers/creators), so the
  fairness flags describe the item itself: ``is_cold_start`` = the item occurs in no history;
  ``is_long_tail`` = its history popularity is below the 80th percentile of the items that occur
  in histories (``long_tail_quantile``), cold items included.
- Split: :func:`genrerank.data.splits.assign_time_split` on impression time (``split_fractions``).
- ``max_candidates`` (default none): an impression with more items is an error naming its line
  (truncating would silently drop shown items and their clicks).

The conversion is two steps: :func:`mind_impressions` parses the files and computes the features
and flags above into a long impressions table (one row per shown item); the importer
(:mod:`genrerank.data.importer`) builds the data set from it with the shipped mapping
``mappings/mind.toml``, the path users' own logs take (``genrerank data import``).

Malformed rows (wrong field count, bad time, a token without ``-0``/``-1``, a duplicate item in an
impression, an empty impression list, a repeated impression_id) raise DataValidationError naming
file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrerank.data.loaders._common import (
    LINE,
    build_vocab,
    check_rows,
    fail,
    first_bad,
    first_duplicate_in_segments,
    log1p,
    long_tail_flags,
    read_delimited,
    register_loader,
    require_dir,
    require_file,
)
from genrerank.data.loaders.mappings import import_source, source_mapping
from genrerank.data.schema import FeatureSpec

BEHAVIOR_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]
NEWS_COLUMNS = [
    "id",
    "category",
    "subcategory",
    "title",
    "abstract",
    "url",
    "title_entities",
    "abstract_entities",
]
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def _tokens(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Whitespace-separated tokens (empty ones dropped) and the row index of each token."""
    lists = pc.utf8_split_whitespace(pc.fill_null(col, ""))
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    flat = lists.flatten()
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    keep = pc.not_equal(flat, "")
    return flat.filter(keep), parent[keep.to_numpy(zero_copy_only=False)]


def mind_impressions(
    input_dir: str | Path,
    *,
    max_candidates: int | None = None,
    long_tail_quantile: float = 0.8,
) -> tuple[pa.Table, dict[str, list[Any]]]:
    """The MIND-specific step: a folder (behaviors.tsv, news.tsv) -> long impressions table.

    One row per shown item, impressions in file order, items in logged order: ``impression_id,
    time`` (unix seconds), ``user_id, news_id, position`` (0-based), ``click``, ``category,
    subcategory`` (news.tsv text, null = unknown), ``log_history_popularity,
    log_history_length, is_cold_start, is_long_tail``. Also returns the vocabularies for the
    importer (``vocabularies.json`` format): the sorted news.tsv values, which include
    categories of news never shown."""
    folder = require_dir(input_dir)
    bpath = require_file(folder, "behaviors.tsv")
    npath = require_file(folder, "news.tsv")
    news = read_delimited(
        npath,
        {"id": pa.string(), "category": pa.string(), "subcategory": pa.string()},
        delimiter="\t",
        header=False,
        names=NEWS_COLUMNS,
        nullable=("category", "subcategory"),
    )
    beh = read_delimited(
        bpath,
        {c: pa.string() for c in BEHAVIOR_COLUMNS},
        delimiter="\t",
        header=False,
        names=BEHAVIOR_COLUMNS,
        nullable=("history",),
    )
    if beh.num_rows == 0:
        fail(bpath, 1, "impressions", "no impressions in the file")

    # Impression ids must be unique: they become request ids.
    codes = pc.dictionary_encode(beh["impression_id"]).combine_chunks().indices.to_numpy()
    dup = first_duplicate_in_segments(np.zeros(len(codes), np.int64), codes)
    if dup is not None:
        fail(
            bpath,
            beh[LINE][dup].as_py(),
            "impression_id",
            f"{beh['impression_id'][dup].as_py()!r} repeats an earlier impression",
        )

    ts = pc.strptime(beh["time"], format=TIME_FORMAT, unit="s", error_is_null=True)
    check_rows(
        beh,
        bpath,
        "time",
        ts.is_null(),
        lambda i: f"{beh['time'][i].as_py()!r} is not a time like 11/11/2019 9:05:58 AM",
    )
    times = ts.cast(pa.int64()).to_numpy()

    # Impression tokens "ID-0" / "ID-1".
    tokens, row_of_tok = _tokens(beh["impressions"])
    n = np.bincount(row_of_tok, minlength=beh.num_rows)
    check_rows(beh, bpath, "impressions", n == 0, "empty impression list")
    parts = pc.extract_regex(tokens, r"^(?P<item>.+)-(?P<label>[01])$")
    bad = first_bad(parts.is_null())
    if bad is not None:
        fail(
            bpath,
            beh[LINE][int(row_of_tok[bad])].as_py(),
            "impressions",
            f"token {tokens[bad].as_py()!r} is not ITEM-0 or ITEM-1",
        )
    item = parts.field("item")
    click = pc.equal(parts.field("label"), "1").to_numpy(zero_copy_only=False).astype(np.float32)

    hist_tokens, row_of_hist = _tokens(beh["history"])
    # One shared code space for history and impression ids.
    all_ids = pa.concat_arrays([item, hist_tokens])
    enc = pc.dictionary_encode(all_ids)
    item_code = enc.indices.to_numpy()[: len(item)].astype(np.int64)
    hist_code = enc.indices.to_numpy()[len(item) :].astype(np.int64)
    n_ids = len(enc.dictionary)

    dup = first_duplicate_in_segments(row_of_tok, item_code)
    if dup is not None:
        fail(
            bpath,
            beh[LINE][int(row_of_tok[dup])].as_py(),
            "impressions",
            f"duplicate item {item[dup].as_py()!r}",
        )
    if max_candidates is not None:
        check_rows(
            beh,
            bpath,
            "impressions",
            n > max_candidates,
            lambda i: f"{n[i]} items, more than max_candidates={max_candidates}",
        )

    # Popularity = distinct users whose history holds the item (a user's history repeats on
    # every impression row of that user, so count (user, item) pairs once).
    user_code = pc.dictionary_encode(beh["user_id"]).combine_chunks().indices.to_numpy()
    pairs = np.unique(user_code[row_of_hist].astype(np.int64) * n_ids + hist_code)
    popularity = np.bincount(pairs % n_ids, minlength=n_ids)
    hist_len = np.bincount(row_of_hist, minlength=beh.num_rows)

    # Item categoricals from news.tsv (text; the importer indexes it); first row wins if an id
    # repeats.
    news_pos = pc.index_in(item, value_set=news["id"])
    offsets = np.concatenate([[0], np.cumsum(n)])
    table = pa.table({
        "impression_id": pc.take(beh["impression_id"], pa.array(row_of_tok)),
        "time": pa.array(times[row_of_tok], pa.int64()),
        "user_id": pc.take(beh["user_id"], pa.array(row_of_tok)),
        "news_id": item,
        "position": pa.array(np.arange(len(item)) - offsets[row_of_tok], pa.int64()),
        "click": pa.array(click, pa.float32()),
        "category": pc.take(news["category"], news_pos),
        "subcategory": pc.take(news["subcategory"], news_pos),
        "log_history_popularity": pa.array(log1p(popularity[item_code]), pa.float32()),
        "log_history_length": pa.array(log1p(hist_len)[row_of_tok], pa.float32()),
        "is_cold_start": pa.array(popularity[item_code] == 0),
        "is_long_tail": pa.array(long_tail_flags(popularity, long_tail_quantile)[item_code]),
    })
    cat_vocab = [None, *build_vocab(news["category"]).to_pylist()]
    vocabularies = {
        "item.category": cat_vocab,
        "category": cat_vocab,
        "item.subcategory": [None, *build_vocab(news["subcategory"]).to_pylist()],
    }
    return table, vocabularies


@register_loader("mind")
def load_mind(
    input_dir: str | Path,
    *,
    max_candidates: int | None = None,
    split_fractions: tuple[float, float, float] | None = None,
    long_tail_quantile: float = 0.8,
    seed: int = 0,
) -> tuple[pa.Table, FeatureSpec]:
    """Read a MIND folder (behaviors.tsv, news.tsv) into the genrerank request table."""
    table, vocabularies = mind_impressions(
        input_dir, max_candidates=max_candidates, long_tail_quantile=long_tail_quantile
    )
    mapping = source_mapping("mind", split_fractions=split_fractions, seed=seed)
    extra = {
        "input": str(Path(input_dir)),
        "split": "assign_time_split on impression time",
        "split_fractions": list(split_fractions or (0.8, 0.1, 0.1)),
        "upstream_score": "log1p(history popularity): MIND logs no ranking score",
        "exposed_order": "logged order; MIND does not guarantee it is the on-screen order",
        "candidate_order": "upstream score descending, ties by seeded random key",
        "is_cold_start": "item in no user history",
        "is_long_tail": f"history popularity below the {long_tail_quantile} quantile",
        "seed": seed,
    }
    data, spec = import_source(mapping, table, vocabularies, extra)
    spec.max_candidates = int(max_candidates or 0)
    return data, spec
