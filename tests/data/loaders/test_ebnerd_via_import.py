"""EB-NeRD: ``data convert --format ebnerd`` == its impressions table imported with
mappings/ebnerd.toml.

Like test_mind_via_import: the impressions table of :func:`ebnerd_impressions` goes the user's
way (Parquet file, import_table) and the result is compared column by column with ``convert``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from genrerank.data.loaders import convert
from genrerank.data.loaders.ebnerd import ebnerd_impressions
from genrerank.data.loaders.mappings import mapping_path, source_mapping
from tests.data.loaders.conftest import real_data
from tests.data.loaders.test_ebnerd import fixture_rows, write_ebnerd
from tests.data.loaders.via_import import assert_same_dataset, import_via_file


@pytest.fixture
def ebnerd_dir(tmp_path: Path) -> Path:
    return write_ebnerd(tmp_path / "ebnerd", fixture_rows("behaviors"), fixture_rows("history"))


def _convert_and_import(
    folder: Path, tmp_path: Path, drop: tuple[str, ...] = (), **options: Any
) -> tuple[Path, Path]:
    converted = convert("ebnerd", folder, tmp_path / "converted", **options)
    table, vocabularies = ebnerd_impressions(
        folder, long_tail_quantile=options.get("long_tail_quantile", 0.8)
    )
    mapping = (
        source_mapping("ebnerd", split_fractions=options.get("split_fractions"),
                       seed=options.get("seed", 0), drop_features=drop)
        if options or drop else mapping_path("ebnerd")
    )
    return converted, import_via_file(table, vocabularies, mapping, tmp_path / "import")


def test_fixture_convert_equals_import(ebnerd_dir, tmp_path):
    assert_same_dataset(*_convert_and_import(ebnerd_dir, tmp_path))


def test_fixture_with_options(ebnerd_dir, tmp_path):
    assert_same_dataset(*_convert_and_import(
        ebnerd_dir, tmp_path, seed=7, split_fractions=(0.5, 0.25, 0.25), long_tail_quantile=0.5
    ))


def test_optional_columns_absent(ebnerd_dir, tmp_path):
    # Without gender and the page column, convert drops those features of the mapping.
    t = pq.read_table(ebnerd_dir / "behaviors.parquet").drop_columns(["gender", "article_id"])
    pq.write_table(t, ebnerd_dir / "behaviors.parquet")
    assert_same_dataset(*_convert_and_import(ebnerd_dir, tmp_path, drop=("gender", "page")))


def test_impressions_table(ebnerd_dir):
    table, vocabularies = ebnerd_impressions(ebnerd_dir)
    assert table.num_rows == sum(len(r["article_ids_inview"]) for r in fixture_rows("behaviors"))
    rows = [r for r in table.to_pylist() if r["impression_id"] == 13]
    # Impression 13: in view 9000001 9000015 9000016 9000017 9000018, clicked 15 and 18.
    assert [r["article_id"] for r in rows] == [9000001, 9000015, 9000016, 9000017, 9000018]
    assert [r["position"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["click"] for r in rows] == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert {r["page"] for r in rows} == {"front"}
    first = [r for r in table.to_pylist() if r["impression_id"] == 12][0]
    assert (first["page"], first["gender"], first["age"]) == ("article", None, None)
    # Sorted distinct values of behaviors.parquet, nulls left out (index 0 = unknown).
    assert vocabularies["user.is_sso_user"][0] is None
    for name in ("device_type", "gender", "postcode", "age", "is_subscriber"):
        values = vocabularies[f"user.{name}"][1:]
        assert values == sorted(values) and None not in values
    assert vocabularies["user.page"] == [None, "front", "article"]


@pytest.mark.real_data
def test_real_sample_convert_equals_import(tmp_path):
    assert_same_dataset(*_convert_and_import(real_data("ebnerd_sample"), tmp_path))
