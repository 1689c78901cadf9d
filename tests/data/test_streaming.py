"""StreamingRerankDataset: the same requests as RerankDataset, sharded across ranks and workers
with exact per-rank counts, deterministic per (seed, epoch), resumable mid-epoch; and sharded data
set folders (written by the simulator and ShardedDatasetWriter, read by read_dataset)."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

import genrerank.data.streaming as streaming
from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.schema import (
    SHARDS_DIR,
    DataValidationError,
    ShardedDatasetWriter,
    read_dataset,
)
from genrerank.data.simulator import Simulator, get_preset, simulate_to_dir
from genrerank.data.streaming import StreamingRerankDataset, shuffle_buffer_order

N_REQUESTS = 2400


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,400 kuaishou requests in shards of 500 (5 files), row groups of 128 requests."""
    out = tmp_path_factory.mktemp("sharded") / "sim"
    return simulate_to_dir("kuaishou", N_REQUESTS, 7, out, progress=False, shard_requests=500,
                           row_group_requests=128)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "sim"
    return simulate_to_dir("kuaishou", N_REQUESTS, 7, out, progress=False)


def _indices(data: StreamingRerankDataset) -> list[int]:
    return [item["request_index"] for item in data]


def _as_worker(monkeypatch: pytest.MonkeyPatch, worker: int, workers: int) -> None:
    info = SimpleNamespace(id=worker, num_workers=workers)
    monkeypatch.setattr(streaming, "get_worker_info", lambda: info)


# --------------------------------------------------------------------------- sharded folders


def test_sharded_simulation_equals_the_single_file(sharded: Path, single: Path) -> None:
    shards = sorted((sharded / SHARDS_DIR).iterdir())
    assert [p.name for p in shards] == [f"part-{i:05d}.parquet" for i in range(5)]
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in shards] == [4, 4, 4, 4, 4]
    assert not (sharded / "requests.parquet").exists()
    a, spec_a = read_dataset(sharded, validate=True)
    b, spec_b = read_dataset(single, validate=True)
    # Same requests, same split (assigned by time before any chunk is generated), same spec.
    assert a.equals(b)
    assert spec_a.to_dict() == spec_b.to_dict()
    assert (sharded / "feature_spec.json").read_text() == (single / "feature_spec.json").read_text()


def test_chunk_times_replay_the_state_stream() -> None:
    sim = Simulator(get_preset("kuaishou"), 3, preset="kuaishou")
    for chunk in (0, 3):
        assert np.array_equal(sim.chunk_times(chunk), sim.chunk_state(chunk).time)


def test_rerank_dataset_and_commands_read_a_sharded_folder(sharded: Path) -> None:
    data = RerankDataset(sharded, split="valid")
    assert len(data) == round(0.1 * N_REQUESTS)
    batch = collate([data[i] for i in range(4)])
    assert batch.candidate_mask.shape == (4, 60)


def test_writer_is_atomic_and_names_the_bad_rows(sharded: Path, tmp_path: Path) -> None:
    table, spec = read_dataset(sharded)
    out = tmp_path / "out"
    simulate_to_dir("kuaishou", 300, 1, out, progress=False)  # what must survive
    before = sorted(p.name for p in out.iterdir())
    bad = table.slice(1000, 200)
    exposed = bad.column("exposed").to_pylist()
    exposed[5] = [0, 0, 1, 2, 3, 4]  # a repeated candidate in request 1005
    bad = bad.set_column(bad.schema.get_field_index("exposed"), "exposed",
                         pa.array(exposed, type=pa.list_(pa.int32())))
    with (pytest.raises(DataValidationError, match=r"requests 1000 to 1199\): row 5 .*exposed"),
          ShardedDatasetWriter(out, spec, shard_requests=400, overwrite=True) as writer):
        writer.write(table.slice(0, 1000))
        writer.write(bad)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_writer_refuses_request_ids_repeated_across_shards(sharded: Path, tmp_path: Path) -> None:
    table, spec = read_dataset(sharded)
    with (pytest.raises(DataValidationError) as err,
          ShardedDatasetWriter(tmp_path / "dup", spec, shard_requests=500) as writer):
        writer.write(table.slice(0, 1000))
        writer.write(table.slice(600, 10))  # rows 600.. again, in shard 2
    message = str(err.value)
    assert "\n" not in message
    assert "part-00002.parquet: row 0" in message and "duplicate of" in message
    assert "part-00001.parquet row 100" in message
    assert not (tmp_path / "dup").exists()


def test_corrupt_shard_is_named(sharded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    _copy_tree(sharded, copy)
    victim = copy / SHARDS_DIR / "part-00003.parquet"
    raw = bytearray(victim.read_bytes())
    victim.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated: the footer is gone
    for read in (read_dataset, lambda d: StreamingRerankDataset(d, "train")):
        with pytest.raises(DataValidationError) as err:
            read(copy)
        assert str(err.value).startswith(f"{victim}: not a readable Parquet file")
        assert "\n" not in str(err.value).strip()


def test_corrupt_row_group_is_named_when_streamed(sharded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    _copy_tree(sharded, copy)
    victim = copy / SHARDS_DIR / "part-00001.parquet"
    pf = pq.ParquetFile(victim)
    start = pf.metadata.row_group(2).column(0).data_page_offset  # request ids of group 2
    raw = bytearray(victim.read_bytes())
    raw[start : start + 16] = b"\x07" * 16
    victim.write_bytes(bytes(raw))
    data = StreamingRerankDataset(copy, None, shuffle=False)  # metadata intact: opens
    with pytest.raises(DataValidationError, match=rf"^{victim} \(row group 2\)"):
        list(data)


def test_shard_with_another_spec_is_named(sharded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    _copy_tree(sharded, copy)
    victim = copy / SHARDS_DIR / "part-00002.parquet"
    table = pq.read_table(victim)
    meta = dict(table.schema.metadata)
    spec = json.loads(meta[b"genrerank.feature_spec"])
    spec["n_categories"] += 1
    meta[b"genrerank.feature_spec"] = json.dumps(spec).encode()
    pq.write_table(table.replace_schema_metadata(meta), victim)
    for read in (read_dataset, lambda d: StreamingRerankDataset(d, "train")):
        with pytest.raises(DataValidationError,
                           match=rf"^{victim}: field 'n_categories' of its feature spec differs"):
            read(copy)


def test_both_layouts_in_one_folder_are_refused(sharded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    _copy_tree(sharded, copy)
    (copy / "requests.parquet").write_bytes((copy / SHARDS_DIR / "part-00000.parquet")
                                            .read_bytes())
    with pytest.raises(DataValidationError, match="holds both requests.parquet and"):
        read_dataset(copy)


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


# --------------------------------------------------------------------------- streaming


def test_one_epoch_is_the_split_once_with_the_same_items(sharded: Path) -> None:
    reference = RerankDataset(sharded, split="train")
    data = StreamingRerankDataset(sharded, "train", seed=3, shuffle_buffer=300)
    assert data.num_requests == len(reference) == len(data)
    items = list(data)
    got = [it["request_index"] for it in items]
    assert sorted(got) == reference.rows.tolist()
    assert got != sorted(got)  # shuffled
    position = {int(r): i for i, r in enumerate(reference.rows)}
    for item in items[:: 37]:
        expected = reference[position[item["request_index"]]]
        assert item.keys() == expected.keys()
        for key, value in expected.items():
            if key == "labels":
                assert all(np.array_equal(item[key][s], v) for s, v in value.items())
            else:
                assert np.array_equal(item[key], value), key
    batch = collate(items[:16])
    assert batch.request_index.tolist() == got[:16]


def test_unshuffled_stream_keeps_the_data_set_order(sharded: Path) -> None:
    data = StreamingRerankDataset(sharded, ["valid", "test"], shuffle=False)
    reference = RerankDataset(sharded, split=["valid", "test"])
    assert _indices(data) == reference.rows.tolist()


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ranks_and_workers_are_disjoint_cover_everything_and_count_exactly(
    sharded: Path, monkeypatch: pytest.MonkeyPatch, world: int, workers: int
) -> None:
    data = StreamingRerankDataset(sharded, "train", seed=1, shuffle_buffer=200)
    n = data.num_requests
    per_rank = -(-n // world)
    seen: list[list[int]] = []
    for rank in range(world):
        data.set_shard(rank, world)
        assert len(data) == per_rank
        mine: list[int] = []
        for worker in range(workers):
            _as_worker(monkeypatch, worker, workers)
            part = _indices(data)
            assert len(part) in (per_rank // workers, per_rank // workers + 1)
            mine += part
        assert len(mine) == per_rank  # exactly: DDP ranks take the same number of steps
        seen.append(mine)
    everything = [i for mine in seen for i in mine]
    assert set(everything) == set(RerankDataset(sharded, split="train").rows.tolist())
    counts = collections.Counter(everything)
    assert sum(c - 1 for c in counts.values()) == world * per_rank - n  # padding only
    # Ranks share no request; padding repeats a rank's own items.
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(seen[a]) & set(seen[b])


def test_order_is_a_function_of_seed_and_epoch(sharded: Path) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        data = StreamingRerankDataset(sharded, "train", seed=seed, shuffle_buffer=100)
        data.set_epoch(epoch)
        return _indices(data)

    first = order(0, 0)
    assert order(0, 0) == first
    assert order(0, 1) != first and sorted(order(0, 1)) == sorted(first)
    assert order(1, 0) != first


def test_set_start_skips_exactly(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = StreamingRerankDataset(sharded, "train", seed=2, shuffle_buffer=250)
    data.set_shard(1, 2)
    data.set_epoch(4)
    full = _indices(data)
    for start in (0, 1, 129, 1000, len(full)):
        data.set_start(start)
        assert _indices(data) == full[start:]
    data.set_epoch(5)  # a new epoch starts at its beginning
    assert len(_indices(data)) == len(full)
    # With workers each skips its share: start // K (+1 for the first start % K).
    data.set_epoch(4)
    per_worker = []
    for worker in range(2):
        _as_worker(monkeypatch, worker, 2)
        data.set_start(0)
        per_worker.append(_indices(data))
    data.set_start(101)
    for worker, skip in ((0, 51), (1, 50)):
        _as_worker(monkeypatch, worker, 2)
        assert _indices(data) == per_worker[worker][skip:]


def test_dataloader_workers_yield_the_rank_share(sharded: Path) -> None:
    data = StreamingRerankDataset(sharded, "train", seed=0, shuffle_buffer=64)
    data.set_shard(0, 3)
    loader = DataLoader(data, batch_size=32, collate_fn=collate, num_workers=2)
    got = [int(i) for batch in loader for i in batch.request_index]
    assert len(got) == len(data) == -(-data.num_requests // 3)
    assert len(set(got)) == len(got)


def test_shuffle_buffer_order_is_a_bounded_permutation() -> None:
    out = shuffle_buffer_order(1000, 50, np.random.default_rng(0))
    assert sorted(out.tolist()) == list(range(1000))
    assert (out <= np.arange(1000) + 50).all()
    assert shuffle_buffer_order(5, 50, np.random.default_rng(0)).size == 5


def test_statistics_sample_is_the_leading_requests(sharded: Path) -> None:
    reference = RerankDataset(sharded, split="train")
    data = StreamingRerankDataset(sharded, "train")
    sample = data.statistics_sample(300)
    assert len(sample) == 300
    assert sample.rows.tolist() == reference.rows[:300].tolist()
    assert np.array_equal(sample._item_dense.values,
                          reference._item_dense.values[: len(sample._item_dense.values)])
    assert len(data.statistics_sample(10**6)) == len(reference)


def test_cli_simulate_writes_shards_that_every_command_reads(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from genrerank.cli import main

    out = tmp_path / "sim"
    result = CliRunner().invoke(main, ["simulate", "--preset", "avito", "--requests", "300",
                                       "--seed", "1", "--shard-requests", "120", "--out",
                                       str(out)])
    assert result.exit_code == 0, result.output
    assert "in shards of 120" in result.output
    assert len(list((out / SHARDS_DIR).glob("part-*.parquet"))) == 3
    result = CliRunner().invoke(main, ["data", "stats", str(out)])
    assert result.exit_code == 0, result.output
    assert "requests: 300 (train 240, valid 30, test 30)" in result.output
