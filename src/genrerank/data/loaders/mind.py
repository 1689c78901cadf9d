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

Malformed rows (wrong field count, bad time, a token without ``-0``/``-1``, a duplicate item in an
impression, an empty impression list, a repeated impression_id) raise DataValidationError naming
file, line and field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrerank.data.loaders._common import (
    LINE,
    Requests,
    build_vocab,
    check_rows,
    fail,
    first_bad,
    first_duplicate_in_segments,
    log1p,
    long_tail_flags,
    lookup,
    order_candidates,
    read_delimited,
    register_loader,
    require_dir,
    require_file,
    split_requests,
)
from genrerank.data.schema import CategoricalFeature, FeatureSpec

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

    # Item categoricals from news.tsv; first row wins if an id repeats.
    cat_vocab = build_vocab(news["category"])
    sub_vocab = build_vocab(news["subcategory"])
    news_pos = pc.index_in(enc.dictionary, value_set=news["id"])
    news_cat = np.concatenate([[0], lookup(news["category"], cat_vocab)])
    news_sub = np.concatenate([[0], lookup(news["subcategory"], sub_vocab)])
    pos = pc.fill_null(pc.add(news_pos, 1), 0).to_numpy(zero_copy_only=False)
    id_cat, id_sub = news_cat[pos], news_sub[pos]

    pop = popularity[item_code]
    score = log1p(pop)
    offsets = np.concatenate([[0], np.cumsum(n)])
    perm, exposed = order_candidates(offsets, score, seed)
    cand = item_code[perm]
    tail_by_id = long_tail_flags(popularity, long_tail_quantile)

    request_ids = beh["impression_id"].to_numpy(zero_copy_only=False)
    spec = FeatureSpec(
        source="mind",
        user_categorical=[],
        user_dense=["log_history_length"],
        item_categorical=[
            CategoricalFeature("category", len(cat_vocab) + 1),
            CategoricalFeature("subcategory", len(sub_vocab) + 1),
        ],
        item_dense=["log_history_popularity"],
        labels=["click"],
        n_categories=len(cat_vocab) + 1,
        n_creators=1,
        max_candidates=int(max_candidates or 0),
        extra={
            "input": str(folder),
            "split": "assign_time_split on impression time",
            "split_fractions": list(split_fractions or (0.8, 0.1, 0.1)),
            "upstream_score": "log1p(history popularity): MIND logs no ranking score",
            "exposed_order": "logged order; MIND does not guarantee it is the on-screen order",
            "candidate_order": "upstream score descending, ties by seeded random key",
            "is_cold_start": "item in no user history",
            "is_long_tail": f"history popularity below the {long_tail_quantile} quantile",
            "seed": seed,
        },
    )
    reqs = Requests(
        request_id=request_ids,
        time=times,
        user_id=beh["user_id"].combine_chunks(),
        split=split_requests(times, request_ids, split_fractions),
        user_cat=np.zeros((beh.num_rows, 0), np.int32),
        user_dense=log1p(hist_len)[:, None],
        n=n,
        item_id=pc.take(enc.dictionary, pa.array(cand)),
        item_cat=np.stack([id_cat[cand], id_sub[cand]], axis=1),
        item_dense=score[perm][:, None],
        upstream_score=score[perm],
        category=id_cat[cand],
        creator=np.zeros(len(cand), np.int32),
        is_cold_start=popularity[cand] == 0,
        is_long_tail=tail_by_id[cand],
        m=n,
        exposed=exposed,
        labels={"click": click},
    )
    return reqs.to_table(spec), spec
