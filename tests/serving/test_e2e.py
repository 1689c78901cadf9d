"""End to end: `genrerank serve --onnx` as a real uvicorn process, over real HTTP."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from genrerank.data.dataset import RerankDataset
from genrerank.serving.schema import payload_from_dataset
from tests.serving.test_export import shared_export, simulated

READY_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_log(out: Path, err: Path) -> str:
    return f"server stdout:\n{out.read_text()}\nserver stderr:\n{err.read_text()}"


def _wait_ready(proc: subprocess.Popen, base: str, out: Path, err: Path) -> httpx.Response:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}\n{_server_log(out, err)}")
        try:
            response = httpx.get(f"{base}/readyz", timeout=2.0)
            if response.status_code == 200:
                return response
            last = f"{response.status_code} {response.text}"
        except httpx.TransportError as exc:  # not listening yet
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"/readyz not 200 after {READY_TIMEOUT_S} s ({last})\n{_server_log(out, err)}")


def _metric(text: str, sample: str) -> float:
    """The value of one Prometheus sample line (``name{labels}``)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in /metrics:\n{text}")


def test_serve_an_onnx_export_over_http(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    onnx_dir, manifest = shared_export(tmp_path_factory, "nar4rec")
    dataset = RerankDataset(simulated(tmp_path_factory), "test")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).parent / "genrerank"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with out.open("w") as out_f, err.open("w") as err_f:
        proc = subprocess.Popen(
            [str(exe), "serve", "--onnx", str(onnx_dir), "--port", str(port), "--threads", "1"],
            stdout=out_f,
            stderr=err_f,
            env=env,
        )
    try:
        ready = _wait_ready(proc, base, out, err)
        assert ready.json() == {"status": "ready", "model_version": manifest["model_version"]}

        before = httpx.get(f"{base}/metrics", timeout=5.0).text  # the warm-up used the cache too
        payload = payload_from_dataset(dataset, 0)
        response = httpx.post(f"{base}/v1/rerank", json=payload, timeout=10.0)
        assert response.status_code == 200, response.text
        body = response.json()
        m, candidates = payload["m"], payload["candidates"]["ids"]
        assert m == 6 and len(candidates) == 60
        assert body["request_id"] == payload["request_id"]
        assert len(body["items"]) == m
        assert len(set(body["items"])) == m  # no duplicates
        assert set(body["items"]) <= set(candidates)
        assert len(body["scores"]) == m and all(0 < s <= 1 for s in body["scores"])
        assert body["strategy"] == "nar4rec" and body["list_score"] is None
        assert body["model_version"] == manifest["model_version"]
        assert math.isfinite(body["timings_ms"]["total"])

        # A NaN literal (what json.dumps writes by default) in a dense feature: 422 naming it.
        name = next(iter(payload["candidates"]["dense"]))
        payload["candidates"]["dense"][name][3] = float("nan")
        text = json.dumps(payload)
        assert "NaN" in text
        bad = httpx.post(
            f"{base}/v1/rerank",
            content=text,
            timeout=10.0,
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 422, bad.text
        assert bad.json()["error"] == "invalid request"
        assert {"field": f"candidates.dense.{name}[3]", "message": "NaN is not allowed"} in (
            bad.json()["detail"]
        )

        metrics = httpx.get(f"{base}/metrics", timeout=5.0).text
        ok = 'genrerank_requests_total{endpoint="/v1/rerank",status="200"}'
        rejected = 'genrerank_requests_total{endpoint="/v1/rerank",status="422"}'
        assert _metric(metrics, ok) == 1.0
        assert _metric(metrics, rejected) == 1.0
        assert _metric(metrics, 'genrerank_errors_total{kind="validation"}') == 1.0
        assert _metric(metrics, "genrerank_ready") == 1.0
        # The served request's 60 new items went through the item cache, and stayed there.
        for sample, added in (
            ("genrerank_item_cache_misses_total", 60.0),
            ("genrerank_item_cache_hits_total", 0.0),
            ("genrerank_item_cache_size", 60.0),
        ):
            assert _metric(metrics, sample) - _metric(before, sample) == added, sample

        proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on Ctrl-C
        assert proc.wait(timeout=20) == 0, _server_log(out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
