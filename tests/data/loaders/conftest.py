"""Helpers for the loader tests: hand-written fixtures and the (optional) licensed real data."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from genrerank.data.schema import read_dataset
from tests.conftest import shared_data_dir

_STORED = Path(__file__).parent / "fixtures"


def _materialise() -> Path:
    """Copy the hand-written fixtures to a temporary folder under their official file names.

    They are stored as ``<official name>.fixture`` so that nothing named like the licensed data
    sets (behaviors.tsv, ...) is ever tracked in the repository, while the loaders still read
    the exact official layout.
    """
    root = Path(tempfile.mkdtemp(prefix="genrerank-fixtures-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for src in _STORED.rglob("*.fixture"):
        dst = root / src.relative_to(_STORED).with_suffix("")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return root


FIXTURES = _materialise()


def real_data(name: str) -> Path:
    """A folder of ../shared/data, or skip: the real logs may not be copied into the repo."""
    path = shared_data_dir() / name
    if not path.is_dir():
        pytest.skip(
            f"../shared/data/{name} not found: looked in {path}; set GENRERANK_SHARED_DATA to "
            "the folder holding the licensed real data to run this test"
        )
    return path


def rows_by_id(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Read a written data set back (validating it) as request_id -> row dict."""
    table, _ = read_dataset(data_dir, validate=True)
    return {row["request_id"]: row for row in table.to_pylist()}


def shown(row: dict[str, Any]) -> list[str]:
    """The item ids of a request in display order."""
    return [row["item_id"][i] for i in row["exposed"]]


def edit_line(path: Path, line: int, fn: Callable[[str], str]) -> None:
    """Replace 1-based ``line`` of a text file by ``fn(line_text)`` (no newline)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = fn(lines[line - 1])
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.fixture
def fixture_copy(tmp_path: Path) -> Callable[[str], Path]:
    """Copy fixtures/<fmt> into tmp_path so a test can damage it."""

    def copy(fmt: str) -> Path:
        dst = tmp_path / f"in_{fmt}"
        shutil.copytree(FIXTURES / fmt, dst)
        return dst

    return copy
