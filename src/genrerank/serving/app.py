"""The HTTP app in front of a :class:`~genrerank.serving.types.RerankService`.

Endpoints:

- ``POST /v1/rerank``: re-rank one request; body and errors are described in
  :mod:`genrerank.serving.schema` (the reference for clients).
- ``GET /healthz``: ``200 {"status": "ok"}`` while the process is alive.
- ``GET /readyz``: ``200 {"status": "ready", "model_version": ...}`` once a warm-up request
  has gone through the model; ``503`` before that, or with the error if the warm-up failed,
  and ``503 {"status": "draining"}`` once the server has been asked to stop (SIGTERM). A
  service with a ``ready_check()`` (its model on a model server) is also asked each time, and
  ``/readyz`` answers ``503`` with its reason while the model server is down.
- ``GET /metrics``: Prometheus text format (request counts by endpoint and status, re-rank
  latency, errors by kind, model queue depth, item cache statistics read from
  ``service.cache_stats()`` at scrape time, model version).
- ``GET /docs``, ``GET /openapi.json``: the generated API documentation.

Model calls run one at a time on a dedicated worker thread (the model parallelises inside a
call with intra-op threads; concurrent calls would only compete for the same cores), so the
event loop stays free to parse, answer probes and time out slow calls; a model on a model
server gets ``model_workers`` threads (its calls wait on the network, and the server batches
concurrent calls). A model server that is down is a ``503`` with ``Retry-After``
(:class:`~genrerank.serving.types.ModelUnavailable`), one past its own deadline a ``504``
(:class:`~genrerank.serving.types.ModelTimeout`). In front of the worker
is a bounded FIFO queue (:class:`ModelQueue`, ``max_queue`` waiting calls):

- a request that finds the queue full (``max_queue`` calls waiting, or more than
  ``max_wait_s`` of expected waiting: the calls ahead times the recent mean call time) is
  answered ``503`` with ``Retry-After`` at once, before its body is parsed, so the excess of an
  overload is refused fast and the admitted requests keep a bounded latency;
- ``timeout_s`` is each request's deadline, from its admission to the queue: a request still
  queued at its deadline is dropped without running (``504``); a call already running is not
  interrupted, its result is dropped (``504``);
- a client that closes its connection while its request waits is dropped from the queue too.

Status codes that never reach a client are counted too: ``499`` (the client closed the
connection before the answer; logged at INFO, no traceback) and, from the server's protocol
layer (:mod:`genrerank.serving.server`), requests answered before they reached the app
(endpoint label ``unparsed``: ``400`` malformed HTTP, ``408`` request head too slow). A
request body not received within ``body_timeout_s`` of its head is a ``408`` (and the
connection is closed).

Run with :func:`genrerank.serving.server.run_server` (what ``genrerank serve`` does: header
and body read timeouts, a drain phase on SIGTERM), or any ASGI server around ``create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
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
from starlette.requests import ClientDisconnect

from genrerank.constraints import InfeasibleConstraints
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
from genrerank.serving.types import ModelTimeout, ModelUnavailable, RerankResult, RerankService

logger = logging.getLogger("genrerank.serving")

RERANK_PATH = "/v1/rerank"
_KNOWN_PATHS = frozenset({RERANK_PATH, "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
#: The endpoint label of requests answered by the server's protocol layer (malformed HTTP,
#: a request head that did not arrive in time): they never reached the app's routing.
UNPARSED_ENDPOINT = "unparsed"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5)
LATENCY_BUCKETS += (1.0, 2.5)
ERROR_KINDS = ("validation", "timeout", "internal", "overloaded", "read_timeout", "client_closed",
               "model_unavailable")
#: nginx's "client closed request": recorded in /metrics, never sent (nobody is listening).
CLIENT_CLOSED = 499
DEFAULT_MAX_QUEUE = 8
#: Admission also stops when the calls ahead would take longer than this (their number times the
#: recent mean call time): a fixed count admits 8 x 10 ms of waiting on a PyTorch model at n = 60,
#: so admitted p99 was 126 ms under 2x overload; a time budget holds whatever the model's speed.
DEFAULT_MAX_WAIT_S = 0.02
DEFAULT_BODY_TIMEOUT_S = 10.0

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


class _BodyReadTimeout(Exception):
    """The request body did not arrive within the body read timeout."""


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


# ---------------------------------------------------------------------------- the model queue


class QueueClosed(RuntimeError):
    """The queue was closed (the app is shutting down) before the call could run."""


class DeadlinePassed(TimeoutError):
    """The call's deadline passed while it was queued: it was not run."""


@dataclass(eq=False)
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    deadline: float | None  # time.perf_counter() value; None: no deadline
    enqueued: float
    started: float | None = None  # set by the worker when the call starts

    def settle(self, result: Any, error: BaseException | None) -> None:
        """Hand the outcome to the event loop (called from the worker thread)."""
        # RuntimeError: the loop is closed; nobody waits for this any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the request gave up (timeout, client gone): the outcome is dropped
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass(eq=False)
class ModelQueue:
    """Calls run one at a time on one worker thread (``workers`` threads, each running one
    call, when the model is remote: a call then mostly waits on the network, and concurrent
    calls are what a model server's dynamic batcher stacks), behind a FIFO queue of at most
    ``max_waiting`` calls (the running ones not included) and, with ``max_wait_s``, at most
    that much expected waiting: the calls ahead (running ones included, less the workers
    free for it) times the recent mean call time (an exponential average) / ``workers``. One
    call may always wait, so a slow model still keeps its worker busy.

    ``submit`` refuses a call when the queue is full (the caller answers 503); the worker
    drops a call whose deadline passed while it waited, without running it; ``cancel`` takes a
    call out of the queue (its caller gave up). The worker thread starts with the first call.
    """

    max_waiting: int
    max_wait_s: float | None = None
    name: str = "genrerank-model"
    workers: int = 1
    _jobs: deque[_Job] = field(default_factory=deque, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)
    busy: int = field(default=0, init=False)  # calls running (at most ``workers``)
    #: Recent mean duration of a call, seconds (None before the first one).
    call_s: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.max_wait_s is not None and not self.max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0, got {self.max_wait_s}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def expected_wait_s(self) -> float:
        """How long a call submitted now would wait: the calls ahead times the mean call time
        (with several workers: the calls ahead beyond the free workers, shared among them)."""
        ahead = max(len(self._jobs) + self.busy - self.workers + 1, 0)
        return ahead * (self.call_s or 0.0) / self.workers

    def full(self) -> bool:
        """Whether a call submitted now would be refused (read without the lock: a hint)."""
        waiting = len(self._jobs)
        if waiting >= self.max_waiting:
            return True
        return (self.max_wait_s is not None and waiting >= 1
                and self.expected_wait_s() > self.max_wait_s)

    def submit(self, fn: Callable[[], Any], deadline: float | None = None, *,
               bounded: bool = True) -> _Job | None:
        """Queue ``fn`` (call from the event loop); None when the queue is full."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop.create_future(), loop, deadline, time.perf_counter())
        with self._cond:
            if self._closed:
                raise QueueClosed("the model queue is closed")
            if bounded and self.full():
                return None
            self._jobs.append(job)
            if self._thread is None:
                # Daemons: a model call stuck forever must not keep the process alive.
                for k in range(self.workers):
                    thread = threading.Thread(target=self._work, daemon=True,
                                              name=self.name if k == 0 else f"{self.name}-{k}")
                    thread.start()
                    self._thread = self._thread or thread
            self._cond.notify()
        return job

    def cancel(self, job: _Job) -> bool:
        """Take ``job`` out of the queue; True if it was still waiting (it will never run)."""
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
        return True

    def close(self) -> None:
        """Stop the worker after its current call; calls still waiting fail with QueueClosed."""
        with self._cond:
            self._closed = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in pending:
            job.settle(None, QueueClosed("the server is shutting down"))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self.busy += 1
            try:
                now = time.perf_counter()
                if job.future.cancelled():
                    continue
                if job.deadline is not None and now >= job.deadline:
                    job.settle(None, DeadlinePassed(f"waited {now - job.enqueued:.3f} s"))
                    continue
                job.started = now
                try:
                    result, error = job.fn(), None
                except Exception as exc:  # handed to the request, which answers 500
                    result, error = None, exc
                took = time.perf_counter() - now
                self.call_s = took if self.call_s is None else 0.8 * self.call_s + 0.2 * took
                job.settle(result, error)
            finally:
                with self._cond:
                    self.busy -= 1


# ---------------------------------------------------------------------------- metrics


class _Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps per process)."""

    def __init__(self, service: RerankService) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "genrerank_requests",
            "HTTP requests by endpoint and status code (499: the client closed the connection "
            f"first; endpoint {UNPARSED_ENDPOINT}: answered before reaching the app)",
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
            "Failed requests by kind (" + ", ".join(ERROR_KINDS) + ")",
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
            "genrerank_ready",
            "1 once the warm-up request succeeded, 0 again while draining",
            registry=self.registry,
        )
        self.queue_waiting = Gauge(
            "genrerank_queue_waiting", "Model calls waiting in the queue", registry=self.registry
        )
        self.queue_limit = Gauge(
            "genrerank_queue_limit",
            "Most model calls that may wait; more are answered 503",
            registry=self.registry,
        )
        self.model_busy = Gauge(
            "genrerank_model_busy", "1 while a model call runs", registry=self.registry
        )
        self.registry.register(_CacheCollector(service))

    def record_unparsed(self, status: int) -> None:
        """Count a request the server's protocol layer answered itself (400, 408)."""
        self.requests.labels(UNPARSED_ENDPOINT, str(status)).inc()
        if status == 408:
            self.errors.labels("read_timeout").inc()


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
            ("bytes", "Bytes held by the item cache (ids, fingerprints, vectors, overhead)"),
            ("capacity_bytes", "Byte bound of the item cache"),
        ):
            if key in stats:
                name = f"genrerank_item_cache_{key}"
                yield GaugeMetricFamily(name, help_text, value=float(stats[key]))


@dataclass
class _AppState:
    ready: bool = False
    warmup_error: str | None = None
    # Set from a signal handler (start_draining): a plain attribute write, nothing that locks.
    draining: bool = False


def start_draining(app: FastAPI) -> None:
    """Begin the drain phase: /readyz answers 503 and every response closes its connection
    (clients reconnect elsewhere); requests are still served. Safe in a signal handler."""
    app.state.serving_state.draining = True


def _json_bytes(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


@dataclass
class _Refusal:
    """The 503 answer of an overload, built once."""

    queue_full: Callable[[], bool]
    body: bytes
    retry_after_s: int
    headers: list[tuple[bytes, bytes]] = field(init=False)

    def __post_init__(self) -> None:
        self.headers = [(b"content-type", b"application/json"),
                        (b"content-length", str(len(self.body)).encode()),
                        (b"retry-after", str(self.retry_after_s).encode())]

    def response(self) -> Response:
        return Response(self.body, status_code=503, media_type="application/json",
                        headers={"retry-after": str(self.retry_after_s)})


class _CountRequests:
    """Pure-ASGI middleware: request counts by endpoint/status, re-rank latency, the body read
    timeout, client disconnects, and ``Connection: close`` while draining.

    Pure ASGI rather than ``@app.middleware``: BaseHTTPMiddleware adds ~100 us per request.
    Unknown paths are counted as ``other`` so scanners cannot blow up label cardinality.
    """

    def __init__(self, app: ASGIApp, metrics: _Metrics, state: _AppState,
                 body_timeout_s: float, refusal: _Refusal) -> None:
        self.app = app
        self.metrics = metrics
        self.state = state
        self.body_timeout_s = body_timeout_s
        self.refusal = refusal
        self.timeout_body = _json_bytes(
            "request timeout",
            f"the request body was not received within {body_timeout_s:g} s")

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in _KNOWN_PATHS else "other"
        status = 500  # if the app dies before answering, the server answers 500
        started = False
        # The whole body must arrive within body_timeout_s of the head (not per chunk, so a
        # trickle of bytes cannot hold the request open).
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        body_done = False

        async def receive_in_time() -> MutableMapping[str, Any]:
            nonlocal body_done
            if body_done:  # later reads only wait for a disconnect: no deadline
                return await receive()  # type: ignore[no-any-return]
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyReadTimeout from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message  # type: ignore[no-any-return]

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
                headers = list(message.get("headers", []))
                if self.state.draining and (b"connection", b"close") not in headers:
                    message = dict(message)
                    message["headers"] = [*headers, (b"connection", b"close")]
            await send(message)

        try:
            if endpoint == RERANK_PATH and scope.get("method") == "POST" and (
                self.refusal.queue_full()
            ):
                # The excess of an overload is refused here, before routing and parsing: the
                # cheaper a refusal, the more CPU is left for the admitted requests.
                status = 503
                self.metrics.errors.labels("overloaded").inc()
                await send_wrapper({"type": "http.response.start", "status": 503,
                                    "headers": self.refusal.headers})
                await send_wrapper({"type": "http.response.body", "body": self.refusal.body})
                return
            await self.app(scope, receive_in_time, send_wrapper)
        except _BodyReadTimeout:
            logger.info("%s %s: request body not received within %g s; answered 408",
                        scope.get("method"), path, self.body_timeout_s)
            self.metrics.errors.labels("read_timeout").inc()
            if not started:
                status = 408
                await send_wrapper({
                    "type": "http.response.start", "status": 408,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.timeout_body)).encode()),
                                (b"connection", b"close")],
                })
                await send_wrapper({"type": "http.response.body", "body": self.timeout_body})
        except ClientDisconnect:
            # Not a server error: the client went away while its body was being read.
            status = CLIENT_CLOSED
        finally:
            if status == CLIENT_CLOSED:
                self.metrics.errors.labels("client_closed").inc()
                logger.info("%s %s: the client closed the connection before the answer",
                            scope.get("method"), path)
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


class _ClientGone(Exception):
    """The client closed its connection while its request waited for the model."""


async def _watch_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
                            future: asyncio.Future[Any]) -> None:
    """Fail ``future`` with _ClientGone if the next ASGI message (after the whole body) says
    the client went away; any other message ends the watch."""
    message = await receive()
    if message.get("type") == "http.disconnect" and not future.done():
        future.set_exception(_ClientGone())


def create_app(
    service: RerankService,
    *,
    timeout_s: float = 1.0,
    max_body_bytes: int = 4_000_000,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_wait_s: float | None = DEFAULT_MAX_WAIT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    retry_after_s: int = 1,
    model_workers: int = 1,
) -> FastAPI:
    """The FastAPI app serving ``service``.

    ``timeout_s`` is a request's deadline from its admission to the model queue: still queued
    then, it is dropped without running; running, its result is dropped (``504`` either way).
    ``max_queue`` bounds the model calls waiting behind the running one, ``max_wait_s`` (None:
    no bound) their expected wait (``503`` with ``Retry-After: retry_after_s`` past either).
    ``max_body_bytes`` bounds the request body (``413`` past it), ``body_timeout_s`` the time
    to receive it after the head (``408``). ``model_workers`` calls run at once (1 for a
    model in this process; more for one on a model server, see :class:`ModelQueue`).
    """
    if timeout_s <= 0 or body_timeout_s <= 0:
        raise ValueError("timeout_s and body_timeout_s must be > 0")
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    validator = RequestValidator.for_service(service)
    metrics = _Metrics(service)
    state = _AppState()

    # In a dict so a restarted app (lifespan run again, as in tests) gets a fresh worker.
    holder = {"queue": ModelQueue(max_queue, max_wait_s, workers=model_workers)}
    metrics.queue_limit.set(max_queue)
    metrics.queue_waiting.set_function(lambda: float(holder["queue"].waiting))
    metrics.model_busy.set_function(lambda: float(holder["queue"].busy))
    metrics.ready.set_function(lambda: float(state.ready and not state.draining))
    stopped: list[bool] = []
    refusal = _Refusal(
        lambda: holder["queue"].full(),
        _json_bytes("overloaded", "the model queue is full (at most "
                                  f"{max_queue} requests or "
                                  f"{'unbounded' if max_wait_s is None else f'{max_wait_s:g} s'} "
                                  f"of expected waiting); retry after {retry_after_s} s"),
        retry_after_s,
    )

    def overloaded() -> Response:
        metrics.errors.labels("overloaded").inc()
        return refusal.response()

    # A service whose model is remote (a model server) says whether it is reachable.
    ready_check: Callable[[], str | None] | None = getattr(service, "ready_check", None)

    async def warm_up() -> None:
        """One synthetic request through validation and the model: readiness, warm caches.
        A remote model that is unavailable is retried every second (it may come up later);
        any other failure is final."""
        while True:
            try:
                n = max(1, min(8, service.max_candidates or 8))
                request = validator.validate_python(synthetic_payload(service.spec, n=n, m=1))
                job = holder["queue"].submit(functools.partial(service.rerank, request),
                                             bounded=False)
                assert job is not None
                await job.future
            except (ModelUnavailable, ModelTimeout) as exc:
                state.warmup_error = f"{type(exc).__name__}: {exc}"
                logger.warning("warm-up: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)
                continue
            except Exception as exc:  # reported by /readyz; the process stays up
                logger.exception("warm-up request failed; /readyz will answer 503")
                state.warmup_error = f"{type(exc).__name__}: {exc}"
            else:
                state.ready = True
                state.warmup_error = None
                logger.info("warm-up done; model %s ready", service.model_version)
            return

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if stopped:  # the app was started and stopped before: its worker is gone
            holder["queue"] = ModelQueue(max_queue, max_wait_s, workers=model_workers)
            stopped.clear()
        # A background task, so /healthz answers while the (possibly slow) first call runs.
        task = asyncio.create_task(warm_up())
        app.state.warmup_task = task
        try:
            yield
        finally:
            task.cancel()
            holder["queue"].close()
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
    app.state.serving_state = state
    # For the server's protocol layer (genrerank.serving.server), which answers some requests
    # (malformed HTTP, a request head too slow) before they reach the app.
    app.state.record_unparsed = metrics.record_unparsed
    app.state.limits = {"timeout_s": timeout_s, "body_timeout_s": body_timeout_s,
                        "max_queue": max_queue}

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
            408: {"model": ErrorBody, "description": "The body did not arrive in time"},
            413: {"model": ValidationErrorBody, "description": "Body too large"},
            422: {"model": ValidationErrorBody, "description": "Invalid request"},
            500: {"model": ErrorBody, "description": "The model failed"},
            503: {
                "model": ErrorBody,
                "description": "Overloaded: the model queue is full; retry after Retry-After",
                "headers": {"Retry-After": {"schema": {"type": "integer"},
                                            "description": "Seconds to wait"}},
            },
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
        queue = holder["queue"]  # a full queue was refused by the middleware already
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
        deadline = parsed_at + timeout_s
        try:
            job = queue.submit(lambda: service.rerank(parsed), deadline)
        except QueueClosed:
            return _error(503, "unavailable", "the server is shutting down")
        if job is None:  # filled up while this request was parsed
            return overloaded()

        # Watch for the client going away while the request waits: it is then dropped. The
        # watcher fails the job's future, so this task awaits one future only (fewest event
        # loop hops between the model's answer and the response, which counts under load).
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, job.future))
        time_limit = asyncio.timeout(max(deadline - time.perf_counter(), 0.0))
        try:
            async with time_limit:
                await job.future
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except Exception:  # looked at below, from the future or the time limit
            pass
        finally:
            watcher.cancel()
            if not job.future.done() or job.future.cancelled() or isinstance(
                    job.future.exception(), _ClientGone):
                # Timed out, client gone, or this task cancelled: a call still waiting is
                # dropped; a running call's late result is dropped by _settle.
                if queue.cancel(job):
                    logger.info("request %r dropped from the queue", parsed.request_id)
                job.future.cancel()
        if time_limit.expired() or isinstance(job.future.exception(), DeadlinePassed):
            metrics.errors.labels("timeout").inc()
            logger.warning("request %r timed out after %g s", parsed.request_id, timeout_s)
            return _error(
                504,
                "timeout",
                f"the model did not answer within {timeout_s:g} s; the request was abandoned",
            )
        if isinstance(job.future.exception(), QueueClosed):
            return _error(503, "unavailable", "the server is shutting down")
        if isinstance(job.future.exception(), ModelTimeout):  # a remote model's own deadline
            metrics.errors.labels("timeout").inc()
            return _error(504, "timeout", str(job.future.exception()))
        if isinstance(job.future.exception(), ModelUnavailable):  # a model server down
            metrics.errors.labels("model_unavailable").inc()
            response = _error(503, "model unavailable", str(job.future.exception()))
            response.headers["Retry-After"] = str(retry_after_s)
            return response
        try:
            payload = _response_body(job.future.result(), parsed.request_id)
        except InfeasibleConstraints as exc:  # the validator checks first; a service may too
            metrics.errors.labels("validation").inc()
            return _invalid([FieldError("constraints", str(exc))])
        except Exception as exc:  # any service failure is a 500, never a crash
            metrics.errors.labels("internal").inc()
            logger.exception("request %r failed in the service", parsed.request_id)
            return _error(500, "internal error", f"{type(exc).__name__}: {exc}")

        queued_s = (job.started or parsed_at) - job.enqueued
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
        summary="Readiness: a warm-up request went through the model, and not draining",
        responses={503: {"description": "Warming up, the warm-up failed, or draining"}},
    )
    async def readyz() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.ready and ready_check is not None:
            # A remote model is asked each time (in a thread: a slow server must not stall
            # the event loop), so /readyz follows the model server going down and up.
            try:
                problem = await asyncio.wait_for(asyncio.to_thread(ready_check), 2.0)
            except TimeoutError:
                problem = "the model server did not answer the readiness check within 2 s"
            except Exception as exc:  # a probe failure is "not ready", never a 500
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                return JSONResponse({"status": "not ready", "error": problem}, status_code=503)
        if state.ready:
            return JSONResponse({"status": "ready", "model_version": str(service.model_version)})
        if state.warmup_error is not None:
            body = {"status": "not ready", "error": f"warm-up failed: {state.warmup_error}"}
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
    app.add_middleware(_CountRequests, metrics=metrics, state=state,
                       body_timeout_s=body_timeout_s, refusal=refusal)
    return app
