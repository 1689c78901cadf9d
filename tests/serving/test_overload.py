"""Overload of a real `genrerank serve --run` process on loopback (a small seeded nar4rec, n = 60
candidates per request): far more concurrent requests than the model queue admits.

32 keep-alive connections each send 10 requests back to back (320 in all, bounded in time by
asyncio.timeout) to a server with --max-queue 2: at most 3 requests are in the model's hands
at any time, so the excess must be refused at once with 503 + Retry-After, the admitted ones
served well within the timeout, and nothing else may happen (no 504, no 500, no dropped
connection). Asserts behaviour, not speed: the latency bound is the server's own timeout
(without the queue bound all 320 would queue, and the later ones end in 504).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from genrerank.data.dataset import RerankDataset
from genrerank.serving.schema import payload_from_dataset
from tests.serving._server_proc import HOST, free_port, http_bytes, metric, server_process
from tests.serving.test_export import shared_run, simulated

CONNECTIONS, PER_CONNECTION = 32, 10
TIMEOUT_MS = 1000
MAX_QUEUE = 2
RUN_LIMIT_S = 60.0  # the whole burst; it takes a few seconds


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _burst(port: int, requests: list[bytes]) -> list[dict[str, Any]]:
    """Every connection sends its requests one after the other, as fast as answered."""
    answers: list[dict[str, Any]] = []

    async def one_connection(k: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for i in range(PER_CONNECTION):
                request = requests[(k * PER_CONNECTION + i) % len(requests)]
                start = time.perf_counter()
                writer.write(request)
                await writer.drain()
                try:
                    status, headers, body = await _read_answer(reader)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    answers.append({"status": None, "error": repr(exc)})
                    return
                answers.append({"status": status, "headers": headers, "body": body,
                                "seconds": time.perf_counter() - start})
        finally:
            writer.close()

    async with asyncio.timeout(RUN_LIMIT_S):
        await asyncio.gather(*(one_connection(k) for k in range(CONNECTIONS)))
    return answers


def test_overload_gets_fast_503s_and_the_admitted_requests_stay_in_time(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = shared_run(tmp_path_factory, "nar4rec")
    dataset = RerankDataset(simulated(tmp_path_factory), "test")
    payloads = [payload_from_dataset(dataset, i) for i in range(min(16, len(dataset)))]
    assert all(len(p["candidates"]["ids"]) == 60 for p in payloads)
    bodies = [json.dumps(p).encode() for p in payloads]
    requests = [http_bytes("POST", "/v1/rerank", body) for body in bodies]
    port = free_port()
    exe = str(Path(sys.executable).parent / "genrerank")
    args = [exe, "serve", "--run", str(run), "--port", str(port), "--threads", "1",
            "--max-queue", str(MAX_QUEUE), "--timeout-ms", str(TIMEOUT_MS)]
    with server_process(args, tmp_path, port) as server:
        for body in bodies[:3]:  # first calls at n = 60 (one-off costs) before the burst
            warm = httpx.post(f"{server.base}/v1/rerank", content=body, timeout=30.0)
            assert warm.status_code == 200, warm.text
        answers = asyncio.run(_burst(port, requests))
        statuses = [a["status"] for a in answers]
        assert len(answers) == CONNECTIONS * PER_CONNECTION, [
            a for a in answers if a["status"] is None][:3]
        assert set(statuses) <= {200, 503}, sorted(set(statuses), key=str)  # no 504 storm
        admitted = [a for a in answers if a["status"] == 200]
        refused = [a for a in answers if a["status"] == 503]
        assert refused, "no request was refused: the queue bound did not act"
        assert admitted, "every request was refused"
        for answer in refused:
            assert answer["headers"].get("retry-after") == "1"
            assert json.loads(answer["body"])["error"] == "overloaded"
        for answer in admitted:
            body = json.loads(answer["body"])
            assert len(body["items"]) == 6 and body["model_version"]
        p99_admitted = float(np.percentile([a["seconds"] for a in admitted], 99))
        assert p99_admitted < TIMEOUT_MS / 1000.0, p99_admitted

        text = server.metrics()
        served = 'genrerank_requests_total{endpoint="/v1/rerank",status="200"}'
        rejected = 'genrerank_requests_total{endpoint="/v1/rerank",status="503"}'
        assert metric(text, served) == len(admitted) + 3
        assert metric(text, rejected) == len(refused)
        assert metric(text, 'genrerank_errors_total{kind="overloaded"}') == len(refused)
        assert metric(text, 'genrerank_errors_total{kind="timeout"}') == 0.0
        assert metric(text, 'genrerank_errors_total{kind="internal"}') == 0.0
        assert metric(text, "genrerank_queue_limit") == MAX_QUEUE
        assert metric(text, "genrerank_ready") == 1.0
    assert "Traceback" not in server.err.read_text(), server.log()
