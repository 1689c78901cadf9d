"""EB-NeRD loader on a hand-written fixture and, when present, the real sample.

Parquet cannot be written by hand: the fixture rows are hand-written JSON lines
(fixtures/ebnerd/*.jsonl) that the tests store as Parquet with the exact Arrow schema of the
official files (checked against the real sample when it is available).
"""

from __future__ import annotations

import calendar
import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrerank.data.loaders import convert, load
from genrerank.data.schema import DataValidationError, read_dataset
from tests.data.loaders.conftest import FIXTURES, real_data, rows_by_id, shown

TS = pa.timestamp("us")
BEHAVIORS_SCHEMA = pa.schema(
    [
        ("impression_id", pa.uint32()),
        ("article_id", pa.int32()),
        ("impression_time", TS),
        ("read_time", pa.float32()),
        ("scroll_percentage", pa.float32()),
        ("device_type", pa.int8()),
        ("article_ids_inview", pa.large_list(pa.int32())),
        ("article_ids_clicked", pa.large_list(pa.int32())),
        ("user_id", pa.uint32()),
        ("is_sso_user", pa.bool_()),
        ("gender", pa.int8()),
        ("postcode", pa.int8()),
        ("age", pa.int8()),
        ("is_subscriber", pa.bool_()),
        ("session_id", pa.uint32()),
        ("next_read_time", pa.float32()),
        ("next_scroll_percentage", pa.float32()),
    ]
)
HISTORY_SCHEMA = pa.schema(
    [
        ("user_id", pa.uint32()),
        ("impression_time_fixed", pa.large_list(TS)),
        ("scroll_percentage_fixed", pa.large_list(pa.float32())),
        ("article_id_fixed", pa.large_list(pa.int32())),
        ("read_time_fixed", pa.large_list(pa.float32())),
    ]
)


def fixture_rows(name: str) -> list[dict[str, Any]]:
    rows = [
        json.loads(s) for s in (FIXTURES / "ebnerd" / f"{name}.jsonl").read_text().split("\n") if s
    ]
    for r in rows:
        if "impression_time" in r:
            r["impression_time"] = datetime.fromisoformat(r["impression_time"])
        if "impression_time_fixed" in r:
            r["impression_time_fixed"] = [
                datetime.fromisoformat(t) for t in r["impression_time_fixed"]
            ]
    return rows


def write_ebnerd(folder: Path, behaviors: list[dict], history: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(behaviors, schema=BEHAVIORS_SCHEMA), folder / "behaviors.parquet"
    )
    pq.write_table(pa.Table.from_pylist(history, schema=HISTORY_SCHEMA), folder / "history.parquet")
    return folder


@pytest.fixture
def ebnerd_dir(tmp_path: Path) -> Path:
    return write_ebnerd(tmp_path / "ebnerd", fixture_rows("behaviors"), fixture_rows("history"))


@pytest.fixture
def rows(ebnerd_dir: Path, tmp_path: Path) -> dict[str, dict]:
    return rows_by_id(convert("ebnerd", ebnerd_dir, tmp_path / "ds"))


def test_spec(ebnerd_dir, tmp_path):
    _, spec = read_dataset(convert("ebnerd", ebnerd_dir, tmp_path / "ds"))
    assert spec.source == "ebnerd" and spec.labels == ["click"]
    assert [(c.name, c.vocab_size) for c in spec.user_categorical] == [
        ("device_type", 4),  # 1, 2, 3
        ("is_sso_user", 2),  # True
        ("gender", 3),  # 0, 1
        ("postcode", 2),  # 2
        ("age", 3),  # 40, 60
        ("is_subscriber", 3),  # False, True
        ("page", 3),  # front page, article page
    ]
    assert spec.user_dense == ["log_history_length", "log_history_read_time"]
    assert spec.item_categorical == [] and spec.item_dense == ["log_history_popularity"]
    assert (spec.n_categories, spec.n_creators, spec.max_list_length) == (1, 1, 5)


def test_requests(rows):
    assert len(rows) == 10
    assert [rows[str(i)]["split"] for i in range(11, 21)] == ["train"] * 8 + ["valid", "test"]
    r = rows["11"]
    assert r["time"] == calendar.timegm((2023, 2, 24, 8, 0, 0))  # naive times read as UTC
    assert r["user_id"] == "101"
    assert shown(r) == ["9000010", "9000001", "9000011", "9000002"]
    assert r["label_click"] == [0.0, 0.0, 1.0, 0.0]
    # History popularity: 9000001 read by 3 users, 9000002 by 2; the others by none.
    assert r["item_id"][:2] == ["9000001", "9000002"]
    assert r["upstream_score"] == pytest.approx([math.log1p(3), math.log1p(2), 0.0, 0.0])
    assert [d[0] for d in r["item_dense"]] == pytest.approx(r["upstream_score"])
    assert r["is_cold_start"] == [False, False, True, True]
    # Seen popularities 3, 2, 1, 1, 1: 80th percentile 2.2, so only 9000001 is in the head.
    assert r["is_long_tail"] == [False, True, True, True]
    assert r["category"] == [0, 0, 0, 0] and r["creator"] == [0, 0, 0, 0]
    # device 2, sso True, gender 0, postcode null, age 40, subscriber True, front page.
    assert r["user_cat"] == [2, 1, 1, 0, 1, 2, 1]
    # 101 read 4 articles, mean read time 25 s.
    assert r["user_dense"] == pytest.approx([math.log1p(4), math.log1p(25)])


def test_more_requests(rows):
    r = rows["12"]  # article page, gender and age null, not a subscriber
    assert r["user_cat"] == [1, 1, 0, 1, 0, 1, 2]
    assert r["user_dense"] == pytest.approx([math.log1p(2), math.log1p(5)])  # null read time
    r = rows["13"]  # two clicks
    assert shown(r) == ["9000001", "9000015", "9000016", "9000017", "9000018"]
    assert r["label_click"] == [0.0, 1.0, 0.0, 0.0, 1.0]
    r = rows["14"]  # user without history
    assert r["user_dense"] == [0.0, 0.0]
    assert r["is_cold_start"] == [True] * 4


def _bad(tmp_path: Path, index: int, **changes: Any) -> Path:
    behaviors = fixture_rows("behaviors")
    behaviors[index].update(changes)
    return write_ebnerd(tmp_path / "bad", behaviors, fixture_rows("history"))


@pytest.mark.parametrize(
    ("index", "changes", "message"),
    [
        (
            2,
            {"article_ids_clicked": [9000015, 9000099]},
            r"row 2 \(impression_id 13\), field 'article_ids_clicked': clicked article 9000099",
        ),
        (
            4,
            {"article_ids_inview": []},
            r"row 4 \(impression_id 15\), field 'article_ids_inview': empty",
        ),
        (
            5,
            {"article_ids_inview": [9000027, 9000004, 9000027]},
            r"row 5 \(impression_id 16\), field 'article_ids_inview': article 9000027 appears",
        ),
        (1, {"user_id": None}, r"row 1 \(impression_id 12\), field 'user_id': null"),
        (
            3,
            {"impression_time": None},
            r"row 3 \(impression_id 14\), field 'impression_time': null",
        ),
        (6, {"impression_id": 11}, r"row 6 \(impression_id 11\), field 'impression_id': repeats"),
        (
            7,
            {"article_ids_clicked": None},
            r"row 7 \(impression_id 18\), field 'article_ids_clicked'",
        ),
    ],
)
def test_malformed(tmp_path, index, changes, message):
    folder = _bad(tmp_path, index, **changes)
    with pytest.raises(DataValidationError, match=message) as info:
        load("ebnerd", folder)
    assert "behaviors.parquet" in str(info.value)
    out = tmp_path / "out"
    with pytest.raises(DataValidationError):
        convert("ebnerd", folder, out)
    assert not out.exists()


def test_missing_column_and_files(ebnerd_dir, tmp_path):
    t = pq.read_table(ebnerd_dir / "behaviors.parquet").drop_columns(["article_ids_clicked"])
    pq.write_table(t, ebnerd_dir / "behaviors.parquet")
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['article_ids_clicked'\]"):
        load("ebnerd", ebnerd_dir)
    (ebnerd_dir / "history.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="expected file 'history.parquet'"):
        load("ebnerd", ebnerd_dir)


def test_optional_user_columns_absent(ebnerd_dir):
    t = pq.read_table(ebnerd_dir / "behaviors.parquet").drop_columns(["gender", "article_id"])
    pq.write_table(t, ebnerd_dir / "behaviors.parquet")
    table, spec = load("ebnerd", ebnerd_dir)
    names = [c.name for c in spec.user_categorical]
    assert names == ["device_type", "is_sso_user", "postcode", "age", "is_subscriber"]


@pytest.mark.real_data
def test_fixture_schema_matches_real_files():
    folder = real_data("ebnerd_sample")
    assert pq.read_schema(folder / "behaviors.parquet").remove_metadata() == BEHAVIORS_SCHEMA
    assert pq.read_schema(folder / "history.parquet").remove_metadata() == HISTORY_SCHEMA


@pytest.mark.real_data
def test_real_ebnerd_sample(tmp_path):
    folder = real_data("ebnerd_sample")
    start = time.perf_counter()
    out = convert("ebnerd", folder, tmp_path / "ebnerd")
    elapsed = time.perf_counter() - start
    table, spec = read_dataset(out, validate=True)
    n = table["item_id"].combine_chunks().value_lengths().to_numpy()
    # Numbers documented in ../shared/data/README.md.
    assert table.num_rows == 1046
    assert (n.min(), n.max()) == (4, 81)
    assert round(float(n.mean()), 1) == 10.4
    clicks = np.concatenate([np.asarray(c) for c in table["label_click"].to_pylist()])
    assert int(clicks.sum()) == 1047  # one impression has two clicked articles
    assert elapsed < 10, f"conversion took {elapsed:.1f} s"


def test_sub_second_times_floor(tmp_path):
    behaviors = fixture_rows("behaviors")
    behaviors[0]["impression_time"] = datetime(2023, 2, 24, 8, 0, 0, 750000)
    table, _ = load("ebnerd", write_ebnerd(tmp_path / "e", behaviors, fixture_rows("history")))
    assert table["time"][0].as_py() == calendar.timegm((2023, 2, 24, 8, 0, 0))
