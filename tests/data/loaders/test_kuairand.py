"""KuaiRand loader on a hand-written fixture in the official KuaiRand-Pure layout.

Fixture in brief (times are Beijing time; time_ms is UTC epoch):
- user 0, 2022-04-08 10:00: videos 1, 2, 3, 4 at 30 s steps (the file lists 3 before 2), then
  after 16 minutes 5, 5 again 10 s later, 6 -> requests [1 2 3 4], [5], [5 6];
- user 3, 2022-04-15: video 0, then video 7 ten minutes later -> [0], [7] (user not in
  user_features);
- user 1, 2022-04-22 (second log file): 7, 8, 0, 9 (gaps 100, 100, 250 s), then 1 after 450 s
  -> [7 8 0 9], [1];
- user 2, 2022-05-01: 3, then 42 (not in the video catalogue) -> [3 42].
"""

from __future__ import annotations

import math
import shutil

import pytest

from genrerank.data.loaders import convert, load
from genrerank.data.schema import DataValidationError, read_dataset
from tests.data.loaders.conftest import FIXTURES, edit_line, rows_by_id, shown

KUAI = FIXTURES / "kuairand"
LOG1 = "log_standard_4_08_to_4_21_pure.csv"
LOG2 = "log_standard_4_22_to_5_08_pure.csv"
# author_id -> creator index (sorted): 1999999 1, 2103883 2, 3499857 3, 5067285 4,
# 7349781 5, 8635271 6. First tags sort as strings: "12" 1, "2" 2, "20" 3, "3" 4, "39" 5,
# "62" 6, "67" 7.
CREATOR = {"0": 5, "1": 2, "2": 5, "3": 4, "4": 6, "5": 6, "6": 2, "7": 1, "8": 5, "9": 3}
TAG = {"0": 5, "1": 2, "2": 3, "3": 5, "4": 6, "5": 3, "6": 1, "7": 5, "8": 7, "9": 4}


def by_item(row, column):
    return dict(zip(row["item_id"], row[column], strict=True))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return rows_by_id(convert("kuairand", KUAI, tmp_path_factory.mktemp("kuai") / "ds"))


def test_spec(tmp_path):
    _, spec = read_dataset(convert("kuairand", KUAI, tmp_path / "ds"))
    assert spec.labels == ["click", "like", "long_view", "watch_time"]
    assert [(c.name, c.vocab_size) for c in spec.item_categorical] == [
        ("video_type", 3),  # AD, NORMAL
        ("upload_type", 7),
        ("music_type", 4),  # 4.0, 8.0, 9.0
        ("tag", 8),
    ]
    assert spec.item_dense == ["log_duration"]
    assert spec.user_categorical[0].name == "tab" and spec.user_categorical[0].vocab_size == 4
    assert len(spec.user_categorical) == 1 + 8 + 18
    assert (spec.n_categories, spec.n_creators, spec.max_list_length) == (8, 7, 4)


def test_requests(rows):
    assert sorted(rows) == ["0-0", "0-1", "0-2", "1-0", "1-1", "2-0", "3-0", "3-1"]
    assert [shown(rows[r]) for r in ("0-0", "0-1", "0-2")] == [
        ["1", "2", "3", "4"],
        ["5"],
        ["5", "6"],
    ]
    assert shown(rows["1-0"]) == ["7", "8", "0", "9"]
    assert shown(rows["1-1"]) == ["1"]
    assert shown(rows["2-0"]) == ["3", "42"]
    assert [shown(rows["3-0"]), shown(rows["3-1"])] == [["0"], ["7"]]
    split = {r: rows[r]["split"] for r in rows}
    assert split == {
        "0-0": "train",
        "0-1": "train",
        "0-2": "train",
        "3-0": "train",
        "3-1": "train",
        "1-0": "train",
        "1-1": "valid",
        "2-0": "test",
    }
    assert rows["0-0"]["time"] == 1649383200 and rows["1-1"]["time"] == 1650629700


def test_labels_and_features(rows):
    r = rows["0-0"]
    assert r["label_click"] == [1.0, 0.0, 1.0, 0.0]
    assert r["label_like"] == [0.0, 0.0, 1.0, 0.0]
    assert r["label_long_view"] == [1.0, 0.0, 1.0, 0.0]
    assert r["label_watch_time"] == pytest.approx([12.0, 2.1, 16.433, 0.5])
    assert r["upstream_score"] == [0.0] * 4
    assert by_item(r, "creator") == {k: CREATOR[k] for k in "1234"}
    assert by_item(r, "category") == {k: TAG[k] for k in "1234"}
    # video 3: AD, UNKNOWN upload type, no music type, tag 39.
    assert by_item(r, "item_cat")["3"] == [1, 5, 0, 5]
    assert by_item(r, "item_dense")["1"] == [pytest.approx(math.log1p(20.0))]
    # Creator first uploads: 2103883 on 04-09 (after 04-08: new), 5067285 on 04-05 (3 days);
    # 7349781 on 03-01 and 8635271 on 01-20 are old.
    assert by_item(r, "is_cold_start") == {"1": True, "2": False, "3": True, "4": False}
    # Training impressions per creator: 7349781 4, 8635271 3, the others 1-2; 80th pct = 3.
    assert by_item(r, "is_long_tail") == {"1": True, "2": False, "3": True, "4": False}
    assert r["user_dense"] == pytest.approx([math.log1p(v) for v in (514, 150, 34, 799)])
    assert r["user_cat"][:3] == [2, 1, 1]  # tab 1, full_active, is_lowactive_period 0

    assert rows["0-2"]["label_watch_time"] == pytest.approx([4.0, 0.0])
    assert by_item(rows["3-1"], "is_cold_start") == {"7": True}  # 1999999 first upload 04-11
    assert rows["3-0"]["user_cat"] == [1] + [0] * 26  # user 3 is not in user_features
    assert rows["3-0"]["user_dense"] == [0.0] * 4
    r = rows["2-0"]  # video 42 has no catalogue entry
    assert by_item(r, "creator") == {"3": 4, "42": 0}
    assert by_item(r, "item_cat")["42"] == [0, 0, 0, 0]
    assert by_item(r, "is_cold_start") == {"3": False, "42": False}


def test_window_options():
    table, _ = load("kuairand", KUAI, max_list_length=3)
    got = {r["request_id"]: shown(r) for r in table.to_pylist()}
    assert [got["0-0"], got["0-1"], got["0-2"], got["0-3"]] == [
        ["1", "2", "3"],
        ["4"],
        ["5"],
        ["5", "6"],
    ]
    assert [got["1-0"], got["1-1"], got["1-2"]] == [["7", "8", "0"], ["9"], ["1"]]
    table, _ = load("kuairand", KUAI, window_seconds=20)
    got = {r["request_id"]: shown(r) for r in table.to_pylist()}
    assert [got[f"0-{k}"] for k in range(6)] == [["1"], ["2"], ["3"], ["4"], ["5"], ["5", "6"]]


def test_include_random(fixture_copy):
    folder = fixture_copy("kuairand")
    header = (folder / LOG2).read_text().split("\n")[0]
    (folder / "log_random_4_22_to_5_08_pure.csv").write_text(
        header + "\n1,6,20220422,2002,1650628950000,1,0,0,0,0,0,0,5000,114500,0,0,0,1,4\n"
    )
    table, _ = load("kuairand", folder)
    assert {r["request_id"]: shown(r) for r in table.to_pylist()}["1-0"] == ["7", "8", "0", "9"]
    table, spec = load("kuairand", folder, include_random=True)
    assert {r["request_id"]: shown(r) for r in table.to_pylist()}["1-0"] == [
        "7",
        "8",
        "6",
        "0",
        "9",
    ]
    assert "log_random_4_22_to_5_08_pure.csv" in spec.extra["log_files"]


@pytest.mark.parametrize(
    ("file", "line", "edit", "message"),
    [
        (
            LOG1,
            3,
            lambda s: s.replace(
                "0,3,20220408,1001,1649383260000,1,1", "0,3,20220408,1001,1649383260000,2,1"
            ),
            r"line 3, field 'is_click': 2 is not 0 or 1",
        ),
        (
            LOG1,
            5,
            lambda s: s.replace("1649383290000", "16493832x0000"),
            r"line 5, field 'time_ms': '16493832x0000' is not a valid int",
        ),
        (LOG1, 4, lambda s: s.rsplit(",", 1)[0], r"line 4: expected 19 ','-separated fields"),
        (LOG2, 7, lambda s: s.replace(",800,", ",,"), r"line 7, field 'play_time_ms': empty value"),
        (
            LOG2,
            2,
            lambda s: s.replace("20220422", "20221342"),
            r"line 2, field 'date': 20221342 is not a date",
        ),
        (
            LOG2,
            3,
            lambda s: s.replace(",3000,24500,", ",-3000,24500,"),
            r"line 3, field 'play_time_ms': negative",
        ),
        (
            "video_features_basic_pure.csv",
            5,
            lambda s: s.replace("2022-04-05", "05/04/2022"),
            r"line 5, field 'upload_dt': '05/04/2022' is not a date",
        ),
        (
            "video_features_basic_pure.csv",
            11,
            lambda s: s.replace("9,", "8,", 1),
            r"line 11, field 'video_id': repeated",
        ),
        (
            "user_features_pure.csv",
            3,
            lambda s: s.replace(",457,", ",many,"),
            r"line 3, field 'follow_user_num': 'many' is not a valid float",
        ),
    ],
)
def test_malformed(fixture_copy, tmp_path, file, line, edit, message):
    folder = fixture_copy("kuairand")
    edit_line(folder / file, line, edit)
    with pytest.raises(DataValidationError, match=message) as info:
        load("kuairand", folder)
    assert file in str(info.value)
    with pytest.raises(DataValidationError):
        convert("kuairand", folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_column(fixture_copy):
    folder = fixture_copy("kuairand")
    edit_line(folder / LOG1, 1, lambda s: s.replace("long_view", "longview"))
    with pytest.raises(
        DataValidationError, match=r"line 1 \(header\): missing column\(s\) \['long_view'\]"
    ):
        load("kuairand", folder)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("user_features_pure.csv", "expected file 'user_features_pure.csv'"),
        ("video_features_basic_pure.csv", "expected file 'video_features_basic_pure.csv'"),
        ("logs", r"expected one or more 'log_standard_\*.csv'"),
    ],
)
def test_missing_files(fixture_copy, remove, message):
    folder = fixture_copy("kuairand")
    for p in folder.glob("log_standard_*.csv") if remove == "logs" else [folder / remove]:
        p.unlink()
    with pytest.raises(FileNotFoundError, match=message):
        load("kuairand", folder)


def test_1k_file_names(tmp_path):
    folder = tmp_path / "k1"
    shutil.copytree(KUAI, folder)
    (folder / "video_features_basic_pure.csv").rename(folder / "video_features_basic_1k.csv")
    (folder / "user_features_pure.csv").rename(folder / "user_features_1k.csv")
    table, _ = load("kuairand", folder)
    assert table.num_rows == 8
