"""A corpus of corrupted data sets, one per defect a data set can carry, written past the
validating writer as a careless exporter would. Every reader (``data stats``, ``train``,
``evaluate``) must refuse each one with one line naming the file, the row or request and the
field, with no traceback, and leave nothing behind."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.data.schema import (
    METADATA_SPEC_KEY,
    METADATA_VERSION_KEY,
    REQUESTS_FILE,
    SCHEMA_VERSION,
    SPEC_FILE,
    DataValidationError,
    arrow_schema,
    read_dataset,
)
from tests.conftest import tiny_rows, tiny_spec

Rows = list[dict[str, Any]]


def _write_raw(folder: Path, rows: Rows, schema: pa.Schema | None = None,
               spec_json: str | None = None, drop: str | None = None) -> Path:
    """Write ``rows`` with the format's metadata but without any validation."""
    spec = tiny_spec()
    schema = schema or arrow_schema(spec)
    # The tiny spec declares no request context: its columns hold empty lists.
    rows = [{"context_cat": [], "context_dense": [], **row} for row in rows]
    table = pa.Table.from_pylist(rows, schema=schema)
    if drop:
        table = table.drop_columns([drop])
    folder.mkdir(parents=True)
    meta = {METADATA_VERSION_KEY: str(SCHEMA_VERSION).encode(),
            METADATA_SPEC_KEY: spec.to_json().encode()}
    pq.write_table(table.replace_schema_metadata(meta), folder / REQUESTS_FILE)
    (folder / SPEC_FILE).write_text(spec_json if spec_json is not None else spec.to_json())
    return folder


def _edit(change: Callable[[Rows], None]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        rows = copy.deepcopy(tiny_rows())
        change(rows)
        return _write_raw(folder, rows)
    return build


def _set(row: int, field: str, value: Any) -> Callable[[Rows], None]:
    def change(rows: Rows) -> None:
        rows[row][field] = value
    return change


def _strings_for_scores(folder: Path) -> Path:
    rows = copy.deepcopy(tiny_rows())
    for r in rows:
        r["upstream_score"] = [str(v) for v in r["upstream_score"]]
    schema = arrow_schema(tiny_spec())
    i = schema.get_field_index("upstream_score")
    schema = schema.set(i, pa.field("upstream_score", pa.list_(pa.string())))
    return _write_raw(folder, rows, schema)


def _missing_column(folder: Path) -> Path:
    return _write_raw(folder, copy.deepcopy(tiny_rows()), drop="item_dense")


def _truncated_parquet(folder: Path) -> Path:
    _write_raw(folder, copy.deepcopy(tiny_rows()))
    data = (folder / REQUESTS_FILE).read_bytes()
    (folder / REQUESTS_FILE).write_bytes(data[: len(data) // 2])
    return folder


def _malformed_spec_file(folder: Path) -> Path:
    return _write_raw(folder, copy.deepcopy(tiny_rows()), spec_json='{"source": "tiny", ')


def _contradicting_spec_file(folder: Path) -> Path:
    spec = json.loads(tiny_spec().to_json())
    spec["labels"] = ["click"]
    return _write_raw(folder, copy.deepcopy(tiny_rows()), spec_json=json.dumps(spec))


def _duplicate_request(rows: Rows) -> None:
    rows[2]["request_id"] = "r0"


def _no_candidates(rows: Rows) -> None:
    for key in ("item_id", "item_cat", "item_dense", "upstream_score", "category", "creator",
                "is_cold_start", "is_long_tail", "exposed", "label_click", "label_like"):
        rows[1][key] = []


# name -> (builder, fragments the one-line error must contain)
CORPUS: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "duplicate candidate ids": (_edit(_set(0, "item_id", ["a", "b", "a"])),
                                ["row 0", "'r0'", "'item_id'", "duplicate candidate 'a'"]),
    "duplicate request ids": (_edit(_duplicate_request),
                              ["row 2", "'request_id'", "duplicate of row 0"]),
    "repeated exposed item": (_edit(_set(2, "exposed", [3, 3, 0])),
                              ["row 2", "'r2'", "'exposed'", "repeated candidate"]),
    "empty exposed list": (_edit(lambda rows: rows[0].update(exposed=[], label_click=[],
                                                             label_like=[])),
                           ["row 0", "'exposed'", "empty exposed list"]),
    "label -1": (_edit(_set(2, "label_click", [0.0, -1.0, 1.0])),
                 ["row 2", "'label_click'", "invalid value -1.0"]),
    "label 2": (_edit(_set(0, "label_like", [2.0, 0.0])),
                ["row 0", "'label_like'", "invalid value 2.0"]),
    "scores stored as strings": (_strings_for_scores,
                                 ["'upstream_score'", "list<string>", "expected list<float>"]),
    "null item id": (_edit(_set(1, "item_id", ["a", None])),
                     ["row 1", "'r1'", "'item_id'", "null value"]),
    "unknown split": (_edit(_set(1, "split", "validation")),
                      ["row 1", "'split'", "must be one of"]),
    "request with 0 candidates": (_edit(_no_candidates),
                                  ["row 1", "'r1'", "'item_id'", "no candidates"]),
    "category beyond vocabulary": (_edit(_set(2, "category", [1, 2, 9, 1])),
                                   ["row 2", "'category'", "index 9 outside vocabulary"]),
    "item categorical beyond vocabulary": (_edit(_set(0, "item_cat", [[1], [4], [2]])),
                                           ["row 0", "'item_cat'", "index 4 outside vocabulary"]),
    "exposed index out of range": (_edit(_set(1, "exposed", [1, 5])),
                                   ["row 1", "'exposed'", "candidate index out of range"]),
    "NaN feature": (_edit(_set(2, "item_dense", [[0.0], [float("nan")], [2.0], [3.0]])),
                    ["row 2", "'item_dense'", "NaN or infinite"]),
    "infinite user feature": (_edit(_set(1, "user_dense", [float("inf")])),
                              ["row 1", "'user_dense'", "NaN or infinite"]),
    "labels shorter than the list": (_edit(_set(2, "label_like", [0.0, 1.0])),
                                     ["row 2", "'label_like'", "2 values for 3 exposed"]),
    "missing column": (_missing_column, ["missing column(s) ['item_dense']"]),
    "truncated Parquet file": (_truncated_parquet, ["not a readable Parquet file"]),
    "malformed feature_spec.json": (_malformed_spec_file,
                                    [SPEC_FILE, "not a valid feature spec"]),
    "feature_spec.json contradicting the metadata": (
        _contradicting_spec_file, [SPEC_FILE, "'labels'", "disagrees"]),
}


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _assert_one_line_error(code: int, text: str, fragments: list[str], data: Path) -> None:
    assert code == 1, text
    assert "Traceback" not in text, text
    error_lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, text
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, text)
    # The message names the file (a folder name is enough only for the spec-file cases).
    assert str(data) in error_lines[0], text


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_reader_refuses_every_corruption(name: str, tmp_path: Path) -> None:
    build, fragments = CORPUS[name]
    data = build(tmp_path / "corrupt")
    before = sorted(p.name for p in tmp_path.iterdir())

    with pytest.raises(DataValidationError):
        read_dataset(data)
    code, text = run("data", "stats", str(data))
    _assert_one_line_error(code, text, fragments, data)
    code, text = run("train", "--model", "pointwise", "--data", str(data),
                     "--out", str(tmp_path / "run"), "--set", "train.epochs=1")
    _assert_one_line_error(code, text, fragments, data)
    # Nothing written by the failed commands: no run folder, no stray files.
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_evaluate_refuses_corrupt_data_and_writes_no_result(tiny_dataset: Path,
                                                            tmp_path: Path) -> None:
    code, text = run("train", "--model", "pointwise", "--data", str(tiny_dataset),
                     "--out", str(tmp_path / "run"), "--set", "train.epochs=1")
    assert code == 0, text
    for name in ("label 2", "scores stored as strings", "truncated Parquet file"):
        build, fragments = CORPUS[name]
        data = build(tmp_path / name.replace(" ", "_"))
        out = tmp_path / f"{name}.json"
        code, text = run("evaluate", "--run", str(tmp_path / "run"), "--data", str(data),
                         "--out", str(out))
        _assert_one_line_error(code, text, fragments, data)
        assert not out.exists()


def test_no_validate_skips_row_checks_but_not_types(tmp_path: Path) -> None:
    from genrerank.data import schema

    data = CORPUS["label 2"][0](tmp_path / "labels")
    try:
        schema.set_validate_on_read(False)
        read_dataset(data)  # trusted: the row-level checks are skipped
        with pytest.raises(DataValidationError, match="expected list<float>"):
            read_dataset(_strings_for_scores(tmp_path / "strings"))
    finally:
        schema.set_validate_on_read(True)
    with pytest.raises(DataValidationError, match="invalid value 2.0"):
        read_dataset(data)


def test_the_corpus_is_valid_without_its_defect(tiny_dataset: Path, tmp_path: Path) -> None:
    """The writer used by the corpus produces readable data when nothing is corrupted, so each
    refusal above comes from its defect."""
    data = _write_raw(tmp_path / "clean", copy.deepcopy(tiny_rows()))
    table, spec = read_dataset(data)
    assert table.num_rows == 3 and spec.labels == ["click", "like"]
    code, text = run("data", "stats", str(data))
    assert code == 0, text
