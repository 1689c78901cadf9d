"""``genrerank bench serving``: throughput and tail latency of the HTTP re-ranking service.

What is measured: the whole service as a client sees it (``genrerank serve`` in its own process:
HTTP parsing, JSON validation, the model, the response), for each backend (``torch``: the run
folder, ``onnx``: its ONNX Runtime export) and each request size (simulator presets ``kuaishou``
n = 60, m = 6 and ``large`` n = 500, m = 50), at rising offered request rates.

Method, per (backend, preset):

- Inputs: a simulated data set of the preset, a nar4rec run trained for a token budget (one
  epoch by default: latency does not depend on how well the model ranks, and the results say
  so) and its ONNX export, all prepared under the work folder. The request pool is the first
  ``pool_size`` requests of the test split, each serialised once into a complete HTTP/1.1
  request (bytes) and cycled, so the client spends no CPU on JSON while it measures.
- The server is started as a subprocess, polled on ``GET /readyz`` until it answers 200, and
  always stopped at the end (SIGINT, then SIGTERM, then kill).
- Sanity pass first: ``malformed_requests`` malformed bodies (a literal ``NaN``, a duplicate
  item id, m > n, an unknown feature name, no candidates, a body that is not JSON), sent one at
  a time; each must be answered 4xx and the server must still be ready afterwards.
- Then a warm-up step (not recorded) and the ramp. Each step is an **open-loop** load: request
  ``i`` is due at ``t0 + i / rate`` whatever happened to earlier ones, and its latency is taken
  from that *due* time to the end of its response, so time spent waiting for a free connection
  (the server falling behind) counts: no coordinated omission (as in wrk2). At most
  ``connections`` keep-alive connections are open; each is driven by one coroutine that claims
  the next due request, sleeps until it is due, sends it and reads the answer (status line and
  ``Content-Length`` only; the flat ``timings_ms`` object is picked out of the body without a
  full JSON parse). A step sends ``min(max_requests, duration_s * rate)`` requests; everything
  still unanswered ``drain_s`` after the last due time is abandoned and counted as ``late`` (so
  a step is bounded in count and in time). Non-2xx statuses and connection errors are errors,
  except 503: the bounded model queue shedding load, counted apart (``shed``).
- A step with errors, shed or late requests, p99 above ``p99_cutoff_ms`` or a dead server ends that
  configuration's ramp (the reason is recorded): higher rates would only queue.
- Per step: offered and achieved rate (2xx answers per second, from the first due time to the
  last answer), p50 / p95 / p99 / max latency over the 2xx answers (linear interpolation),
  errors by kind, the server's own mean stage timings (``timings_ms``), its CPU (cores busy, from
  psutil CPU times, 100 % = one core) and memory: RSS sampled every ``sample_s`` and the
  kernel's peak mark ``VmHWM`` of ``/proc/<pid>/status``, reset at the start of the step where
  the kernel allows it (``/proc/<pid>/clear_refs``), so it is the step's own peak.
- **Overload step** (presets in ``overload_presets``, n = 60 by default), after the ramp, on the
  same server: its capacity is measured first, closed loop (``capacity_connections``
  connections each sending the next request as soon as the previous one is answered, for
  ``capacity_duration_s``; capacity = 2xx answers per second), then an open-loop step offers
  ``overload_factor`` x that rate from ``overload_connections`` connections (enough that the
  client never limits how many requests reach the server) for ``overload_duration_s``.
  Recorded: the admitted (2xx) requests' latency, the share of 503s and their latency (from the
  due time, and from the send time: how fast the server refuses), whether each 503 carried
  ``Retry-After``, every other error, late answers, and the server's RSS right before and
  after the step (flat = no growth beyond 5 %).
- The load generator shares the machine with the server (asyncio, one thread; its CPU use per
  step is recorded as ``client_cores``). Before each step the benchmark waits (up to
  ``max_wait_quiet_s``) until other processes are quiet, as ``bench latency`` does, and records
  the CPU other processes used during the step.

**Triton** (backend ``triton``, ``--backends onnx,triton``): the same service started with
``--model-server`` against a real ``tritonserver`` (:mod:`genrerank.serving.triton.launcher`)
serving the export's Triton repository, here the CPU stand-in (Python backend running the same
``model.onnx`` with ONNX Runtime) since the CPU binary has no ONNX Runtime backend; dynamic
batching on, the service with ``triton_workers`` model calls in flight. Before the load, the
Triton-backed service and in-process ONNX Runtime serve the export's parity request set and
their lists are compared; after it, Triton's own statistics give the mean batch size it ran.
The server CPU column counts the service only (tritonserver and its stub are separate
processes, recorded per configuration).

Outputs ``serving.{json,md}`` in the results folder (``serving_quick.*`` with ``--quick``,
``<out_stem>.*`` when set).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from genrerank.bench.latency import CpuProbe, _json_safe, _load, machine_info, wait_for_quiet
from genrerank.utils.io import atomic_write_json, atomic_write_text
from genrerank.utils.tables import markdown_table

PRESETS = ("kuaishou", "large")
BACKENDS = ("torch", "onnx", "triton")
DEFAULT_BACKENDS = ("torch", "onnx")
RATES = (25.0, 50.0, 100.0, 200.0, 400.0)
MODEL = "nar4rec"
RERANK_PATH = "/v1/rerank"
#: The malformed requests of the sanity pass, cycled (see :func:`malformed_body`).
MALFORMED_KINDS = ("nan", "duplicate_id", "m_gt_n", "unknown_feature", "empty_candidates",
                   "not_json")
#: The issue's latency target: p99 at this rate for requests with this many candidates.
TARGET_P99_MS, TARGET_RATE, TARGET_N = 15.0, 200.0, 60
#: The overload targets: admitted requests' p99, the 503s' p99 (send to answer), RSS growth.
TARGET_OVERLOAD_P99_MS, TARGET_REFUSAL_MS, TARGET_RSS_GROWTH = 50.0, 5.0, 0.05
LOAD_METHOD = (
    "open loop: request i is due at t0 + i / rate regardless of earlier answers; latency = end "
    "of the response - due time (waiting for a free keep-alive connection included: no "
    "coordinated omission); asyncio client on raw HTTP/1.1 keep-alive connections, request "
    "bodies serialised once; percentiles by linear interpolation over the 2xx answers"
)


@dataclass
class ServingSettings:
    """Grid, load shape and budget of one run (``ServingSettings()`` full, ``quick()`` smoke)."""

    presets: tuple[str, ...] = PRESETS
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    rates: tuple[float, ...] = RATES  # offered requests/s, rising; the ramp stops early on trouble
    duration_s: float = 10.0  # per step, or ...
    max_requests: int = 4000  # ... this many requests, whichever comes first
    warmup_s: float = 3.0  # unrecorded warm-up step at the first rate
    drain_s: float = 5.0  # answers later than this after the last due time are abandoned (late)
    connections: int = 8  # keep-alive connections of the load generator
    p99_cutoff_ms: float = 1000.0  # a step above this ends the ramp
    pool_size: int = 200  # distinct requests (test split), cycled
    threads: int = 1  # the server's --threads (the `genrerank serve` default)
    n_requests: int = 2000  # simulated requests per preset (10 % of them form the test split)
    train_epochs: int = 1  # a short training run: the benchmark measures speed, not quality
    contrastive_alpha: float = 0.05  # fixed decoding alpha: skips the "auto" search on valid
    malformed_requests: int = 20
    ready_timeout_s: float = 60.0
    stop_grace_s: float = 10.0  # after SIGINT, before SIGTERM (and as long again before kill)
    sample_s: float = 0.25  # server RSS sampling period during a step
    busy_cores: float = 0.5  # before each step, wait until other processes use at most this ...
    max_wait_quiet_s: float = 30.0  # ... but no longer than this
    data_seed: int = 0
    seed: int = 0  # train.seed
    # The overload step (see the module doc); presets it runs for (n = 60: the target).
    overload: bool = True
    overload_presets: tuple[str, ...] = ("kuaishou",)
    overload_factor: float = 2.0  # offered load, x the measured capacity
    overload_connections: int = 64
    overload_duration_s: float = 10.0
    overload_max_requests: int = 20_000
    # Closed loop with 2 connections: one request runs while the other waits, so the worker is
    # never idle and the server (which always admits one waiting request) never refuses; more
    # connections meet the expected-wait bound and spin on 503s, which starve the model thread.
    capacity_connections: int = 2
    capacity_duration_s: float = 5.0
    max_queue: int | None = None  # the server's --max-queue (None: its default)
    host: str = "127.0.0.1"
    work_dir: str | None = None  # data, runs, exports, server logs; None = a temporary folder
    is_quick: bool = False  # names the output files (serving_quick.*) and the report
    out_stem: str | None = None  # output file names (default serving / serving_quick)
    triton_workers: int = 4  # the Triton-backed service's --model-workers

    @classmethod
    def full(cls) -> ServingSettings:
        return cls()

    @classmethod
    def quick(cls) -> ServingSettings:
        return cls(rates=(50.0, 200.0), duration_s=3.0, max_requests=1200, warmup_s=1.0,
                   drain_s=3.0, pool_size=100, n_requests=1000, max_wait_quiet_s=10.0,
                   overload_duration_s=3.0, overload_max_requests=5000,
                   capacity_duration_s=2.0, is_quick=True)


def output_paths(out_dir: str | Path, quick: bool, stem: str | None = None) -> dict[str, Path]:
    """``serving.{json,md}``, or ``serving_quick.*`` for a quick run (``stem.*`` if given)."""
    stem = stem or ("serving_quick" if quick else "serving")
    return {ext: Path(out_dir) / f"{stem}.{ext}" for ext in ("json", "md")}


# ---------------------------------------------------------------------------- HTTP client


def http_request(host: str, port: int, path: str, body: bytes, method: str = "POST") -> bytes:
    """A complete keep-alive HTTP/1.1 request, serialised once and sent as is."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def _read_response(
    reader: asyncio.StreamReader,
) -> tuple[int, bytes, bool, bytes | None]:
    """``(status, body, connection closes, Retry-After)``: the status line, the framing headers
    and Retry-After only."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(None, 2)[1])
    length: int | None = None
    chunked = close = False
    retry_after: bytes | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"retry-after":
            retry_after = value.strip()
    if chunked:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])  # chunk + CRLF
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then an empty line
            pass
        body = b"".join(parts)
    elif length is not None:
        body = await reader.readexactly(length)
    else:  # no framing: the body runs to the end of the connection
        body, close = await reader.read(), True
    return status, body, close, retry_after


def server_timings(body: bytes) -> dict[str, float] | None:
    """The flat ``"timings_ms": {...}`` object of a response body, without parsing the rest."""
    at = body.find(b'"timings_ms"')
    if at < 0:
        return None
    start = body.find(b"{", at)
    end = body.find(b"}", start)
    if start < 0 or end < 0:
        return None
    try:
        obj = json.loads(body[start:end + 1])
    except ValueError:
        return None
    return {str(k): float(v) for k, v in obj.items() if isinstance(v, int | float)}


@dataclass
class _Tally:
    """What the workers of one step collect (one event loop thread: no locks needed)."""

    scheduled: int
    sent: int = 0
    completed: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx answers only
    errors: Counter[str] = field(default_factory=Counter)
    last_done: float = 0.0
    timing_sums: Counter[str] = field(default_factory=Counter)
    timing_counts: Counter[str] = field(default_factory=Counter)
    next_index: int = 0
    refused: list[float] = field(default_factory=list)  # 503 answers: due -> answer, seconds
    refused_service: list[float] = field(default_factory=list)  # 503 answers: send -> answer
    retry_after_missing: int = 0  # 503 answers without a Retry-After header


class _Connection:
    """One keep-alive connection, (re)opened on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = False  # has answered a request: the server may have closed it since
        self.retry_after: bytes | None = None  # of the last answer

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.used = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send ``request``, read its answer. A kept-alive connection that the server closed
        while idle fails before any byte of the answer: that is retried once on a fresh
        connection, as HTTP clients do (re-ranking is idempotent), not counted as an error."""
        for attempt in range(2):
            if self.writer is None:
                await self.open()
            assert self.reader is not None and self.writer is not None
            reused = self.used
            try:
                self.writer.write(request)
                await self.writer.drain()
                status, body, close, self.retry_after = await _read_response(self.reader)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                self.close()
                stale = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
                if reused and stale and attempt == 0:
                    continue
                raise
            self.used = True
            if close:
                self.close()
            return status, body
        raise AssertionError("unreachable")


async def _worker(host: str, port: int, requests: Sequence[bytes], tally: _Tally, t0: float,
                  interval: float, deadline: float, parse_timings: bool) -> None:
    """One keep-alive connection: claim the next due request, wait for its due time, send it."""
    conn = _Connection(host, port)
    try:
        with contextlib.suppress(OSError):  # a failed connect is counted on first use
            await conn.open()
        while tally.next_index < tally.scheduled:
            i = tally.next_index
            tally.next_index += 1
            due = t0 + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return  # the rest of the schedule is late: counted from the tally at the end
            tally.sent += 1
            sent_at = time.perf_counter()
            try:
                async with asyncio.timeout(remaining):
                    status, body = await conn.exchange(requests[i % len(requests)])
            except TimeoutError:
                conn.close()
                return  # abandoned at the deadline: late
            except (OSError, EOFError, ValueError, IndexError, asyncio.LimitOverrunError):
                # IncompleteReadError is an EOFError; a garbled status line a ValueError.
                tally.errors["connection"] += 1
                tally.completed += 1
                conn.close()
                continue
            done = time.perf_counter()
            tally.completed += 1
            tally.last_done = max(tally.last_done, done)
            if 200 <= status < 300:
                tally.latencies.append(done - due)
                if parse_timings:
                    for k, v in (server_timings(body) or {}).items():
                        tally.timing_sums[k] += v
                        tally.timing_counts[k] += 1
            else:
                tally.errors[str(status)] += 1
                if status == 503:
                    tally.refused.append(done - due)
                    tally.refused_service.append(done - sent_at)
                    tally.retry_after_missing += conn.retry_after is None
    finally:
        conn.close()


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 / max / mean / min in ms (linear interpolation); None when empty."""
    keys = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms", "min_ms")
    if not seconds:
        return dict.fromkeys(keys)
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return dict(zip(keys, (float(p50), float(p95), float(p99), float(ms.max()),
                           float(ms.mean()), float(ms.min())), strict=True))


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float,
    max_requests: int,
    *,
    connections: int = 8,
    drain_s: float = 5.0,
    parse_timings: bool = True,
    sampler: Callable[[], None] | None = None,
    sample_s: float = 0.25,
) -> dict[str, Any]:
    """Offer ``rate`` requests/s (open loop) for ``duration_s`` or ``max_requests``; the stats.

    ``requests`` are complete HTTP requests (:func:`http_request`), cycled. ``sampler`` is called
    every ``sample_s`` seconds while the step runs (server memory).
    """
    if rate <= 0 or duration_s <= 0 or max_requests < 1 or connections < 1 or not requests:
        raise ValueError("rate, duration_s, max_requests, connections and requests must be > 0")
    interval = 1.0 / rate
    total = max(1, min(max_requests, math.floor(duration_s * rate + 1e-9)))
    tally = _Tally(scheduled=total)
    stop = asyncio.Event()

    async def sample_loop(sample: Callable[[], None]) -> None:
        while not stop.is_set():
            sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), sample_s)

    sampling = asyncio.create_task(sample_loop(sampler)) if sampler is not None else None
    cpu0 = os.times()
    # A short lead lets every worker open its connection before the first request is due.
    t0 = time.perf_counter() + 0.05
    deadline = t0 + (total - 1) * interval + drain_s
    workers = [_worker(host, port, requests, tally, t0, interval, deadline, parse_timings)
               for _ in range(min(connections, total))]
    await asyncio.gather(*workers)
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    stop.set()
    if sampling is not None:
        await sampling
    ok = len(tally.latencies)
    # 503 is the server shedding load by design (bounded queue): counted apart, not an error.
    shed = tally.errors.get("503", 0)
    error_count = sum(tally.errors.values()) - shed
    span = tally.last_done - t0 if tally.last_done > t0 else wall
    return {
        "offered_rps": rate,
        "duration_s": duration_s,
        "scheduled": total,
        "sent": tally.sent,
        "completed": tally.completed,
        "ok": ok,
        "errors": dict(sorted(tally.errors.items())),
        "error_count": error_count,
        "shed": shed,
        # Due but never answered in time (never sent, or abandoned at the deadline).
        "late": total - ok - error_count - shed,
        "wall_s": wall,
        "achieved_rps": ok / span if span > 0 else None,
        "latency": latency_summary(tally.latencies),
        "server_timings_ms": {k: tally.timing_sums[k] / tally.timing_counts[k]
                              for k in sorted(tally.timing_sums)},
        # 503 answers (an overload refused): from the due time, and from the send time.
        "refused_latency": latency_summary(tally.refused),
        "refused_service_latency": latency_summary(tally.refused_service),
        "retry_after_missing": tally.retry_after_missing,
        "client_cores": ((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall
                         if wall > 0 else None),
    }


def run_open_loop(host: str, port: int, requests: Sequence[bytes], rate: float,
                  duration_s: float, max_requests: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`open_loop` in a fresh event loop (blocking)."""
    return asyncio.run(open_loop(host, port, requests, rate, duration_s, max_requests, **kwargs))


async def closed_loop(host: str, port: int, requests: Sequence[bytes], connections: int,
                      duration_s: float, timeout_s: float = 10.0) -> dict[str, Any]:
    """Capacity: each of ``connections`` connections sends its next request as soon as the
    previous one is answered, for ``duration_s``; the server is never idle, so its 2xx answers
    per second are its capacity. Non-2xx answers and connection errors are counted apart."""
    if connections < 1 or duration_s <= 0 or not requests:
        raise ValueError("connections, duration_s and requests must be > 0")
    counts: Counter[str] = Counter()
    t0 = time.perf_counter()
    end = t0 + duration_s
    last_done = t0

    async def run(k: int) -> None:
        nonlocal last_done
        conn = _Connection(host, port)
        i = k
        try:
            while time.perf_counter() < end:
                try:
                    async with asyncio.timeout(timeout_s):
                        status, _ = await conn.exchange(requests[i % len(requests)])
                except (OSError, EOFError, ValueError, IndexError, asyncio.LimitOverrunError,
                        TimeoutError):
                    counts["connection"] += 1
                    conn.close()
                    continue
                counts["ok" if 200 <= status < 300 else str(status)] += 1
                last_done = max(last_done, time.perf_counter())
                i += connections
        finally:
            conn.close()

    await asyncio.gather(*(run(k) for k in range(connections)))
    span = last_done - t0
    ok = counts.pop("ok", 0)
    return {"connections": connections, "duration_s": duration_s, "ok": ok,
            "errors": dict(sorted(counts.items())),
            "capacity_rps": ok / span if ok and span > 0 else None}


def http_call(host: str, port: int, method: str, path: str, body: bytes | None = None,
              timeout: float = 10.0) -> tuple[int, bytes]:
    """One blocking request on a fresh connection (readiness, sanity pass, metrics)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the server


class ServerError(RuntimeError):
    """The server did not start, or died."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` (our child; Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServerProcess:
    """``cmd`` as a subprocess, ready once ``GET /readyz`` answers 200; a context manager that
    always stops it. stdout / stderr go to files (a pipe nobody reads could block the server)."""

    def __init__(self, cmd: Sequence[str], host: str, port: int, log_dir: Path,
                 ready_timeout_s: float = 60.0, stop_grace_s: float = 10.0) -> None:
        self.cmd, self.host, self.port = list(cmd), host, port
        self.ready_timeout_s, self.stop_grace_s = ready_timeout_s, stop_grace_s
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout.log", log_dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.died = False  # exited on its own before stop(): a crash

    def start(self) -> float:
        """Start and wait until ready; the seconds that took. ServerError with the stderr tail."""
        t0 = time.perf_counter()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # Own session: a Ctrl-C in the terminal reaches the benchmark, which stops the
            # server itself (in its finally), instead of killing the server mid-step.
            # SIGINT back to its default: a benchmark started in the background (nohup, CI)
            # ignores SIGINT, and the child would inherit that and never stop gracefully.
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_default_sigint)
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with code {self.proc.returncode} before it "
                                  f"was ready: {self.stderr_tail(1)}")
            if self.ready(timeout=1.0):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > self.ready_timeout_s:
                raise ServerError(f"server not ready after {self.ready_timeout_s:.0f} s: "
                                  f"{self.stderr_tail(1)}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self, timeout: float = 5.0) -> bool:
        try:
            return http_call(self.host, self.port, "GET", "/readyz", timeout=timeout)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no stderr)"
        return "\n".join(text[-lines:]) or "(empty stderr)"

    def stop(self) -> int | None:
        """SIGINT (graceful), then SIGTERM, then kill; the exit code."""
        if self.proc is None:
            return None
        self.died = self.died or self.proc.poll() is not None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(self.stop_grace_s if sig != signal.SIGKILL else None)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def measure_step(server: ServerProcess, requests: Sequence[bytes], rate: float,
                 duration_s: float, settings: ServingSettings, *, connections: int | None = None,
                 max_requests: int | None = None) -> dict[str, Any]:
    """One load step against ``server``, with its CPU and memory over the step
    (``connections`` and ``max_requests``: the settings' unless given)."""
    proc = psutil.Process(server.pid)
    family = [proc, *proc.children(recursive=True)]  # in case the server forks workers
    rss_peak = 0

    def sample() -> None:
        nonlocal rss_peak
        total = 0
        for p in family:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        rss_peak = max(rss_peak, total)

    def cpu() -> float:
        total = 0.0
        for p in family:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    reset = _reset_peak(server.pid)
    probe = CpuProbe()
    cpu0, t0 = cpu(), time.perf_counter()
    step = run_open_loop(settings.host, server.port, requests, rate, duration_s,
                         max_requests or settings.max_requests,
                         connections=connections or settings.connections,
                         drain_s=settings.drain_s, sampler=sample, sample_s=settings.sample_s)
    server_cores = (cpu() - cpu0) / max(time.perf_counter() - t0, 1e-9)
    busy, _ = probe.measure()
    hwm = _status_kib(server.pid, "VmHWM")
    step["server"] = {
        "cpu_percent": 100.0 * server_cores,  # 100 = one core busy all the step
        "rss_peak_sampled_mib": rss_peak / 2**20 if rss_peak else None,
        "vmhwm_mib": hwm / 1024 if hwm is not None else None,
        # False: VmHWM is the process's lifetime peak (start-up and earlier steps included).
        "vmhwm_reset": reset,
        "alive": server.alive(),
    }
    peaks = [x for x in (step["server"]["rss_peak_sampled_mib"],
                         step["server"]["vmhwm_mib"] if reset else None) if x is not None]
    step["server"]["peak_rss_mib"] = max(peaks) if peaks else step["server"]["vmhwm_mib"]
    # The server is our child but not yet waited for, so the probe counts it as "other".
    step["other_processes_cores"] = (max(busy - server_cores, 0.0) if busy is not None
                                     else None)
    return step


def stop_reason(step: Mapping[str, Any], settings: ServingSettings) -> str | None:
    """Why the ramp ends after ``step`` (None: go on to the next rate)."""
    if not step["server"]["alive"]:
        return "server died"
    if step["error_count"]:
        return f"errors {step['errors']}"
    if step.get("shed"):  # past capacity: higher rates would only be refused
        return (f"shedding load: {step['shed']} of {step['scheduled']} requests answered 503 "
                "(the bounded queue was full)")
    if step["late"]:
        return (f"overloaded: {step['late']} of {step['scheduled']} requests unanswered "
                f"{settings.drain_s:g} s after their due time")
    p99 = step["latency"]["p99_ms"]
    if p99 is not None and p99 > settings.p99_cutoff_ms:
        return f"p99 {p99:,.0f} ms > cut-off {settings.p99_cutoff_ms:,.0f} ms"
    return None


def _rss_mib(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return None


def overload_step(server: ServerProcess, requests: Sequence[bytes],
                  settings: ServingSettings) -> dict[str, Any]:
    """Capacity (closed loop), then an open-loop step at ``overload_factor`` x capacity from
    ``overload_connections`` connections; see the module doc."""
    wait_for_quiet(settings.busy_cores, settings.max_wait_quiet_s)
    capacity = asyncio.run(closed_loop(settings.host, server.port, requests,
                                       settings.capacity_connections,
                                       settings.capacity_duration_s))
    out: dict[str, Any] = {"capacity": capacity, "capacity_rps": capacity["capacity_rps"],
                           "factor": settings.overload_factor,
                           "connections": settings.overload_connections}
    if not capacity["capacity_rps"]:
        out["error"] = f"no 2xx answer while measuring capacity: {capacity['errors']}"
        return out
    rate = settings.overload_factor * capacity["capacity_rps"]
    waited = wait_for_quiet(settings.busy_cores, settings.max_wait_quiet_s)
    rss_before = _rss_mib(server.pid)
    step = measure_step(server, requests, rate, settings.overload_duration_s, settings,
                        connections=settings.overload_connections,
                        max_requests=settings.overload_max_requests)
    time.sleep(settings.sample_s)  # answers just sent: let the server settle before sampling
    rss_after = _rss_mib(server.pid)
    refused = step["errors"].get("503", 0)
    other = {k: v for k, v in step["errors"].items() if k != "503"}
    growth = (rss_after - rss_before if rss_after is not None and rss_before is not None
              else None)
    out |= {
        "offered_rps": rate,
        "scheduled": step["scheduled"],
        "admitted": step["ok"],
        "refused_503": refused,
        "refused_share": refused / step["scheduled"] if step["scheduled"] else None,
        "other_errors": other,
        "other_error_count": sum(other.values()),
        "late": step["late"],
        "retry_after_missing": step["retry_after_missing"],
        "achieved_rps": step["achieved_rps"],
        "admitted_latency": step["latency"],
        "refused_latency": step["refused_latency"],
        "refused_service_latency": step["refused_service_latency"],
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "rss_growth_mib": growth,
        "rss_growth_share": growth / rss_before if growth is not None and rss_before else None,
        "server": step["server"],
        "server_timings_ms": step["server_timings_ms"],
        "client_cores": step["client_cores"],
        "other_processes_cores": step["other_processes_cores"],
        "waited_for_quiet_s": waited,
        "ready_after": server.ready(),
    }
    return out


def _overload_line(cfg: Mapping[str, Any], o: Mapping[str, Any]) -> str:
    if "error" in o:
        return f"{cfg['backend']} {cfg['preset']} overload: {o['error']}"
    return (f"{cfg['backend']} {cfg['preset']} overload: capacity {_num(o['capacity_rps'])}/s, "
            f"offered {_num(o['offered_rps'])}/s from {o['connections']} connections: "
            f"admitted {o['admitted']} (p99 {_ms(o['admitted_latency']['p99_ms'])} ms), "
            f"503 {o['refused_503']} ({100 * (o['refused_share'] or 0):.0f} %, p99 "
            f"{_ms(o['refused_service_latency']['p99_ms'])} ms from send), other errors "
            f"{o['other_error_count']}, late {o['late']}, RSS {_num(o['rss_before_mib'])} -> "
            f"{_num(o['rss_after_mib'])} MiB")


# ---------------------------------------------------------------------------- sanity pass


def malformed_body(kind: str, payload: Mapping[str, Any]) -> bytes:
    """A ``POST /v1/rerank`` body that a correct server must answer 4xx (``payload`` valid)."""
    if kind == "not_json":
        return b'{"candidates": this is not JSON'
    p = copy.deepcopy(dict(payload))
    c = p["candidates"]
    if kind == "nan":
        c["upstream_score"][0] = float("nan")  # json.dumps writes the non-standard literal NaN
    elif kind == "duplicate_id":
        c["ids"][1] = c["ids"][0]
    elif kind == "m_gt_n":
        p["m"] = len(c["ids"]) + 1
    elif kind == "unknown_feature":
        group = "dense" if c.get("dense") else "cat"
        c[group]["no_such_feature"] = [0] * len(c["ids"])
    elif kind == "empty_candidates":
        for key, value in c.items():
            c[key] = {name: [] for name in value} if isinstance(value, dict) else []
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; known: {MALFORMED_KINDS}")
    return json.dumps(p).encode()


def sanity_pass(host: str, port: int, payloads: Sequence[Mapping[str, Any]],
                count: int = 20) -> dict[str, Any]:
    """``count`` malformed requests, one at a time: each must get a 4xx; then ``/readyz``."""
    answers: list[dict[str, Any]] = []
    for i in range(count):
        kind = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
        try:
            body = malformed_body(kind, payloads[i % len(payloads)])
        except (KeyError, IndexError, TypeError) as exc:  # the payload format changed
            answers.append({"kind": kind, "status": None, "error": f"could not build: {exc!r}"})
            continue
        try:
            status, _ = http_call(host, port, "POST", RERANK_PATH, body)
            answers.append({"kind": kind, "status": status})
        except (OSError, http.client.HTTPException) as exc:
            answers.append({"kind": kind, "status": None, "error": repr(exc)})
    try:
        ready = http_call(host, port, "GET", "/readyz", timeout=5.0)[0] == 200
    except (OSError, http.client.HTTPException):
        ready = False
    bad = [a for a in answers if a["status"] is None or not 400 <= a["status"] < 500]
    by_kind: dict[str, list[int | None]] = {}
    for a in answers:
        by_kind.setdefault(a["kind"], []).append(a["status"])
    return {"sent": count, "answered_4xx": count - len(bad), "by_kind": by_kind,
            "not_4xx": bad, "ready_after": ready, "passed": not bad and ready}


def metrics_counters(text: str, limit: int = 60) -> dict[str, float]:
    """The ``*_total`` samples of a Prometheus text exposition (request counters and the like)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        if name.split("{", 1)[0].endswith("_total"):
            with contextlib.suppress(ValueError):
                out[name] = float(value)
        if len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------- inputs


def train_overrides(settings: ServingSettings) -> tuple[str, ...]:
    # The whole decode table: "decode.alpha=0.05" would be typed after the packaged "auto"
    # and stored as the string "0.05", which decoding later rejects.
    decode = json.dumps({"name": "contrastive", "alpha": settings.contrastive_alpha})
    return (f"train.epochs={settings.train_epochs}", f"train.seed={settings.seed}",
            "train.progress=false", f"decode={decode}")


def prepare_inputs(preset: str, settings: ServingSettings, work: Path,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Data set, short-trained run and ONNX export of ``preset`` under ``work`` (reused when a
    previous run with the same settings left them there)."""
    from genrerank.data.simulator import simulate_to_dir
    from genrerank.experiment import train_run

    info: dict[str, Any] = {}
    data_dir = work / "data" / preset
    if not data_dir.exists():
        say(f"{preset}: simulating {settings.n_requests} requests")
        t0 = time.perf_counter()
        simulate_to_dir(preset, settings.n_requests, settings.data_seed, data_dir,
                        progress=False)
        info["simulate_s"] = time.perf_counter() - t0
    info["data_dir"] = str(data_dir)

    run_dir = work / "runs" / preset / MODEL
    marker = run_dir / "bench_serving_train.json"
    overrides = list(train_overrides(settings))
    done = json.loads(marker.read_text()) if marker.exists() else None
    if done is None or done.get("overrides") != overrides:
        say(f"{preset}: training {MODEL} ({settings.train_epochs} epoch(s); speed, not quality)")
        t0 = time.perf_counter()
        best = train_run(MODEL, data_dir, run_dir, overrides=tuple(overrides), overwrite=True)
        done = {"overrides": overrides, "best_valid": best, "train_s": time.perf_counter() - t0}
        atomic_write_json(marker, _json_safe(done))
        (work / "onnx" / f"{preset}.bench_serving_export.json").unlink(missing_ok=True)  # stale
    info["run_dir"] = str(run_dir)
    info["training"] = done

    onnx_dir = work / "onnx" / preset
    marker = onnx_dir.parent / f"{preset}.bench_serving_export.json"
    if "onnx" not in settings.backends:
        return info
    try:
        from genrerank.serving.export import export_run
    except ImportError as exc:
        info["onnx_skipped"] = f"genrerank.serving.export.export_run not importable: {exc}"
        return info
    if marker.exists():
        info["export"] = json.loads(marker.read_text())
    else:
        say(f"{preset}: exporting to ONNX")
        t0 = time.perf_counter()
        try:
            report = export_run(run_dir, onnx_dir)
        except Exception as exc:  # a failed export must not lose the torch measurements
            info["onnx_skipped"] = f"export_run failed: {type(exc).__name__}: {exc}"
            return info
        info["export"] = {"report": _json_safe(report), "export_s": time.perf_counter() - t0}
        atomic_write_json(marker, info["export"])
    info["onnx_dir"] = str(onnx_dir)
    return info


def request_pool(data_dir: str | Path, m: int, size: int) -> list[dict[str, Any]]:
    """JSON payloads of the first ``size`` test-split requests."""
    from genrerank.data.dataset import RerankDataset
    from genrerank.serving.schema import payload_from_dataset

    test = RerankDataset(data_dir, split="test")
    if len(test) == 0:
        raise ValueError(f"{data_dir}: the test split is empty")
    return [payload_from_dataset(test, i, m=m) for i in range(min(size, len(test)))]


def server_command(backend_args: Sequence[str], host: str, port: int,
                   threads: int, max_queue: int | None = None) -> list[str]:
    exe = Path(sys.executable).parent / "genrerank"
    extra = [] if max_queue is None else ["--max-queue", str(max_queue)]
    return [str(exe), "serve", *backend_args, "--host", host, "--port", str(port),
            "--threads", str(threads), *extra]


# ---------------------------------------------------------------------------- one configuration


def run_config(backend: str, backend_args: Sequence[str], preset: str, n: int, m: int,
               payloads: Sequence[Mapping[str, Any]], settings: ServingSettings,
               log_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Start the server, sanity pass, warm-up, the ramp; always stops the server."""
    port = free_port(settings.host)
    cmd = server_command(backend_args, settings.host, port, settings.threads,
                         settings.max_queue)
    cfg: dict[str, Any] = {"backend": backend, "preset": preset, "n": n, "m": m,
                           "command": cmd, "pool": len(payloads), "steps": []}
    requests = [http_request(settings.host, port, RERANK_PATH,
                             json.dumps(p, separators=(",", ":")).encode()) for p in payloads]
    cfg["mean_request_bytes"] = float(np.mean([len(r) for r in requests]))
    server = ServerProcess(cmd, settings.host, port, log_dir, settings.ready_timeout_s,
                           settings.stop_grace_s)
    try:
        with server:
            cfg["startup_s"] = server.start()
            cfg["rss_after_start_mib"] = psutil.Process(server.pid).memory_info().rss / 2**20
            cfg["sanity"] = sanity_pass(settings.host, port, payloads,
                                        settings.malformed_requests)
            say(f"{backend} {preset}: ready in {cfg['startup_s']:.1f} s; sanity pass "
                f"{cfg['sanity']['answered_4xx']}/{settings.malformed_requests} answered 4xx, "
                f"ready after: {cfg['sanity']['ready_after']}")
            warm = measure_step(server, requests, settings.rates[0], settings.warmup_s,
                                settings)
            cfg["warmup"] = {k: warm[k] for k in ("offered_rps", "scheduled", "ok", "errors",
                                                  "late", "latency")}
            for rate in settings.rates:
                waited = wait_for_quiet(settings.busy_cores, settings.max_wait_quiet_s)
                step = measure_step(server, requests, rate, settings.duration_s, settings)
                step["waited_for_quiet_s"] = waited
                cfg["steps"].append(step)
                say(_step_line(cfg, step))
                reason = stop_reason(step, settings)
                if reason:
                    cfg["stopped"] = {"after_rps": rate, "reason": reason}
                    say(f"{backend} {preset}: ramp stopped at {rate:g} requests/s: {reason}")
                    break
            if settings.overload and preset in settings.overload_presets and server.alive():
                cfg["overload"] = overload_step(server, requests, settings)
                say(_overload_line(cfg, cfg["overload"]))
            cfg["ready_after"] = server.ready()
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, text = http_call(settings.host, port, "GET", "/metrics")
                cfg["metrics"] = {"status": status,
                                  "counters": metrics_counters(text.decode(errors="replace"))}
    except ServerError as exc:
        cfg["error"] = str(exc)
        say(f"{backend} {preset}: {exc}")
    cfg["crashed"] = server.died
    cfg["exit_code"] = server.proc.returncode if server.proc is not None else None
    if cfg["crashed"] or "error" in cfg:
        cfg["stderr_tail"] = server.stderr_tail()
    return cfg


def _step_line(cfg: Mapping[str, Any], s: Mapping[str, Any]) -> str:
    lat = s["latency"]
    return (f"{cfg['backend']} {cfg['preset']} @ {s['offered_rps']:g}/s: achieved "
            f"{_num(s['achieved_rps'])}/s, p50 {_ms(lat['p50_ms'])} p99 {_ms(lat['p99_ms'])} ms, "
            f"errors {s['error_count']}, 503 {s.get('shed', 0)}, late {s['late']}, server CPU "
            f"{s['server']['cpu_percent']:.0f} %, client {100 * (s['client_cores'] or 0):.0f} %")


def run_triton_config(info: Mapping[str, Any], preset: str, n: int, m: int,
                      payloads: Sequence[Mapping[str, Any]], settings: ServingSettings,
                      work: Path, say: Callable[[str], None]) -> dict[str, Any] | str:
    """The ``triton`` configuration: the export's repository (Python-backend CPU stand-in) on
    a real tritonserver, the parity comparison, then :func:`run_config` with the service on
    ``--model-server``; the reason as a string when tritonserver cannot run here."""
    import tritonclient.grpc as grpcclient

    from genrerank.serving.runtime import load_reranker
    from genrerank.serving.triton.compare import compare_services, parity_inputs
    from genrerank.serving.triton.launcher import TritonProcess, TritonUnavailable
    from genrerank.serving.triton.repository import model_names, write_repository

    repo = work / "triton" / preset
    write_repository(info["onnx_dir"], repo, backend="python", threads=settings.threads)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    try:
        triton = TritonProcess(repo, log_path=work / "logs" / f"tritonserver-{preset}.log")
        triton.start()
    except TritonUnavailable as exc:
        return str(exc)
    try:
        say(f"triton {preset}: tritonserver ready on {triton.url}; parity with ONNX Runtime")
        remote = load_reranker(model_server=triton.url)
        local = load_reranker(onnx_dir=info["onnx_dir"])
        lengths = tuple(sorted({1, min(3, m), m}))
        parity = compare_services(remote, local, parity_inputs(remote.spec,
                                                               remote.strategies[0], lengths))
        say(f"triton {preset}: parity set: {parity['identical_lists']}/{parity['requests']} "
            f"identical lists, max score difference {parity['max_score_diff']:.2g}")
        model = model_names(MODEL)["model"]
        client = grpcclient.InferenceServerClient(triton.url)
        before = client.get_inference_statistics(model).model_stats[0]
        proc = psutil.Process(triton.proc.pid) if triton.proc is not None else None
        cpu0 = _family_cpu(proc)
        t0 = time.perf_counter()
        args = ["--model-server", triton.url, "--model-workers", str(settings.triton_workers)]
        cfg = run_config("triton", args, preset, n, m, payloads, settings,
                         work / "logs" / f"triton-{preset}", say)
        after = client.get_inference_statistics(model).model_stats[0]
        inferences = after.inference_count - before.inference_count
        executions = after.execution_count - before.execution_count
        cfg["parity"] = parity
        cfg["triton"] = {
            "repository": "python-backend CPU stand-in (model.py runs model.onnx with ONNX "
                          "Runtime), dynamic batching",
            "service_model_workers": settings.triton_workers,
            "inferences": inferences, "executions": executions,
            "mean_batch": inferences / executions if executions else None,
            # tritonserver + its Python stubs, over the whole configuration.
            "cpu_cores_mean": (_family_cpu(proc) - cpu0) / (time.perf_counter() - t0),
        }
        say(f"triton {preset}: {inferences} model inferences in {executions} executions "
            f"(mean batch {_num(cfg['triton']['mean_batch'], 2)})")
        return cfg
    finally:
        triton.stop()


def _family_cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# ---------------------------------------------------------------------------- targets


def serving_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the measurements (never tuned to them)."""
    configs = result["configs"]
    out: list[dict[str, Any]] = []
    for backend in result["settings"]["backends"]:
        label = (f"service p99 <= {TARGET_P99_MS:g} ms at {TARGET_RATE:g} requests/s, "
                 f"n = {TARGET_N} ({backend})")
        line: dict[str, Any] = {"target": label, "backend": backend, "value": None}
        cfg = next((c for c in configs if c["backend"] == backend and c["n"] == TARGET_N), None)
        skipped = next((why for key, why in result.get("skipped", {}).items()
                        if key.split()[0] == backend), None)
        if cfg is None or "error" in cfg:
            why = skipped or (cfg or {}).get("error") or f"no n = {TARGET_N} configuration"
            line |= {"status": "not measured", "note": str(why).splitlines()[0]}
        else:
            step = next((s for s in cfg["steps"] if s["offered_rps"] == TARGET_RATE), None)
            if step is None and cfg.get("stopped"):
                line |= {"status": "not met", "note": f"ramp stopped at "
                         f"{cfg['stopped']['after_rps']:g} requests/s: "
                         f"{cfg['stopped']['reason']}"}
            elif step is None:
                line |= {"status": "not measured",
                         "note": f"{TARGET_RATE:g} requests/s not in the rates"}
            else:
                p99 = step["latency"]["p99_ms"]
                clean = not step["error_count"] and not step["late"] and not step.get("shed")
                line |= {"value": p99, "status": "met" if clean and p99 is not None
                         and p99 <= TARGET_P99_MS else "not met"}
                if not clean:
                    line["note"] = (f"{step['error_count']} errors, {step.get('shed', 0)} "
                                    f"answered 503, {step['late']} late")
        out.append(line)
    problems: list[str] = []
    ran = [c for c in configs if "error" not in c]
    overloaded = sum(1 for c in ran for s in c["steps"] if s["late"])
    shedding = sum(1 for c in ran for s in c["steps"] if s.get("shed"))
    timeouts = any("504" in s["errors"] for c in ran for s in c["steps"])
    for c in configs:
        name = f"{c['backend']} {c['preset']}"
        if "error" in c:
            problems.append(f"{name}: {str(c['error']).splitlines()[0]}")
            continue
        if c.get("crashed"):
            problems.append(f"{name}: server exited (code {c.get('exit_code')})")
        elif not c.get("ready_after", False):
            problems.append(f"{name}: not ready after the ramp")
        for s in c["steps"]:
            if s["error_count"]:
                problems.append(f"{name} @ {s['offered_rps']:g}/s: errors {s['errors']}")
        san = c.get("sanity") or {}
        if not san.get("passed", False):
            problems.append(f"{name}: sanity pass {san.get('answered_4xx')}/{san.get('sent')} "
                            f"answered 4xx, ready after: {san.get('ready_after')}")
    notes = problems + (["504 = the server's own time-out of a queued model call"]
                        if timeouts else [])
    if overloaded:  # the client gave up on them: the server was too slow, not wrong
        notes.append(f"{overloaded} overloaded step(s) with late answers, not counted as errors")
    if shedding:  # the bounded queue refusing the excess: the designed answer to overload
        notes.append(f"{shedding} step(s) at or past capacity shed load with 503 + Retry-After, "
                     "not counted as errors")
    out += triton_targets(result)
    line = {
        "target": "no errors and no crash under load; every malformed request answered 4xx",
        "value": None,
        "status": "not measured" if not ran and not problems else
                  "met" if not problems else "not met",
    }
    if notes:
        line["note"] = "; ".join(notes)
    out.append(line)
    out += overload_targets(result)
    return out


def triton_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's Triton targets: the same lists as in-process ONNX Runtime on the parity set;
    200 requests/s held at n = 60 with 0 errors (no 503, no late answer, >= 95 % achieved)."""
    out: list[dict[str, Any]] = []
    for c in result["configs"]:
        if c["backend"] != "triton":
            continue
        parity = c.get("parity") or {}
        same = parity.get("identical_lists")
        out.append({
            "target": f"Triton-backed service answers the same lists as in-process ONNX Runtime "
                      f"on the parity request set (n = {c['n']} configuration)",
            "value": None,
            "status": "not measured" if same is None else
                      "met" if same == parity["requests"] else "not met",
            "note": f"{same}/{parity.get('requests')} identical lists, max score difference "
                    f"{parity.get('max_score_diff', float('nan')):.2g}" if same is not None
                    else None,
        })
        if c["n"] != TARGET_N:
            continue
        step = next((s for s in c.get("steps", []) if s["offered_rps"] == TARGET_RATE), None)
        line: dict[str, Any] = {"target": f"Triton-backed service holds {TARGET_RATE:g} "
                                          f"requests/s at n = {TARGET_N} with 0 errors",
                                "value": None}
        if step is None:
            line |= {"status": "not met" if c.get("stopped") else "not measured",
                     "note": f"ramp stopped: {c['stopped']['reason']}" if c.get("stopped")
                     else f"{TARGET_RATE:g} requests/s not reached"}
        else:
            held = (not step["error_count"] and not step["late"] and not step.get("shed")
                    and (step["achieved_rps"] or 0) >= 0.95 * TARGET_RATE)
            line |= {"status": "met" if held else "not met",
                     "note": f"achieved {_num(step['achieved_rps'])}/s, p99 "
                             f"{_ms(step['latency']['p99_ms'])} ms, errors "
                             f"{step['error_count']}, 503 {step.get('shed', 0)}, late "
                             f"{step['late']}"}
        out.append(line)
    return out


def overload_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's overload targets, for each configuration that ran the overload step."""
    out: list[dict[str, Any]] = []
    for c in result["configs"]:
        o = c.get("overload")
        if o is None:
            continue
        name = f"{c['backend']}, n = {c['n']}"
        factor = o.get("factor", result["settings"].get("overload_factor", 2.0))
        where = f"overload at {factor:g}x capacity ({name})"
        lines = [
            {"target": f"{where}: admitted p99 < {TARGET_OVERLOAD_P99_MS:g} ms", "value": None},
            {"target": f"{where}: excess answered 503 in < {TARGET_REFUSAL_MS:g} ms (p99, send "
                       "to answer)", "value": None},
            {"target": f"{where}: 0 other errors, 503s with Retry-After, RSS flat (<= "
                       f"{100 * TARGET_RSS_GROWTH:g} % growth)", "value": None},
        ]
        if "error" in o:
            for line in lines:
                line |= {"status": "not measured", "note": str(o["error"])}
            out += lines
            continue
        admitted, refused = o["admitted_latency"]["p99_ms"], o["refused_service_latency"]["p99_ms"]
        for line, value, limit in ((lines[0], admitted, TARGET_OVERLOAD_P99_MS),
                                   (lines[1], refused, TARGET_REFUSAL_MS)):
            line["value"] = value
            line["status"] = ("not measured" if value is None else
                              "met" if value < limit else "not met")
        if not o["refused_503"]:
            lines[1]["note"] = "no request was refused: the step did not overload the server"
        growth = o.get("rss_growth_share")
        clean = not o["other_error_count"] and not o["late"] and not o["retry_after_missing"]
        lines[2]["status"] = ("not measured" if growth is None else
                              "met" if clean and growth <= TARGET_RSS_GROWTH else "not met")
        lines[2]["note"] = (f"other errors {o['other_errors'] or 0}, late {o['late']}, 503s "
                            f"without Retry-After {o['retry_after_missing']}, RSS "
                            f"{_num(o['rss_before_mib'])} -> {_num(o['rss_after_mib'])} MiB")
        out += lines
    return out


# ---------------------------------------------------------------------------- the benchmark


def _versions() -> dict[str, str | None]:
    try:
        import onnxruntime

        ort: str | None = onnxruntime.__version__
    except ImportError:
        ort = None
    return {"onnxruntime": ort}


def run_serving_benchmark(
    settings: ServingSettings,
    out_dir: Path,
    *,
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; writes ``serving[_quick].{json,md}`` and returns the JSON."""
    unknown = [p for p in settings.presets if p not in PRESETS]
    unknown += [b for b in settings.backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown preset(s) / backend(s) {unknown}; presets {list(PRESETS)}, "
                         f"backends {list(BACKENDS)}")
    if not settings.rates or min(settings.rates) <= 0 or list(settings.rates) != sorted(
            settings.rates):
        raise ValueError(f"rates must be positive and rising, got {settings.rates}")
    from genrerank.data.simulator.presets import get_preset

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    started_at = dt.datetime.now(dt.UTC)
    t_start = time.perf_counter()
    load_start = _load()
    own_work = settings.work_dir is None
    work = Path(settings.work_dir or tempfile.mkdtemp(prefix="genrerank-serving-"))
    say(f"serving benchmark ({'quick' if settings.is_quick else 'full'}), work folder {work}")
    configs: list[dict[str, Any]] = []
    inputs: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    try:
        for preset in settings.presets:
            sim = get_preset(preset)
            n, m = sim.n_candidates, sim.list_length
            info = inputs[preset] = prepare_inputs(preset, settings, work, say)
            payloads = request_pool(info["data_dir"], m, settings.pool_size)
            for backend in settings.backends:
                if backend in ("onnx", "triton") and "onnx_dir" not in info:
                    why = skipped[f"{backend} {preset}"] = info.get("onnx_skipped",
                                                                    "no ONNX export")
                    say(f"{backend} {preset}: skipped: {why}")
                    continue
                if backend == "triton":
                    cfg = run_triton_config(info, preset, n, m, payloads, settings, work, say)
                    if isinstance(cfg, str):
                        skipped[f"triton {preset}"] = cfg
                        say(f"triton {preset}: skipped: {cfg}")
                    else:
                        configs.append(cfg)
                    continue
                args = (["--run", info["run_dir"]] if backend == "torch"
                        else ["--onnx", info["onnx_dir"]])
                configs.append(run_config(backend, args, preset, n, m, payloads, settings,
                                          work / "logs" / f"{backend}-{preset}", say))
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t_start
    result: dict[str, Any] = {
        "benchmark": "serving",
        "quick": settings.is_quick,
        "date": started_at.isoformat(timespec="seconds"),
        "wall_time_s": wall,
        "machine": {**machine_info(settings.threads), **_versions(),
                    "mode": f"genrerank serve subprocess, --threads {settings.threads}; load "
                            "generator in the benchmark process on the same machine"},
        "load_average": {"start": load_start, "end": _load()},
        "settings": asdict(settings),
        "model": {
            "name": MODEL,
            "training": f"short-trained: {settings.train_epochs} epoch(s) on "
                        f"{settings.n_requests} simulated requests per preset (80 % train); "
                        "the benchmark measures speed, not quality",
            "overrides": list(train_overrides(settings)),
        },
        # Paths only where they outlive the run (a given work_dir; a temporary one is deleted).
        "inputs": {p: {k: v for k, v in i.items() if not (own_work and k.endswith("_dir"))}
                   for p, i in inputs.items()},
        "load_method": LOAD_METHOD,
        "skipped": skipped,
        "configs": configs,
    }
    result["targets"] = serving_targets(result)
    result = _json_safe(result)
    if write:
        paths = output_paths(out_dir, settings.is_quick, settings.out_stem)
        atomic_write_json(paths["json"], result)
        atomic_write_text(paths["md"], serving_markdown(result))
    say(render_targets(result))
    if write:
        say(f"wrote {paths['json']} and {paths['md']} in {wall:.0f}s")
    return result


# ---------------------------------------------------------------------------- Markdown


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def steps_table(result: Mapping[str, Any]) -> str:
    rows = []
    for c in result["configs"]:
        for s in c["steps"]:
            lat, srv = s["latency"], s["server"]
            errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
            if s["late"]:
                errors += f" (+{s['late']} late)"
            rows.append({
                "backend": c["backend"], "n": c["n"], "offered rps": _num(s["offered_rps"], 0),
                "achieved rps": _num(s["achieved_rps"]), "p50 ms": _ms(lat["p50_ms"]),
                "p95 ms": _ms(lat["p95_ms"]), "p99 ms": _ms(lat["p99_ms"]),
                "max ms": _ms(lat["max_ms"]), "errors": errors,
                "server model ms": _ms(s.get("server_timings_ms", {}).get("model")),
                "peak server RSS MiB": _num(srv["peak_rss_mib"]),
                "server CPU %": _num(srv["cpu_percent"], 0),
                "other CPU": _num(s.get("other_processes_cores"), 2),
            })
    return markdown_table(rows)


def overload_table(result: Mapping[str, Any]) -> str:
    rows = []
    for c in result["configs"]:
        o = c.get("overload")
        if o is None or "error" in o:
            continue
        adm, ref, svc = o["admitted_latency"], o["refused_latency"], o["refused_service_latency"]
        others = ", ".join(f"{k}: {v}" for k, v in o["other_errors"].items()) or "0"
        if o["late"]:
            others += f" (+{o['late']} late)"
        rows.append({
            "backend": c["backend"], "n": c["n"], "capacity rps": _num(o["capacity_rps"]),
            "offered rps": _num(o["offered_rps"]), "sent": o["scheduled"],
            "admitted p50 ms": _ms(adm["p50_ms"]), "admitted p99 ms": _ms(adm["p99_ms"]),
            "503 share": f"{100 * (o['refused_share'] or 0):.1f} %",
            "503 p99 ms (from due)": _ms(ref["p99_ms"]),
            "503 p99 ms (from send)": _ms(svc["p99_ms"]),
            "no Retry-After": o["retry_after_missing"], "other errors": others,
            "RSS before -> after MiB": f"{_num(o['rss_before_mib'])} -> "
                                       f"{_num(o['rss_after_mib'])}",
        })
    return markdown_table(rows)


def render_targets(result: Mapping[str, Any]) -> str:
    lines = ["Targets:"]
    for t in result["targets"]:
        value = "" if t.get("value") is None else f" measured {_ms(t['value'])} ms:"
        status = "NOT met" if t["status"] == "not met" else t["status"]
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"- {t['target']}:{value} {status}{note}")
    return "\n".join(lines)


def serving_markdown(result: Mapping[str, Any]) -> str:
    """The Markdown report of a result dict (as :func:`run_serving_benchmark` returns)."""
    s, mach = result["settings"], result["machine"]
    quick = result["quick"]
    lines = [
        f"# Serving benchmark{' (quick)' if quick else ''}",
        "",
        f"Date: {result['date']}. Wall time: {result['wall_time_s'] / 60:.1f} min. Machine: "
        f"{mach.get('cpu')}, {mach.get('cpu_count')} cores, torch {mach.get('torch')}, "
        f"onnxruntime {mach.get('onnxruntime')}, Python {mach.get('python')}. "
        f"{mach.get('mode')}.",
        "",
        f"Model: {result['model']['name']}, {result['model']['training']}. Requests: the first "
        f"{s['pool_size']} requests of each data set's test split, cycled.",
        "",
        f"Load: {result['load_method']}. {s['connections']} connections; each step "
        f"{s['duration_s']:g} s or {s['max_requests']} requests, whichever comes first, after "
        f"an unrecorded {s['warmup_s']:g} s warm-up; answers later than {s['drain_s']:g} s "
        "after their due time are abandoned (`late`). A step with errors, 503s, late answers or "
        f"p99 > {s['p99_cutoff_ms']:g} ms ends that configuration's ramp. Errors = non-2xx "
        "answers but 503 (load shed by the bounded queue, listed apart) and connection errors. "
        "Peak server RSS = the kernel's VmHWM of the server "
        "process, reset at the start of each step where possible, or the highest sampled "
        "RSS; server CPU 100 % = one core; server model ms = the mean `timings_ms.model` "
        "the server reports (the model call alone, without HTTP, parsing and queueing); "
        "other CPU = cores used by other processes during the step (0 = a quiet machine; "
        "the load generator and the server share it).",
        "",
        "## Steps",
        "",
        steps_table(result) or "(no step ran)",
        "",
    ]
    busy = [f"{c['backend']} n = {c['n']} at {st['offered_rps']:g}/s "
            f"({st['other_processes_cores']:.1f})"
            for c in result["configs"] for st in c["steps"]
            if (st.get("other_processes_cores") or 0.0) > s["busy_cores"]]
    if busy:
        lines += ["**Warning**: other processes used more than "
                  f"{s['busy_cores']:g} cores (in brackets) during " + ", ".join(busy)
                  + "; those steps competed with them for the CPU, so their latencies are "
                  "inflated.", ""]
    notes = []
    for c in result["configs"]:
        name = f"{c['backend']}, n = {c['n']}"
        if "error" in c:
            notes.append(f"- {name}: **failed**: {str(c['error']).splitlines()[0]}")
            continue
        san = c.get("sanity") or {}
        stop = c.get("stopped")
        notes.append(
            f"- {name}: ready in {_num(c.get('startup_s'))} s; sanity pass "
            f"{san.get('answered_4xx')}/{san.get('sent')} malformed requests answered 4xx, "
            f"ready afterwards: {'yes' if san.get('ready_after') else 'NO'}; "
            + (f"ramp stopped after {stop['after_rps']:g} requests/s ({stop['reason']}); "
               if stop else "ramp completed; ")
            + f"server {'CRASHED' if c.get('crashed') else 'alive'}"
            + (", ready" if c.get("ready_after") else ", NOT ready") + " at the end.")
        tri = c.get("triton")
        if tri:
            par = c.get("parity") or {}
            notes.append(
                f"- {name}: Triton {tri['repository']}; service with "
                f"{tri['service_model_workers']} model calls in flight; {tri['inferences']} "
                f"inferences in {tri['executions']} executions (mean batch "
                f"{_num(tri['mean_batch'], 2)}); tritonserver + stub CPU "
                f"{_num(100 * tri['cpu_cores_mean'], 0)} % on average (not in the server CPU "
                f"column); parity set {par.get('identical_lists')}/{par.get('requests')} "
                "identical lists vs in-process ONNX Runtime.")
    for backend, why in result.get("skipped", {}).items():
        notes.append(f"- {backend}: skipped: {why}")
    if notes:
        lines += ["## Configurations", "", *notes, ""]
    overloads = [c for c in result["configs"] if c.get("overload") is not None]
    if overloads:
        lines += [
            "## Overload",
            "",
            f"After the ramp, on the same server: capacity measured closed loop "
            f"({s.get('capacity_connections')} connections, each sending its next request as "
            f"soon as the previous one is answered, {s.get('capacity_duration_s')} s; 2xx "
            "answers per second), then an open-loop step at "
            f"{s.get('overload_factor')}x that rate from {s.get('overload_connections')} "
            f"connections for {s.get('overload_duration_s')} s (or "
            f"{s.get('overload_max_requests')} requests). Admitted = 2xx answers, latency from "
            "the due time; 503 latency from the due time and from the send time (how fast the "
            "server refuses); RSS of the server right before and after the step.",
            "",
            overload_table(result) or "(no overload step completed)",
            "",
        ]
        lines += [f"- {c['backend']}, n = {c['n']}: **failed**: {c['overload']['error']}"
                  for c in overloads if "error" in c["overload"]]
        if any("error" in c["overload"] for c in overloads):
            lines.append("")
    lines += [
        "## " + render_targets(result).replace("Targets:", "Targets\n"),
        "",
        f"Reproduce: `genrerank bench serving{' --quick' if quick else ''}"
        # A named run is a load-only run (the model-time part writes serving_model.* itself).
        + (" --skip-model-time" if s.get("out_stem") else "")
        + (f" --backends {','.join(s['backends'])}" if tuple(s["backends"]) != DEFAULT_BACKENDS
           else "")
        + (f" --out-stem {s['out_stem']}" if s.get("out_stem") else "")
        + "`; every step (server stage timings, CPU, memory, waiting for quiet) is in "
        f"`{s.get('out_stem') or ('serving_quick' if quick else 'serving')}.json`.",
        "",
    ]
    return "\n".join(lines)
