"""Shared fixtures: a tiny hand-written data set in the genrerank format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from genrerank.data.schema import CategoricalFeature, FeatureSpec

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The licensed real logs (never committed): $GENRERANK_SHARED_DATA or ../shared/data."""
    return Path(os.environ.get("GENRERANK_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_spec() -> FeatureSpec:
    return FeatureSpec(
        source="tiny",
        user_categorical=[CategoricalFeature("segment", 3)],
        user_dense=["activity"],
        item_categorical=[CategoricalFeature("category", 4)],
        item_dense=["duration"],
        labels=["click", "like"],
        n_categories=4,
        n_creators=5,
    )


def tiny_rows() -> list[dict]:
    """Three requests with n = 3, 2, 4 and m = 2, 2, 3."""
    def req(i, t, items, exposed, click, like, split):
        n = len(items)
        return {
            "request_id": f"r{i}",
            "time": t,
            "user_id": f"u{i % 2}",
            "split": split,
            "user_cat": [i % 3],
            "user_dense": [0.5 * i],
            "item_id": items,
            "item_cat": [[(k % 3) + 1] for k in range(n)],
            "item_dense": [[float(k)] for k in range(n)],
            "upstream_score": [1.0 - 0.1 * k for k in range(n)],
            "category": [(k % 3) + 1 for k in range(n)],
            "creator": [(k % 4) + 1 for k in range(n)],
            "is_cold_start": [k == 0 for k in range(n)],
            "is_long_tail": [k == n - 1 for k in range(n)],
            "exposed": exposed,
            "label_click": click,
            "label_like": like,
        }

    return [
        req(0, 100, ["a", "b", "c"], [2, 0], [1.0, 0.0], [1.0, 0.0], "train"),
        req(1, 200, ["a", "d"], [1, 0], [0.0, 0.0], [0.0, 0.0], "valid"),
        req(2, 300, ["e", "f", "g", "h"], [3, 1, 0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], "test"),
    ]


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    from genrerank.data.schema import table_from_rows, write_dataset

    return write_dataset(tmp_path / "tiny", table_from_rows(tiny_rows(), tiny_spec()), tiny_spec())


def purchase_spec() -> FeatureSpec:
    """:func:`tiny_spec` with the signals of a shop's log instead of clicks and likes."""
    return FeatureSpec(**{**tiny_spec().to_dict(), "labels": ["purchase", "dwell"],
                          "label_kinds": {"purchase": "binary", "dwell": "nonnegative"},
                          "gain_weights": {"purchase": 2.0, "dwell": 0.0}})


def purchase_rows() -> list[dict]:
    """:func:`tiny_rows` with purchase = the click labels and dwell seconds instead of likes."""
    rows = tiny_rows()
    for row in rows:
        row["label_purchase"] = row.pop("label_click")
        row["label_dwell"] = [10.0 * (k + 1) for k in range(len(row.pop("label_like")))]
    return rows


@pytest.fixture
def purchase_dataset(tmp_path: Path) -> Path:
    from genrerank.data.schema import table_from_rows, write_dataset

    return write_dataset(tmp_path / "shop", table_from_rows(purchase_rows(), purchase_spec()),
                         purchase_spec())
