"""Constraints through serving: the HTTP request's ``constraints`` (and a run's default), its
422s, and the PyTorch and ONNX Runtime decoding paths (which must agree)."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from genrerank.constraints import ConstraintSet, compile_constraints
from genrerank.data.dataset import RerankDataset
from genrerank.data.simulator import simulate_to_dir
from genrerank.serving.app import create_app
from genrerank.serving.export import export_run
from genrerank.serving.runtime import load_reranker
from genrerank.serving.schema import RequestValidator, payload_from_dataset
from tests.constraints._random import CASES, Request, random_set
from tests.serving._runs import make_run
from tests.serving.conftest import wait_ready

CONSTRAINTS = {"quotas": [{"attribute": "category", "value": 3, "max": 1, "within": 4},
                          {"attribute": "cold_start", "min": 2}],
               "max_per_creator": 1, "spacing": [{"attribute": "category", "distance": 2}]}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serving")
    simulate_to_dir("kuaishou", 40, 9, out / "sim", progress=False)
    return out


@pytest.fixture(scope="module")
def dataset(root: Path) -> RerankDataset:
    return RerankDataset(root / "sim", "test")


def _payload(ds: RerankDataset, index: int, rng: np.random.Generator | None = None,
             **changes: Any) -> dict[str, Any]:
    payload = payload_from_dataset(ds, index)
    n = len(payload["candidates"]["ids"])
    rng = rng or np.random.default_rng(index)
    payload["candidates"]["is_cold_start"] = (rng.random(n) < 0.2).tolist()
    payload["candidates"]["is_long_tail"] = (rng.random(n) < 0.3).tolist()
    payload.update(changes)
    return payload


def _check(payload: dict[str, Any], items: list[str]) -> list[str]:
    """The violations of served ``items`` against the payload's constraints."""
    c = payload["candidates"]
    rc = compile_constraints(
        ConstraintSet.from_dict(payload["constraints"]), category=c["category"],
        creator=c["creator"], is_cold_start=c["is_cold_start"], is_long_tail=c["is_long_tail"],
        item_ids=c["ids"], candidate_mask=None, list_length=payload["m"])
    return rc.violations([c["ids"].index(i) for i in items])


@pytest.fixture(scope="module")
def client(root: Path, dataset: RerankDataset) -> TestClient:
    run = make_run(root / "runs" / "nar4rec", "nar4rec", dataset.spec)
    with TestClient(create_app(load_reranker(run_dir=run), timeout_s=5.0)) as c:
        assert wait_ready(c).status_code == 200
        yield c


def test_http_request_with_constraints_is_served_under_them(
        client: TestClient, dataset: RerankDataset) -> None:
    plain = _payload(dataset, 0)
    base = client.post("/v1/rerank", json=plain).json()
    constrained = _payload(dataset, 0, constraints={**CONSTRAINTS,
                                                    "forbidden": [base["items"][0]]})
    got = client.post("/v1/rerank", json=constrained)
    assert got.status_code == 200, got.text
    body = got.json()
    assert set(body) == set(base) and len(body["items"]) == plain["m"]
    assert _check(constrained, body["items"]) == []
    assert _check(constrained, base["items"]) != []  # the constraints did change the list
    # Same request again without constraints: unchanged service, unchanged answer.
    assert client.post("/v1/rerank", json=plain).json()["items"] == base["items"]


@pytest.mark.parametrize(("constraints", "field", "words"), [
    ({"quotas": [{"attribute": "colour", "value": 1}]}, "constraints.quotas[0].attribute",
     "must be one of"),
    ({"quotas": [{"attribute": "category", "value": 1, "min": 3, "max": 1}]},
     "constraints.quotas[0].max", "below min"),
    ({"spacing": [{"attribute": "creator"}]}, "constraints.spacing[0].distance", "missing"),
    ({"forbid": ["x"]}, "constraints.forbid", "unknown key"),
    ({"required": ["nope"]}, "constraints", "'nope' is not among the request's candidates"),
    ({"quotas": [{"attribute": "cold_start", "min": 7}]}, "constraints",
     "quotas[0] (cold_start: min 7)"),
])
def test_http_bad_or_infeasible_constraints_are_422s_naming_the_field(
        client: TestClient, dataset: RerankDataset, constraints: dict, field: str,
        words: str) -> None:
    got = client.post("/v1/rerank", json=_payload(dataset, 1, constraints=constraints))
    assert got.status_code == 422, got.text
    detail = got.json()["detail"]
    assert detail[0]["field"] == field, detail
    assert words in detail[0]["message"], detail


def test_http_conflicting_constraints_are_named(client: TestClient,
                                                dataset: RerankDataset) -> None:
    payload = _payload(dataset, 2)
    c = payload["candidates"]
    cold = [i for i, f in enumerate(c["is_cold_start"]) if f]
    cats = {c["category"][i] for i in cold}
    # Every cold-start item is of a category allowed at most once: the minimum cannot hold.
    payload["constraints"] = {
        "quotas": [{"attribute": "cold_start", "min": 2}]
        + [{"attribute": "category", "value": v, "max": 0} for v in sorted(cats)],
        "max_per_creator": 3}
    got = client.post("/v1/rerank", json=payload)
    assert got.status_code == 422
    message = got.json()["detail"][0]["message"]
    assert f"request {payload['request_id']!r}" in message
    assert "quotas[0] (cold_start: min 2)" in message and "max_per_creator" not in message


def test_http_constraint_on_an_attribute_the_request_lacks(client: TestClient,
                                                           dataset: RerankDataset) -> None:
    payload = _payload(dataset, 3, constraints={"quotas": [{"attribute": "long_tail", "min": 1}]})
    del payload["candidates"]["is_long_tail"]
    got = client.post("/v1/rerank", json=payload)
    assert got.status_code == 422
    assert got.json()["detail"][0] == {
        "field": "constraints.quotas[0].attribute",
        "message": "reads each candidate's long_tail: send candidates.is_long_tail"}
    payload = _payload(dataset, 3, constraints={"max_per_creator": 1})
    payload["candidates"]["is_cold_start"] = [True]  # wrong length is the usual 422
    got = client.post("/v1/rerank", json=payload)
    assert got.json()["detail"][0]["field"] == "candidates.is_cold_start"


def test_pipeline_strategy_takes_no_constraints(dataset: RerankDataset) -> None:
    validator = RequestValidator(dataset.spec, ("nar4rec", "pipeline"))
    payload = _payload(dataset, 0, strategy="pipeline", constraints={"max_per_creator": 1})
    with pytest.raises(ValueError, match="pipeline strategy does not decode under constraints"):
        validator.validate_python(payload)


def test_a_runs_default_constraints_apply_to_requests_without_their_own(
        root: Path, dataset: RerankDataset) -> None:
    run = make_run(root / "runs" / "default", "pointwise", dataset.spec,
                   decode={"name": "greedy", "constraints": CONSTRAINTS})
    service = load_reranker(run_dir=run)
    validator = RequestValidator.for_service(service)
    payload = _payload(dataset, 0)
    served = service.rerank(validator.validate_python(payload)).item_ids
    assert _check({**payload, "constraints": CONSTRAINTS}, served) == []
    own = {"max_per_creator": 2}
    served = service.rerank(validator.validate_python({**payload, "constraints": own})).item_ids
    assert _check({**payload, "constraints": own}, served) == []
    bare = copy.deepcopy(payload)
    del bare["candidates"]["is_cold_start"]
    with pytest.raises(ValueError, match="default decode.constraints"):
        validator.validate_python(bare)


@pytest.fixture(scope="module")
def exported(root: Path, dataset: RerankDataset) -> dict[str, tuple[Path, Path]]:
    """One small export of the autoregressive model, whose ONNX Runtime path has its own step
    loop (a matrix model's export decodes with the same ``decode`` call as PyTorch). Parity
    is the test's own comparison; an export takes most of a minute on a busy machine."""
    run = make_run(root / "runs" / "onnx_autoregressive", "autoregressive", dataset.spec)
    export_run(run, root / "onnx" / "autoregressive", check=False)
    return {"autoregressive": (run, root / "onnx" / "autoregressive")}


@pytest.mark.parametrize(("name", "decode"), [
    ("autoregressive", {"name": "greedy"}),
    ("autoregressive", {"name": "beam", "beam_width": 3}),
])
def test_onnx_runtime_decodes_under_constraints_like_pytorch(
        exported: dict[str, tuple[Path, Path]], dataset: RerankDataset, name: str,
        decode: dict, tally: Counter) -> None:
    """Random constraint sets on test requests: the ONNX Runtime path (its own step loop for
    the autoregressive model) serves the lists PyTorch serves, and they satisfy their
    constraints."""
    label = f"onnx_{name}_{decode['name']}"
    run, onnx_dir = exported[name]
    torch_rr = load_reranker(run_dir=run, cache_size=0)
    onnx_rr = load_reranker(onnx_dir=onnx_dir, cache_size=0)
    params = {k: v for k, v in decode.items() if k != "name"}
    for service in (torch_rr, onnx_rr):
        service.backend.decoder, service.backend.decoder_params = decode["name"], params
    validator = RequestValidator.for_service(onnx_rr)
    rng = np.random.default_rng(7)
    for i in range(max(3, CASES // 8)):
        payload = _payload(dataset, i % len(dataset), rng)
        c = payload["candidates"]
        req = Request(np.array(c["category"]), np.array(c["creator"]),
                      np.array(c["is_cold_start"]), np.array(c["is_long_tail"]),
                      np.ones(len(c["ids"]), bool), c["ids"], payload["m"])
        for _ in range(20):
            cs = random_set(rng, req)
            if not cs.is_empty() and req.compile(cs).feasible():
                break
        payload["constraints"] = cs.to_dict()
        inp = validator.validate_python(payload)
        got, ref = onnx_rr.rerank(inp), torch_rr.rerank(inp)
        assert got.item_ids == ref.item_ids
        assert _check(payload, got.item_ids) == []
        tally[(label, "cases")] += 1
        tally[(label, "lists")] += 1
