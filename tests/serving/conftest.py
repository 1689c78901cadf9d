"""A fake RerankService and helpers for the HTTP-layer tests (no model, no torch calls)."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from genrerank.data.schema import CategoricalFeature, FeatureSpec
from genrerank.serving.app import create_app
from genrerank.serving.types import RerankInput, RerankResult


def fake_spec() -> FeatureSpec:
    return FeatureSpec(
        source="test",
        user_categorical=[CategoricalFeature("ucat", 5)],
        user_dense=["ud"],
        item_categorical=[CategoricalFeature("icat", 10)],
        item_dense=["d1", "d2"],
        labels=["click"],
        n_categories=5,
        n_creators=7,
        max_candidates=500,
        max_list_length=10,
    )


class FakeService:
    """Serves the first m candidates with their upstream scores.

    Behaviour is chosen per request by ``request_id`` so one service covers every test:
    ``"boom"`` raises, ``"slow"`` sleeps ``slow_s``; ``fail_all`` makes every call (the warm-up
    included) raise; ``gate``, when given, holds every call until it is set.
    """

    def __init__(
        self,
        *,
        fail_all: bool = False,
        slow_s: float = 0.3,
        gate: threading.Event | None = None,
        max_candidates: int = 500,
    ) -> None:
        self.spec = fake_spec()
        self.model_version = "fake-1"
        self.strategies = ("pipeline", "greedy")
        self.max_candidates = max_candidates
        self.max_list_length = 10
        self.fail_all = fail_all
        self.slow_s = slow_s
        self.gate = gate
        self.calls: list[RerankInput] = []

    def rerank(self, request: RerankInput) -> RerankResult:
        self.calls.append(request)
        if self.gate is not None:
            self.gate.wait(5.0)
        if self.fail_all or request.request_id == "boom":
            raise RuntimeError("model exploded")
        if request.request_id == "slow":
            time.sleep(self.slow_s)
        m = request.m
        return RerankResult(
            item_ids=request.item_ids[:m],
            scores=[float(s) for s in request.upstream_score[:m]],
            strategy=request.strategy,
            model_version=self.model_version,
            list_score=0.5 if request.strategy == "pipeline" else None,
            timings_ms={"model": 0.25},
        )

    def cache_stats(self) -> dict[str, float]:
        return {"hits": 3, "misses": 1, "size": 4, "capacity": 100, "hit_rate": 0.75,
                "bytes": 2048, "capacity_bytes": 65536}


VALID_PAYLOAD: dict[str, Any] = {
    "request_id": "req-1",
    "user": {"cat": {"ucat": 2}, "dense": {"ud": 0.5}},
    "candidates": {
        "ids": ["a", "b", "c", "d", "e"],
        "upstream_score": [0.9, 0.8, 0.7, 0.6, 0.5],
        "cat": {"icat": [1, 2, 3, 0, 9]},
        "dense": {"d1": [0.1, 0.2, 0.3, 0.4, 0.5], "d2": [1, 2, 3, 4, 5]},
        "category": [1, 1, 2, 3, 4],
        "creator": [0, 6, 2, 2, 1],
    },
    "m": 3,
}


def valid_payload() -> dict[str, Any]:
    return copy.deepcopy(VALID_PAYLOAD)


def wait_ready(client: TestClient, timeout_s: float = 5.0) -> Any:
    """Poll /readyz until the background warm-up has finished (either way)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/readyz")
        if response.json().get("status") != "warming up" or time.monotonic() > deadline:
            return response
        time.sleep(0.005)


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def client(service: FakeService) -> Iterator[TestClient]:
    with TestClient(create_app(service, timeout_s=1.0)) as c:
        assert wait_ready(c).status_code == 200
        yield c
