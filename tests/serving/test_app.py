"""The HTTP app, in process: validation answers, service failures, probes, metrics, docs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from genrerank.serving.app import create_app
from tests.serving.conftest import FakeService, valid_payload, wait_ready

Payload = dict[str, Any]


def _set(path: str, value: Any) -> Callable[[Payload], None]:
    """A mutation setting ``a.b[2]``-style ``path`` (dots and [i]) in the payload."""

    def mutate(p: Payload) -> None:
        keys: list[str | int] = []
        for part in path.split("."):
            name, _, rest = part.partition("[")
            keys.append(name)
            if rest:
                keys.append(int(rest.rstrip("]")))
        target: Any = p
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


def _delete(path: str) -> Callable[[Payload], None]:
    def mutate(p: Payload) -> None:
        *parents, last = path.split(".")
        target: Any = p
        for key in parents:
            target = target[key]
        del target[last]

    return mutate


def _candidates(n: int) -> Callable[[Payload], None]:
    def mutate(p: Payload) -> None:
        p["candidates"] = {
            "ids": [f"i{k}" for k in range(n)],
            "upstream_score": [0.5] * n,
            "cat": {"icat": [1] * n},
            "dense": {"d1": [0.0] * n, "d2": [0.0] * n},
        }

    return mutate


def _raw(replace: str, by: str) -> Callable[[Payload], str]:
    """A body edited as text: NaN / Infinity literals that json.dumps(allow_nan) writes."""

    def make(p: Payload) -> str:
        text = json.dumps(p)
        assert replace in text
        return text.replace(replace, by, 1)

    return make


# (case id, mutation of the valid payload or raw body, expected field, message fragment)
INVALID_CASES: list[tuple[str, Any, str, str]] = [
    ("unknown-user-cat", _set("user.cat.zzz", 1), "user.cat.zzz", "unknown"),
    ("unknown-user-dense", _set("user.dense.zzz", 1.0), "user.dense.zzz", "unknown"),
    ("unknown-item-cat", _set("candidates.cat.zzz", [0] * 5), "candidates.cat.zzz", "unknown"),
    (
        "unknown-item-dense",
        _set("candidates.dense.zzz", [0.0] * 5),
        "candidates.dense.zzz",
        "unknown",
    ),
    (
        "cat-feature-sent-as-dense",
        _set("candidates.dense.icat", [0.0] * 5),
        "candidates.dense.icat",
        "declared under candidates.cat",
    ),
    ("missing-user-cat", _delete("user.cat.ucat"), "user.cat.ucat", "missing"),
    ("missing-user-dense", _delete("user.dense.ud"), "user.dense.ud", "missing"),
    ("missing-item-cat", _delete("candidates.cat.icat"), "candidates.cat.icat", "missing"),
    ("missing-item-dense", _delete("candidates.dense.d2"), "candidates.dense.d2", "missing"),
    ("user-omitted", _delete("user"), "user.cat.ucat", "missing"),
    ("missing-candidates", _delete("candidates"), "candidates", "required"),
    ("missing-m", _delete("m"), "m", "required"),
    ("missing-ids", _delete("candidates.ids"), "candidates.ids", "required"),
    ("string-for-number", _set("candidates.dense.d1[2]", "x"), "candidates.dense.d1[2]", "string"),
    (
        "numeric-string",
        _set("candidates.upstream_score[1]", "0.3"),
        "candidates.upstream_score[1]",
        "string",
    ),
    ("float-for-int-cat", _set("candidates.cat.icat[1]", 2.0), "candidates.cat.icat[1]", "integer"),
    ("float-for-user-cat", _set("user.cat.ucat", 1.5), "user.cat.ucat", "integer"),
    (
        "bool-for-number",
        _set("candidates.upstream_score[0]", True),
        "candidates.upstream_score[0]",
        "boolean",
    ),
    ("bool-for-int", _set("user.cat.ucat", False), "user.cat.ucat", "boolean"),
    ("bool-for-m", _set("m", True), "m", "boolean"),
    ("null-for-number", _set("candidates.dense.d2[0]", None), "candidates.dense.d2[0]", "null"),
    ("list-for-scalar", _set("user.dense.ud", [1.0]), "user.dense.ud", "list"),
    ("scalar-for-list", _set("candidates.dense.d1", 1.0), "candidates.dense.d1", "list"),
    ("object-for-list", _set("candidates.ids", {"a": 1}), "candidates.ids", "list"),
    ("string-for-m", _set("m", "3"), "m", "integer"),
    ("float-for-m", _set("m", 3.0), "m", "integer"),
    ("int-ids", _set("candidates.ids[0]", 7), "candidates.ids[0]", "string"),
    ("empty-id", _set("candidates.ids[2]", ""), "candidates.ids[2]", "non-empty"),
    ("request-id-not-string", _set("request_id", 5), "request_id", "string"),
    ("nan-item-dense", _raw("0.4,", "NaN,"), "candidates.dense.d1[3]", "NaN is not allowed"),
    (
        "inf-upstream",
        _raw("0.8,", "Infinity,"),
        "candidates.upstream_score[1]",
        "Infinity is not allowed",
    ),
    (
        "neg-inf-user-dense",
        _raw('"ud": 0.5', '"ud": -Infinity'),
        "user.dense.ud",
        "-Infinity is not allowed",
    ),
    ("overflowing-literal", _raw("0.4,", "1e400,"), "candidates.dense.d1[3]", "finite"),
    ("float32-overflow", _set("candidates.dense.d2[4]", 1e39), "candidates.dense.d2[4]", "float32"),
    ("float32-overflow-user", _set("user.dense.ud", -1e39), "user.dense.ud", "float32"),
    (
        "short-upstream",
        _set("candidates.upstream_score", [0.1] * 4),
        "candidates.upstream_score",
        "4 values for 5",
    ),
    (
        "long-item-cat",
        _set("candidates.cat.icat", [0] * 6),
        "candidates.cat.icat",
        "6 values for 5",
    ),
    (
        "short-item-dense",
        _set("candidates.dense.d1", [0.0] * 2),
        "candidates.dense.d1",
        "2 values for 5",
    ),
    ("short-category", _set("candidates.category", [0]), "candidates.category", "1 values for 5"),
    ("short-creator", _set("candidates.creator", [0] * 7), "candidates.creator", "7 values for 5"),
    (
        "duplicate-ids",
        _set("candidates.ids[3]", "b"),
        "candidates.ids[3]",
        "duplicate id 'b' at positions 1 and 3",
    ),
    ("no-candidates", _candidates(0), "candidates.ids", "no candidates"),
    ("too-many-candidates", _candidates(501), "candidates.ids", "at most 500"),
    ("m-zero", _set("m", 0), "m", ">= 1"),
    ("m-negative", _set("m", -2), "m", ">= 1"),
    ("m-above-n", _set("m", 6), "m", "larger than the 5 candidates"),
    (
        "m-above-max-list-length",
        lambda p: (_candidates(20)(p), _set("m", 11)(p)),
        "m",
        "at most 10",
    ),
    ("unknown-strategy", _set("strategy", "magic"), "strategy", "['pipeline', 'greedy']"),
    ("strategy-not-string", _set("strategy", 1), "strategy", "string"),
    ("k-zero", _set("k", 0), "k", ">= 1"),
    ("k-float", _set("k", 2.5), "k", "integer"),
    (
        "item-cat-out-of-vocab",
        _set("candidates.cat.icat[2]", 10),
        "candidates.cat.icat[2]",
        "outside the vocabulary [0, 10)",
    ),
    ("item-cat-negative", _set("candidates.cat.icat[0]", -1), "candidates.cat.icat[0]", "negative"),
    ("item-cat-huge", _set("candidates.cat.icat[0]", 2**70), "candidates.cat.icat[0]", "too large"),
    (
        "user-cat-out-of-vocab",
        _set("user.cat.ucat", 5),
        "user.cat.ucat",
        "outside the vocabulary [0, 5)",
    ),
    (
        "category-out-of-range",
        _set("candidates.category[4]", 5),
        "candidates.category[4]",
        "outside the vocabulary [0, 5)",
    ),
    (
        "creator-out-of-range",
        _set("candidates.creator[1]", 7),
        "candidates.creator[1]",
        "outside the vocabulary [0, 7)",
    ),
    ("unknown-top-level-key", _set("stratgy", "greedy"), "stratgy", "unknown field"),
    (
        "unknown-candidates-key",
        _set("candidates.score", [0.0] * 5),
        "candidates.score",
        "unknown field",
    ),
    ("malformed-json", lambda p: json.dumps(p)[:-5], "body", "Invalid JSON"),
    ("empty-body", lambda p: "", "body", "Invalid JSON"),
    ("top-level-list", lambda p: "[1, 2]", "body", "object"),
    ("top-level-string", lambda p: '"hello"', "body", "object"),
    ("user-not-object", _set("user", [1]), "user", "object"),
]


def _body(make: Any) -> str:
    payload = valid_payload()
    out = make(payload)
    return out if isinstance(out, str) else json.dumps(payload)


@pytest.fixture(scope="module")
def shared_client() -> Any:
    # One app for the many read-only validation cases: keeps the file fast.
    with TestClient(create_app(FakeService(), timeout_s=1.0)) as c:
        assert wait_ready(c).status_code == 200
        yield c


@pytest.mark.parametrize(
    ("make", "field", "fragment"),
    [case[1:] for case in INVALID_CASES],
    ids=[case[0] for case in INVALID_CASES],
)
def test_invalid_request_is_422_naming_the_field(
    shared_client: TestClient, make: Any, field: str, fragment: str
) -> None:
    response = shared_client.post(
        "/v1/rerank", content=_body(make), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid request"
    assert isinstance(body["detail"], list) and body["detail"]
    matching = [d for d in body["detail"] if d["field"] == field]
    assert matching, body["detail"]
    assert any(fragment in d["message"] for d in matching), body["detail"]


def test_body_too_large_is_413() -> None:
    with TestClient(create_app(FakeService(), max_body_bytes=200)) as c:
        response = c.post("/v1/rerank", content=json.dumps(valid_payload()))
        assert response.status_code == 413
        body = response.json()
        assert body["error"] == "request too large"
        assert body["detail"][0]["field"] == "body" and "200 bytes" in body["detail"][0]["message"]

        # Chunked (no content-length): the limit is enforced while streaming.
        def chunks() -> Any:
            for _ in range(10):
                yield b" " * 100

        response = c.post("/v1/rerank", content=chunks())
        assert response.status_code == 413


def test_valid_request(client: TestClient, service: FakeService) -> None:
    response = client.post("/v1/rerank", json=valid_payload())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "req-1"
    assert body["items"] == ["a", "b", "c"]
    assert body["scores"] == pytest.approx([0.9, 0.8, 0.7])
    assert body["list_score"] == 0.5
    assert body["strategy"] == "pipeline"  # default: the first strategy
    assert body["model_version"] == "fake-1"
    timings = body["timings_ms"]
    assert {"parse", "queue", "model", "total"} <= set(timings)
    assert timings["total"] >= timings["parse"] >= 0
    last = service.calls[-1]
    assert last.strategy == "pipeline" and last.k is None and last.m == 3


def test_strategy_and_k_pass_through(client: TestClient, service: FakeService) -> None:
    payload = valid_payload()
    payload.update(strategy="greedy", k=3, m=2)
    del payload["request_id"]
    body = client.post("/v1/rerank", json=payload).json()
    assert body["strategy"] == "greedy" and body["list_score"] is None
    assert body["request_id"] is None and body["items"] == ["a", "b"]
    assert service.calls[-1].k == 3 and service.calls[-1].strategy == "greedy"


def test_service_exception_is_500_and_the_app_keeps_working(
    client: TestClient, service: FakeService
) -> None:
    payload = valid_payload()
    payload["request_id"] = "boom"
    response = client.post("/v1/rerank", json=payload)
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal error",
        "detail": "RuntimeError: model exploded",
    }
    assert client.post("/v1/rerank", json=valid_payload()).status_code == 200


def test_slow_service_is_504() -> None:
    service = FakeService(slow_s=0.3)
    with TestClient(create_app(service, timeout_s=0.05)) as c:
        assert wait_ready(c).status_code == 200
        payload = valid_payload()
        payload["request_id"] = "slow"
        start = time.perf_counter()
        response = c.post("/v1/rerank", json=payload)
        assert time.perf_counter() - start < 0.25  # answered at the timeout, not at 0.3 s
        assert response.status_code == 504
        body = response.json()
        assert body["error"] == "timeout" and "0.05 s" in body["detail"]
        time.sleep(0.35)  # the abandoned call still holds the single worker until it ends
        assert c.post("/v1/rerank", json=valid_payload()).status_code == 200
        metrics = c.get("/metrics").text
        assert 'genrerank_errors_total{kind="timeout"} 1.0' in metrics


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model_version": "fake-1"}


def test_readyz_is_503_until_warm_up_completes() -> None:
    gate = threading.Event()
    service = FakeService(gate=gate)
    with TestClient(create_app(service)) as c:
        response = c.get("/readyz")
        assert response.status_code == 503 and response.json()["status"] == "warming up"
        assert c.get("/healthz").status_code == 200  # alive while warming up
        gate.set()
        assert wait_ready(c).status_code == 200
    warmup = service.calls[0]
    assert warmup.n == 8 and warmup.m == 1 and warmup.strategy == "pipeline"


def test_readyz_is_503_when_warm_up_fails() -> None:
    with TestClient(create_app(FakeService(fail_all=True))) as c:
        response = wait_ready(c)
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not ready"
        assert "RuntimeError: model exploded" in body["error"]
        assert c.get("/healthz").status_code == 200


def test_metrics(client: TestClient) -> None:
    client.post("/v1/rerank", json=valid_payload())
    client.post("/v1/rerank", json=valid_payload())
    client.post("/v1/rerank", content="{not json")
    payload = valid_payload()
    payload["request_id"] = "boom"
    client.post("/v1/rerank", json=payload)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'genrerank_requests_total{endpoint="/v1/rerank",status="200"} 2.0' in text
    assert 'genrerank_requests_total{endpoint="/v1/rerank",status="422"} 1.0' in text
    assert 'genrerank_requests_total{endpoint="/v1/rerank",status="500"} 1.0' in text
    assert 'genrerank_requests_total{endpoint="/readyz",status="200"}' in text
    assert 'genrerank_errors_total{kind="validation"} 1.0' in text
    assert 'genrerank_errors_total{kind="internal"} 1.0' in text
    assert 'genrerank_errors_total{kind="timeout"} 0.0' in text
    assert "genrerank_request_latency_seconds_count 4.0" in text
    assert 'genrerank_request_latency_seconds_bucket{le="0.0005"}' in text
    assert 'genrerank_request_latency_seconds_bucket{le="2.5"}' in text
    assert "genrerank_item_cache_hit_rate 0.75" in text
    assert "genrerank_item_cache_hits_total 3.0" in text
    assert "genrerank_item_cache_misses_total 1.0" in text
    assert "genrerank_item_cache_size 4.0" in text
    assert "genrerank_item_cache_bytes 2048.0" in text
    assert "genrerank_item_cache_capacity_bytes 65536.0" in text
    assert 'genrerank_model_info{model_version="fake-1"} 1.0' in text
    assert "genrerank_ready 1.0" in text


def test_two_apps_have_separate_metrics() -> None:
    a, b = create_app(FakeService()), create_app(FakeService())
    with TestClient(a) as ca, TestClient(b) as cb:
        wait_ready(ca)
        wait_ready(cb)
        ca.post("/v1/rerank", json=valid_payload())
        assert 'status="200"} 1.0' in ca.get("/metrics").text
        assert 'endpoint="/v1/rerank",status="200"' not in cb.get("/metrics").text


def test_broken_cache_stats_does_not_break_metrics(service: FakeService) -> None:
    def broken() -> dict[str, float]:
        raise RuntimeError("no cache")

    service.cache_stats = broken  # type: ignore[method-assign]
    with TestClient(create_app(service)) as c:
        response = c.get("/metrics")
        assert response.status_code == 200 and "genrerank_model_info" in response.text
        assert "genrerank_item_cache_hit_rate" not in response.text


def test_non_finite_service_score_is_500(client: TestClient, service: FakeService) -> None:
    original = service.rerank

    def nan_scores(request: Any) -> Any:
        result = original(request)
        result.scores[0] = float("nan")
        return result

    service.rerank = nan_scores  # type: ignore[method-assign]
    response = client.post("/v1/rerank", json=valid_payload())
    assert response.status_code == 500 and "non-finite" in response.json()["detail"]


def test_fastapi_validation_errors_use_the_same_shape(service: FakeService) -> None:
    app = create_app(service)

    @app.get("/typed")
    async def typed(x: int) -> dict[str, int]:
        return {"x": x}

    with TestClient(app) as c:
        response = c.get("/typed", params={"x": "abc"})
        assert response.status_code == 422
        body = response.json()
        assert body["error"] == "invalid request"
        assert body["detail"][0]["field"] == "query.x"
        assert c.get("/nope").json() == {"error": "not found", "detail": "Not Found"}
        assert c.get("/v1/rerank").status_code == 405


def test_app_restarts_cleanly(service: FakeService) -> None:
    app = create_app(service)
    for _ in range(2):  # the model worker is recreated on the second start
        with TestClient(app) as c:
            assert wait_ready(c).status_code == 200
            assert c.post("/v1/rerank", json=valid_payload()).status_code == 200


def test_docs_and_openapi(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "genrerank"
    operation = spec["paths"]["/v1/rerank"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[-1]
    request_schema = spec["components"]["schemas"][name]
    assert "candidates" in request_schema["properties"]
    candidates_ref = request_schema["properties"]["candidates"]["$ref"].rsplit("/", 1)[-1]
    assert candidates_ref in spec["components"]["schemas"]  # sub-models resolve too
    assert "RerankResponse" in json.dumps(operation["responses"]["200"])
    assert "422" in operation["responses"]
    assert "/healthz" in spec["paths"] and "/readyz" in spec["paths"]


# ---------------------------------------------------------------------------- overload


def _metric_value(client: TestClient, sample: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in /metrics")


def _wait_metric(client: TestClient, sample: str, value: float, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _metric_value(client, sample) != value:
        assert time.monotonic() < deadline, f"{sample} never reached {value}"
        time.sleep(0.01)


class _HeldService(FakeService):
    """Every call (the warm-up included) waits for ``hold``: up to 60 s, not FakeService's 5 s,
    so a slow machine cannot release it before the test does."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()

    def rerank(self, request: Any) -> Any:
        self.hold.wait(60.0)
        return super().rerank(request)


def test_a_full_queue_is_503_with_retry_after_at_once() -> None:
    """The worker is held (the warm-up is held), 2 requests wait in the queue
    (max_queue=2): the next one is refused at once with 503 and Retry-After, the 2 queued
    ones are served once the worker is free."""
    service = _HeldService()
    with TestClient(create_app(service, timeout_s=60.0, max_queue=2, retry_after_s=3)) as c:
        _wait_metric(c, "genrerank_model_busy", 1.0)  # the warm-up holds the worker
        answers: list[Any] = []

        def post(request_id: str) -> None:
            payload = valid_payload()
            payload["request_id"] = request_id
            answers.append(c.post("/v1/rerank", json=payload))

        queued = [threading.Thread(target=post, args=(f"q{i}",)) for i in range(2)]
        for thread in queued:
            thread.start()
        _wait_metric(c, "genrerank_queue_waiting", 2.0)
        assert _metric_value(c, "genrerank_queue_limit") == 2.0

        start = time.perf_counter()
        refused = c.post("/v1/rerank", json=valid_payload())
        elapsed = time.perf_counter() - start
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "3"
        assert refused.json()["error"] == "overloaded"
        assert elapsed < 2.0  # answered at once, not after the queue (generous bound)

        service.hold.set()
        for thread in queued:
            thread.join(10.0)
        assert sorted(a.status_code for a in answers) == [200, 200]
        assert wait_ready(c).status_code == 200
        text = c.get("/metrics").text
        assert 'genrerank_requests_total{endpoint="/v1/rerank",status="503"} 1.0' in text
        assert 'genrerank_errors_total{kind="overloaded"} 1.0' in text
    assert [call.request_id for call in service.calls[1:]] in (["q0", "q1"], ["q1", "q0"])


def test_a_request_whose_deadline_passes_in_the_queue_is_not_run() -> None:
    service = _HeldService()
    with TestClient(create_app(service, timeout_s=0.2)) as c:
        _wait_metric(c, "genrerank_model_busy", 1.0)  # the warm-up holds the worker
        payload = valid_payload()
        payload["request_id"] = "late"
        response = c.post("/v1/rerank", json=payload)
        assert response.status_code == 504 and response.json()["error"] == "timeout"
        assert _metric_value(c, "genrerank_queue_waiting") == 0.0  # taken out of the queue
        service.hold.set()
        assert wait_ready(c).status_code == 200
        assert c.post("/v1/rerank", json=valid_payload()).status_code == 200
    assert "late" not in [call.request_id for call in service.calls]
    assert len(service.calls) == 2  # the warm-up and the last request


def test_draining_turns_readiness_off_and_closes_connections(
    client: TestClient, service: FakeService
) -> None:
    from genrerank.serving.app import start_draining

    start_draining(client.app)  # type: ignore[arg-type]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    assert ready.headers["connection"] == "close"
    served = client.post("/v1/rerank", json=valid_payload())  # still served
    assert served.status_code == 200 and served.headers["connection"] == "close"
    assert "genrerank_ready 0.0" in client.get("/metrics").text


def test_overload_settings_are_checked(service: FakeService) -> None:
    with pytest.raises(ValueError, match="max_queue"):
        create_app(service, max_queue=0)
    with pytest.raises(ValueError, match="timeout_s"):
        create_app(service, body_timeout_s=0)


def test_openapi_documents_503_and_408(client: TestClient) -> None:
    responses = client.get("/openapi.json").json()["paths"]["/v1/rerank"]["post"]["responses"]
    assert "Retry-After" in responses["503"]["headers"]
    assert "408" in responses and "504" in responses


# ---------------------------------------------------------------------------- ModelQueue


def test_model_queue_refuses_past_its_expected_wait() -> None:
    """With ``max_wait_s``, admission stops when the calls ahead times the mean call time
    exceed it, but one call may always wait; the count bound still holds."""
    import asyncio

    from genrerank.serving.app import ModelQueue

    async def scenario() -> None:
        queue = ModelQueue(8, max_wait_s=0.05)
        with pytest.raises(ValueError, match="max_wait_s"):
            ModelQueue(8, max_wait_s=0.0)
        assert queue.call_s is None and queue.expected_wait_s() == 0.0
        done = queue.submit(lambda: time.sleep(0.04))
        assert done is not None
        await done.future
        assert queue.call_s is not None and queue.call_s >= 0.04
        started, release = threading.Event(), threading.Event()

        def blocker() -> None:
            started.set()
            release.wait(5.0)

        first = queue.submit(blocker)
        assert await asyncio.to_thread(started.wait, 5.0)
        # Running: 1 call ahead (>= 40 ms), so a second may wait (one always may) ...
        second = queue.submit(lambda: None)
        assert second is not None and queue.expected_wait_s() >= 0.08
        # ... but a third would wait >= 80 ms > 50 ms: refused, far below the count bound of 8.
        assert queue.full() and queue.submit(lambda: None) is None
        release.set()
        await first.future
        await second.future
        unbounded = ModelQueue(2)
        unbounded.call_s, unbounded.busy = 10.0, True
        assert not unbounded.full()  # no time bound: only the count

    asyncio.run(scenario())


def test_model_queue_bound_cancel_deadline_and_close() -> None:
    import asyncio

    from genrerank.serving.app import DeadlinePassed, ModelQueue, QueueClosed

    async def scenario() -> None:
        queue = ModelQueue(2)
        started, release = threading.Event(), threading.Event()
        ran: list[str] = []

        def blocker() -> str:
            started.set()
            release.wait(5.0)
            return "first"

        first = queue.submit(blocker)
        assert first is not None
        assert await asyncio.to_thread(started.wait, 5.0)
        assert queue.busy and queue.waiting == 0

        expiring = queue.submit(lambda: ran.append("expiring"), time.perf_counter() + 0.05)
        cancelled = queue.submit(lambda: ran.append("cancelled"))
        assert expiring is not None and cancelled is not None
        assert queue.full() and queue.submit(lambda: ran.append("refused")) is None
        assert queue.cancel(cancelled) and not queue.cancel(cancelled)
        assert not queue.full()
        failing = queue.submit(lambda: 1 / 0)
        assert failing is not None
        await asyncio.sleep(0.1)  # the deadline of `expiring` passes while it waits
        release.set()

        assert await first.future == "first"
        with pytest.raises(DeadlinePassed):
            await expiring.future
        with pytest.raises(ZeroDivisionError):
            await failing.future
        assert ran == []  # neither the expired nor the cancelled call ran

        started.clear()
        release.clear()
        held = queue.submit(blocker)
        pending = queue.submit(lambda: ran.append("pending"))
        assert held is not None and pending is not None
        assert await asyncio.to_thread(started.wait, 5.0)
        queue.close()
        release.set()
        with pytest.raises(QueueClosed):
            await pending.future
        assert await held.future == "first"  # the running call finishes
        with pytest.raises(QueueClosed):
            queue.submit(lambda: None)
        assert ran == []

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="max_waiting"):
        ModelQueue(0)
