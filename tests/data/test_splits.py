import numpy as np
import pytest

from genrerank.data.splits import assign_time_split


def test_split_is_chronological_and_sized() -> None:
    rng = np.random.default_rng(0)
    times = rng.integers(0, 1000, size=1000)
    ids = np.array([f"r{i}" for i in range(1000)])
    split = assign_time_split(times, ids, (0.8, 0.1, 0.1))
    assert (split == "train").sum() == 800 and (split == "valid").sum() == 100
    assert times[split == "train"].max() <= times[split == "valid"].min()
    assert times[split == "valid"].max() <= times[split == "test"].min()


def test_split_is_deterministic_under_ties() -> None:
    times = np.zeros(10, dtype=np.int64)
    ids = np.array([f"r{i}" for i in range(10)])
    a = assign_time_split(times, ids, (0.6, 0.2, 0.2))
    b = assign_time_split(times[::-1].copy(), ids[::-1].copy(), (0.6, 0.2, 0.2))[::-1]
    assert list(a) == list(b)


def test_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum"):
        assign_time_split(np.arange(3), np.arange(3), (0.5, 0.5, 0.5))
