"""Avito Context Ad Clicks (Kaggle 2015) loader.

Input folder, tab-separated files with a header line: ``trainSearchStream.tsv`` (SearchID, AdID,
Position, ObjectType, HistCTR, IsClick), ``SearchInfo.tsv`` (SearchID, SearchDate, IPID, UserID,
IsUserLoggedOn, SearchQuery, LocationID, CategoryID, SearchParams), ``AdsInfo.tsv`` (AdID,
LocationID, CategoryID, Params, Price, Title, IsContext), ``UserInfo.tsv`` (UserID, UserAgentID,
UserAgentOSID, UserDeviceID, UserAgentFamilyID), ``Category.tsv`` (CategoryID, Level,
ParentCategoryID, SubcategoryID), ``Location.tsv`` (LocationID, Level, RegionID, CityID).
SearchDate looks like ``2015-05-10 18:11:01.0`` (read as UTC). Empty fields are allowed where
Avito leaves them empty (HistCTR / IsClick of non-contextual ads, Price, LocationID, ...).

Mapping (as NAR4Rec uses the data):

- Only contextual ads (ObjectType 3) carry clicks. A request = one SearchID's contextual ads in
  ``Position`` order (all exposed, m = n); request_id = SearchID. With ``list_length=5`` (the
  default; ``None`` keeps every length) searches with another number of contextual ads are
  dropped, and so are searches that list one ad twice; the counts are logged and stored in
  ``spec.extra["summary"]`` (not an error: it is a selection rule, not bad input).
- Labels: ``click`` only. Upstream score = ``HistCTR`` (Avito's own historical CTR estimate).
- Item categoricals: ``ad_category``, ``ad_parent_category`` (Category.tsv), ``ad_location``
  (Location.tsv); dense ``log_price`` = log1p(Price) and ``price_missing``. ``category`` = ad
  CategoryID index. ``creator`` = 0: AdsInfo has no advertiser id, so the fairness flags describe
  the ad itself: ``is_cold_start`` = the ad has no contextual impression in the training days;
  ``is_long_tail`` = its training-day impressions are below the 80th percentile
  (``long_tail_quantile``) of the ads shown in training.
- User categoricals: ``is_logged_on``, ``search_category``, ``search_location`` (SearchInfo) and
  ``user_agent_os``, ``user_device``, ``user_agent_family`` (UserInfo). No user dense features.
- Split by day, as the paper: days counted from the first search date (midnight) among the
  searches with contextual ads; the first ``train_days`` (21) are training, the next
  ``test_days`` (7) test; later days are dropped (counted). The paper has no validation split:
  we carve it from the *end of the training days* (the last ``valid_days``, 2), so model
  selection never touches the test days.

Bad input raises DataValidationError naming file, line and field (e.g. an empty or non-0/1
IsClick of a contextual ad, an unparsable SearchDate, a contextual search missing from
SearchInfo.tsv).
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
    logger,
    long_tail_flags,
    lookup,
    map_keys,
    order_candidates,
    read_delimited,
    register_loader,
    require_dir,
    require_file,
    summary_line,
    take_rows,
)
from genrerank.data.schema import CategoricalFeature, DataValidationError, FeatureSpec

I64, F64, STR = pa.int64(), pa.float64(), pa.string()
CONTEXTUAL = 3
DAY = 86400


def _tsv(path: Path, columns: dict, nullable=(), row_filter=None) -> pa.Table:
    return read_delimited(path, columns, delimiter="\t", nullable=nullable, row_filter=row_filter)


def _sorted_lookup(keys: pa.ChunkedArray, query: np.ndarray) -> np.ndarray:
    """Row of each query key in ``keys`` (-1 when absent)."""
    k = keys.to_numpy()
    o = np.argsort(k, kind="stable")
    return map_keys(k[o], o, query, -1)


@register_loader("avito")
def load_avito(
    input_dir: str | Path,
    *,
    list_length: int | None = 5,
    train_days: int = 21,
    test_days: int = 7,
    valid_days: int = 2,
    long_tail_quantile: float = 0.8,
    seed: int = 0,
) -> tuple[pa.Table, FeatureSpec]:
    """Read the Avito Context Ad Clicks files into the request table."""
    if not 0 <= valid_days < train_days or test_days < 1:
        raise ValueError(
            f"need 0 <= valid_days < train_days and test_days >= 1, got valid_days={valid_days},"
            f" train_days={train_days}, test_days={test_days}"
        )
    folder = require_dir(input_dir)
    paths = {
        name: require_file(folder, f"{name}.tsv")
        for name in (
            "trainSearchStream",
            "SearchInfo",
            "AdsInfo",
            "UserInfo",
            "Category",
            "Location",
        )
    }

    # ---- contextual impressions.
    spath = paths["trainSearchStream"]
    stream = _tsv(
        spath,
        {
            "SearchID": I64,
            "AdID": I64,
            "Position": I64,
            "ObjectType": I64,
            "HistCTR": F64,
            "IsClick": I64,
        },
        row_filter=lambda b: pc.fill_null(pc.equal(b["ObjectType"], CONTEXTUAL), True),
    )
    if stream.num_rows == 0:
        raise DataValidationError(f"{spath}: no contextual ads (ObjectType {CONTEXTUAL})")
    click = stream["IsClick"].to_numpy()
    check_rows(
        stream, spath, "IsClick", (click != 0) & (click != 1), lambda i: f"{click[i]} is not 0 or 1"
    )
    ctr = stream["HistCTR"].to_numpy()
    check_rows(
        stream,
        spath,
        "HistCTR",
        ~np.isfinite(ctr) | (ctr < 0),
        lambda i: f"{ctr[i]} is not a rate >= 0",
    )
    sid = stream["SearchID"].to_numpy()
    wanted = pa.array(np.unique(sid))

    # ---- searches with contextual ads.
    ipath = paths["SearchInfo"]
    search = _tsv(
        ipath,
        {
            "SearchID": I64,
            "SearchDate": STR,
            "UserID": I64,
            "IsUserLoggedOn": I64,
            "LocationID": I64,
            "CategoryID": I64,
        },
        nullable=("UserID", "IsUserLoggedOn", "LocationID", "CategoryID"),
        row_filter=lambda b: pc.or_kleene(
            pc.is_in(b["SearchID"], value_set=wanted), b["SearchID"].is_null()
        ),
    )
    s_ids = search["SearchID"].to_numpy()
    dup = first_duplicate_in_segments(np.zeros(len(s_ids), np.int64), s_ids)
    if dup is not None:
        fail(ipath, search[LINE][dup].as_py(), "SearchID", f"search {s_ids[dup]} repeats")
    date = pc.strptime(
        pc.replace_substring_regex(search["SearchDate"], r"\.\d*$", ""),
        format="%Y-%m-%d %H:%M:%S",
        unit="s",
        error_is_null=True,
    )
    check_rows(
        search,
        ipath,
        "SearchDate",
        date.is_null(),
        lambda i: f"{search['SearchDate'][i].as_py()!r} is not like 2015-05-10 18:11:01.0",
    )
    s_time = pc.cast(date, I64).to_numpy()
    row_of = _sorted_lookup(search["SearchID"], sid)
    i = np.flatnonzero(row_of < 0)
    if len(i):
        fail(
            spath,
            stream[LINE][int(i[0])].as_py(),
            "SearchID",
            f"search {sid[i[0]]} is not in SearchInfo.tsv",
        )
    time = s_time[row_of]

    # ---- day split (per impression row, then per request).
    day0 = (s_time.min() // DAY) * DAY
    day = (time - day0) // DAY
    # Split codes: 0 train, 1 valid, 2 test, -1 outside the split days.
    split = np.full(len(day), -1, dtype=np.int8)
    split[day < train_days - valid_days] = 0
    split[(day >= train_days - valid_days) & (day < train_days)] = 1
    split[(day >= train_days) & (day < train_days + test_days)] = 2

    ad = stream["AdID"].to_numpy()
    train_ads = ad[split == 0]
    ad_keys, ad_counts = np.unique(train_ads, return_counts=True)
    ad_tail = long_tail_flags(ad_counts, long_tail_quantile)

    # ---- group into lists: sort by (search, position, line) and apply the selection rules.
    order = np.lexsort((stream[LINE].to_numpy(), stream["Position"].to_numpy(), sid))
    sid_o, ad_o = sid[order], ad[order]
    starts = np.r_[True, sid_o[1:] != sid_o[:-1]]
    group = np.cumsum(starts) - 1
    n_all = np.bincount(group)
    o = np.lexsort((np.arange(len(order)), ad_o, group))
    rep = (group[o][1:] == group[o][:-1]) & (ad_o[o][1:] == ad_o[o][:-1])
    dup_group = np.zeros(len(n_all), bool)
    dup_group[group[o][1:][rep]] = True
    g_split = split[order][starts]
    keep = (g_split >= 0) & ~dup_group
    wrong_len = np.zeros(len(n_all), bool) if list_length is None else n_all != list_length
    summary = {
        "searches_with_contextual_ads": int(len(n_all)),
        "dropped_outside_split_days": int((g_split < 0).sum()),
        "dropped_repeated_ad": int(((g_split >= 0) & dup_group).sum()),
        "dropped_wrong_length": int((keep & wrong_len).sum()),
    }
    keep &= ~wrong_len
    summary["kept"] = int(keep.sum())
    logger.info(summary_line("avito", summary))
    if not keep.any():
        raise DataValidationError(f"{folder}: no search is left after selection: {summary}")
    rows = order[keep[group]]  # stream rows of kept searches, grouped, in display order
    n = n_all[keep]
    offsets = np.concatenate([[0], np.cumsum(n)])
    first = rows[offsets[:-1]]

    # ---- vocabularies from the catalogue files.
    cats = _tsv(
        paths["Category"],
        {"CategoryID": I64, "ParentCategoryID": I64},
        nullable=("ParentCategoryID",),
    )
    locs = _tsv(paths["Location"], {"LocationID": I64})
    cat_vocab = build_vocab(cats["CategoryID"])
    parent_vocab = build_vocab(cats["ParentCategoryID"])
    loc_vocab = build_vocab(locs["LocationID"])
    cat_rows = cats["CategoryID"].to_numpy()
    c_order = np.argsort(cat_rows, kind="stable")
    parent_idx = lookup(cats["ParentCategoryID"], parent_vocab)

    def parent_of(category_ids: np.ndarray) -> np.ndarray:
        r = map_keys(cat_rows[c_order], c_order, category_ids, -1)
        return take_rows(parent_idx, r, 0)

    uniq_ads = pa.array(np.unique(ad[rows]))
    ads = _tsv(
        paths["AdsInfo"],
        {"AdID": I64, "LocationID": I64, "CategoryID": I64, "Price": F64},
        nullable=("LocationID", "CategoryID", "Price"),
        row_filter=lambda b: pc.or_kleene(
            pc.is_in(b["AdID"], value_set=uniq_ads), b["AdID"].is_null()
        ),
    )
    price = ads["Price"].to_numpy(zero_copy_only=False)
    check_rows(
        ads,
        paths["AdsInfo"],
        "Price",
        np.isfinite(price) & (price < 0),
        lambda i: f"negative price {price[i]}",
    )
    cand_ad = ad[rows]
    ad_row = _sorted_lookup(ads["AdID"], cand_ad)
    ad_cat_ids = take_rows(pc.fill_null(ads["CategoryID"], -1).to_numpy(), ad_row, -1)
    ad_cat = take_rows(lookup(ads["CategoryID"], cat_vocab), ad_row, 0)
    ad_parent = parent_of(ad_cat_ids)
    ad_loc = take_rows(lookup(ads["LocationID"], loc_vocab), ad_row, 0)
    price_c = take_rows(np.nan_to_num(price, nan=-1.0), ad_row, -1.0)  # -1: no price
    price_missing = (price_c < 0).astype(np.float32)

    users = _tsv(
        paths["UserInfo"],
        {"UserID": I64, "UserAgentOSID": I64, "UserDeviceID": I64, "UserAgentFamilyID": I64},
        nullable=("UserAgentOSID", "UserDeviceID", "UserAgentFamilyID"),
    )
    srow = row_of[first]
    user_ids = pc.fill_null(search["UserID"], -1).to_numpy()[srow]
    urow = _sorted_lookup(users["UserID"], user_ids)
    user_feats = []
    user_cat = []
    for name, values, vocab in (
        ("is_logged_on", search["IsUserLoggedOn"], None),
        ("search_category", search["CategoryID"], cat_vocab),
        ("search_location", search["LocationID"], loc_vocab),
    ):
        vocab = build_vocab(values) if vocab is None else vocab
        user_feats.append(CategoricalFeature(name, len(vocab) + 1))
        user_cat.append(lookup(values, vocab)[srow])
    for name, col in (
        ("user_agent_os", "UserAgentOSID"),
        ("user_device", "UserDeviceID"),
        ("user_agent_family", "UserAgentFamilyID"),
    ):
        vocab = build_vocab(users[col])
        user_feats.append(CategoricalFeature(name, len(vocab) + 1))
        idx = lookup(users[col], vocab)
        user_cat.append(take_rows(idx, urow, 0))

    score = ctr[rows]
    perm, exposed = order_candidates(offsets, score, seed)
    request_ids = int_strings(sid[first]).to_numpy(zero_copy_only=False)
    cand_ad_p = cand_ad[perm]
    spec = FeatureSpec(
        source="avito",
        user_categorical=user_feats,
        user_dense=[],
        item_categorical=[
            CategoricalFeature("ad_category", len(cat_vocab) + 1),
            CategoricalFeature("ad_parent_category", len(parent_vocab) + 1),
            CategoricalFeature("ad_location", len(loc_vocab) + 1),
        ],
        item_dense=["log_price", "price_missing"],
        labels=["click"],
        n_categories=len(cat_vocab) + 1,
        n_creators=1,
        extra={
            "input": str(folder),
            "request": "contextual ads (ObjectType 3) of one SearchID, by Position",
            "list_length": list_length,
            "split": (
                f"by day from {np.datetime64(int(day0), 's')}: train days "
                f"[0, {train_days - valid_days}), valid [{train_days - valid_days}, "
                f"{train_days}), test [{train_days}, {train_days + test_days})"
            ),
            "upstream_score": "HistCTR",
            "candidate_order": "upstream score descending, ties by seeded random key",
            "is_cold_start": "ad not shown in the training days (no advertiser id)",
            "is_long_tail": f"training-day impressions below the {long_tail_quantile} quantile",
            "summary": summary,
            "seed": seed,
        },
    )
    reqs = Requests(
        request_id=request_ids,
        time=time[first],
        user_id=pc.if_else(pa.array(user_ids >= 0), int_strings(user_ids), "unknown"),
        split=np.array(["train", "valid", "test"])[split[first]],
        user_cat=np.stack(user_cat, axis=1),
        user_dense=np.zeros((len(n), 0), np.float32),
        n=n,
        item_id=int_strings(cand_ad_p),
        item_cat=np.stack([ad_cat, ad_parent, ad_loc], axis=1)[perm],
        item_dense=np.stack([log1p(price_c), price_missing], axis=1)[perm],
        upstream_score=score[perm],
        category=ad_cat[perm],
        creator=np.zeros(len(perm), np.int32),
        is_cold_start=map_keys(ad_keys, ad_counts, cand_ad_p, 0) == 0,
        is_long_tail=map_keys(ad_keys, ad_tail, cand_ad_p, True),
        m=n,
        exposed=exposed,
        labels={"click": click[rows].astype(np.float32)},
    )
    return reqs.to_table(spec), spec
