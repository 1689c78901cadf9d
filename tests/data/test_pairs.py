"""Preference pairs: the pair rule by hand, the file (round trip, refusals, atomic replace),
re-weighting, the pair data set and its batches, and ``take_rows``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genrerank.data.dataset import RerankDataset, collate, take_rows
from genrerank.data.pairs import (
    PairDataset,
    PairRule,
    PreferenceBatch,
    pairs_table,
    read_pairs,
    reselect_pairs,
    select_pairs,
    write_pairs,
)

L = np.array


def test_select_pairs_margin_and_slot_difference() -> None:
    lists = [L([0, 1, 2]), L([0, 1, 3]), L([1, 0, 2]), L([3, 2, 1]), L([2, 3, 0])]
    rewards = [1.0, 0.5, 0.5, 0.95, 0.2]
    # winner 0; list 1 differs in one slot, list 3 is within delta; 2 (a swap) and 4 qualify
    assert select_pairs(rewards, lists, PairRule(delta=0.1, max_pairs=4, min_diff=2)) == [
        (0, 2), (0, 4)]
    # min_diff 1: the one-slot list joins; a larger delta drops list 2 and 1
    assert select_pairs(rewards, lists, PairRule(delta=0.1, max_pairs=4, min_diff=1)) == [
        (0, 1), (0, 2), (0, 4)]
    assert select_pairs(rewards, lists, PairRule(delta=0.6, max_pairs=4, min_diff=1)) == [(0, 4)]
    # a gap of exactly delta is not more than delta
    assert select_pairs([1.0, 0.5], [L([0, 1]), L([1, 0])], PairRule(delta=0.5)) == []
    # a swap differs in 2 slots: excluded at min_diff 3
    assert select_pairs([1.0, 0.0], [L([0, 1, 2]), L([1, 0, 2])],
                        PairRule(delta=0.1, min_diff=3)) == []


def test_select_pairs_keeps_the_closest_in_reward_and_handles_few_lists() -> None:
    lists = [L([0, 1]), L([1, 0]), L([2, 3]), L([3, 2]), L([2, 1])]
    rewards = [0.1, 0.9, 0.5, 0.7, 0.5]
    # winner 1; candidates ordered by reward, ties by proposal order: 3 (0.7), 2, 4 (0.5), 0
    assert select_pairs(rewards, lists, PairRule(delta=0.1, max_pairs=2)) == [(1, 3), (1, 2)]
    assert select_pairs(rewards, lists, PairRule(delta=0.1, max_pairs=3)) == [
        (1, 3), (1, 2), (1, 4)]
    assert select_pairs([1.0], [L([0, 1])], PairRule()) == []
    assert select_pairs([], [], PairRule()) == []
    # NaN rewards never win nor lose
    assert select_pairs([float("nan"), 0.0, 1.0], [L([0, 1]), L([1, 0]), L([2, 3])],
                        PairRule()) == [(2, 1)]


def test_pair_rule_refuses_bad_settings() -> None:
    for kwargs in ({"delta": -0.1}, {"delta": float("nan")}, {"max_pairs": 0}, {"min_diff": 0}):
        with pytest.raises(ValueError, match="pairs:"):
            PairRule(**kwargs)


def _rows() -> list[dict]:
    return [
        {"request_id": "r0", "split": "train", "lists": [[2, 0], [0, 1], [1, 2]],
         "generators": ["a", "b", "upstream"], "reward": [1.0, 0.0, 0.4],
         "terms": {"engagement": [1.0, 0.0, 0.2], "diversity": [0.0, 0.0, 1.0]},
         "pairs": [(0, 1), (0, 2)]},
        {"request_id": "r1", "split": "valid", "lists": [[1, 0], [0, 1]],
         "generators": ["a", "upstream"], "reward": [0.3, 0.1],
         "terms": {"engagement": [0.3, 0.1], "diversity": [0.0, 0.0]}, "pairs": [(0, 1)]},
    ]


META = {"reward_source": "evaluator", "reward": {"weights": {"engagement": 1.0}},
        "generator_run": "ar", "rule": {"delta": 0.1}}


def _table() -> pa.Table:
    return pairs_table(_rows(), ["engagement", "diversity"])


def test_write_read_round_trip_with_metadata(tmp_path: Path) -> None:
    path = write_pairs(_table(), META, tmp_path / "pairs.parquet")
    table, meta = read_pairs(path)
    assert meta == {"format": 1, **META}
    assert table.column("request_id").to_pylist() == ["r0", "r1"]
    assert table.column("lists").to_pylist() == [[[2, 0], [0, 1], [1, 2]], [[1, 0], [0, 1]]]
    assert table.column("pairs").to_pylist() == [[[0, 1], [0, 2]], [[0, 1]]]
    assert table.column("reward_diversity").to_pylist() == [[0.0, 0.0, 1.0], [0.0, 0.0]]
    assert table.column("generators").to_pylist()[1] == ["a", "upstream"]


def test_read_refuses_oracle_rewards_missing_metadata_and_columns(tmp_path: Path) -> None:
    oracle = write_pairs(_table(), {**META, "reward_source": "oracle"}, tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="oracle"):
        read_pairs(oracle)
    bare = tmp_path / "bare.parquet"
    pq.write_table(_table(), bare)
    with pytest.raises(ValueError, match="metadata"):
        read_pairs(bare)
    no_pairs = write_pairs(_table().drop_columns(["pairs"]), META, tmp_path / "np.parquet")
    with pytest.raises(ValueError, match="missing column.*pairs"):
        read_pairs(no_pairs)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ValueError, match="Parquet"):
        read_pairs(junk)
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "absent.parquet")


def test_write_refuses_to_replace_an_existing_file_without_overwrite(tmp_path: Path) -> None:
    path = write_pairs(_table(), META, tmp_path / "pairs.parquet")
    content = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_pairs(_table().slice(0, 1), META, path)
    assert path.read_bytes() == content
    write_pairs(_table().slice(0, 1), META, path, overwrite=True)
    assert read_pairs(path)[0].num_rows == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]  # no temp left


def test_reselect_pairs_reweights_the_stored_terms() -> None:
    out = reselect_pairs(_table(), {"engagement": 1.0, "diversity": 2.0},
                         PairRule(delta=0.1, min_diff=2))
    rewards = out.column("reward").to_pylist()
    assert rewards[0] == pytest.approx([1.0, 0.0, 2.2])
    assert rewards[1] == pytest.approx([0.3, 0.1])
    # list 2 now wins; lists 0 ([2, 0] vs [1, 2]: 2 slots) and 1 lose, closest first
    assert out.column("pairs").to_pylist() == [[[2, 0], [2, 1]], [[0, 1]]]
    assert out.column("lists").equals(_table().column("lists"))
    only = reselect_pairs(_table(), {"diversity": 1.0}, PairRule(delta=0.1))
    assert only.column("reward").to_pylist() == [[0.0, 0.0, 1.0], [0.0, 0.0]]
    assert only.column("pairs").to_pylist() == [[[2, 0], [2, 1]], []]
    with pytest.raises(ValueError, match="fairness"):
        reselect_pairs(_table(), {"fairness": 1.0}, PairRule())


def test_pair_dataset_refuses_unknown_requests_and_lists_out_of_range(
    tiny_dataset: Path,
) -> None:
    train = RerankDataset(tiny_dataset, split="train")
    rows = _rows()
    rows[0]["request_id"] = "nope"
    with pytest.raises(ValueError, match="'nope'"):
        PairDataset(train, pairs_table(rows, ["engagement"]), "train")
    rows = _rows()
    rows[0]["lists"][1] = [0, 3]  # r0 has 3 candidates
    with pytest.raises(ValueError, match="'r0'.*3 candidates"):
        PairDataset(train, pairs_table(rows, ["engagement"]), "train")
    rows = _rows()
    rows[0]["lists"][1] = [0, -1]
    with pytest.raises(ValueError, match="'r0'"):
        PairDataset(train, pairs_table(rows, ["engagement"]), "train")
    # the valid split's requests are looked up in the valid split only
    with pytest.raises(ValueError, match="'r1'"):
        PairDataset(train, _table(), "valid")


def test_pair_dataset_batches_winners_then_losers(tiny_dataset: Path) -> None:
    train = RerankDataset(tiny_dataset, split="train")
    rows = _rows()
    rows[0]["lists"] = [[2, 0, 1], [0, 1], [1]]  # lists shorter than the logged length
    ds = PairDataset(train, pairs_table(rows, ["engagement"]), "train")
    assert len(ds) == 2
    with pytest.raises(ValueError, match="shape"):
        ds.set_reference_log_probs(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="finite"):
        ds.set_reference_log_probs(np.array([[0.0, np.nan], [0.0, 0.0]]))
    ds.set_reference_log_probs(np.array([[-1.0, -2.0], [-3.0, -4.0]]))
    batch = ds.collate_fn([ds[0], ds[1]])
    assert isinstance(batch, PreferenceBatch) and batch.pairs == 2
    assert batch.exposed.tolist() == [[2, 0, 1], [2, 0, 1], [0, 1, 0], [1, 0, 0]]
    assert batch.position_mask.tolist() == [[True] * 3, [True] * 3,
                                            [True, True, False], [True, False, False]]
    assert batch.ref_log_prob.tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert batch.reward.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.4])
    assert batch.labels == {}
    assert batch.candidate_mask.sum(1).tolist() == [3, 3, 3, 3]
    assert len(set(batch.request_index.tolist())) == 1  # both pairs are request r0's
    moved = batch.to("cpu")
    assert isinstance(moved, PreferenceBatch) and moved.pairs == 2


def test_take_rows_repeats_rows_and_swaps_fields(tiny_dataset: Path) -> None:
    data = RerankDataset(tiny_dataset)
    batch = collate([data[i] for i in range(len(data))])
    rows = torch.tensor([2, 0, 0, 2, 1])
    exposed = torch.zeros(5, batch.exposed.shape[1], dtype=torch.long)
    out = take_rows(batch, rows, exposed=exposed)
    assert out.batch_size == 5
    assert torch.equal(out.exposed, exposed)
    assert torch.equal(out.candidate_mask, batch.candidate_mask[rows])
    assert torch.equal(out.item_dense, batch.item_dense[rows])
    assert torch.equal(out.position_mask, batch.position_mask[rows])
    assert torch.equal(out.request_index, batch.request_index[rows])
    for name, values in batch.labels.items():
        assert torch.equal(out.labels[name], values[rows])
    assert torch.equal(out.upstream_score[1], out.upstream_score[2])
    assert not torch.equal(out.upstream_score[0], out.upstream_score[1])
