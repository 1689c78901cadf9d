"""``dataset_stats`` / ``format_stats`` on converted fixtures (numbers counted by hand)."""

from __future__ import annotations

import json

import pytest

from genrerank.data.loaders import convert
from genrerank.data.stats import dataset_stats, format_stats
from tests.data.loaders.conftest import FIXTURES, real_data


def test_mind_fixture_stats(tmp_path):
    stats = dataset_stats(convert("mind", FIXTURES / "mind", tmp_path / "mind"))
    assert stats["source"] == "mind"
    assert stats["requests"] == {"total": 12, "train": 10, "valid": 1, "test": 1}
    assert stats["users"] == 8
    assert stats["items"] == 30  # N1..N30
    # Impression sizes 3 4 2 3 3 5 2 3 3 2 4 2: 36 items, 14 of them clicked.
    assert stats["candidates_per_request"] == {"min": 2, "mean": 3.0, "max": 5}
    assert stats["list_length"] == {"min": 2, "mean": 3.0, "max": 5}
    assert stats["labels"]["click"] == {"positives": 14, "exposed": 36, "rate": 14 / 36}
    for name in ("like", "long_view", "watch_time"):
        assert stats["labels"][name] == "absent"
    json.dumps(stats)  # plain Python values only

    text = format_stats(stats)
    assert "requests: 12 (train 10, valid 1, test 1)" in text
    assert "users: 8" in text and "distinct items: 30" in text
    assert "candidates per request (n): min 2, mean 3.00, max 5" in text
    assert "list length (m): min 2, mean 3.00, max 5" in text
    assert "click: rate 0.3889 (14 / 36)" in text
    assert "like: absent" in text and "watch_time: absent" in text
    assert "2019-11-11 09:05:58 .. 2019-11-15 23:59:59 UTC" in text


def test_kuairand_fixture_stats(tmp_path):
    stats = dataset_stats(convert("kuairand", FIXTURES / "kuairand", tmp_path / "k"))
    assert stats["requests"] == {"total": 8, "train": 6, "valid": 1, "test": 1}
    assert stats["users"] == 4
    assert stats["candidates_per_request"] == {"min": 1, "mean": 2.0, "max": 4}
    labels = stats["labels"]
    assert labels["click"]["rate"] == pytest.approx(9 / 16)
    assert labels["like"]["rate"] == pytest.approx(2 / 16)
    assert labels["long_view"]["rate"] == pytest.approx(9 / 16)
    assert labels["watch_time"]["mean"] == pytest.approx(586.531 / 16, rel=1e-6)
    assert labels["watch_time"]["nonzero_rate"] == pytest.approx(15 / 16)
    text = format_stats(stats)
    assert "watch_time: mean 36.66 s, non-zero 0.9375" in text
    assert "absent" not in text


def test_tiny_dataset_stats(tiny_dataset):
    stats = dataset_stats(tiny_dataset)
    assert stats["requests"] == {"total": 3, "train": 1, "valid": 1, "test": 1}
    assert stats["users"] == 2 and stats["items"] == 8
    assert stats["list_length"] == {"min": 2, "mean": pytest.approx(7 / 3), "max": 3}
    assert stats["labels"]["click"]["positives"] == 3
    assert stats["labels"]["like"]["rate"] == pytest.approx(2 / 7)
    assert stats["labels"]["long_view"] == "absent"
    assert stats["cold_start_share"] == pytest.approx(3 / 9)


def test_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="is this a genrerank data set"):
        dataset_stats(tmp_path)


@pytest.mark.real_data
def test_real_mind_stats(tmp_path):
    stats = dataset_stats(convert("mind", real_data("mind_small_subset"), tmp_path / "mind"))
    assert stats["requests"]["total"] == 5000 and stats["users"] == 4637
    assert stats["labels"]["click"]["positives"] == 7542
    assert "click: rate 0.0398 (7,542 / 189,359)" in format_stats(stats)
