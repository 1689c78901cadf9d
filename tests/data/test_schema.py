from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from genrerank.data.schema import (
    REQUESTS_FILE,
    SPEC_FILE,
    DataValidationError,
    FeatureSpec,
    read_dataset,
    table_from_rows,
    write_dataset,
)
from tests.conftest import tiny_rows, tiny_spec


def test_round_trip_keeps_values_and_records_version(tiny_dataset: Path) -> None:
    table, spec = read_dataset(tiny_dataset, validate=True)
    assert table.num_rows == 3
    assert spec.labels == ["click", "like"]
    assert spec.max_candidates == 4 and spec.max_list_length == 3
    assert table.column("exposed")[2].as_py() == [3, 1, 0]
    assert table.column("label_like")[2].as_py() == [0.0, 0.0, 1.0]
    meta = pq.read_schema(tiny_dataset / REQUESTS_FILE).metadata
    assert meta[b"genrerank.schema_version"] == b"1"
    assert json.loads((tiny_dataset / SPEC_FILE).read_text())["source"] == "tiny"


def test_absent_signal_has_no_column(tiny_dataset: Path) -> None:
    table, _ = read_dataset(tiny_dataset)
    assert "label_long_view" not in table.column_names
    assert "label_watch_time" not in table.column_names


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[1].update(request_id="r0"), "'request_id': duplicate of row 0"),
        (lambda r: r[0].update(item_id=["a", "a", "c"]), "'item_id': duplicate candidate 'a'"),
        (lambda r: r[0].update(upstream_score=[1.0, float("nan"), 0.0]), "'upstream_score': NaN"),
        (lambda r: r[2].update(item_dense=[[0.0], [1.0], [float("inf")], [3.0]]), "'item_dense'"),
        (lambda r: r[0].update(exposed=[2, 2]), "'exposed': repeated candidate"),
        (lambda r: r[0].update(exposed=[5, 0]), "'exposed': candidate index out of range"),
        (lambda r: r[1].update(exposed=[0, 1, 0]), "'exposed': 3 exposed items but only 2"),
        (lambda r: r[0].update(label_click=[2.0, 0.0]), "'label_click': invalid value 2.0"),
        (lambda r: r[0].update(label_click=[1.0]), "'label_click': has 1 values for 2"),
        (lambda r: r[0].update(category=[1, 9, 1]), "'category': index 9 outside vocabulary"),
        (lambda r: r[1].update(split="holdout"), "'split': must be one of"),
        (lambda r: r[2].update(creator=[1, 2]), "'creator': has 2 values for 4 candidates"),
    ],
)
def test_bad_rows_are_named(tmp_path: Path, mutate, message: str) -> None:
    rows = tiny_rows()
    mutate(rows)
    with pytest.raises(DataValidationError, match=message.replace("(", r"\(")):
        write_dataset(tmp_path / "out", table_from_rows(rows, tiny_spec()), tiny_spec())
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_empty_candidate_list_is_rejected(tmp_path: Path) -> None:
    rows = tiny_rows()
    rows[1].update(item_id=[], item_cat=[], item_dense=[], upstream_score=[], category=[],
                   creator=[], is_cold_start=[], is_long_tail=[], exposed=[], label_click=[],
                   label_like=[])
    with pytest.raises(DataValidationError, match="row 1 .* no candidates"):
        write_dataset(tmp_path / "out", table_from_rows(rows, tiny_spec()), tiny_spec())


def test_failed_overwrite_keeps_previous_data(tiny_dataset: Path) -> None:
    before = (tiny_dataset / REQUESTS_FILE).read_bytes()
    rows = tiny_rows()
    rows[0]["exposed"] = [0, 0]
    with pytest.raises(DataValidationError):
        write_dataset(tiny_dataset, table_from_rows(rows, tiny_spec()), tiny_spec(), overwrite=True)
    assert (tiny_dataset / REQUESTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tiny_dataset.parent.iterdir()) == ["tiny"]


def test_existing_folder_needs_overwrite(tiny_dataset: Path) -> None:
    with pytest.raises(FileExistsError):
        write_dataset(tiny_dataset, table_from_rows(tiny_rows(), tiny_spec()), tiny_spec())
    write_dataset(tiny_dataset, table_from_rows(tiny_rows(), tiny_spec()), tiny_spec(),
                  overwrite=True)
    assert read_dataset(tiny_dataset)[0].num_rows == 3


def test_label_kinds_and_version_mismatch(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"\['purchase'\] need a kind"):
        FeatureSpec(source="x", labels=["purchase"])
    with pytest.raises(DataValidationError, match="not lowercase identifiers"):
        FeatureSpec(source="x", labels=["Add to cart"], label_kinds={"Add to cart": "binary"})
    with pytest.raises(DataValidationError, match="choose from"):
        FeatureSpec(source="x", labels=["purchase"], label_kinds={"purchase": "count"})
    with pytest.raises(DataValidationError, match="gain_weights"):
        FeatureSpec(source="x", gain_weights={"click": float("nan")})
    spec = FeatureSpec(source="x", labels=["click", "purchase", "dwell"],
                       label_kinds={"purchase": "binary", "dwell": "nonnegative"})
    assert [spec.label_kind(s) for s in spec.labels] == ["binary", "binary", "nonnegative"]
    data = tiny_spec().to_dict()
    data["schema_version"] = 99
    with pytest.raises(DataValidationError, match="schema_version 99"):
        FeatureSpec.from_dict(data)
    with pytest.raises(FileNotFoundError, match="no requests.parquet"):
        read_dataset(tmp_path)


def test_any_named_signal_is_checked_by_its_kind(tmp_path: Path) -> None:
    spec = FeatureSpec(**{**tiny_spec().to_dict(), "labels": ["purchase", "dwell"],
                          "label_kinds": {"purchase": "binary", "dwell": "nonnegative"},
                          "gain_weights": {"purchase": 3.0}})
    rows = tiny_rows()
    for row in rows:
        m = len(row["exposed"])
        row.pop("label_click"), row.pop("label_like")
        row["label_purchase"], row["label_dwell"] = [0.0] * m, [12.5] * m
    path = write_dataset(tmp_path / "ok", table_from_rows(rows, spec), spec)
    table, read = read_dataset(path)
    assert read.label_kinds == {"purchase": "binary", "dwell": "nonnegative"}
    assert read.gain_weights == {"purchase": 3.0}
    assert table.column("label_dwell")[0].as_py() == [12.5, 12.5]
    rows[1]["label_purchase"] = [0.0, 2.0]  # binary: only 0 or 1
    with pytest.raises(DataValidationError, match=r"row 1 .*'label_purchase': invalid value 2.0"):
        write_dataset(tmp_path / "bad", table_from_rows(rows, spec), spec)
    rows[1]["label_purchase"], rows[2]["label_dwell"] = [0.0, 1.0], [1.0, -1.0, 0.0]
    with pytest.raises(DataValidationError, match=r"row 2 .*'label_dwell': invalid value -1.0"):
        write_dataset(tmp_path / "bad", table_from_rows(rows, spec), spec)


def test_request_context_columns_round_trip_and_are_checked(tmp_path: Path) -> None:
    from genrerank.data.schema import CategoricalFeature

    spec = FeatureSpec(**{**tiny_spec().to_dict(),
                          "context_categorical": [CategoricalFeature("device", 3)],
                          "context_dense": ["query_length"]})
    rows = tiny_rows()
    for i, row in enumerate(rows):
        row["context_cat"], row["context_dense"] = [i % 3], [float(i)]
    table, read = read_dataset(write_dataset(tmp_path / "ctx", table_from_rows(rows, spec), spec))
    assert read.context_categorical[0].name == "device"
    assert table.column("context_cat").to_pylist() == [[0], [1], [2]]
    assert table.column("context_dense").to_pylist() == [[0.0], [1.0], [2.0]]
    rows[2]["context_cat"] = [3]
    with pytest.raises(DataValidationError, match=r"row 2 .*'context_cat': index 3 outside"):
        write_dataset(tmp_path / "bad", table_from_rows(rows, spec), spec)
    rows[2]["context_cat"], rows[0]["context_dense"] = [2], [float("nan")]
    with pytest.raises(DataValidationError, match=r"row 0 .*'context_dense': NaN"):
        write_dataset(tmp_path / "bad", table_from_rows(rows, spec), spec)
    rows[0]["context_dense"] = []
    with pytest.raises(DataValidationError, match=r"row 0 .*'context_dense': has 0 values"):
        write_dataset(tmp_path / "bad", table_from_rows(rows, spec), spec)


def test_data_set_without_context_columns_still_reads(tiny_dataset: Path) -> None:
    """Data sets written before the context columns existed read with no context features."""
    path = tiny_dataset / REQUESTS_FILE
    old = pq.read_table(path)
    old = old.drop_columns(["context_cat", "context_dense"])
    pq.write_table(old, path)
    table, spec = read_dataset(tiny_dataset)
    assert table.column("context_cat").to_pylist() == [[], [], []]
    assert spec.context_dense == []


def test_table_from_rows_fills_optional_columns_and_names_missing_ones() -> None:
    spec = FeatureSpec(source="bare", labels=["click"])
    row = {"request_id": "r0", "time": 1, "user_id": "u", "split": "train",
           "item_id": ["a", "b"], "item_cat": [[], []], "item_dense": [[], []],
           "upstream_score": [1.0, 0.5], "exposed": [1], "label_click": [1.0]}
    table = table_from_rows([row], spec)
    assert table.column("category").to_pylist() == [[0, 0]]
    assert table.column("is_long_tail").to_pylist() == [[False, False]]
    del row["exposed"]
    with pytest.raises(DataValidationError, match=r"row 0 \(request_id 'r0'\): missing key "
                                                  r"'exposed'"):
        table_from_rows([row], spec)


def test_candidates_must_be_in_upstream_order(tmp_path: Path) -> None:
    rows = tiny_rows()
    rows[2]["upstream_score"] = [0.9, 0.9, 0.95, 0.1]  # ties fine, a rise is not
    with pytest.raises(DataValidationError, match=r"row 2 \(request_id 'r2'\), field "
                                                  r"'upstream_score': .*candidate 2 \(0\.95\)"):
        write_dataset(tmp_path / "bad", table_from_rows(rows, tiny_spec()), tiny_spec())
    rows[2]["upstream_score"] = [0.9, 0.9, 0.5, 0.1]
    rows[1]["upstream_score"] = [5.0, 4.0]  # above the previous request's last score: fine
    assert read_dataset(write_dataset(tmp_path / "ok", table_from_rows(rows, tiny_spec()),
                                      tiny_spec()))[0].num_rows == 3


def test_write_refuses_a_data_set_without_train_or_valid(tmp_path: Path) -> None:
    rows = tiny_rows()
    rows[1]["split"] = "test"
    with pytest.raises(DataValidationError, match=r"no request in the 'valid' split .*"
                                                  r"assign_time_split.*allow_missing_splits"):
        write_dataset(tmp_path / "out", table_from_rows(rows, tiny_spec()), tiny_spec())
    assert not (tmp_path / "out").exists()
    for row in rows:
        row["split"] = "test"
    with pytest.raises(DataValidationError, match=r"'train' or 'valid' split"):
        write_dataset(tmp_path / "out", table_from_rows(rows, tiny_spec()), tiny_spec())
    path = write_dataset(tmp_path / "out", table_from_rows(rows, tiny_spec()), tiny_spec(),
                         allow_missing_splits=True)  # e.g. only for rerank / evaluate
    assert read_dataset(path)[0].column("split").to_pylist() == ["test"] * 3


def test_parquet_written_by_pandas_reads_with_a_hand_written_spec(tmp_path: Path) -> None:
    import pandas as pd

    spec = FeatureSpec(source="search-log", labels=["purchase", "dwell"],
                       label_kinds={"purchase": "binary", "dwell": "nonnegative"},
                       gain_weights={"purchase": 2.0, "dwell": 0.0})
    frame = pd.DataFrame({
        "request_id": ["q1", "q2"], "time": [10, 20], "user_id": ["u1", "u2"],
        "split": ["train", "valid"],
        "user_cat": [[], []], "user_dense": [[], []],
        "context_cat": [[], []], "context_dense": [[], []],
        "item_id": [["a", "b", "c"], ["d", "e"]],
        "item_cat": [[[], [], []], [[], []]], "item_dense": [[[], [], []], [[], []]],
        "upstream_score": [[3.0, 2.0, 1.0], [2, 1]],  # ints in a float column: fine
        "category": [[0, 0, 0], [0, 0]], "creator": [[0, 0, 0], [0, 0]],
        "is_cold_start": [[False] * 3, [False] * 2], "is_long_tail": [[False] * 3, [False] * 2],
        "exposed": [[1, 0], [0, 1]],
        "label_purchase": [[1.0, 0.0], [0.0, 0.0]], "label_dwell": [[30.5, 2.0], [0.0, 4.0]],
    })
    folder = tmp_path / "mine"
    folder.mkdir()
    frame.to_parquet(folder / REQUESTS_FILE)
    with pytest.raises(DataValidationError, match=r"no genrerank metadata and .* no "
                                                  r"feature_spec\.json.*write_dataset.*"
                                                  r"genrerank data import"):
        read_dataset(folder)
    (folder / SPEC_FILE).write_text(json.dumps({
        "schema_version": 1, "source": "search-log", "labels": ["purchase", "dwell"],
        "label_kinds": {"purchase": "binary", "dwell": "nonnegative"},
        "gain_weights": {"purchase": 2.0, "dwell": 0.0}}))
    table, read = read_dataset(folder)
    assert read == FeatureSpec(**{**spec.to_dict(), "max_candidates": 3, "max_list_length": 2})
    assert table.schema.field("upstream_score").type.value_type == "float"
    assert table.column("label_dwell").to_pylist() == [[30.5, 2.0], [0.0, 4.0]]
    assert table.column("item_cat").to_pylist()[1] == [[], []]
    frame.loc[1, "label_purchase"] = [0.0, 3.0]  # every row is still validated
    frame.to_parquet(folder / REQUESTS_FILE)
    with pytest.raises(DataValidationError, match=r"row 1 .*'label_purchase': invalid value 3"):
        read_dataset(folder)
