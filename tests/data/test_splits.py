import numpy as np
import pytest

from genrerank.data.splits import (
    assign_split,
    assign_time_split,
    check_splits,
    split_boundary_warnings,
)


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


# --------------------------------------------------------------------------- split options

USERS = np.array(["u1", "u2", "u1", "u3", "u4", "u5", "u2"])


def test_user_split_is_by_hashed_user() -> None:
    # CRC-32: u4 841313273 < u1 1112514422 < u5 1159879535 < u3 2890006106 < u2 3678850764;
    # 5 users x (0.6, 0.2, 0.2) -> 3 train, 1 valid, 1 test, whatever their request counts.
    split = assign_split(
        "user", request_time=np.arange(7), request_id=np.arange(7), user=USERS,
        fractions=(0.6, 0.2, 0.2),
    )
    assert list(split) == ["train", "test", "train", "valid", "train", "train", "test"]
    # Order of requests and their times do not matter; only the user id does.
    again = assign_split(
        "user", request_time=np.zeros(7), request_id=np.arange(7)[::-1], user=USERS[::-1],
        fractions=(0.6, 0.2, 0.2),
    )
    assert list(again[::-1]) == list(split)


def test_user_split_needs_users() -> None:
    with pytest.raises(ValueError, match="user id"):
        assign_split("user", request_time=np.arange(3), request_id=np.arange(3))


def test_time_method_is_the_time_split() -> None:
    times = np.array([5, 1, 3, 2, 4])
    ids = np.array(["a", "b", "c", "d", "e"])
    split = assign_split("time", request_time=times, request_id=ids, fractions=(0.6, 0.2, 0.2))
    assert list(split) == ["test", "train", "train", "train", "valid"]
    assert list(split) == list(assign_time_split(times, ids, (0.6, 0.2, 0.2)))


def test_column_split() -> None:
    same = assign_split(
        "column", request_time=np.arange(3), request_id=np.arange(3),
        column=np.array(["test", "train", "valid"]),
    )
    assert list(same) == ["test", "train", "valid"]
    mapped = assign_split(
        "column", request_time=np.arange(4), request_id=np.arange(4),
        column=np.array([0, 2, 1, 0]), values={"0": "train", "1": "valid", "2": "test"},
    )
    assert list(mapped) == ["train", "test", "valid", "train"]


def test_column_split_rejects_unmapped_values() -> None:
    with pytest.raises(ValueError, match=r"'holdout' \(first at row 2\)"):
        assign_split(
            "column", request_time=np.arange(4), request_id=np.arange(4),
            column=np.array(["train", "valid", "holdout", "holdout"]),
        )
    with pytest.raises(ValueError, match="'3' \\(first at row 1\\)"):
        assign_split(
            "column", request_time=np.arange(3), request_id=np.arange(3),
            column=np.array([0, 3, 1]), values={"0": "train", "1": "test"},
        )
    with pytest.raises(ValueError, match="must be one of"):
        assign_split(
            "column", request_time=np.arange(1), request_id=np.arange(1),
            column=np.array([0]), values={"0": "training"},
        )
    with pytest.raises(ValueError, match="column"):
        assign_split("column", request_time=np.arange(1), request_id=np.arange(1))


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="'time', 'user', 'column'"):
        assign_split("random", request_time=np.arange(1), request_id=np.arange(1))


def test_check_splits() -> None:
    assert check_splits(np.array(["train", "valid", "test"])) == []
    messages = check_splits(np.array(["train", "test", "train"]))
    assert messages == ["no valid requests: early stopping and model selection are impossible"]
    assert len(check_splits(np.array(["valid", "dev"]))) == 3  # no train, no test, bad "dev"


def test_split_boundary_warnings() -> None:
    # Requests: train at 0 and 10, valid at 20, test at 30 -> cuts at 20 (train/valid) and 30.
    split = np.array(["train", "train", "valid", "test"])
    times = np.array([0, 10, 20, 30])
    row_request = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    row_time = np.array([0, 20, 25, 10, 35, 20, 30, 31])
    # r0 ends exactly at the cut (not after it); r1 spans 10..25 across 20; r2 spans 20..35
    # across 30; r3 lies after every cut.
    lines = split_boundary_warnings(split, times, row_request, row_time)
    assert lines == [
        "request 1 (train, time 10) has rows from 10 to 25, across the train/valid cut at 20",
        "request 2 (valid, time 20) has rows from 20 to 35, across the valid/test cut at 30",
        "2 of 4 requests have rows on both sides of a split cut; their later events fall in "
        "the next split's period",
    ]
    short = split_boundary_warnings(
        split, times, row_request, row_time, limit=1, request_id=np.array(["a", "b", "c", "d"])
    )
    assert len(short) == 2 and short[0].startswith("request 'b' (train")
    assert short[1].startswith("2 of 4")
    tidy = np.array([0, 5, 10, 19, 20, 30, 30, 31])
    assert split_boundary_warnings(split, times, row_request, tidy) == []
    # Without a validation split the cut is train/test at 30: only r2 (20..35) spans it.
    no_valid = np.array(["train", "train", "train", "test"])
    lines = split_boundary_warnings(no_valid, times, row_request, row_time)
    assert lines[0] == (
        "request 2 (train, time 20) has rows from 20 to 35, across the train/test cut at 30"
    )
    assert lines[1].startswith("1 of 4")
