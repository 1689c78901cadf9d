"""KuaiRand (Kuaishou short video) loader: ``log_standard_*.csv`` + video and user feature files.

Input folder: one or more ``log_standard_*.csv`` (comma-separated with header ``user_id,
video_id, date, hourmin, time_ms, is_click, is_like, is_follow, is_comment, is_forward, is_hate,
long_view, play_time_ms, duration_ms, profile_stay_time, comment_stay_time, is_profile_enter,
is_rand, tab``), ``video_features_basic*.csv`` and ``user_features*.csv`` (the ``_pure``, ``_1k``
or ``_27k`` versions). ``include_random=True`` also reads ``log_random_*.csv``: those videos
were inserted at random into the same feeds, so merging them rebuilds the lists users saw.

Mapping:

- The logs hold single impressions, not lists. A request = one user's impressions, ordered by
  ``time_ms``, until the gap to the previous impression exceeds ``window_seconds`` (300) or the
  list reaches ``max_list_length`` (10); a video repeating inside a window also starts a new
  request (candidates must be unique). All impressions are exposed (m = n) in time order.
  request_id = ``{user_id}-{k}`` (k-th request of the user); time = first impression (s).
- Labels: ``click`` (is_click), ``like`` (is_like), ``long_view``, ``watch_time`` =
  play_time_ms / 1000 (seconds).
- Item categoricals from the video features file: ``video_type, upload_type, music_type, tag``
  (first tag of the list); dense ``log_duration`` = log1p(duration_ms / 1000) from the log.
  ``category`` = first tag; ``creator`` = author_id index (videos missing from the features file:
  0 = unknown, never flagged).
- User categoricals: ``tab`` (scenario of the request's first impression), and from the user
  file ``user_active_degree, is_lowactive_period, is_live_streamer, is_video_author``, the four
  ``*_range`` buckets and ``onehot_feat0..17``; user dense: log1p of ``follow_user_num,
  fans_user_num, friend_user_num, register_days``.
- Upstream score: the logs hold no ranking score -> 0.0 for every candidate (candidate order is
  then a seeded random permutation, see ``_common``).
- ``is_cold_start``: the creator is new: the first upload date among the author's videos in the
  features file is less than ``cold_start_days`` (7) before the impression date (a creator
  whose only videos are uploaded after the impression date counts as new too). KuaiRand-Pure's
  catalogue has upload dates on three days only (2022-04-09..11), so there the flag marks the
  first days of the log; the 1K/27K catalogues are richer.
- ``is_long_tail``: the creator's impressions in the *training split* are below the 80th
  percentile (``long_tail_quantile``) of the creators seen in training (unseen: long tail).
- Split: :func:`genrerank.data.splits.assign_time_split` on request time.

Files can hold millions of rows: they are read with pyarrow and checked vectorised; a malformed
value raises DataValidationError naming the file, the 1-based line (header = line 1) and column.
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
    first_duplicate_in_segments,
    int_strings,
    log1p,
    long_tail_flags,
    lookup,
    map_keys,
    order_candidates,
    read_delimited,
    register_loader,
    require_dir,
    split_requests,
    take_rows,
)
from genrerank.data.schema import CategoricalFeature, DataValidationError, FeatureSpec

I64 = pa.int64()
LOG_COLUMNS = {
    "user_id": I64,
    "video_id": I64,
    "date": I64,
    "time_ms": I64,
    "is_click": I64,
    "is_like": I64,
    "long_view": I64,
    "play_time_ms": I64,
    "duration_ms": I64,
    "tab": I64,
}
VIDEO_CATEGORICAL = ["video_type", "upload_type", "music_type", "tag"]
USER_CATEGORICAL = [
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
    *[f"onehot_feat{k}" for k in range(18)],
]
USER_DENSE = ["follow_user_num", "fans_user_num", "friend_user_num", "register_days"]
DAY = 86400
NO_DATE = np.iinfo(np.int64).max


def _one(folder: Path, pattern: str, official: str) -> Path:
    hits = sorted(folder.glob(pattern))
    if not hits:
        raise FileNotFoundError(f"{folder}: expected file {official!r} ({pattern}) not found")
    if len(hits) > 1:
        raise DataValidationError(f"{folder}: several files match {pattern}: {hits}")
    return hits[0]


def _read_log(path: Path, file_no: int) -> pa.Table:
    t = read_delimited(path, LOG_COLUMNS, delimiter=",", quoted=True)
    for name in ("is_click", "is_like", "long_view"):
        v = t[name].to_numpy()
        check_rows(t, path, name, (v != 0) & (v != 1), lambda i, v=v: f"{v[i]} is not 0 or 1")
    for name in ("play_time_ms", "duration_ms", "time_ms"):
        v = t[name].to_numpy()
        check_rows(t, path, name, v < 0, lambda i, v=v: f"negative value {v[i]}")
    date = pc.strptime(
        pc.cast(t["date"], pa.string()), format="%Y%m%d", unit="s", error_is_null=True
    )
    check_rows(
        t,
        path,
        "date",
        date.is_null(),
        lambda i: f"{t['date'][i].as_py()} is not a date like 20220408",
    )
    days = pc.cast(date, I64).to_numpy() // DAY
    t = t.append_column("_day", pa.array(days))
    return t.append_column("_file", pa.array(np.full(t.num_rows, file_no, np.int64)))


@register_loader("kuairand")
def load_kuairand(
    input_dir: str | Path,
    *,
    window_seconds: float = 300,
    max_list_length: int = 10,
    include_random: bool = False,
    cold_start_days: int = 7,
    long_tail_quantile: float = 0.8,
    split_fractions: tuple[float, float, float] | None = None,
    seed: int = 0,
) -> tuple[pa.Table, FeatureSpec]:
    """Read a KuaiRand folder into the request table (see the module docstring)."""
    if max_list_length < 1:
        raise ValueError(f"max_list_length must be >= 1, got {max_list_length}")
    folder = require_dir(input_dir)
    logs = sorted(folder.glob("log_standard_*.csv"))
    if include_random:
        logs += sorted(folder.glob("log_random_*.csv"))
    if not logs:
        raise FileNotFoundError(f"{folder}: expected one or more 'log_standard_*.csv' files")
    vpath = _one(folder, "video_features_basic*.csv", "video_features_basic_pure.csv")
    upath = _one(folder, "user_features*.csv", "user_features_pure.csv")

    log = pa.concat_tables([_read_log(p, k) for k, p in enumerate(logs)]).combine_chunks()
    if log.num_rows == 0:
        raise DataValidationError(f"{folder}: the log files hold no impressions")

    video_cols = {"video_id": I64, "author_id": I64, "upload_dt": pa.string()}
    video_cols |= {c: pa.string() for c in VIDEO_CATEGORICAL}
    videos = read_delimited(
        vpath, video_cols, delimiter=",", quoted=True, nullable=["upload_dt", *VIDEO_CATEGORICAL]
    )
    user_cols = {"user_id": I64} | {c: pa.string() for c in USER_CATEGORICAL}
    user_cols |= {c: pa.float64() for c in USER_DENSE}
    users = read_delimited(
        upath, user_cols, delimiter=",", quoted=True, nullable=[*USER_CATEGORICAL, *USER_DENSE]
    )
    upload = pc.strptime(videos["upload_dt"], format="%Y-%m-%d", unit="s", error_is_null=True)
    bad = pc.and_(upload.is_null(), videos["upload_dt"].is_valid())
    check_rows(
        videos,
        vpath,
        "upload_dt",
        bad,
        lambda i: f"{videos['upload_dt'][i].as_py()!r} is not a date like 2022-04-10",
    )

    # ---- sessionise: sort by (user, time, file order) then cut windows into requests.
    user = log["user_id"].to_numpy()
    t_ms = log["time_ms"].to_numpy()
    order = np.lexsort((log[LINE].to_numpy(), log["_file"].to_numpy(), t_ms, user))
    user, t_ms = user[order], t_ms[order]
    video = log["video_id"].to_numpy()[order]
    n_rows = len(order)
    breaks = np.ones(n_rows, bool)
    breaks[1:] = (user[1:] != user[:-1]) | (np.diff(t_ms) > window_seconds * 1000)
    idx = np.arange(n_rows)
    while True:
        # The length cut counts positions inside a gap-separated segment; a repeated video adds
        # a break, which shifts those positions, so iterate until no request repeats a video.
        pos = idx - np.maximum.accumulate(np.where(breaks, idx, 0))
        req = np.cumsum(breaks | (pos % max_list_length == 0)) - 1
        o = np.lexsort((idx, video, req))
        repeat = (req[o][1:] == req[o][:-1]) & (video[o][1:] == video[o][:-1])
        if not repeat.any():
            break
        breaks[o[1:][repeat]] = True
    n = np.bincount(req)
    offsets = np.concatenate([[0], np.cumsum(n)])
    first = offsets[:-1]
    n_req = len(n)

    # request ids: user-k
    req_user = user[first]
    k_in_user = np.arange(n_req) - np.maximum.accumulate(
        np.where(np.r_[True, req_user[1:] != req_user[:-1]], np.arange(n_req), 0)
    )
    request_ids = pc.binary_join_element_wise(
        int_strings(req_user), int_strings(k_in_user), "-"
    ).to_numpy(zero_copy_only=False)
    times = t_ms[first] // 1000
    split = split_requests(times, request_ids, split_fractions)

    # ---- item features from the catalogue.
    v_ids = videos["video_id"].to_numpy()
    dup = first_duplicate_in_segments(np.zeros(len(v_ids), np.int64), v_ids)
    if dup is not None:
        fail(vpath, videos[LINE][dup].as_py(), "video_id", f"repeated video_id {v_ids[dup]}")
    v_sort = np.argsort(v_ids, kind="stable")
    v_ids_sorted = v_ids[v_sort]
    first_tag = pc.utf8_trim_whitespace(pc.list_element(pc.split_pattern(videos["tag"], ","), 0))
    videos = videos.set_column(videos.column_names.index("tag"), "tag", first_tag)
    item_feats, item_cols = [], []
    for name in VIDEO_CATEGORICAL:
        vocab = build_vocab(videos[name])
        item_feats.append(CategoricalFeature(name, len(vocab) + 1))
        item_cols.append(lookup(videos[name], vocab)[v_sort])
    author_vocab = build_vocab(videos["author_id"])
    v_author = lookup(videos["author_id"], author_vocab)[v_sort]
    upload_s = pc.cast(upload, I64)
    has_date = upload_s.is_valid().to_numpy(zero_copy_only=False)[v_sort]
    v_upload_day = pc.fill_null(upload_s, 0).to_numpy()[v_sort] // DAY
    # Each creator's first upload day; NO_DATE for creators without any dated video.
    author_first = np.full(len(author_vocab) + 1, NO_DATE)
    np.minimum.at(author_first, v_author[has_date], v_upload_day[has_date])

    def per_video(col: np.ndarray, default):
        return map_keys(v_ids_sorted, col, video, default)

    cat_matrix = np.stack([per_video(c, 0) for c in item_cols], axis=1).astype(np.int32)
    creator = per_video(v_author, 0).astype(np.int32)
    day = log["_day"].to_numpy()[order]
    first_upload = author_first[creator]
    dated = (creator > 0) & (first_upload != NO_DATE)
    cold = dated & (day - np.where(dated, first_upload, 0) < cold_start_days)

    train_row = split[req] == "train"
    author_counts = np.bincount(creator[train_row], minlength=len(author_vocab) + 1)
    author_counts[0] = 0
    tail_by_author = long_tail_flags(author_counts[1:], long_tail_quantile)
    tail = np.concatenate([[False], tail_by_author])[creator]

    # ---- user features.
    u_ids = users["user_id"].to_numpy()
    u_sort = np.argsort(u_ids, kind="stable")
    req_rows = map_keys(u_ids[u_sort], u_sort, req_user, -1)
    user_feats = []
    tab_vocab = build_vocab(log["tab"])
    user_feats.append(CategoricalFeature("tab", len(tab_vocab) + 1))
    user_cat = [lookup(log["tab"].to_numpy()[order][first], tab_vocab)]
    for name in USER_CATEGORICAL:
        vocab = build_vocab(users[name])
        user_feats.append(CategoricalFeature(name, len(vocab) + 1))
        col = lookup(users[name], vocab)
        user_cat.append(take_rows(col, req_rows, 0))
    user_dense = []
    for name in USER_DENSE:
        col = pc.fill_null(users[name], 0.0).to_numpy()
        user_dense.append(take_rows(log1p(col), req_rows, 0.0))

    # ---- candidate order and labels (labels follow display order = time order).
    perm, exposed = order_candidates(offsets, np.zeros(n_rows), seed)
    lab = {
        "click": log["is_click"].to_numpy()[order],
        "like": log["is_like"].to_numpy()[order],
        "long_view": log["long_view"].to_numpy()[order],
        "watch_time": log["play_time_ms"].to_numpy()[order] / 1000.0,
    }
    duration = log["duration_ms"].to_numpy()[order] / 1000.0

    spec = FeatureSpec(
        source="kuairand",
        user_categorical=user_feats,
        user_dense=[f"log_{c}" for c in USER_DENSE],
        item_categorical=item_feats,
        item_dense=["log_duration"],
        labels=["click", "like", "long_view", "watch_time"],
        n_categories=item_feats[VIDEO_CATEGORICAL.index("tag")].vocab_size,
        n_creators=len(author_vocab) + 1,
        extra={
            "input": str(folder),
            "log_files": [p.name for p in logs],
            "request": f"per user, gap <= {window_seconds}s, at most {max_list_length} items",
            "split": "assign_time_split on request time",
            "split_fractions": list(split_fractions or (0.8, 0.1, 0.1)),
            "upstream_score": "0.0: KuaiRand logs no ranking score",
            "candidate_order": "seeded random permutation (all upstream scores tie)",
            "is_cold_start": f"creator's first upload < {cold_start_days} days before",
            "is_long_tail": f"creator's train impressions below the {long_tail_quantile} quantile",
            "seed": seed,
        },
    )
    reqs = Requests(
        request_id=request_ids,
        time=times,
        user_id=int_strings(req_user),
        split=split,
        user_cat=np.stack(user_cat, axis=1),
        user_dense=np.stack(user_dense, axis=1),
        n=n,
        item_id=int_strings(video[perm]),
        item_cat=cat_matrix[perm],
        item_dense=log1p(duration)[perm][:, None],
        upstream_score=np.zeros(n_rows, np.float32),
        category=cat_matrix[perm, VIDEO_CATEGORICAL.index("tag")],
        creator=creator[perm],
        is_cold_start=cold[perm],
        is_long_tail=tail[perm],
        m=n,
        exposed=exposed,
        labels=lab,
    )
    return reqs.to_table(spec), spec
