"""Request context features (query, device, page type) in the dataset and the padded Batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.schema import CategoricalFeature, FeatureSpec, table_from_rows, write_dataset
from tests.conftest import tiny_rows, tiny_spec

#: Per request of tiny_rows: (device index, query length).
CONTEXT = [(1, 3.0), (2, 0.5), (0, 7.25)]


def context_spec() -> FeatureSpec:
    """tiny_spec plus one context categorical and one context dense feature."""
    spec = tiny_spec()
    spec.context_categorical = [CategoricalFeature("device", 3)]
    spec.context_dense = ["query_length"]
    return spec


def context_rows() -> list[dict]:
    rows = tiny_rows()
    for row, (device, length) in zip(rows, CONTEXT, strict=True):
        row["context_cat"] = [device]
        row["context_dense"] = [length]
    return rows


def write_context_dataset(out: Path) -> Path:
    spec = context_spec()
    return write_dataset(out, table_from_rows(context_rows(), spec), spec)


def test_padded_batches_carry_the_request_context(tmp_path: Path) -> None:
    ds = RerankDataset(write_context_dataset(tmp_path / "ctx"))
    assert ds[1]["context_cat"].tolist() == [2] and ds[1]["context_dense"].tolist() == [0.5]
    batch = collate([ds[i] for i in range(len(ds))])  # n = 3, 2, 4: padded to 4
    assert batch.context_cat.dtype == torch.long and batch.context_cat.shape == (3, 1)
    assert batch.context_dense.dtype == torch.float32 and batch.context_dense.shape == (3, 1)
    assert batch.context_cat[:, 0].tolist() == [c for c, _ in CONTEXT]
    assert batch.context_dense[:, 0].tolist() == [d for _, d in CONTEXT]
    # Per request, not per candidate: padding candidates does not touch them.
    assert batch.candidate_mask.shape == (3, 4)
    moved = batch.to("cpu")
    assert torch.equal(moved.context_cat, batch.context_cat)
    assert torch.equal(moved.context_dense, batch.context_dense)


def test_one_split_keeps_its_own_requests_context(tmp_path: Path) -> None:
    test = RerankDataset(write_context_dataset(tmp_path / "ctx"), "test")
    batch = collate([test[0]])
    assert batch.context_cat.tolist() == [[0]] and batch.context_dense.tolist() == [[7.25]]


def test_a_data_set_without_context_gives_zero_width_tensors(tiny_dataset: Path) -> None:
    ds = RerankDataset(tiny_dataset)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.context_cat.shape == (3, 0) and batch.context_cat.dtype == torch.long
    assert batch.context_dense.shape == (3, 0) and batch.context_dense.dtype == torch.float32


def test_an_in_memory_table_without_context_columns(tmp_path: Path) -> None:
    spec = tiny_spec()
    table = table_from_rows(tiny_rows(), spec).drop_columns(["context_cat", "context_dense"])
    batch = collate([RerankDataset((table, spec))[0]])
    assert batch.context_cat.shape == (1, 0) and batch.context_dense.shape == (1, 0)
    # A spec that declares context features cannot do without the columns.
    declared = context_spec()
    table = table_from_rows(context_rows(), declared).drop_columns(["context_dense"])
    with pytest.raises(ValueError, match="'context_dense'.*declares 1"):
        RerankDataset((table, declared))
