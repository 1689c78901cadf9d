import json
from pathlib import Path

import pytest

from genrerank.utils.io import atomic_write_json
from genrerank.utils.tables import markdown_table


def test_markdown_table_aligns_text_left_numbers_right() -> None:
    rows = [{"name": "a", "x": 1.23456}, {"name": "bbb", "x": float("nan")}]
    table = markdown_table(rows, digits=2)
    assert table.splitlines() == [
        "| name | x    |",
        "|------|------|",
        "| a    | 1.23 |",
        "| bbb  |  nan |",
    ]
    assert markdown_table([]) == ""


def test_atomic_write_json_leaves_old_file_on_failure(tmp_path: Path) -> None:
    path = atomic_write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
