"""The HTTP app in front of a :class:`~genrerank.serving.types.RerankService`.

Endpoints:

- ``POST /v1/rerank``: re-rank one request; body and errors are described in
  :mod:`genrerank.serving.schema` (the reference for clients).
- ``GET /healthz``: ``200 {"status": "ok"}`` while the process is alive.
- ``GET /readyz``: ``200 {"status": "ready", "model_version": ...}`` once a warm-up request
  has gone through the model; ``503`` before that, or with the error if the warm-up failed.
- ``GET /metrics``: Prometheus text format (request counts and latency, errors by kind, item
  cache statistics read from ``service.cache_stats()`` at scrape time, model version).
- ``GET /docs``, ``GET /openapi.json``: the generated API documentation.

Model calls run one at a time on a dedicated worker thread (the model parallelises inside a
call with intra-op threads; concurrent calls would only compete for the same cores), so the
event loop stays free to parse, answer probes and time out slow calls.

Run with e.g. ``uvicorn --factory`` around a function that builds the service and returns
``create_app(service)``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException

from genrerank.serving import schema as schema_module
from genrerank.serving.schema import (
    ErrorBody,
    FieldError,
    RequestValidationFailed,
    RequestValidator,
    RerankRequest,
    RerankResponse,
    ValidationErrorBody,
    format_loc,
    synthetic_payload,
)
from genrerank.serving.types import RerankInput, RerankResult, RerankService

logger = logging.getLogger("genrerank.serving")

RERANK_PATH = "/v1/rerank"
_KNOWN_PATHS = frozenset({RERANK_PATH, "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5)
LATENCY_BUCKETS += (1.0, 2.5)
ERROR_KINDS = ("validation", "timeout", "internal")

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _error(status: int, error: str, detail: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def _invalid(errors: list[FieldError], status: int = 422) -> JSONResponse:
    error = "request too large" if status == 413 else "invalid request"
    return _error(status, error, [e.to_dict() for e in errors])


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes without reading them all into memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge(int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


class _Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps per process)."""

    def __init__(self, service: RerankService) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "genrerank_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "genrerank_request_latency_seconds",
            f"Latency of {RERANK_PATH} requests, body read to response, in seconds",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "genrerank_errors",
            "Failed re-rank requests by kind (validation, timeout, internal)",
            ["kind"],
            registry=self.registry,
        )
        for kind in ERROR_KINDS:  # export zeros, so rate() works before the first error
            self.errors.labels(kind)
        self.model_info = Gauge(
            "genrerank_model_info",
            "The served model (value always 1)",
            ["model_version"],
            registry=self.registry,
        )
        self.model_info.labels(str(service.model_version)).set(1)
        self.ready = Gauge(
            "genrerank_ready", "1 once the warm-up request succeeded", registry=self.registry
        )
        self.registry.register(_CacheCollector(service))


class _CacheCollector(Collector):
    """Reads ``service.cache_stats()`` at scrape time: the cache lives in the runtime."""

    def __init__(self, service: RerankService) -> None:
        self.service = service

    def describe(self) -> Iterable[Metric]:
        return []  # unknown until scraped; an empty describe() keeps registration lazy

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self.service.cache_stats()
        except Exception:  # a broken stats call must not take /metrics down with it
            logger.exception("cache_stats() failed")
            return
        if "hits" in stats:
            yield CounterMetricFamily(
                "genrerank_item_cache_hits", "Item cache hits", value=float(stats["hits"])
            )
        if "misses" in stats:
            yield CounterMetricFamily(
                "genrerank_item_cache_misses", "Item cache misses", value=float(stats["misses"])
            )
        for key, help_text in (
            ("hit_rate", "Item cache hit rate (0 when unused)"),
            ("size", "Items in the item cache"),
            ("capacity", "Capacity of the item cache"),
        ):
            if key in stats:
                name = f"genrerank_item_cache_{key}"
                yield GaugeMetricFamily(name, help_text, value=float(stats[key]))


class _CountRequests:
    """Pure-ASGI middleware: request counts by endpoint/status, and re-rank latency.

    Pure ASGI rather than ``@app.middleware``: BaseHTTPMiddleware adds ~100 us per request.
    Unknown paths are counted as ``other`` so scanners cannot blow up label cardinality.
    """

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in _KNOWN_PATHS else "other"
        status = 500  # if the app dies before answering, the server answers 500

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint == RERANK_PATH:
                self.metrics.latency.observe(time.perf_counter() - start)


def _response_body(result: RerankResult, request_id: str | None) -> dict[str, Any]:
    """The 200 body; raises on a malformed result (turned into a 500 by the caller)."""
    if not isinstance(result, RerankResult):
        raise TypeError(f"service returned {type(result).__name__}, not RerankResult")
    scores = [float(s) for s in result.scores]
    list_score = None if result.list_score is None else float(result.list_score)
    if not all(math.isfinite(s) for s in scores) or (
        list_score is not None and not math.isfinite(list_score)
    ):
        raise ValueError("service returned a non-finite score")
    return {
        "request_id": request_id,
        "items": [str(i) for i in result.item_ids],
        "scores": scores,
        "list_score": list_score,
        "strategy": str(result.strategy),
        "model_version": str(result.model_version),
        "timings_ms": {str(k): float(v) for k, v in result.timings_ms.items()},
    }


def create_app(
    service: RerankService, *, timeout_s: float = 1.0, max_body_bytes: int = 4_000_000
) -> FastAPI:
    """The FastAPI app serving ``service``.

    ``timeout_s`` bounds the model call of one request, queueing behind other calls included
    (``504`` past it; a call already running is not interrupted, its result is dropped).
    ``max_body_bytes`` bounds the request body (``413`` past it).
    """
    validator = RequestValidator.for_service(service)
    metrics = _Metrics(service)

    def new_executor() -> ThreadPoolExecutor:
        # One worker: model calls are serialised; see the module docstring.
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="genrerank-model")

    # In a dict so a restarted app (lifespan run again, as in tests) gets a fresh one.
    pool = {"executor": new_executor()}
    stopped: list[bool] = []
    state: dict[str, Any] = {"ready": False, "warmup_error": None}

    def call_service(request: RerankInput, queued_at: float) -> tuple[RerankResult, float]:
        started = time.perf_counter()
        return service.rerank(request), started - queued_at

    async def warm_up() -> None:
        """One synthetic request through validation and the model: readiness, warm caches."""
        try:
            n = max(1, min(8, service.max_candidates or 8))
            request = validator.validate_python(synthetic_payload(service.spec, n=n, m=1))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(pool["executor"], call_service, request, time.perf_counter())
        except Exception as exc:  # reported by /readyz; the process stays up
            logger.exception("warm-up request failed; /readyz will answer 503")
            state["warmup_error"] = f"{type(exc).__name__}: {exc}"
        else:
            state["ready"] = True
            metrics.ready.set(1)
            logger.info("warm-up done; model %s ready", service.model_version)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if stopped:  # the app was started and stopped before: its worker is gone
            pool["executor"] = new_executor()
            stopped.clear()
        # A background task, so /healthz answers while the (possibly slow) first call runs.
        task = asyncio.create_task(warm_up())
        app.state.warmup_task = task
        try:
            yield
        finally:
            task.cancel()
            pool["executor"].shutdown(wait=False, cancel_futures=True)
            stopped.append(True)

    app = FastAPI(
        title="genrerank",
        summary="Generative re-ranking of recommendation candidates",
        description=schema_module.__doc__ or "",
        version=str(service.model_version),
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics_registry = metrics.registry
    app.state.validator = validator

    @app.exception_handler(RequestValidationError)
    async def fastapi_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("validation").inc()
        errors = [
            FieldError(format_loc(tuple(e.get("loc", ()))), str(e.get("msg", "invalid")))
            for e in exc.errors()
        ]
        return _invalid(errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 404 / 405 in the same {"error", "detail"} shape as everything else.
        try:
            phrase = HTTPStatus(exc.status_code).phrase.lower()
        except ValueError:
            phrase = "http error"
        return _error(exc.status_code, phrase, exc.detail)

    @app.post(
        RERANK_PATH,
        summary="Re-rank candidates into a list of length m",
        response_model=RerankResponse,
        responses={
            413: {"model": ValidationErrorBody, "description": "Body too large"},
            422: {"model": ValidationErrorBody, "description": "Invalid request"},
            500: {"model": ErrorBody, "description": "The model failed"},
            504: {"model": ErrorBody, "description": "The model did not answer in time"},
        },
        # The body is parsed by hand (pydantic's Rust JSON parser straight from bytes, no
        # FastAPI double pass); this only documents it. Schema injected in custom_openapi.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/RerankRequest"}}
                },
            }
        },
    )
    async def rerank(request: Request) -> Response:
        start = time.perf_counter()
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge as exc:
            metrics.errors.labels("validation").inc()
            message = f"body of {exc.args[0]} bytes exceeds the limit of {max_body_bytes} bytes"
            return _invalid([FieldError("body", message)], status=413)
        try:
            parsed = validator.validate_json(body)
        except RequestValidationFailed as exc:
            metrics.errors.labels("validation").inc()
            return _invalid(exc.errors)
        parsed_at = time.perf_counter()

        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool["executor"], call_service, parsed, parsed_at)
        # asyncio.wait rather than wait_for: a TimeoutError raised *by the service* is a 500.
        done, _ = await asyncio.wait({future}, timeout=timeout_s)
        if not done:
            # Cancelling drops the call if it is still queued; a running call cannot be
            # interrupted, it finishes on the worker and its result is discarded.
            future.cancel()
            metrics.errors.labels("timeout").inc()
            logger.warning("request %r timed out after %g s", parsed.request_id, timeout_s)
            return _error(
                504,
                "timeout",
                f"the model did not answer within {timeout_s:g} s; the request was abandoned",
            )
        try:
            result, queued_s = future.result()
            payload = _response_body(result, parsed.request_id)
        except Exception as exc:  # any service failure is a 500, never a crash
            metrics.errors.labels("internal").inc()
            logger.exception("request %r failed in the service", parsed.request_id)
            return _error(500, "internal error", f"{type(exc).__name__}: {exc}")

        timings = {"parse": _ms(parsed_at - start), "queue": _ms(queued_s)}
        timings.update(payload["timings_ms"])
        timings["total"] = _ms(time.perf_counter() - start)
        payload["timings_ms"] = timings
        return JSONResponse(payload)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: a warm-up request went through the model",
        responses={503: {"description": "Warming up, or the warm-up failed"}},
    )
    async def readyz() -> JSONResponse:
        if state["ready"]:
            return JSONResponse({"status": "ready", "model_version": str(service.model_version)})
        if state["warmup_error"] is not None:
            body = {"status": "not ready", "error": f"warm-up failed: {state['warmup_error']}"}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "warming up"}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            # The request model is not a route parameter, so FastAPI does not emit it: add it
            # (and its sub-models) to the components the requestBody refers to.
            request_schema = RerankRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(jsonable_encoder(request_schema.pop("$defs", {})))
            components["RerankRequest"] = request_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
    app.add_middleware(_CountRequests, metrics=metrics)
    return app
