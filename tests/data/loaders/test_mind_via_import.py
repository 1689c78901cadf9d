"""MIND: ``data convert --format mind`` == its impressions table imported with mappings/mind.toml.

The loader is :func:`mind_impressions` (MIND-specific parsing and features) + the importer with
the shipped mapping; here the table goes the user's way instead (Parquet file, import_table) and
both data sets are compared column by column (:mod:`tests.data.loaders.via_import` lists the
spec fields allowed to differ). Before the split into the two steps, the converter's output was
checked identical to the old direct implementation on this fixture and on the real subset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from genrerank.data.loaders import convert
from genrerank.data.loaders.mappings import mapping_path, source_mapping
from genrerank.data.loaders.mind import mind_impressions
from tests.data.loaders.conftest import FIXTURES, real_data
from tests.data.loaders.via_import import assert_same_dataset, import_via_file

MIND = FIXTURES / "mind"


def _convert_and_import(folder: Path, tmp_path: Path, **options: Any) -> tuple[Path, Path]:
    converted = convert("mind", folder, tmp_path / "converted", **options)
    table, vocabularies = mind_impressions(
        folder, long_tail_quantile=options.get("long_tail_quantile", 0.8)
    )
    mapping = (
        source_mapping("mind", split_fractions=options.get("split_fractions"),
                       seed=options.get("seed", 0))
        if options else mapping_path("mind")
    )
    return converted, import_via_file(table, vocabularies, mapping, tmp_path / "import")


def test_fixture_convert_equals_import(tmp_path):
    assert_same_dataset(*_convert_and_import(MIND, tmp_path))


def test_fixture_with_options(tmp_path):
    # Another tie-break seed, split and long-tail cut reach both paths the same way.
    assert_same_dataset(*_convert_and_import(
        MIND, tmp_path, seed=7, split_fractions=(0.5, 0.25, 0.25), long_tail_quantile=0.5
    ))


def test_impressions_table():
    table, vocabularies = mind_impressions(MIND)
    assert table.num_rows == 36  # items shown in the fixture's 12 impressions
    rows = [r for r in table.to_pylist() if r["impression_id"] == "2"]
    # Impression 2 of U2 (history "N1 N2"): "N7-0 N1-1 N8-0 N4-0", in logged order.
    assert [r["news_id"] for r in rows] == ["N7", "N1", "N8", "N4"]
    assert [r["position"] for r in rows] == [0, 1, 2, 3]
    assert [r["click"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
    assert [r["category"] for r in rows] == [None, "news", "sports", None]
    assert [r["subcategory"] for r in rows] == [None, "newsus", "basketball_nba", None]
    assert [r["is_cold_start"] for r in rows] == [True, False, True, True]
    assert {r["user_id"] for r in rows} == {"U2"}
    # Sorted news.tsv values, not training frequency; category and its feature share one.
    assert vocabularies["category"] == [None, "finance", "lifestyle", "news", "sports"]
    assert vocabularies["item.category"] == vocabularies["category"]
    assert vocabularies["item.subcategory"][1:] == sorted(vocabularies["item.subcategory"][1:])


def test_comparison_catches_a_different_encoding(tmp_path):
    # Without the given vocabularies the importer indexes categories by training frequency,
    # which differs on this fixture: the comparison must say so.
    converted = convert("mind", MIND, tmp_path / "converted")
    table, _ = mind_impressions(MIND)
    imported = import_via_file(table, None, mapping_path("mind"), tmp_path / "import")
    with pytest.raises(AssertionError, match="column 'item_cat' differs first at request"):
        assert_same_dataset(converted, imported)


@pytest.mark.real_data
def test_real_subset_convert_equals_import(tmp_path):
    assert_same_dataset(*_convert_and_import(real_data("mind_small_subset"), tmp_path))
