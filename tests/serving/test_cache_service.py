"""The item cache's byte bound and the item id limit, wired through a real service: options of
load_reranker reach the cache and the request validator, and the bound holds over HTTP."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from genrerank.data.dataset import RerankDataset
from genrerank.serving.app import create_app
from genrerank.serving.cache import DEFAULT_CACHE_BYTES
from genrerank.serving.runtime import DEFAULT_CACHE_SIZE, load_reranker
from genrerank.serving.schema import (
    DEFAULT_MAX_ITEM_ID_LENGTH,
    RequestValidator,
    payload_from_dataset,
)
from tests.serving.conftest import wait_ready
from tests.serving.test_export import shared_run, simulated


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    # TorchBackend sets torch's global thread count; later tests in this process keep theirs.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_defaults_reach_the_cache_and_the_validator(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    service = load_reranker(run_dir=shared_run(tmp_path_factory, "nar4rec"))
    assert service.cache.capacity == DEFAULT_CACHE_SIZE
    assert service.cache.max_bytes == DEFAULT_CACHE_BYTES == 64 * 2**20
    assert service.max_item_id_length == DEFAULT_MAX_ITEM_ID_LENGTH == 256
    assert RequestValidator.for_service(service).max_item_id_length == 256
    stats = service.cache_stats()
    assert stats["bytes"] == 0.0 and stats["capacity_bytes"] == float(DEFAULT_CACHE_BYTES)
    with pytest.raises(ValueError, match="max_item_id_length must be >= 1"):
        load_reranker(run_dir=shared_run(tmp_path_factory, "nar4rec"), max_item_id_length=0)


def test_byte_bound_holds_over_http_with_long_unique_ids(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    bound = 200_000
    service = load_reranker(run_dir=shared_run(tmp_path_factory, "nar4rec"),
                            cache_bytes=bound, max_item_id_length=3000)
    dataset = RerankDataset(simulated(tmp_path_factory), "test")
    base = payload_from_dataset(dataset, 0)
    n = len(base["candidates"]["ids"])
    with TestClient(create_app(service, timeout_s=30.0)) as client:
        assert wait_ready(client, timeout_s=60.0).status_code == 200
        for request in range(20):
            payload = copy.deepcopy(base)
            # Unique ids of 3000 characters: 60 of them are ~190 KB, about the whole bound.
            payload["candidates"]["ids"] = [f"{request}-{j}-".ljust(3000, "x") for j in range(n)]
            response = client.post("/v1/rerank", json=payload)
            assert response.status_code == 200, response.text
            assert service.cache.nbytes <= bound
        stats = service.cache_stats()
        assert stats["capacity_bytes"] == bound
        assert 0 < stats["bytes"] <= bound and 0 < stats["size"] < n  # evicting, not empty
        # The last request's ids are the ones kept (least recently used go first).
        assert all(key.startswith("19-") for key in service.cache.lru_order())
        payload["candidates"]["ids"][5] = "y" * 3001
        response = client.post("/v1/rerank", json=payload)
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {"field": "candidates.ids[5]",
             "message": "item id of 3001 characters; at most 3000 are accepted"}
        ]
