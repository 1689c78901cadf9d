"""Every bad input is one line naming the file, the line or row, and the column; nothing written."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrerank.data import from_pandas, import_table
from genrerank.data.importer import load_mapping
from genrerank.data.schema import DataValidationError
from tests.data.importer.conftest import (
    CANDIDATES_CSV,
    LONG_CSV,
    MAPPING,
    MAPPING_TOML,
    WIDE_CSV,
    mapping,
    wide_mapping,
)


def _edit(text: str, line: int, old: str, new: str) -> str:
    lines = text.splitlines()
    assert old in lines[line - 1], (line, old)
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    return "\n".join(lines) + "\n"


def _error(tmp_path: Path, long: str = LONG_CSV, m=MAPPING, cand: str | None = None,
           name: str = "long.csv") -> str:
    (tmp_path / name).write_text(long)
    cand_path = None
    if cand is not None:
        cand_path = tmp_path / "cand.csv"
        cand_path.write_text(cand)
    out = tmp_path / "out" / "ds"
    with pytest.raises(DataValidationError) as exc:
        import_table(tmp_path / name, m, out, candidates=cand_path)
    msg = str(exc.value)
    assert "\n" not in msg
    # Atomic: neither the data set nor a staging folder is left behind.
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    return msg


@pytest.mark.parametrize("line,old,new,column,words", [
    (3, ",blue,,", ",blue,abc,", "price", "'abc'"),  # a number column holding text
    (4, ",c,3,", ",c,4,", "pos", "contiguous"),  # position gap
    (4, ",c,3,", ",c,2,", "pos", "also held by item 'a' (line 2)"),
    (3, ",b,1,", ",b,0,", "pos", "below position_base"),
    (7, ",e,1,", ",e,2,", "pos", "starts at position 2"),
    (6, ",d,2,", ",b,2,", "iid", "item 'b' shown twice in request 'r2' (also at line 5)"),
    (4, ",0.7,0,", ",0.7,2,", "clk", "value 2 of binary signal 'click' is not 0 or 1"),
    (2, ",3.5,", ",-3.5,", "dwell", "negative"),
    (5, "2024-01-01 00:05:00", "yesterday", "ts", "'yesterday' is not an ISO 8601 time"),
    (2, ",10,30,", ",inf,30,", "price", "not finite"),
    (4, ",u1,c,", ",u9,c,", "uid", "request 'r1' has user 'u9' here but 'u1' at line 2"),
    (5, ",u2,", ",,", "uid", "empty value"),
    (7, ",test", ",tset", "fold", "'tset'"),
])
def test_long_data_errors(tmp_path, line, old, new, column, words):
    msg = _error(tmp_path, _edit(LONG_CSV, line, old, new))
    assert msg.startswith(str(tmp_path / "long.csv"))
    assert f"line {line}" in msg and repr(column) in msg and words in msg, msg


def test_missing_column(tmp_path):
    m = copy.deepcopy(MAPPING)
    m["signals"]["click"]["column"] = "clicked"
    msg = _error(tmp_path, m=m)
    assert "line 1" in msg and "'clicked'" in msg and "long.csv" in msg


def test_time_format(tmp_path):
    msg = _error(tmp_path, m=mapping(time_format="%Y-%m-%dT%H:%M:%S"))
    assert "line 5" in msg and "'ts'" in msg and "time_format" in msg


def test_candidates_errors(tmp_path):
    msg = _error(tmp_path, cand=_edit(CANDIDATES_CSV, 2, "r1,", "r9,"))
    assert msg.startswith(str(tmp_path / "cand.csv"))
    assert "line 2" in msg and "'rid'" in msg and "no shown item" in msg
    msg = _error(tmp_path, cand=CANDIDATES_CSV + "r1,x,0.7,c3,green,3\n")
    assert "cand.csv: line 5" in msg and "'iid'" in msg and "listed twice" in msg
    assert "(also at line 2)" in msg
    msg = _error(tmp_path, cand=CANDIDATES_CSV.replace("score", "scor"))
    assert "cand.csv: line 1" in msg and "'score'" in msg


@pytest.mark.parametrize("line,old,new,where,column,words", [
    (3, ",b;d,", ",,", "line 3", "iids", "no shown item"),
    (2, ",0;1;0,", ",0;1,", "line 2", "clks", "2 values for 3 items"),
    (2, ",0;1;0,", ",0;5;0,", "line 2, element 2", "clks", "not 0 or 1"),
    (2, ",0;1;0,", ",0;x;0,", "line 2, element 2", "clks", "'x' is not a number"),
    (3, "r2,", "r1,", "line 3", "rid", "repeats line 2"),
    # A per-request column: no element in the location.
    (3, "2024-01-01 00:05:00", "soon", "line 3", "ts", "'soon' is not an ISO 8601 time"),
])
def test_wide_errors(tmp_path, line, old, new, where, column, words):
    msg = _error(tmp_path, _edit(WIDE_CSV, line, old, new), m=wide_mapping(), name="wide.csv")
    assert f"wide.csv: {where}, column {column!r}" in msg and words in msg, msg


def test_parquet_and_dataframe_rows(tmp_path):
    df = pd.read_csv(pd.io.common.StringIO(LONG_CSV))
    df.loc[2, "clk"] = 2  # the third data row
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "long.parquet")
    with pytest.raises(DataValidationError, match=r"long\.parquet: row 3, column 'clk'"):
        import_table(tmp_path / "long.parquet", MAPPING, tmp_path / "ds")
    with pytest.raises(DataValidationError, match=r"^DataFrame: row 3, column 'clk'"):
        from_pandas(df, MAPPING)
    df = pd.read_csv(pd.io.common.StringIO(LONG_CSV), dtype={"price": str})
    df.loc[1, "price"] = "cheap"
    with pytest.raises(DataValidationError,
                       match=r"^DataFrame: row 2, column 'price': 'cheap' is not a number"):
        from_pandas(df, MAPPING)
    df = pd.read_csv(pd.io.common.StringIO(LONG_CSV))
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['clk'\]"):
        from_pandas(df.drop(columns=["clk"]), MAPPING)


@pytest.mark.parametrize("change,words", [
    ({"colums": {}}, "colums: unknown key (did you mean 'columns'?)"),
    ({"layout": "wdie"}, "'wdie' is not one of long, wide (did you mean 'wide'?)"),
    ({"columns": {"request_id": "rid"}}, "missing required key(s)"),
    ({"signals": {}}, "declare at least one signal"),
    ({"signals": {"Click": {"column": "clk", "kind": "binary"}}}, "lowercase identifier"),
    ({"signals": {"ctr": {"column": "clk"}}}, "missing key 'kind'"),
    ({"signals": {"click": {"column": "clk", "kind": "binray"}}}, "(did you mean 'binary'?)"),
    ({"features": {"item": {"c": {"column": "color", "kind": "categorical", "fill": 0}}}},
     "does not apply to kind 'categorical'"),
    ({"features": {"item": {"c": {"column": "color", "kind": "categorical",
                                  "vocab_cpa": 3}}}}, "(did you mean 'vocab_cap'?)"),
    ({"split": {"fractions": [0.5, 0.5, 0.5]}}, "summing to 1"),
    ({"duplicates": {"policy": "keep"}}, "is not one of error, drop, merge"),
    ({"derived": {"names": ["item_ctrr"]}}, "(did you mean 'item_ctr'?)"),
    ({"position_base": 2}, "position_base: expected an integer 0..1"),
    ({"candidates": {"columns": {"iidd": "item"}}}, "(did you mean 'iid'?)"),
])
def test_mapping_errors(change, words):
    m = copy.deepcopy(MAPPING)
    m.update(change)
    with pytest.raises(DataValidationError) as exc:
        load_mapping(m)
    assert words in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_mapping_file_errors(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(MAPPING_TOML.replace("[columns]", "[columns]\nrequest_idd = 'x'"))
    with pytest.raises(DataValidationError, match=r"m\.toml: \[columns\] request_idd: unknown "
                       r"key \(did you mean 'request_id'\?\)"):
        load_mapping(path)
    path.write_text("layout = ")
    with pytest.raises(DataValidationError, match=r"m\.toml: not valid TOML"):
        load_mapping(path)
    wide = wide_mapping()
    wide["columns"]["position"] = "pos"
    with pytest.raises(DataValidationError, match=r"position: not used with layout = 'wide'"):
        load_mapping(wide)


def test_existing_output_is_refused_before_reading(tmp_path, files):
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileExistsError):
        import_table(files["long.csv"], MAPPING, tmp_path / "ds")
