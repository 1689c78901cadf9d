"""The serving benchmark's load generator, server handling and report, against tiny local servers
(no model, no training): counts, open-loop latency, errors, bounds, targets and Markdown."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genrerank.bench.serving import (
    MALFORMED_KINDS,
    ServerError,
    ServerProcess,
    ServingSettings,
    free_port,
    http_request,
    malformed_body,
    metrics_counters,
    output_paths,
    run_open_loop,
    sanity_pass,
    server_timings,
    serving_markdown,
    serving_targets,
    stop_reason,
)

HOST = "127.0.0.1"


class TinyServer:
    """A raw asyncio HTTP/1.1 keep-alive server in a thread. Every answer waits ``delay_s``
    (one request at a time if ``serial``); a body containing ``fail`` gets a 500, ``shed`` a
    503, ``close`` a dropped connection; others ``status`` (200: fixed JSON with ``timings_ms``)."""

    def __init__(self, delay_s: float = 0.0, serial: bool = False, status: int = 200) -> None:
        self.delay_s, self.serial, self.status = delay_s, serial, status
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.lock = asyncio.Lock()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, HOST, 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests += 1
                if b"close" in body:
                    writer.close()
                    return
                if self.serial:
                    async with self.lock:
                        await asyncio.sleep(self.delay_s)
                elif self.delay_s:
                    await asyncio.sleep(self.delay_s)
                status = 500 if b"fail" in body else 503 if b"shed" in body else self.status
                out = json.dumps({"items": ["a", "b"], "scores": [0.5, 0.25],
                                  "timings_ms": {"model": 1.5, "total": 2.0}}).encode()
                if head.startswith(b"GET /readyz"):
                    status, out = 200, b"{}"
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(out)}\r\n\r\n".encode() + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:  # handlers still sleeping on abandoned requests
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[TinyServer]:
    s = TinyServer()
    yield s
    s.close()


def requests_for(port: int, *bodies: bytes) -> list[bytes]:
    return [http_request(HOST, port, "/v1/rerank", b) for b in bodies]


def test_counts_latency_and_server_timings(server: TinyServer) -> None:
    reqs = requests_for(server.port, b'{"x": 1}', b'{"x": 2}')
    samples: list[float] = []
    step = run_open_loop(HOST, server.port, reqs, rate=100.0, duration_s=0.3,
                         max_requests=1000, connections=4,
                         sampler=lambda: samples.append(time.perf_counter()), sample_s=0.05)
    assert len(samples) >= 3  # the server-memory sampler runs during the step
    assert step["scheduled"] == step["sent"] == step["completed"] == step["ok"] == 30
    assert server.requests == 30
    assert step["error_count"] == 0 and step["late"] == 0 and step["errors"] == {}
    lat = step["latency"]
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert step["server_timings_ms"] == {"model": 1.5, "total": 2.0}
    # 30 answers spread over ~0.3 s: the achieved rate is about the offered one.
    assert 60 < step["achieved_rps"] < 130
    assert step["client_cores"] is not None


def test_latency_includes_the_server_delay() -> None:
    slow = TinyServer(delay_s=0.05)
    try:
        step = run_open_loop(HOST, slow.port, requests_for(slow.port, b"{}"), rate=40.0,
                             duration_s=0.25, max_requests=100, connections=8)
    finally:
        slow.close()
    assert step["ok"] == 10
    assert step["latency"]["p50_ms"] >= 50.0
    assert step["latency"]["p50_ms"] < 500.0


def test_latency_is_measured_from_the_due_time() -> None:
    """One connection, a server that needs 50 ms per request (20/s), 40 requests/s offered:
    requests queue up behind each other, and the open loop charges the queueing to them."""
    slow = TinyServer(delay_s=0.05, serial=True)
    try:
        step = run_open_loop(HOST, slow.port, requests_for(slow.port, b"{}"), rate=40.0,
                             duration_s=10.0, max_requests=16, connections=1, drain_s=5.0)
    finally:
        slow.close()
    assert step["ok"] == 16
    lat = step["latency"]
    # The 16th request is due at 375 ms and answered at ~800 ms: ~425 ms, although the server
    # spent 50 ms on it. Measured from the send time every latency would be ~50 ms.
    assert lat["max_ms"] >= 350.0
    assert lat["p50_ms"] >= 150.0
    assert lat["min_ms"] >= 50.0


def test_errors_by_status_and_connection(server: TinyServer) -> None:
    reqs = requests_for(server.port, b'{"ok": 1}', b'{"fail": 1}', b'{"ok": 2}', b'{"close": 1}')
    step = run_open_loop(HOST, server.port, reqs, rate=200.0, duration_s=10.0,
                         max_requests=40, connections=2)
    assert step["scheduled"] == 40
    assert step["ok"] == 20
    assert step["errors"] == {"500": 10, "connection": 10}
    assert step["error_count"] == 20 and step["late"] == 0
    settings = ServingSettings()
    assert stop_reason({**step, "server": {"alive": True}}, settings).startswith("errors")


def test_503s_are_load_shed_not_errors(server: TinyServer) -> None:
    """The bounded queue's 503s are counted apart: the ramp stops there (past capacity), and
    the no-errors target does not count them."""
    reqs = requests_for(server.port, b'{"ok": 1}', b'{"shed": 1}')
    step = run_open_loop(HOST, server.port, reqs, rate=200.0, duration_s=10.0,
                         max_requests=20, connections=2)
    assert step["errors"] == {"503": 10} and step["shed"] == 10
    assert step["error_count"] == 0 and step["late"] == 0 and step["ok"] == 10
    reason = stop_reason({**step, "server": {"alive": True}}, ServingSettings())
    assert reason is not None and reason.startswith("shedding load: 10 of 20")


def test_bounded_by_max_requests(server: TinyServer) -> None:
    t0 = time.perf_counter()
    step = run_open_loop(HOST, server.port, requests_for(server.port, b"{}"), rate=200.0,
                         duration_s=30.0, max_requests=25)
    assert time.perf_counter() - t0 < 2.0
    assert step["scheduled"] == step["ok"] == server.requests == 25


def test_bounded_by_duration(server: TinyServer) -> None:
    t0 = time.perf_counter()
    step = run_open_loop(HOST, server.port, requests_for(server.port, b"{}"), rate=50.0,
                         duration_s=0.4, max_requests=100_000)
    wall = time.perf_counter() - t0
    assert step["scheduled"] == step["ok"] == 20
    assert 0.35 < wall < 2.0


def test_overload_is_cut_at_the_deadline() -> None:
    """A server far slower than the offered rate: the step still ends drain_s after the last
    due time, and what was not answered by then is late (not an error)."""
    slow = TinyServer(delay_s=0.2, serial=True)
    try:
        t0 = time.perf_counter()
        step = run_open_loop(HOST, slow.port, requests_for(slow.port, b"{}"), rate=100.0,
                             duration_s=0.2, max_requests=1000, connections=2, drain_s=0.3)
        wall = time.perf_counter() - t0
    finally:
        slow.close()
    assert step["scheduled"] == 20
    assert wall < 1.5  # ~0.19 s of schedule + 0.3 s drain
    assert step["late"] >= 15 and step["error_count"] == 0
    assert step["ok"] + step["late"] == 20
    settings = ServingSettings()
    reason = stop_reason({**step, "server": {"alive": True}}, settings)
    assert reason is not None and reason.startswith("overloaded")
    assert stop_reason({**step, "server": {"alive": False}}, settings) == "server died"
    clean = _step(200.0, 12.0)
    assert stop_reason(clean, settings) is None
    assert stop_reason({**clean, "latency": {**clean["latency"], "p99_ms": 1500.0}},
                       settings) == "p99 1,500 ms > cut-off 1,000 ms"


def test_a_stale_keep_alive_connection_is_retried(server: TinyServer) -> None:
    """The server closes a kept-alive connection (as after its idle timeout): the next request
    on it goes out again on a fresh connection instead of counting as an error."""

    async def go() -> tuple[int, int]:
        from genrerank.bench.serving import _Connection

        conn = _Connection(HOST, server.port)
        first = await conn.exchange(requests_for(server.port, b"{}")[0])
        assert conn.writer is not None
        # Kill the socket under the connection, as a server closing it would.
        conn.writer.transport.abort()
        second = await conn.exchange(requests_for(server.port, b"{}")[0])
        conn.close()
        return first[0], second[0]

    assert asyncio.run(go()) == (200, 200)


def test_server_timings_and_metrics_parsing() -> None:
    body = b'{"items":["a"],"scores":[0.1],"timings_ms":{"model":3.25,"total":4},"x":{"y":1}}'
    assert server_timings(body) == {"model": 3.25, "total": 4.0}
    assert server_timings(b'{"items": []}') is None
    text = ("# HELP http_requests_total x\n# TYPE http_requests_total counter\n"
            'http_requests_total{status="200"} 12.0\nhttp_requests_total{status="422"} 3\n'
            "process_resident_memory_bytes 1e8\n")
    assert metrics_counters(text) == {'http_requests_total{status="200"}': 12.0,
                                      'http_requests_total{status="422"}': 3.0}


PAYLOAD: dict[str, Any] = {
    "request_id": "r1",
    "user": {"cat": {"segment": 1}, "dense": {"activity": 0.5}},
    "candidates": {"ids": ["a", "b", "c"], "upstream_score": [0.3, 0.2, 0.1],
                   "cat": {"item_id": [1, 2, 3]}, "dense": {"dur": [1.0, 2.0, 3.0]},
                   "category": [1, 2, 1], "creator": [4, 5, 6]},
    "m": 2,
}


def test_malformed_bodies() -> None:
    bodies = {k: malformed_body(k, PAYLOAD) for k in MALFORMED_KINDS}
    assert b"NaN" in bodies["nan"]
    with pytest.raises(ValueError):
        json.loads(bodies["not_json"])
    dup = json.loads(bodies["duplicate_id"])["candidates"]["ids"]
    assert dup[0] == dup[1]
    assert json.loads(bodies["m_gt_n"])["m"] == 4
    assert "no_such_feature" in json.loads(bodies["unknown_feature"])["candidates"]["dense"]
    empty = json.loads(bodies["empty_candidates"])["candidates"]
    assert empty["ids"] == [] and empty["dense"] == {"dur": []} and empty["category"] == []
    assert PAYLOAD["candidates"]["ids"] == ["a", "b", "c"]  # the original is untouched


def test_sanity_pass(server: TinyServer) -> None:
    res = sanity_pass(HOST, server.port, [PAYLOAD], count=8)  # every request answered 200
    assert res["sent"] == 8 and res["ready_after"]
    assert not res["passed"] and res["answered_4xx"] == 0 and len(res["not_4xx"]) == 8
    assert set(res["by_kind"]) == set(MALFORMED_KINDS)
    server.status = 422
    res = sanity_pass(HOST, server.port, [PAYLOAD], count=20)
    assert res["passed"] and res["answered_4xx"] == 20 and res["not_4xx"] == []
    assert res["by_kind"]["nan"] == [422] * 4 and res["by_kind"]["not_json"] == [422] * 3


SERVER_SCRIPT = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
try:
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
except KeyboardInterrupt:
    sys.exit(0)
"""


def test_server_process_start_and_stop(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-c", SERVER_SCRIPT, str(port)]
    with ServerProcess(cmd, HOST, port, tmp_path, ready_timeout_s=20) as proc:
        assert proc.start() < 20 and proc.alive() and proc.ready()
    assert not proc.alive() and proc.proc is not None and proc.proc.returncode == 0
    assert not proc.died


def test_server_process_that_fails_to_start(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; sys.exit('no such command: serve')"]
    with ServerProcess(cmd, HOST, free_port(), tmp_path) as proc, pytest.raises(
            ServerError, match="no such command"):
        proc.start()
    assert proc.died


# ---------------------------------------------------------------------------- report


def _step(rate: float, p99: float, errors: dict[str, int] | None = None,
          late: int = 0) -> dict[str, Any]:
    errors = errors or {}
    return {
        "offered_rps": rate, "duration_s": 3.0, "scheduled": int(3 * rate), "sent": int(3 * rate),
        "completed": int(3 * rate) - late, "ok": int(3 * rate) - late - sum(errors.values()),
        "errors": errors, "error_count": sum(errors.values()), "late": late, "wall_s": 3.1,
        "achieved_rps": rate * 0.99,
        "latency": {"p50_ms": p99 / 3, "p95_ms": p99 / 1.5, "p99_ms": p99, "max_ms": p99 * 1.2,
                    "mean_ms": p99 / 3, "min_ms": 1.0},
        "server_timings_ms": {"model": 1.25, "total": 2.0}, "client_cores": 0.1,
        "server": {"cpu_percent": 80.0, "rss_peak_sampled_mib": 300.0, "vmhwm_mib": 310.5,
                   "vmhwm_reset": True, "alive": True, "peak_rss_mib": 310.5},
        "other_processes_cores": 0.0,
    }


def _config(backend: str, n: int, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"backend": backend, "preset": "kuaishou" if n == 60 else "large", "n": n,
            "m": 6 if n == 60 else 50, "steps": steps, "startup_s": 4.0, "crashed": False,
            "ready_after": True, "exit_code": 0,
            "sanity": {"sent": 20, "answered_4xx": 20, "ready_after": True, "passed": True},
            **extra}


def synthetic_result(configs: list[dict[str, Any]], skipped: dict[str, str] | None = None,
                     ) -> dict[str, Any]:
    settings = ServingSettings.quick()
    from dataclasses import asdict

    result = {
        "benchmark": "serving", "quick": True, "date": "2025-01-01T00:00:00+00:00",
        "wall_time_s": 120.0,
        "machine": {"cpu": "Test CPU", "cpu_count": 2, "torch": "2.x", "onnxruntime": "1.x",
                    "python": "3.12", "mode": "test"},
        "settings": asdict(settings), "load_method": "open loop",
        "model": {"name": "nar4rec", "training": "short-trained: 1 epoch(s)"},
        "skipped": skipped or {}, "configs": configs,
    }
    result["targets"] = serving_targets(result)
    return result


def test_targets_and_markdown() -> None:
    result = synthetic_result([
        _config("torch", 60, [_step(50, 5.0), _step(200, 12.0)]),
        _config("torch", 500, [_step(50, 80.0), _step(200, 1500.0)],
                stopped={"after_rps": 200.0, "reason": "p99 1,500 ms > cut-off 1,000 ms"}),
        _config("onnx", 60, [_step(50, 4.0)],
                stopped={"after_rps": 50.0, "reason": "errors {'500': 2}"}),
    ])
    result["configs"][2]["steps"][0] |= {"errors": {"500": 2}, "error_count": 2}
    result["targets"] = serving_targets(result)
    torch_t, onnx_t, overall = result["targets"]
    assert torch_t["status"] == "met" and torch_t["value"] == 12.0
    assert onnx_t["status"] == "not met" and "ramp stopped at 50" in onnx_t["note"]
    assert overall["status"] == "not met" and "onnx kuaishou @ 50/s" in overall["note"]

    md = serving_markdown(result)
    assert md.startswith("# Serving benchmark (quick)")
    header = next(line for line in md.splitlines() if line.startswith("| backend"))
    for col in ("n", "offered rps", "achieved rps", "p50 ms", "p95 ms", "p99 ms", "errors",
                "peak server RSS MiB"):
        assert f"| {col} " in header or f" {col} |" in header
    assert md.count("| torch ") == 4 and md.count("| onnx ") == 1
    assert "500: 2" in md and "310.5" in md and "| 1.25 " in md  # server model ms
    assert "service p99 <= 15 ms at 200 requests/s, n = 60 (torch): measured 12.0 ms: met" in md
    assert "NOT met" in md and "short-trained" in md
    assert "Warning" not in md  # no step saw other processes
    result["configs"][0]["steps"][1]["other_processes_cores"] = 1.4
    assert "**Warning**" in serving_markdown(result) and "torch n = 60 at 200/s (1.4)" in (
        serving_markdown(result))


def test_targets_all_clean_and_skipped_backend() -> None:
    result = synthetic_result(
        [_config("torch", 60, [_step(50, 5.0), _step(200, 20.0)]),
         _config("torch", 500, [_step(50, 30.0), _step(200, 90.0)])],
        skipped={"onnx kuaishou": "genrerank.serving.export.export_run not importable"},
    )
    torch_t, onnx_t, overall = result["targets"]
    assert torch_t["status"] == "not met" and math.isclose(torch_t["value"], 20.0)
    assert onnx_t["status"] == "not measured" and "not importable" in onnx_t["note"]
    assert overall["status"] == "met" and "note" not in overall
    md = serving_markdown(result)
    assert "onnx kuaishou: skipped" in md


def test_settings_and_paths(tmp_path: Path) -> None:
    quick, full = ServingSettings.quick(), ServingSettings()
    assert quick.is_quick and not full.is_quick
    assert len(quick.rates) < len(full.rates) and quick.duration_s < full.duration_s
    assert 200.0 in quick.rates and 200.0 in full.rates  # the target's rate is always measured
    assert output_paths(tmp_path, True)["md"].name == "serving_quick.md"
    assert output_paths(tmp_path, False)["json"].name == "serving.json"
