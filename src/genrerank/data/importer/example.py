"""A synthetic impressions log in the long layout, and the mapping that imports it.

:func:`write_example_csv` writes one row per shown item: ``request_id, ts`` (ISO 8601 text),
``user, item, pos`` (1-based), ``clicked`` (0/1), ``dwell_s`` (seconds, 0 unless clicked),
``item_cat`` (text), ``item_price`` (float), ``item_tags`` (``"a|b"``), ``query`` and ``device``
(request context, text). It is small enough to read and realistic enough to learn from:

- each user prefers one category, each query points at one category;
- the logged list is ordered by a noisy upstream estimate of the item's appeal;
- the click probability is ``sigmoid(appeal - 0.25 (pos - 1) - 2.2)`` with appeal = item quality
  + 1.0 if the item's category is the user's favourite + 0.8 if it is the query's + 0.3 if a tag
  matches the query - 0.3 log(price / 20) + 0.3 on desktop, so features, context and position
  all matter; dwell time grows with appeal.

``EXAMPLE_MAPPING`` imports it (``genrerank data example --out DIR`` writes both files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

EXAMPLE_MAPPING = """\
# Mapping of the synthetic log written by genrerank.data.importer.example.write_example_csv.
layout = "long"
source = "example_shop"
position_base = 1

[columns]
request_id = "request_id"
time = "ts"
user_id = "user"
item_id = "item"
position = "pos"
category = "item_cat"

[signals]
click = {column = "clicked", kind = "binary", gain = 1.0}
dwell = {column = "dwell_s", kind = "nonnegative", gain = 0.0}

[features.item]
item_cat = {column = "item_cat", kind = "categorical"}
price = {column = "item_price", kind = "dense", transform = "log1p"}
tags = {column = "item_tags", kind = "tags", sep = "|", top_k = 16}

[features.context]
query = {column = "query", kind = "categorical", vocab_cap = 500, hash_buckets = 32}
device = {column = "device", kind = "categorical"}

[derived]
names = ["item_ctr", "item_impressions"]

[split]
method = "time"
fractions = [0.8, 0.1, 0.1]

[duplicates]
policy = "error"
"""

_TAGS = ["sale", "new", "eco", "premium", "kids", "bundle", "gift", "local", "handmade",
         "bestseller", "vintage", "sport", "outdoor", "home", "office", "travel", "summer",
         "winter", "organic", "smart"]
_DEVICES = np.array(["mobile", "desktop", "tablet"])


def example_table(n_requests: int, seed: int = 0, list_length: int = 10) -> pa.Table:
    """The example log as an Arrow table (``n_requests * list_length`` rows)."""
    rng = np.random.default_rng(seed)
    n_cat = 20
    n_users = max(20, n_requests // 20)
    n_items = max(10 * list_length, n_requests // 5)
    n_queries = max(20, min(2000, n_requests // 50))

    item_cat = rng.integers(0, n_cat, n_items)
    quality = rng.normal(0.0, 0.6, n_items)
    price = np.round(np.exp(rng.normal(3.0, 0.8, n_items)), 2)
    n_tags = rng.integers(0, 4, n_items)
    tag_ids = rng.integers(0, len(_TAGS), (n_items, 3))
    tag_text = np.array(["|".join(_TAGS[t] for t in dict.fromkeys(row[:k]))
                         for row, k in zip(tag_ids, n_tags, strict=True)], dtype=object)
    has_tag = np.zeros((n_items, len(_TAGS)), bool)
    for k in range(3):
        has_tag[np.arange(n_items), tag_ids[:, k]] |= k < n_tags
    user_fav = rng.integers(0, n_cat, n_users)
    query_cat = rng.integers(0, n_cat, n_queries)
    query_tag = rng.integers(0, len(_TAGS), n_queries)

    # Requests: a user (heavy-tailed activity), a query (Zipf-like), a device, a time.
    user = np.minimum(rng.zipf(1.6, n_requests) - 1, n_users - 1)
    user = rng.permutation(n_users)[user]
    query = np.minimum(rng.zipf(1.4, n_requests) - 1, n_queries - 1)
    device = rng.choice(3, n_requests, p=[0.6, 0.3, 0.1])
    start = np.datetime64("2024-03-01T00:00:00", "s").astype(np.int64)
    ts = np.sort(start + rng.integers(0, 30 * 86400, n_requests))

    # Items: half from the query's category, half from anywhere; distinct within a request.
    pool = 3 * list_length
    by_cat = np.argsort(item_cat, kind="stable")
    cat_start = np.searchsorted(item_cat[by_cat], np.arange(n_cat))
    cat_size = np.bincount(item_cat, minlength=n_cat)
    qc = query_cat[query][:, None]
    in_cat = by_cat[cat_start[qc] + rng.integers(0, 1 << 30, (n_requests, pool)) %
                    np.maximum(cat_size[qc], 1)]
    anywhere = rng.integers(0, n_items, (n_requests, pool))
    draws = np.where(rng.random((n_requests, pool)) < 0.5, in_cat, anywhere)
    items = _first_distinct(draws, list_length, n_items, rng)

    u, q = user[:, None], query[:, None]
    appeal = (quality[items] + 1.0 * (item_cat[items] == user_fav[u])
              + 0.8 * (item_cat[items] == query_cat[q])
              + 0.3 * has_tag[items, query_tag[q]]
              - 0.3 * np.log(price[items] / 20.0) + 0.3 * (device[:, None] == 1))
    upstream = appeal + rng.normal(0.0, 1.0, appeal.shape)
    order = np.argsort(-upstream, axis=1)
    items = np.take_along_axis(items, order, axis=1)
    appeal = np.take_along_axis(appeal, order, axis=1)
    pos = np.arange(list_length)[None, :]
    p_click = 1.0 / (1.0 + np.exp(-(appeal - 0.25 * pos - 2.2)))
    clicked = rng.random(appeal.shape) < p_click
    dwell = np.where(clicked, np.round(np.exp(rng.normal(2.5 + 0.4 * appeal, 0.6)), 1), 0.0)

    flat_items = items.reshape(-1)
    req = np.repeat(np.arange(n_requests), list_length)
    times = pa.array(ts[req].astype("datetime64[s]"), pa.timestamp("s"))
    cat_names = np.array([f"cat_{c:02d}" for c in range(n_cat)], dtype=object)
    query_names = np.array([f"q{k:04d}" for k in range(n_queries)], dtype=object)
    return pa.table({
        "request_id": pc.binary_join_element_wise(
            "r", pc.cast(pa.array(req), pa.string()), ""),
        "ts": pc.strftime(times, format="%Y-%m-%dT%H:%M:%S"),
        "user": pc.binary_join_element_wise("u", pc.cast(pa.array(user[req]), pa.string()), ""),
        "item": pc.binary_join_element_wise("i", pc.cast(pa.array(flat_items), pa.string()), ""),
        "pos": pa.array(np.tile(np.arange(1, list_length + 1), n_requests)),
        "clicked": pa.array(clicked.reshape(-1).astype(np.int8)),
        "dwell_s": pa.array(dwell.reshape(-1)),
        "item_cat": pa.array(cat_names[item_cat[flat_items]], pa.string()),
        "item_price": pa.array(price[flat_items]),
        "item_tags": pa.array(tag_text[flat_items], pa.string()),
        "query": pa.array(query_names[query[req]], pa.string()),
        "device": pa.array(_DEVICES[device[req]], pa.string()),
    })


def _first_distinct(draws: np.ndarray, k: int, n_items: int,
                    rng: np.random.Generator) -> np.ndarray:
    """The first ``k`` distinct values of each row (rows lacking them are redrawn)."""
    r, w = draws.shape
    order = np.argsort(draws, axis=1, kind="stable")
    sorted_ = np.take_along_axis(draws, order, axis=1)
    repeat = np.zeros_like(draws, dtype=bool)
    repeat_sorted = np.zeros((r, w), bool)
    repeat_sorted[:, 1:] = sorted_[:, 1:] == sorted_[:, :-1]
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    # Stable sort on "is a repeat" moves the first occurrences to the front, in draw order.
    front = np.argsort(repeat, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(draws, front, axis=1)
    short = (~repeat).sum(axis=1) < k
    for row in np.flatnonzero(short):  # vanishingly rare with 3k draws from many items
        out[row] = rng.choice(n_items, k, replace=False)
    return out


def write_example_csv(path: str | Path, n_requests: int, seed: int = 0,
                      list_length: int = 10) -> Path:
    """Write the example log (``n_requests * list_length`` rows) as CSV with a header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(example_table(n_requests, seed, list_length), path,
                    pacsv.WriteOptions(quoting_style="none"))
    return path
