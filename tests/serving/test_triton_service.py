"""The service with its model on a real Triton Inference Server (gRPC).

tritonserver is the binary of the nvidia-pytriton wheel that ``make`` installs into
``.venv/pytriton`` (Python backend only, so the repository is the CPU stand-in whose model.py
runs the same model.onnx with ONNX Runtime). Where it cannot start, every test here skips with
the reason. A server starts in about 2 s; the module takes ~20 s beyond the shared export."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from genrerank.serving.app import create_app
from genrerank.serving.runtime import Reranker, load_reranker
from genrerank.serving.schema import synthetic_payload
from genrerank.serving.triton.compare import compare_services, parity_inputs
from genrerank.serving.triton.launcher import TritonProcess, TritonUnavailable
from genrerank.serving.triton.repository import write_repository
from genrerank.serving.types import ModelTimeout, ModelUnavailable
from tests.serving.test_export import shared_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_export(tmp_path_factory, "nar4rec")[0]


@pytest.fixture(scope="module")
def repo(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(export_dir, out, backend="python")
    return out


def _start(repo: Path, port: int | None = None) -> TritonProcess:
    try:
        return TritonProcess(repo, grpc_port=port).start()
    except TritonUnavailable as exc:
        pytest.skip(f"tritonserver cannot run here: {exc}")


@pytest.fixture(scope="module")
def triton(repo: Path) -> Iterator[TritonProcess]:
    server = _start(repo)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def onnx_service(export_dir: Path) -> Reranker:
    return load_reranker(onnx_dir=export_dir)


def test_triton_service_answers_the_parity_set_like_onnx_runtime(
        triton: TritonProcess, onnx_service: Reranker) -> None:
    service = load_reranker(model_server=triton.url)
    assert service.backend.name == "triton"
    assert service.model_version == onnx_service.model_version
    inputs = parity_inputs(service.spec, service.strategies[0])
    report = compare_services(service, onnx_service, inputs)
    assert report["identical_lists"] == report["requests"] == len(inputs) > 10, report
    assert report["max_score_diff"] <= 1e-5, report
    assert service.ready_check() is None


def test_dynamic_batching_stacks_concurrent_requests(
        triton: TritonProcess, onnx_service: Reranker) -> None:
    """Concurrent calls of the same bucket (n = 60 and 45 -> 64) are executed together
    (Triton's own statistics: fewer executions than inferences) and each still gets its own
    answer. Six clients against one model instance whose calls take milliseconds: requests
    queue during every execution, so batches form whatever the machine's speed."""
    import tritonclient.grpc as grpcclient

    service = load_reranker(model_server=triton.url)
    graphs = service.backend.onnx
    inputs = [i for i in parity_inputs(service.spec, service.strategies[0], lengths=(3,))
              if i.n in (60, 45)]
    statics = [onnx_service.item_vectors(i)[0] for i in inputs]
    feeds = [graphs.request_feeds(i.user_cat[None], i.user_dense[None], s[None],
                                  i.upstream_score[None], np.ones((1, i.n), bool),
                                  i.category[None]) for i, s in zip(inputs, statics, strict=True)]
    want = [onnx_service.backend.onnx.matrix(f, 3)[0] for f in feeds]
    client = grpcclient.InferenceServerClient(triton.url)
    before = client.get_inference_statistics(graphs.model).model_stats[0]
    rounds, clients, got, errors = 8, 6, {}, []

    def call(c: int) -> None:
        try:
            for r in range(rounds):
                got[(c, r)] = graphs.matrix(feeds[c % 2], 3)[0]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(got) == clients * rounds
    for (c, _), lp in got.items():
        finite = np.isfinite(want[c % 2])
        assert np.array_equal(np.isfinite(lp), finite)
        assert np.abs(lp[finite] - want[c % 2][finite]).max() <= 1e-5
    after = client.get_inference_statistics(graphs.model).model_stats[0]
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == clients * rounds
    assert executions < inferences, (executions, inferences)


def test_http_service_on_triton_and_its_readiness(
        triton: TritonProcess, onnx_service: Reranker) -> None:
    service = load_reranker(model_server=triton.url)
    body = synthetic_payload(service.spec, n=12, m=3)
    body["candidates"]["upstream_score"] = [float(np.sin(i)) for i in range(12)]
    with TestClient(create_app(service)) as client:
        _wait_ready(client)
        response = client.post("/v1/rerank", json=body)
        assert response.status_code == 200, response.text
        with TestClient(create_app(onnx_service)) as local:
            _wait_ready(local)
            assert response.json()["items"] == local.post("/v1/rerank", json=body).json()["items"]


def _wait_ready(client: TestClient, want: int = 200, tries: int = 100) -> dict:
    import time

    for _ in range(tries):
        response = client.get("/readyz")
        if response.status_code == want:
            return response.json()
        time.sleep(0.1)
    raise AssertionError(f"/readyz never answered {want}: {response.json()}")


def test_server_down_is_503_and_not_ready_then_recovers(repo: Path) -> None:
    server = _start(repo)
    try:
        service = load_reranker(model_server=server.url)
        body = synthetic_payload(service.spec, n=6, m=2)
        with TestClient(create_app(service)) as client:
            _wait_ready(client)
            assert client.post("/v1/rerank", json=body).status_code == 200
            server.stop()
            response = client.post("/v1/rerank", json=body)
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "model unavailable"
            assert "Retry-After" in response.headers
            ready = _wait_ready(client, want=503)
            assert ready["status"] == "not ready" and server.url in ready["error"]
            assert client.get("/healthz").status_code == 200  # the process is fine
            server.start()  # same port
            _wait_ready(client, tries=300)  # gRPC reconnects with a backoff of a few seconds
            assert client.post("/v1/rerank", json=body).status_code == 200
            metrics = client.get("/metrics").text
            assert 'genrerank_errors_total{kind="model_unavailable"} 1.0' in metrics
    finally:
        server.stop()


def test_slow_model_server_is_504(triton: TritonProcess) -> None:
    service = load_reranker(model_server=triton.url)
    body = synthetic_payload(service.spec, n=6, m=2)
    with TestClient(create_app(service)) as client:
        _wait_ready(client)
        # A deadline no server meets: what a slow or hung server looks like to the service.
        service.backend.onnx.timeout_s = 1e-6
        response = client.post("/v1/rerank", json=body)
        assert response.status_code == 504, response.text
        assert "did not answer within" in response.json()["detail"]
        service.backend.onnx.timeout_s = 5.0
        assert client.post("/v1/rerank", json=body).status_code == 200


def test_backend_errors_are_typed(triton: TritonProcess) -> None:
    service = load_reranker(model_server=triton.url)
    graphs = service.backend.onnx
    graphs.timeout_s = 1e-6
    with pytest.raises(ModelTimeout):
        graphs.item_embedding(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32),
                              np.zeros(2, np.int64))
    graphs.timeout_s = 5.0
    graphs.url = "127.0.0.1:1"
    import tritonclient.grpc as grpcclient

    graphs.client = grpcclient.InferenceServerClient(graphs.url)
    with pytest.raises(ModelUnavailable, match="127.0.0.1:1 unavailable"):
        graphs.item_embedding(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32),
                              np.zeros(2, np.int64))


def test_no_server_at_start_is_one_clear_error() -> None:
    from genrerank.serving.triton.backend import TritonGraphs

    with pytest.raises(ValueError, match=r"model server 127.0.0.1:1 not reachable within "
                                         r"0.5 s: UNAVAILABLE"):
        TritonGraphs("127.0.0.1:1", connect_timeout_s=0.5)


def test_genrerank_serve_with_model_server(triton: TritonProcess, onnx_service: Reranker,
                                           tmp_path: Path) -> None:
    """The command line: `genrerank serve --model-server` as its own process, one request, the
    same list as in-process ONNX Runtime."""
    import sys

    import httpx

    from tests.serving._server_proc import free_port, server_process

    port = free_port()
    exe = str(Path(sys.executable).parent / "genrerank")
    body = synthetic_payload(onnx_service.spec, n=20, m=4)
    body["candidates"]["upstream_score"] = [float(np.cos(i)) for i in range(20)]
    with server_process([exe, "serve", "--model-server", triton.url, "--port", str(port)],
                        tmp_path, port) as server:
        response = httpx.post(f"{server.base}/v1/rerank", json=body, timeout=10.0)
        assert response.status_code == 200, response.text
        with TestClient(create_app(onnx_service)) as local:
            _wait_ready(local)
            assert response.json()["items"] == local.post("/v1/rerank", json=body).json()["items"]
        assert "(triton, " in server.out.read_text()  # the start-up line names the backend
