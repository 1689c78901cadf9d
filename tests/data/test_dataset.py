from pathlib import Path

import torch
from torch.utils.data import DataLoader

from genrerank.data.dataset import RerankDataset, collate


def test_split_selection(tiny_dataset: Path) -> None:
    assert len(RerankDataset(tiny_dataset)) == 3
    train = RerankDataset(tiny_dataset, split="train")
    assert len(train) == 1 and train.request_ids.tolist() == ["r0"]
    assert RerankDataset(tiny_dataset, split=["valid", "test"]).rows.tolist() == [1, 2]


def test_collate_pads_variable_n_and_m_with_masks(tiny_dataset: Path) -> None:
    ds = RerankDataset(tiny_dataset)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert batch.candidate_mask.tolist() == [
        [True, True, True, False],
        [True, True, False, False],
        [True, True, True, True],
    ]
    assert batch.position_mask.tolist() == [[True, True, False], [True, True, False], [True] * 3]
    assert batch.exposed.tolist() == [[2, 0, 0], [1, 0, 0], [3, 1, 0]]
    assert batch.item_cat.shape == (3, 4, 1) and batch.item_dense.shape == (3, 4, 1)
    assert batch.user_cat.shape == (3, 1) and batch.user_dense.shape == (3, 1)
    assert set(batch.labels) == {"click", "like"}
    assert batch.labels["click"].tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    # Padded slots are zero, never garbage from a neighbouring request.
    assert batch.upstream_score[1, 2:].tolist() == [0.0, 0.0]
    assert batch.request_index.tolist() == [0, 1, 2]


def test_exposed_attribute_gathers_per_position(tiny_dataset: Path) -> None:
    batch = collate([RerankDataset(tiny_dataset)[2]])
    assert batch.exposed_attribute(batch.upstream_score).tolist() == [
        [torch.tensor(0.7).item(), torch.tensor(0.9).item(), 1.0]
    ]
    assert batch.exposed_attribute(batch.item_dense)[0, :, 0].tolist() == [3.0, 1.0, 0.0]


def test_source_without_item_features(tmp_path: Path) -> None:
    from genrerank.data.schema import table_from_rows, write_dataset
    from tests.conftest import tiny_rows, tiny_spec

    spec = tiny_spec()
    spec.item_categorical, spec.item_dense = [], []
    rows = tiny_rows()
    for row in rows:
        row["item_cat"] = [[] for _ in row["item_id"]]
        row["item_dense"] = [[] for _ in row["item_id"]]
    path = write_dataset(tmp_path / "bare", table_from_rows(rows, spec), spec)
    batch = collate([RerankDataset(path)[i] for i in range(3)])
    assert batch.item_cat.shape == (3, 4, 0) and batch.item_dense.shape == (3, 4, 0)
    assert batch.candidate_mask.sum().item() == 9
