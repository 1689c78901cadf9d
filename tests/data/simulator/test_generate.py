"""Generated data sets: format, determinism, regeneration of hidden state from a folder."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from genrerank.data.schema import (
    REQUESTS_FILE,
    SPEC_FILE,
    arrow_schema,
    read_dataset,
    validate_table,
)
from genrerank.data.simulator import Simulator, request_index, simulate_dataset, simulate_to_dir


@pytest.fixture(scope="module")
def kuai_table():
    return simulate_dataset("kuaishou", 600, seed=0)


def _list(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    n = len(col)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)


def test_table_is_valid(kuai_table):
    table, spec = kuai_table
    validate_table(table, spec)
    assert table.num_rows == 600
    assert table.schema.names == arrow_schema(spec).names
    assert spec.labels == ["click", "like", "long_view", "watch_time"]
    assert spec.max_candidates == 60 and spec.max_list_length == 6
    assert spec.extra["simulator"]["preset"] == "kuaishou"
    assert spec.extra["simulator"]["seed"] == 0
    assert spec.extra["gain_weights"] == {"click": 1.0, "like": 1.5, "long_view": 0.8}
    assert len(spec.user_dense) == len(_list(table, "user_dense")[0])
    click, like, lv = (_list(table, f"label_{k}") for k in ("click", "like", "long_view"))
    assert np.all(like <= click) and np.all(lv <= click)
    assert 0.03 < click.mean() < 0.25  # plausible view rate


def test_split_by_time(kuai_table):
    table, _ = kuai_table
    split = np.array(table.column("split").to_pylist())
    time = table.column("time").to_numpy()
    assert {s: int((split == s).sum()) for s in ("train", "valid", "test")} == {
        "train": 480, "valid": 60, "test": 60
    }
    assert time[split == "train"].max() <= time[split == "test"].min()


def test_avito_click_only():
    table, spec = simulate_dataset("avito", 50, seed=1)
    validate_table(table, spec)
    assert spec.labels == ["click"]
    assert [c for c in table.column_names if c.startswith("label_")] == ["label_click"]
    assert _list(table, "exposed").shape == (50, 5)
    assert _list(table, "upstream_score").shape == (50, 5)


def test_large_preset_shapes():
    table, spec = simulate_dataset("large", 3, seed=1)
    validate_table(table, spec)
    assert _list(table, "item_id").shape == (3, 500)
    assert _list(table, "exposed").shape == (3, 50)


def test_deterministic(tmp_path, kuai_table):
    table, spec = kuai_table
    again, spec2 = simulate_dataset("kuaishou", 600, seed=0, progress=True)
    assert again.equals(table) and spec2 == spec
    a = simulate_to_dir("kuaishou", 300, 0, tmp_path / "a", progress=False)
    b = simulate_to_dir("kuaishou", 300, 0, tmp_path / "b", progress=False)
    assert (a / REQUESTS_FILE).read_bytes() == (b / REQUESTS_FILE).read_bytes()
    assert (a / SPEC_FILE).read_bytes() == (b / SPEC_FILE).read_bytes()
    other, _ = simulate_dataset("kuaishou", 600, seed=1)
    assert not other.column("upstream_score").equals(table.column("upstream_score"))


def test_small_data_set_is_a_prefix_of_a_larger_one(kuai_table):
    table, _ = kuai_table
    small, _ = simulate_dataset("kuaishou", 100, seed=0)
    for name in ("request_id", "item_id", "upstream_score", "exposed", "label_click"):
        assert small.column(name).equals(table.column(name).slice(0, 100)), name


def test_regenerate_hidden_state_from_folder(tmp_path):
    path = simulate_to_dir(
        "kuaishou", 2100, 5, tmp_path / "ds", progress=False, logging_temperature=2.0
    )
    assert sorted(p.name for p in path.iterdir()) == sorted([REQUESTS_FILE, SPEC_FILE])
    table, spec = read_dataset(path)
    sim = Simulator.from_dataset(path)
    assert sim.config.logging_temperature == 2.0 and sim.seed == 5
    rows = np.array([0, 17, 2047, 2048, 2099])
    idx = request_index(np.array(table.column("request_id").to_pylist())[rows])
    assert np.array_equal(idx, rows)
    state, lists, fb = sim.logged(idx)
    sub = table.take(pa.array(rows))
    items = np.char.add("v", state.items.astype(str))
    assert np.array_equal(items, np.array(sub.column("item_id").to_pylist()))
    assert np.array_equal(state.upstream.astype(np.float32), _list(sub, "upstream_score"))
    assert np.array_equal(state.category, _list(sub, "category"))
    assert np.array_equal(state.creator, _list(sub, "creator"))
    assert np.array_equal(state.is_cold_start, _list(sub, "is_cold_start"))
    assert np.array_equal(lists, _list(sub, "exposed"))
    for k in spec.labels:
        assert np.array_equal(fb[k], _list(sub, f"label_{k}")), k
    # The folder holds no hidden truth: only the schema's columns.
    assert table.column_names == arrow_schema(spec).names
    assert np.array_equal(sim.requests(idx).appeal, state.appeal)
