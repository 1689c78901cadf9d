"""Long and wide impressions round trips on hand-written tables, checked value by value."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrerank.data import from_arrow, from_pandas, import_table
from genrerank.data.importer import import_arrow
from genrerank.data.schema import read_dataset, validate_table
from tests.data.importer.conftest import CANDIDATES_CSV, LONG_CSV, MAPPING, mapping, wide_mapping

T0 = 1704067200  # 2024-01-01T00:00:00Z

#: Expected rows; candidates by upstream score descending, exposed = candidate index per
#: display position. Vocabularies (training split = r1, r2; ties by first appearance):
#: color blue=1 (3x), green=2 (2x), red=3 (1x); category c2=1, c1=2, c3=3 (2x each), c4 unknown;
#: device mobile=1, desktop=2, tablet unknown.
EXPECTED = [
    dict(request_id="r1", time=T0, user_id="u1", split="train", user_dense=[30.0],
         context_cat=[1], item_id=["a", "x", "c", "b"], upstream_score=[0.9, 0.8, 0.7, 0.5],
         exposed=[3, 0, 2], label_click=[0.0, 1.0, 0.0], label_dwell=[0.0, 3.5, 0.0],
         category=[2, 3, 2, 1], item_cat=[[3], [2], [1], [1]],
         item_dense=[[10.0], [3.0], [5.0], [-1.0]],
         is_cold_start=[False, True, False, False], is_long_tail=[True, True, True, False]),
    dict(request_id="r2", time=T0 + 300, user_id="u2", split="train", user_dense=[40.0],
         context_cat=[2], item_id=["d", "b"], upstream_score=[0.95, 0.8], exposed=[1, 0],
         label_click=[1.0, 0.0], label_dwell=[2.0, 0.0], category=[3, 1],
         item_cat=[[2], [1]], item_dense=[[7.0], [20.0]],
         is_cold_start=[False, False], is_long_tail=[True, False]),
    dict(request_id="r3", time=T0 + 86400, user_id="u1", split="test", user_dense=[30.0],
         context_cat=[0], item_id=["a", "e", "b"], upstream_score=[0.6, 0.3, 0.1],
         exposed=[1], label_click=[1.0], label_dwell=[1.0], category=[2, 0, 1],
         item_cat=[[3], [3], [1]], item_dense=[[10.0], [1.0], [20.0]],
         is_cold_start=[False, True, False], is_long_tail=[True, True, False]),
    dict(request_id="r4", time=T0 + 43200, user_id="u3", split="valid", user_dense=[50.0],
         context_cat=[1], item_id=["f"], upstream_score=[0.5], exposed=[0],
         label_click=[0.0], label_dwell=[0.0], category=[2], item_cat=[[3]],
         item_dense=[[2.0]], is_cold_start=[True], is_long_tail=[True]),
]


def _check(table: pa.Table) -> None:
    rows = table.to_pylist()
    assert len(rows) == len(EXPECTED)
    for row, want in zip(rows, EXPECTED, strict=True):
        for key, value in want.items():
            got = row[key]
            if key in ("upstream_score",):
                assert got == pytest.approx(value), (row["request_id"], key)
            else:
                assert got == value, (row["request_id"], key, got, value)


def test_long_csv_with_candidates(files):
    out = import_table(files["long.csv"], files["mapping.toml"], files["long.csv"].parent / "ds",
                       candidates=files["cand.csv"])
    table, spec = read_dataset(out)
    _check(table)
    assert spec.labels == ["click", "dwell"]
    assert spec.label_kinds == {"click": "binary", "dwell": "nonnegative"}
    assert spec.gain_weights == {"click": 1.0, "dwell": 0.5}
    assert [(c.name, c.vocab_size) for c in spec.item_categorical] == [("color", 4)]
    assert [(c.name, c.vocab_size) for c in spec.context_categorical] == [("device", 3)]
    assert spec.item_dense == ["price"] and spec.user_dense == ["age"]
    assert spec.n_categories == 4 and spec.n_creators == 1
    vocab = json.loads((out / "vocabularies.json").read_text())
    assert vocab == {
        "item.color": [None, "blue", "green", "red"],
        "context.device": [None, "mobile", "desktop"],
        "category": [None, "c2", "c1", "c3"],
    }
    report = json.loads((out / "import_report.json").read_text())
    assert report["rows_read"] == {"shown": 7, "candidates": 3}
    assert report["requests"] == 4 and report["shown_items"] == 7
    assert report["not_shown_candidates"] == 3
    assert report["splits"] == {"train": 2, "valid": 1, "test": 1}
    assert report["vocabulary_sizes"]["item.color"] == 4
    assert report["warnings"] == [
        "context.device: 1 value(s) outside the training vocabulary, unknown (0)"]


def test_long_without_candidates_keeps_shown_order_by_score(files):
    table, _ = from_arrow(pa.Table.from_pandas(pd.read_csv(files["long.csv"])), MAPPING)
    r1 = table.to_pylist()[0]
    assert r1["item_id"] == ["a", "c", "b"]  # scores 0.9, 0.7, 0.5
    assert r1["exposed"] == [2, 0, 1]  # displayed b, a, c
    assert r1["label_click"] == [0.0, 1.0, 0.0]


def test_wide_csv_equals_long(files):
    long_table = import_arrow(
        pa.Table.from_pandas(pd.read_csv(files["long.csv"])), MAPPING,
        pa.Table.from_pandas(pd.read_csv(files["cand.csv"])),
    ).table
    out = import_table(files["wide.csv"], wide_mapping(), files["wide.csv"].parent / "wide_ds",
                       candidates=files["cand.csv"])
    table, _ = read_dataset(out)
    _check(table)
    assert table.to_pylist() == long_table.to_pylist()


def test_wide_parquet_lists(tmp_path, files):
    wide = pa.table({
        "rid": ["r1", "r2", "r3", "r4"],
        "ts": ["2024-01-01T00:00:00", "2024-01-01 00:05:00", "2024-01-02T00:00:00Z",
               "2024-01-01T12:00:00"],
        "uid": ["u1", "u2", "u1", "u3"],
        "iids": [["b", "a", "c"], ["b", "d"], ["e"], ["f"]],
        "scores": [[0.5, 0.9, 0.7], [0.8, 0.95], [0.3], [0.5]],
        "clks": [[0, 1, 0], [1, 0], [1], [0]],
        "dwells": [[0, 3.5, 0], [2, 0], [1], [0]],
        "cats": [["c2", "c1", "c1"], ["c2", "c3"], ["c4"], ["c1"]],
        "colors": [["blue", "red", "blue"], ["blue", "green"], ["red"], ["red"]],
        "prices": [[None, 10.0, 5.0], [20.0, 7.0], [1.0], [2.0]],
        "age": [30, 40, 30, 50],
        "device": ["mobile", "desktop", "tablet", "mobile"],
        "fold": ["train", "train", "test", "valid"],
    })
    pq.write_table(wide, tmp_path / "wide.parquet")
    out = import_table(tmp_path / "wide.parquet", wide_mapping(), tmp_path / "ds",
                       candidates=files["cand.csv"])
    _check(read_dataset(out)[0])


def test_from_pandas_equals_import_table(files):
    out = import_table(files["long.csv"], files["mapping.toml"], files["long.csv"].parent / "ds",
                       candidates=files["cand.csv"])
    written, written_spec = read_dataset(out)
    table, spec = from_pandas(pd.read_csv(files["long.csv"]), MAPPING,
                              pd.read_csv(files["cand.csv"]))
    validate_table(table, spec)
    assert table.to_pylist() == written.to_pylist()
    for key in ("item_categorical", "context_categorical", "labels", "label_kinds",
                "gain_weights", "n_categories", "item_dense"):
        assert getattr(spec, key) == getattr(written_spec, key), key


def test_folder_of_files_and_tsv(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    lines = LONG_CSV.splitlines()
    (folder / "part-1.tsv").write_text("\n".join([lines[0], *lines[1:4]]).replace(",", "\t"))
    (folder / "part-2.tsv").write_text("\n".join([lines[0], *lines[4:]]).replace(",", "\t"))
    (tmp_path / "cand.tsv").write_text(CANDIDATES_CSV.replace(",", "\t"))
    out = import_table(folder, MAPPING, tmp_path / "ds", candidates=tmp_path / "cand.tsv")
    _check(read_dataset(out)[0])


def test_optional_columns_absent(tmp_path):
    # Only the required columns and one signal: no score, category, creator, flags, features.
    csv = tmp_path / "min.csv"
    csv.write_text("q,t,u,i,p,y\nA,10,u1,x,0,1\nA,10,u1,y,1,0\nB,20,u2,x,0,0\n"
                   "C,30,u1,z,0,0\nC,30,u1,x,1,1\n")
    m = {"position_base": 0,
         "columns": {"request_id": "q", "time": "t", "user_id": "u", "item_id": "i",
                     "position": "p"},
         "signals": {"click": {"column": "y"}},
         "split": {"fractions": [0.4, 0.3, 0.3]}}
    out = import_table(csv, m, tmp_path / "ds")
    table, spec = read_dataset(out)
    rows = table.to_pylist()
    assert [r["request_id"] for r in rows] == ["A", "B", "C"]  # first appearance
    assert [r["split"] for r in rows] == ["train", "valid", "test"]
    assert rows[0]["item_id"] == ["x", "y"] and rows[0]["exposed"] == [0, 1]
    assert rows[0]["upstream_score"] == pytest.approx([1.0, 0.5])  # 1 / (1 + rank)
    assert rows[2]["label_click"] == [0.0, 1.0]
    assert rows[0]["category"] == [0, 0] and rows[0]["creator"] == [0, 0]
    assert rows[0]["context_cat"] == [] and rows[0]["item_cat"] == [[], []]
    assert spec.n_categories == 1 and spec.n_creators == 1
    assert spec.item_categorical == [] and spec.item_dense == []
    report = json.loads((out / "import_report.json").read_text())
    assert any("no upstream_score" in w for w in report["warnings"])


def test_unix_times_flags_creator_and_tags(tmp_path):
    df = pd.DataFrame({
        "r": ["A", "A", "B", "B", "C"],
        "t": [100, 100, 200, 200, 300],
        "u": ["u1"] * 5,
        "i": [1, 2, 1, 3, 2],  # integer item ids become text
        "p": [1, 2, 1, 2, 1],
        "y": [1, 0, 0, 1, 1],
        "seller": ["s1", "s2", "s1", None, "s2"],
        "tags": ["a|b", "b", "", "b|c|a", None],
        "new": ["yes", "no", "no", "yes", "no"],
    })
    m = {"columns": {"request_id": "r", "time": "t", "user_id": "u", "item_id": "i",
                     "position": "p", "creator": "seller", "is_cold_start": "new"},
         "signals": {"click": {"column": "y", "kind": "binary"}},
         "features": {"item": {"tags": {"column": "tags", "kind": "tags", "top_k": 2}}},
         "split": {"fractions": [0.67, 0.0, 0.33]}}
    table, spec = from_pandas(df, m)
    rows = table.to_pylist()
    assert [r["time"] for r in rows] == [100, 200, 300]
    assert rows[0]["item_id"] == ["1", "2"]
    # Training tags: a (A1, B3), b (A1, A2, B3), c (B3) -> b, a kept; columns tags:b, tags:a.
    assert spec.item_dense == ["tags:b", "tags:a"]
    assert rows[0]["item_dense"] == [[1.0, 1.0], [1.0, 0.0]]
    assert rows[1]["item_dense"] == [[0.0, 0.0], [1.0, 1.0]]
    # Creators by training frequency: s1 (2) = 1, s2 (1) = 2; empty = 0.
    assert spec.n_creators == 3
    assert rows[0]["creator"] == [1, 2] and rows[1]["creator"] == [1, 0]
    assert rows[0]["is_cold_start"] == [True, False]  # the mapped column
    # Long tail by creator training impressions: quantile 0.8 of (2, 1) = 1.8 -> s2 tail.
    assert rows[0]["is_long_tail"] == [False, True]
    assert rows[1]["is_long_tail"] == [False, False]  # empty creator: False


def test_hash_buckets_and_vocab_cap():
    df = pd.DataFrame({
        "r": ["A", "B", "C", "D"], "t": [1, 2, 3, 4], "u": ["u"] * 4, "i": ["x"] * 4,
        "p": [1] * 4, "y": [0, 1, 0, 1], "q": ["shoes", "shoes", "hats", "socks"],
    })
    m = {"columns": {"request_id": "r", "time": "t", "user_id": "u", "item_id": "i",
                     "position": "p"},
         "signals": {"click": {"column": "y", "kind": "binary"}},
         "features": {"context": {"q": {"column": "q", "kind": "categorical", "vocab_cap": 1,
                                        "hash_buckets": 4}}},
         "split": {"method": "column", "column": "r",
                   "values": {"train": ["A", "B", "C"], "test": ["D"]}}}
    from genrerank.data.ids import hash_item_id

    result = import_arrow(pa.Table.from_pandas(df), m)
    ctx = [r["context_cat"][0] for r in result.table.to_pylist()]
    assert ctx[:2] == [1, 1]  # shoes, the most frequent training value
    assert ctx[2] == 2 + hash_item_id("hats") % 4  # beyond the cap: hashed
    assert ctx[3] == 2 + hash_item_id("socks") % 4  # never seen in training: hashed
    assert result.spec.context_categorical[0].vocab_size == 1 + 1 + 4
    assert result.vocabularies["context.q"] == [None, "shoes"]


def test_derived_features(files):
    pytest.importorskip("genrerank.data.derived")
    m = mapping(derived={"names": ["item_impressions"]})
    table, spec = from_pandas(pd.read_csv(files["long.csv"]), m, pd.read_csv(files["cand.csv"]))
    assert spec.item_dense == ["price", "item_impressions"]
    rows = table.to_pylist()
    imp = {r["request_id"]: dict(zip(r["item_id"], (d[1] for d in r["item_dense"]),
                                     strict=True)) for r in rows}
    assert imp["r1"] == {"a": 0.0, "x": 0.0, "c": 0.0, "b": 0.0}  # the earliest request
    assert imp["r2"]["b"] == pytest.approx(0.6931472)  # log1p(1): shown in r1
    assert imp["r2"]["d"] == 0.0
    # Test request: every training impression is history. a once, b twice, e never.
    assert imp["r3"] == pytest.approx({"a": 0.6931472, "e": 0.0, "b": 1.0986123})


@pytest.mark.parametrize("policy,click_a", [("drop", 0.0), ("merge", 1.0)])
def test_duplicates_drop_and_merge(tmp_path, policy, click_a):
    csv = tmp_path / "dup.csv"
    # a shown at positions 1 and 3 of A (clicked only the second time); exact repeat of B's row.
    csv.write_text("r,t,u,i,p,y\nA,1,u,a,1,0\nA,1,u,b,2,0\nA,1,u,a,3,1\nB,2,u,c,1,1\n"
                   "B,2,u,c,1,1\nB,2,u,d,2,0\n")
    m = {"columns": {"request_id": "r", "time": "t", "user_id": "u", "item_id": "i",
                     "position": "p"},
         "signals": {"click": {"column": "y", "kind": "binary"}},
         "duplicates": {"policy": policy}, "split": {"fractions": [0.5, 0.0, 0.5]}}
    out = import_table(csv, m, tmp_path / "ds", allow_missing_splits=True)
    rows = read_dataset(out)[0].to_pylist()
    assert rows[0]["item_id"] == ["a", "b"] and rows[0]["exposed"] == [0, 1]
    assert rows[0]["label_click"] == [click_a, 0.0]
    assert rows[1]["item_id"] == ["c", "d"] and rows[1]["label_click"] == [1.0, 0.0]
    report = json.loads((out / "import_report.json").read_text())
    assert report["duplicates"][{"drop": "dropped", "merge": "merged"}[policy]] == 2


def test_candidates_repeating_shown_items_are_ignored(tmp_path, files):
    cand = tmp_path / "cand2.csv"
    cand.write_text(CANDIDATES_CSV + "r1,a,0.01,c1,red,10\n")  # a was shown in r1
    out = import_table(files["long.csv"], MAPPING, tmp_path / "ds", candidates=cand)
    _check(read_dataset(out)[0])
    report = json.loads((out / "import_report.json").read_text())
    assert report["duplicates"]["candidate_rows_already_shown"] == 1

