"""The serving benchmark's overload step (capacity, then 2x capacity open loop) against a real
server process around the fake service (tests/serving/_fake_server.py): every model call takes
5 ms, so the capacity is known to be at most 200 requests/s; then its targets and Markdown.

Small and bounded (a few seconds of load); asserts what the step records, not how fast."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genrerank.bench.serving import (
    RERANK_PATH,
    ServerProcess,
    ServingSettings,
    free_port,
    http_request,
    overload_step,
    overload_targets,
    serving_markdown,
    serving_targets,
)
from tests.bench.test_serving import _config, _step, synthetic_result
from tests.serving.conftest import valid_payload

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ServingSettings(capacity_connections=2, capacity_duration_s=1.0,
                           overload_connections=32, overload_duration_s=1.5,
                           overload_max_requests=2000, drain_s=3.0, max_wait_quiet_s=0.0)


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    port = free_port()
    # sys.path set explicitly: the test may run from any folder.
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
              "from tests.serving._fake_server import main; main()")
    cmd = [sys.executable, "-c", script, "--port", str(port), "--delay-ms", "5",
           "--max-queue", "4", "--timeout-s", "2"]
    with ServerProcess(cmd, HOST, port, tmp_path_factory.mktemp("fake-server"),
                       ready_timeout_s=90) as server:
        server.start()
        yield server


def test_overload_step_refuses_the_excess_and_records_it(fake_server: ServerProcess) -> None:
    body = json.dumps(valid_payload()).encode()
    requests = [http_request(HOST, fake_server.port, RERANK_PATH, body)]
    o = overload_step(fake_server, requests, SETTINGS)
    assert "error" not in o, o
    cap = o["capacity"]
    assert cap["errors"] == {} and cap["ok"] > 0  # 2 connections: the queue never fills
    assert 5.0 < o["capacity_rps"] <= 210.0  # 5 ms per call: at most ~200/s
    assert o["offered_rps"] == pytest.approx(2.0 * o["capacity_rps"])
    assert o["scheduled"] == o["admitted"] + o["refused_503"] + o["other_error_count"] + o["late"]
    assert o["refused_503"] > 0 and o["admitted"] > 0
    assert o["refused_share"] == pytest.approx(o["refused_503"] / o["scheduled"])
    assert o["other_errors"] == {} and o["late"] == 0
    assert o["retry_after_missing"] == 0  # every 503 carried Retry-After
    for key in ("admitted_latency", "refused_latency", "refused_service_latency"):
        assert o[key]["p99_ms"] is not None and o[key]["p99_ms"] > 0
    # From the send time a refusal can only be quicker than from its due time.
    assert o["refused_service_latency"]["p50_ms"] <= o["refused_latency"]["p50_ms"] + 1e-9
    assert o["rss_before_mib"] > 0 and o["rss_after_mib"] > 0
    assert o["ready_after"] and o["server"]["alive"]


def _overload(**changes: Any) -> dict[str, Any]:
    lat = {"p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 30.0, "max_ms": 40.0, "mean_ms": 12.0,
           "min_ms": 1.0}
    fast = {k: v / 10 for k, v in lat.items()}
    base = {"capacity": {"ok": 500}, "capacity_rps": 250.0, "factor": 2.0, "connections": 64,
            "offered_rps": 500.0, "scheduled": 1500, "admitted": 700, "refused_503": 800,
            "refused_share": 800 / 1500, "other_errors": {}, "other_error_count": 0, "late": 0,
            "retry_after_missing": 0, "achieved_rps": 240.0, "admitted_latency": lat,
            "refused_latency": fast, "refused_service_latency": fast, "rss_before_mib": 400.0,
            "rss_after_mib": 401.0, "rss_growth_mib": 1.0, "rss_growth_share": 1 / 400}
    return base | changes


def test_overload_targets_and_markdown() -> None:
    plain = synthetic_result([_config("onnx", 60, [_step(200, 8.0)])])
    assert overload_targets(plain) == []  # no overload step: no overload lines
    assert "## Overload" not in serving_markdown(plain)

    result = synthetic_result([
        _config("onnx", 60, [_step(200, 8.0)], overload=_overload()),
        _config("torch", 60, [_step(200, 20.0)], overload=_overload(
            admitted_latency={**_overload()["admitted_latency"], "p99_ms": 75.0},
            other_errors={"504": 3}, other_error_count=3)),
        _config("torch", 500, [_step(50, 60.0)], overload={"error": "no 2xx answer"}),
    ])
    lines = [t for t in serving_targets(result) if t["target"].startswith("overload")]
    assert len(lines) == 9
    onnx_p99, onnx_503, onnx_clean, torch_p99, _, torch_clean, *failed = lines
    assert onnx_p99["status"] == "met" and onnx_p99["value"] == 30.0
    assert onnx_503["status"] == "met" and onnx_503["value"] == pytest.approx(3.0)
    assert onnx_clean["status"] == "met" and "400.0 -> 401.0 MiB" in onnx_clean["note"]
    assert torch_p99["status"] == "not met" and torch_p99["value"] == 75.0
    assert torch_clean["status"] == "not met" and "504" in torch_clean["note"]
    assert all(t["status"] == "not measured" for t in failed)

    md = serving_markdown(result)
    assert "## Overload" in md and "| 503 share " in md and "53.3 %" in md
    assert "torch, n = 500: **failed**: no 2xx answer" in md
    target = "overload at 2x capacity (onnx, n = 60): admitted p99 < 50 ms"
    assert f"{target}: measured 30.0 ms: met" in md

    grown = synthetic_result([_config("onnx", 60, [_step(200, 8.0)], overload=_overload(
        rss_after_mib=480.0, rss_growth_mib=80.0, rss_growth_share=0.2))])
    assert overload_targets(grown)[2]["status"] == "not met"
    quiet = synthetic_result([_config("onnx", 60, [_step(200, 8.0)], overload=_overload(
        refused_503=0, refused_share=0.0))])
    assert "did not overload" in overload_targets(quiet)[1]["note"]
