"""The server runner (genrerank.serving.server) as a real process on loopback, with raw sockets:
request head and body read timeouts, status counting of what never reaches a client, the
drain on SIGTERM, and a busy port. The service is the fake one (tests/serving/_fake_server.py):
no model, and a request can be held in the model until the test opens a gate file.

Timing bounds are generous (a loaded 2-core machine): they tell "closed by the timeout"
from "held open indefinitely", not how fast anything is.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.serving.server import bind_socket
from tests.serving._server_proc import (
    HOST,
    ServerProc,
    connect,
    fake_server_args,
    free_port,
    http_bytes,
    metric,
    read_until_closed,
    server_process,
    status_of,
    wait_for_metric,
)
from tests.serving.conftest import valid_payload

RERANK = "/v1/rerank"


def _payload(request_id: str) -> bytes:
    payload = valid_payload()
    payload["request_id"] = request_id
    return json.dumps(payload).encode()


@pytest.fixture(scope="module")
def timeouts_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One server for the read-timeout tests (they compare /metrics before and after)."""
    port = free_port()
    args = fake_server_args(port, "--header-timeout-s", "1", "--body-timeout-s", "1")
    with server_process(args, tmp_path_factory.mktemp("timeouts"), port) as server:
        yield server


def _delta(before: str, after: str, sample: str) -> float:
    return metric(after, sample) - metric(before, sample)


def _req(endpoint: str, status: int) -> str:
    return f'genrerank_requests_total{{endpoint="{endpoint}",status="{status}"}}'


READ_TIMEOUTS = 'genrerank_errors_total{kind="read_timeout"}'


def test_slow_and_silent_request_heads_are_closed(timeouts_server: ServerProc) -> None:
    """10 connections trickle a request head one byte at a time, 10 send nothing: all are
    closed about 1 s after they connected (the trickle does not extend it), the partial ones
    with a 408; the server keeps answering meanwhile."""
    port = timeouts_server.port
    before = timeouts_server.metrics()
    trickling = [connect(port) for _ in range(10)]
    silent = [connect(port) for _ in range(10)]
    opened = time.monotonic()
    head = b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    for sock in trickling:
        sock.sendall(head[:10])
    sent = {sock: 10 for sock in trickling}
    answers: dict[socket.socket, bytes] = {}
    closed_after: dict[socket.socket, float] = {}
    deadline = opened + 15.0  # without the timeout these would stay open forever
    while len(closed_after) < 20 and time.monotonic() < deadline:
        for sock in trickling + silent:
            if sock in closed_after:
                continue
            if sock in sent and sent[sock] < len(head):
                with contextlib.suppress(OSError):  # closed by the server: seen on the read
                    sock.sendall(head[sent[sock]:sent[sock] + 1])
                    sent[sock] += 1
            data, closed = read_until_closed(sock, 0.01)
            answers[sock] = answers.get(sock, b"") + data
            if closed:
                closed_after[sock] = time.monotonic() - opened
        assert httpx.get(f"{timeouts_server.base}/healthz", timeout=5.0).status_code == 200
        time.sleep(0.1)
    for sock in trickling + silent:
        sock.close()
    assert len(closed_after) == 20, f"{20 - len(closed_after)} connections still open"
    assert all(t >= 0.9 for t in closed_after.values())  # not before the timeout
    for sock in trickling:
        assert status_of(answers[sock]) == 408, answers[sock]
        assert b"connection: close" in answers[sock].lower()
    for sock in silent:
        assert answers[sock] == b""  # never sent a request: closed without an answer
    after = timeouts_server.metrics()
    assert _delta(before, after, _req("unparsed", 408)) == 10.0
    assert _delta(before, after, READ_TIMEOUTS) == 10.0


def test_body_shorter_than_its_content_length_is_408(timeouts_server: ServerProc) -> None:
    before = timeouts_server.metrics()
    sock = connect(timeouts_server.port)
    start = time.monotonic()
    body = _payload("short")
    sock.sendall(http_bytes("POST", RERANK, body[:20], length=len(body)))
    answer, closed = read_until_closed(sock, 15.0)
    elapsed = time.monotonic() - start
    sock.close()
    assert closed and status_of(answer) == 408, answer
    assert b"request body was not received within 1 s" in answer
    assert 0.9 <= elapsed < 15.0
    after = timeouts_server.metrics()
    assert _delta(before, after, _req(RERANK, 408)) == 1.0
    assert _delta(before, after, READ_TIMEOUTS) == 1.0
    # A normal request right after is unaffected.
    response = httpx.post(f"{timeouts_server.base}{RERANK}", content=_payload("ok"),
                          timeout=10.0)
    assert response.status_code == 200


def test_an_endpoint_that_ignores_its_body_does_not_hold_the_connection(
    timeouts_server: ServerProc,
) -> None:
    """GET /healthz declares a body it never sends, then trickles bytes of it: answered 200,
    and the connection is closed by the protocol's body backstop (1 s + 1 s grace)."""
    sock = connect(timeouts_server.port)
    sock.sendall(http_bytes("GET", "/healthz", length=1000))
    start = time.monotonic()
    answer = b""
    closed = False
    while not closed and time.monotonic() - start < 15.0:
        with contextlib.suppress(OSError):  # closed by the server: seen on the read below
            sock.sendall(b"x")
        data, closed = read_until_closed(sock, 0.2)
        answer += data
    sock.close()
    assert closed, "connection held open by a trickled body"
    assert status_of(answer) == 200
    assert 1.5 <= time.monotonic() - start < 15.0


def test_malformed_http_is_counted_as_400(timeouts_server: ServerProc) -> None:
    before = timeouts_server.metrics()
    sock = connect(timeouts_server.port)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    answer, closed = read_until_closed(sock, 10.0)
    sock.close()
    assert status_of(answer) == 400 and closed
    # An app-level 4xx is counted too (it always was).
    bad = httpx.post(f"{timeouts_server.base}{RERANK}", content=b"{not json", timeout=10.0)
    assert bad.status_code == 422
    after = timeouts_server.metrics()
    assert _delta(before, after, _req("unparsed", 400)) == 1.0
    assert _delta(before, after, _req(RERANK, 422)) == 1.0


def test_client_disconnects_are_499_not_500(tmp_path: Path) -> None:
    """A client that goes away mid-body, while its request runs, or while it waits in the
    queue: each counted as 499 (client closed), none as 500, no ERROR or traceback logged;
    the queued one is dropped from the queue (never run)."""
    gate = tmp_path / "gate"
    port = free_port()
    with server_process(fake_server_args(port, "--gate", str(gate)), tmp_path, port) as server:
        # 1. Mid-body.
        sock = connect(port)
        body = _payload("mid-body")
        sock.sendall(http_bytes("POST", RERANK, body[:20], length=len(body)))
        time.sleep(0.2)
        sock.close()
        closed_metric = _req(RERANK, 499)
        wait_for_metric(server, closed_metric, 1.0)

        # 2. While its call runs in the model (held there by the gate).
        running = connect(port)
        running.sendall(http_bytes("POST", RERANK, _payload("gated")))
        wait_for_metric(server, "genrerank_model_busy", 1.0)
        # 3. While it waits in the queue behind it.
        queued = connect(port)
        queued.sendall(http_bytes("POST", RERANK, _payload("queued")))
        wait_for_metric(server, "genrerank_queue_waiting", 1.0)
        queued.close()
        text = wait_for_metric(server, "genrerank_queue_waiting", 0.0)  # dropped, not run
        assert metric(text, "genrerank_model_busy") == 1.0  # the gated call still runs
        running.close()
        text = wait_for_metric(server, closed_metric, 3.0)
        gate.touch()
        wait_for_metric(server, "genrerank_model_busy", 0.0)
        ok = httpx.post(f"{server.base}{RERANK}", content=_payload("after"), timeout=10.0)
        assert ok.status_code == 200
        text = server.metrics()
        assert metric(text, 'genrerank_errors_total{kind="client_closed"}') == 3.0
        assert 'status="500"' not in text
        assert metric(text, 'genrerank_errors_total{kind="internal"}') == 0.0
    log = server.err.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    closed_lines = [line for line in log.splitlines() if "client closed the connection" in line]
    assert len(closed_lines) == 3 and all(line.startswith("INFO") for line in closed_lines), log
    assert log.count("request 'queued' dropped from the queue") == 1, log
    assert log.count("dropped from the queue") == 1, log  # the running one was not queued


def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    """SIGTERM with a request in flight: /readyz turns 503 at once while requests are still
    served (with Connection: close); after the drain phase the server stops listening, the
    in-flight request still completes with 200, and the process exits 0."""
    gate = tmp_path / "gate"
    port = free_port()
    args = fake_server_args(port, "--gate", str(gate), "--drain-s", "4")
    with server_process(args, tmp_path, port) as server:
        results: dict[str, httpx.Response | BaseException] = {}

        def in_flight() -> None:
            try:
                results["gated"] = httpx.post(f"{server.base}{RERANK}", content=_payload("gated"),
                                              timeout=60.0)
            except BaseException as exc:  # reported by the asserts below
                results["gated"] = exc

        thread = threading.Thread(target=in_flight, daemon=True)
        thread.start()
        try:
            wait_for_metric(server, "genrerank_model_busy", 1.0)
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10.0
            ready = httpx.get(f"{server.base}/readyz", timeout=5.0)
            while ready.status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
                ready = httpx.get(f"{server.base}/readyz", timeout=5.0)
            assert ready.status_code == 503 and ready.json() == {"status": "draining"}
            assert ready.headers["connection"] == "close"
            assert "genrerank_ready 0.0" in server.metrics()
            # Still accepting and serving while draining (the gated call holds the model, so
            # this one is answered by /healthz; the queue is open too).
            assert httpx.get(f"{server.base}/healthz", timeout=5.0).status_code == 200
            # Then it stops listening, while the gated request is still in flight.
            deadline = time.monotonic() + 30.0
            refused = False
            while not refused and time.monotonic() < deadline:
                try:
                    socket.create_connection((HOST, port), timeout=2.0).close()
                    time.sleep(0.1)
                except OSError:
                    refused = True
            assert refused, "still listening 30 s after SIGTERM"
            assert "gated" not in results and server.proc.poll() is None
        finally:
            gate.touch()
            thread.join(30.0)
        response = results["gated"]
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 200 and response.json()["request_id"] == "gated"
        assert server.proc.wait(timeout=30.0) == 0, server.log()
    assert "draining for 4 s" in server.err.read_text()


def test_a_busy_port_fails_in_one_line_before_anything_is_served(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--run", str(tmp_path), "--port", str(port)])
        assert result.exit_code == 1
        assert result.output == (
            f"Error: cannot listen on {HOST}:{port}: Address already in use\n"
        )
        with pytest.raises(ValueError, match=f"cannot listen on {HOST}:{port}"):
            bind_socket(HOST, port)
