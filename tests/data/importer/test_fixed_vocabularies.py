"""Given vocabularies (``vocabularies.json`` format) instead of ones fitted on training rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from genrerank.data import import_table
from genrerank.data.ids import hash_item_id
from genrerank.data.importer import VOCAB_FILE, import_arrow
from genrerank.data.schema import DataValidationError, read_dataset
from tests.data.importer.conftest import MAPPING, mapping


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {r["request_id"]: r for r in table.to_pylist()}


def test_given_vocabularies_fix_index_order_and_size(files):
    # Fitted, training frequency would give color blue=1, green=2, red=3 (test_roundtrip);
    # given, "red" is 1 and "purple" (never shown) still takes an index.
    vocab = {"item.color": [None, "red", "purple", "blue"], "category": [None, "c4", "c1"],
             "context.device": [None, "tablet"]}
    out = import_table(files["long.csv"], files["mapping.toml"], files["long.csv"].parent / "ds",
                       candidates=files["cand.csv"], vocabularies=vocab)
    table, spec = read_dataset(out)
    rows = _by_id(table)
    # r1 candidates by score: a (red, c1), x (green, c3), c (blue, c1), b (blue, c2).
    assert rows["r1"]["item_id"] == ["a", "x", "c", "b"]
    assert rows["r1"]["item_cat"] == [[1], [0], [3], [3]]  # green is outside: unknown
    assert rows["r1"]["category"] == [2, 0, 2, 0]
    assert rows["r3"]["category"][rows["r3"]["item_id"].index("e")] == 1  # c4, test only
    assert [rows[r]["context_cat"] for r in ("r1", "r2", "r3")] == [[0], [0], [1]]
    assert spec.item_categorical[0].vocab_size == 4
    assert spec.n_categories == 3
    assert spec.context_categorical[0].vocab_size == 2
    written = json.loads((out / VOCAB_FILE).read_text())
    assert written["item.color"] == vocab["item.color"]
    assert written["category"] == vocab["category"]
    assert "given, not fitted: category, context.device, item.color" in spec.extra["vocabularies"]


def test_given_vocabulary_round_trips_a_fitted_one(files):
    first = import_arrow(_long(files), MAPPING)
    again = import_arrow(_long(files), MAPPING, vocabularies=first.vocabularies)
    assert again.table.equals(first.table)


def test_values_match_as_text_and_outside_values_hash(tmp_path):
    table = pa.table({
        "r": ["A", "B", "C", "D"], "t": [1, 2, 3, 4], "u": ["u"] * 4, "i": ["x"] * 4,
        "p": [1] * 4, "y": [0, 1, 0, 1], "g": [7, 3, None, 12], "s": [True, False, True, None],
    })
    m = {"columns": {"request_id": "r", "time": "t", "user_id": "u", "item_id": "i",
                     "position": "p"},
         "signals": {"click": {"column": "y", "kind": "binary"}},
         "features": {"user": {"g": {"column": "g", "kind": "categorical", "hash_buckets": 5},
                               "s": {"column": "s", "kind": "categorical"}}},
         "split": {"method": "column", "column": "r",
                   "values": {"train": ["A", "B"], "valid": ["C"], "test": ["D"]}}}
    # Integers given as text and booleans as Python bools name the same values.
    result = import_arrow(table, m, vocabularies={"user.g": [None, "3", "7"],
                                                  "user.s": [None, False, True]})
    cats = [r["user_cat"] for r in result.table.to_pylist()]
    assert [c[0] for c in cats] == [2, 1, 0, 3 + hash_item_id("12") % 5]
    assert [c[1] for c in cats] == [2, 1, 2, 0]
    assert [c.vocab_size for c in result.spec.user_categorical] == [3 + 5, 3]


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ({"item.colour": [None, "red"]}, r"vocabularies given for \['item.colour'\], which are "
         r"not categoricals of the mapping \(category, context.device, item.color\)"),
        ({"item.price": [None, 1]}, r"\['item.price'\]"),  # a dense feature
        ({"item.color": ["red"]}, r"vocabularies\['item.color'\]: expected a list starting "
         "with None"),
        ({"item.color": [None, "red", "red"]}, "no value twice"),
        ({"category": [None, "c1", None]}, "None only at index 0"),
        ({"category": [None, "c1", 2]}, "values of mixed or unsupported types"),
    ],
)
def test_bad_vocabularies(files, vocab, message):
    with pytest.raises(DataValidationError, match=message):
        import_arrow(_long(files), mapping(), vocabularies=vocab)


def _long(files) -> pa.Table:
    from pyarrow import csv

    return csv.read_csv(files["long.csv"])
