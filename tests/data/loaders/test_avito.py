"""Avito Context Ad Clicks loader on a hand-written fixture in the Kaggle layout.

The real files cannot be obtained here (Kaggle). Fixture in brief: searches 101-114, first date
2015-04-25 (day 0). Days 0-18 train, 19-20 valid, 21-27 test, 28+ dropped. Search 103 has four
contextual ads and 114 six (dropped for list_length=5), 112 lists ad 1001 twice (dropped), 111
is on day 28 (dropped), 113 has no contextual ads, 115 is only in SearchInfo.
"""

from __future__ import annotations

import calendar
import math

import pytest

from genrerank.data.loaders import convert, load
from genrerank.data.schema import DataValidationError, read_dataset
from tests.data.loaders.conftest import FIXTURES, edit_line, rows_by_id, shown

AVITO = FIXTURES / "avito"


def by_item(row, column):
    return dict(zip(row["item_id"], row[column], strict=True))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert("avito", AVITO, tmp_path_factory.mktemp("avito") / "ds")


@pytest.fixture(scope="module")
def rows(converted):
    return rows_by_id(converted)


def test_spec_and_summary(converted):
    _, spec = read_dataset(converted)
    assert spec.labels == ["click"]
    assert [(c.name, c.vocab_size) for c in spec.item_categorical] == [
        ("ad_category", 6),  # 5, 22, 27, 43, 60
        ("ad_parent_category", 4),  # 1, 4, 9
        ("ad_location", 5),  # 101, 278, 2951, 3960
    ]
    assert spec.item_dense == ["log_price", "price_missing"]
    assert [c.name for c in spec.user_categorical] == [
        "is_logged_on",
        "search_category",
        "search_location",
        "user_agent_os",
        "user_device",
        "user_agent_family",
    ]
    assert (spec.n_categories, spec.n_creators, spec.max_list_length) == (6, 1, 5)
    assert spec.extra["summary"] == {
        "searches_with_contextual_ads": 13,
        "dropped_outside_split_days": 1,
        "dropped_repeated_ad": 1,
        "dropped_wrong_length": 2,
        "kept": 9,
    }


def test_split_by_day(rows):
    assert {r: rows[r]["split"] for r in rows} == {
        "101": "train",
        "102": "train",
        "104": "train",
        "105": "train",
        "106": "train",
        "107": "valid",
        "108": "valid",
        "109": "test",
        "110": "test",
    }


def test_search_101(rows):
    r = rows["101"]
    assert r["time"] == calendar.timegm((2015, 4, 25, 9, 15, 22))
    assert r["user_id"] == "3"
    assert shown(r) == ["1001", "1002", "1003", "1004", "1005"]  # contextual ads by Position
    assert r["label_click"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    # Candidates by HistCTR, the upstream score.
    assert r["item_id"] == ["1003", "1001", "1005", "1002", "1004"]
    assert r["upstream_score"] == pytest.approx([0.02, 0.012, 0.008, 0.004, 0.001])
    cat = by_item(r, "item_cat")
    assert cat["1001"] == [2, 2, 2]  # category 22 (parent 4), location 278
    assert cat["1003"] == [1, 1, 1]  # category 5 (parent 1), location 101
    assert cat["1002"] == [2, 2, 0]  # no location
    dense = by_item(r, "item_dense")
    assert dense["1001"] == pytest.approx([math.log1p(1290.0), 0.0])
    assert dense["1003"] == [0.0, 1.0]  # empty Price
    assert by_item(r, "category") == {"1001": 2, "1002": 2, "1003": 1, "1004": 3, "1005": 4}
    assert r["creator"] == [0] * 5
    # logged on, search category 22, location 278; user 3: OS 20, device 2021, family 23.
    assert r["user_cat"] == [2, 2, 2, 1, 2, 1]
    assert r["user_dense"] == []


def test_flags(rows):
    # Training-day impressions (all training searches, dropped ones too): 1001 7, 1002-1004 5,
    # 1006 4, 1005/1007/1008/1009 3, 1010 2 -> 80th percentile 5.
    r = rows["101"]
    assert by_item(r, "is_long_tail") == {
        "1001": False,
        "1002": False,
        "1003": False,
        "1004": False,
        "1005": True,
    }
    assert r["is_cold_start"] == [False] * 5
    r = rows["107"]  # ad 1011 is first shown on a validation day; user 15 is not in UserInfo
    assert by_item(r, "is_cold_start")["1011"] is True
    assert by_item(r, "is_long_tail")["1011"] is True
    assert by_item(r, "item_cat")["1011"] == [0, 0, 0]
    assert r["user_cat"][3:] == [0, 0, 0]
    assert r["label_click"] == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_position_order_not_file_order(rows):
    # Search 102's rows are not in Position order in the file.
    assert shown(rows["102"]) == ["1006", "1007", "1008", "1001", "1009"]
    assert rows["102"]["label_click"] == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_options():
    table, spec = load("avito", AVITO, list_length=None)
    ids = set(table["request_id"].to_pylist())
    assert ids == {"101", "102", "103", "104", "105", "106", "107", "108", "109", "110", "114"}
    assert spec.extra["summary"]["dropped_wrong_length"] == 0
    assert {len(r) for r in table["item_id"].to_pylist()} == {4, 5, 6}
    table, _ = load("avito", AVITO, train_days=14, valid_days=1, test_days=15)
    split = dict(zip(table["request_id"].to_pylist(), table["split"].to_pylist(), strict=True))
    assert split["104"] == "train" and split["105"] == "test" and split["111"] == "test"
    with pytest.raises(ValueError, match="valid_days"):
        load("avito", AVITO, valid_days=21)


@pytest.mark.parametrize(
    ("file", "line", "edit", "message"),
    [
        (
            "trainSearchStream.tsv",
            5,
            lambda s: s[: s.rindex("\t")] + "\t",
            r"line 5, field 'IsClick': empty value",
        ),
        (
            "trainSearchStream.tsv",
            5,
            lambda s: s[: s.rindex("\t")] + "\t2",
            r"line 5, field 'IsClick': 2 is not 0 or 1",
        ),
        (
            "trainSearchStream.tsv",
            2,
            lambda s: s.replace("0.012", "n/a"),
            r"line 2, field 'HistCTR': 'n/a' is not a valid float",
        ),
        (
            "trainSearchStream.tsv",
            2,
            lambda s: s.replace("0.012", "-0.5"),
            r"line 2, field 'HistCTR': -0.5 is not a rate",
        ),
        (
            "trainSearchStream.tsv",
            3,
            lambda s: s + "\textra",
            r"line 3: expected 6 tab-separated fields",
        ),
        (
            "trainSearchStream.tsv",
            2,
            lambda s: s.replace("101\t", "999\t", 1),
            r"line 2, field 'SearchID': search 999 is not in SearchInfo",
        ),
        (
            "SearchInfo.tsv",
            3,
            lambda s: s.replace("2015-04-25 23:59:59.0", "25.04.2015 23:59"),
            r"line 3, field 'SearchDate': '25.04.2015 23:59' is not like",
        ),
        (
            "SearchInfo.tsv",
            4,
            lambda s: s.replace("103\t", "102\t", 1),
            r"line 4, field 'SearchID': search 102 repeats",
        ),
        (
            "AdsInfo.tsv",
            3,
            lambda s: s.replace("4500.0", "-1.0"),
            r"line 3, field 'Price': negative price",
        ),
    ],
)
def test_malformed(fixture_copy, tmp_path, file, line, edit, message):
    folder = fixture_copy("avito")
    edit_line(folder / file, line, edit)
    with pytest.raises(DataValidationError, match=message) as info:
        load("avito", folder)
    assert file in str(info.value)
    with pytest.raises(DataValidationError):
        convert("avito", folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_header_and_files(fixture_copy):
    folder = fixture_copy("avito")
    edit_line(folder / "SearchInfo.tsv", 1, lambda s: s.replace("SearchDate", "Date"))
    with pytest.raises(DataValidationError, match=r"SearchInfo.tsv: line 1 \(header\): missing"):
        load("avito", folder)
    (folder / "Location.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="expected file 'Location.tsv'"):
        load("avito", folder)


@pytest.mark.parametrize(
    ("file", "line", "field"),
    [
        ("trainSearchStream.tsv", 3, "ObjectType"),
        ("SearchInfo.tsv", 6, "SearchID"),
        ("AdsInfo.tsv", 4, "AdID"),
    ],
)
def test_empty_key_fields_are_errors(fixture_copy, file, line, field):
    """Rows with an empty key must fail, not vanish through the row filters."""
    folder = fixture_copy("avito")
    header = (folder / file).read_text(encoding="utf-8").split("\n")[0].split("\t")
    k = header.index(field)

    def blank(s: str) -> str:
        parts = s.split("\t")
        parts[k] = ""
        return "\t".join(parts)

    edit_line(folder / file, line, blank)
    with pytest.raises(DataValidationError, match=rf"{file}: line {line}, field '{field}': empty"):
        load("avito", folder)
