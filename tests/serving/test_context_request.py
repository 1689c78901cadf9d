"""Request context features in the HTTP request: the ``context`` object, its validation errors
(one line per field, like user features) and the payload builders."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from genrerank.data.dataset import RerankDataset
from genrerank.data.schema import CategoricalFeature, FeatureSpec
from genrerank.serving.app import create_app
from genrerank.serving.schema import (
    RequestValidationFailed,
    RequestValidator,
    RerankRequest,
    payload_from_dataset,
    synthetic_payload,
)
from tests.data.test_context_dataset import CONTEXT, write_context_dataset
from tests.serving.conftest import FakeService, fake_spec, valid_payload, wait_ready


def context_spec() -> FeatureSpec:
    spec = fake_spec()
    spec.context_categorical = [CategoricalFeature("device", 3), CategoricalFeature("page", 4)]
    spec.context_dense = ["query_length", "hour"]
    return spec


class ContextService(FakeService):
    def __init__(self) -> None:
        super().__init__()
        self.spec = context_spec()


def context_payload() -> dict[str, Any]:
    payload = valid_payload()
    # Dense values in another order than the spec's: the input follows the spec.
    payload["context"] = {"cat": {"page": 3, "device": 1},
                          "dense": {"hour": 13.0, "query_length": 2.5}}
    return payload


def _validator(spec: FeatureSpec | None = None) -> RequestValidator:
    return RequestValidator(spec or context_spec(), ("pipeline", "greedy"), 500, 10)


def _errors(payload: Any, spec: FeatureSpec | None = None) -> dict[str, str]:
    with pytest.raises(RequestValidationFailed) as info:
        body = payload if isinstance(payload, str) else json.dumps(payload)
        _validator(spec).validate_json(body)
    return {e.field: e.message for e in info.value.errors}


def test_context_becomes_spec_ordered_arrays() -> None:
    inp = _validator().validate_json(json.dumps(context_payload()))
    assert inp.context_cat.dtype == np.int64 and inp.context_cat.tolist() == [1, 3]
    assert inp.context_dense.dtype == np.float32 and inp.context_dense.tolist() == [2.5, 13.0]
    np.testing.assert_array_equal(inp.user_cat, [2])  # user features are unaffected


def test_context_may_be_omitted_only_when_the_spec_has_none() -> None:
    plain = fake_spec()
    inp = _validator(plain).validate_python(valid_payload())
    assert inp.context_cat.shape == (0,) and inp.context_dense.shape == (0,)
    empty = {**valid_payload(), "context": {"cat": {}, "dense": {}}}
    assert _validator(plain).validate_python(empty).context_cat.shape == (0,)
    # Declared context features are required, like user features.
    assert _errors(valid_payload()) == {
        "context.cat.device": "missing context categorical feature",
        "context.cat.page": "missing context categorical feature",
        "context.dense.query_length": "missing context dense feature",
        "context.dense.hour": "missing context dense feature",
    }
    partial = context_payload()
    del partial["context"]["dense"]["hour"]
    assert _errors(partial) == {"context.dense.hour": "missing context dense feature"}


def _edit(path: str, value: Any) -> dict[str, Any]:
    payload = context_payload()
    *parents, last = path.split(".")
    node = payload
    for key in parents:
        node = node[key]
    node[last] = value
    return payload


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        (_edit("context.cat.device", 3), "context.cat.device",
         "index 3 is outside the vocabulary [0, 3) (0 = unknown)"),
        (_edit("context.cat.page", -1), "context.cat.page",
         "-1 is negative; indices are >= 0 (0 = unknown)"),
        (_edit("context.cat.page", 1.0), "context.cat.page", "expected an integer, got the "
         "number 1.0"),
        (_edit("context.cat.device", True), "context.cat.device",
         "expected an integer, got a boolean (true)"),
        (_edit("context.dense.hour", "13"), "context.dense.hour",
         "expected a number, got a string ('13')"),
        (_edit("context.dense.hour", 2e9), "context.dense.hour",
         "2000000000.0 is too large: numbers must be within [-1e9, 1e9]"),
        (_edit("context.dense.query_length", 1e300), "context.dense.query_length",
         "1e+300 does not fit in float32"),
        (_edit("context.cat.query", 1), "context.cat.query",
         "unknown context categorical feature; expected ['device', 'page']"),
        (_edit("context.cat.hour", 1), "context.cat.hour",
         "unknown context categorical feature (it is declared under context.dense)"),
        (_edit("context.dense.ud", 1.0), "context.dense.ud",
         "unknown context dense feature (it is declared under user.dense)"),
        (_edit("context.lang", {}), "context.lang", "unknown field"),
        (_edit("context", [1]), "context", "expected an object, got a list"),
    ],
    ids=["out-of-vocab", "negative", "float-index", "boolean-index", "string-number",
         "too-large", "beyond-float32", "unknown-name", "dense-name-under-cat",
         "user-name-under-context", "unknown-key", "not-an-object"],
)
def test_invalid_context_names_the_field(payload: dict, field: str, message: str) -> None:
    assert _errors(payload) == {field: message}


def test_non_finite_context_numbers_are_refused() -> None:
    body = json.dumps(context_payload()).replace('"hour": 13.0', '"hour": NaN')
    assert _errors(body) == {"context.dense.hour": "NaN is not allowed"}
    body = json.dumps(context_payload()).replace('"hour": 13.0', '"hour": -Infinity')
    assert _errors(body) == {
        "context.dense.hour": "-Infinity is not allowed (numbers must be finite)"}


def test_a_context_feature_sent_as_a_user_feature_is_pointed_to_context() -> None:
    payload = context_payload()
    payload["user"]["cat"]["device"] = 1
    assert _errors(payload) == {
        "user.cat.device": "unknown user categorical feature (it is declared under context.cat)"}


def test_payload_builders_carry_the_context(tmp_path: Path) -> None:
    ds = RerankDataset(write_context_dataset(tmp_path / "ctx"))
    validator = RequestValidator(ds.spec, ("s",))
    for i, (device, length) in enumerate(CONTEXT):
        payload = payload_from_dataset(ds, i)
        assert payload["context"] == {"cat": {"device": device},
                                      "dense": {"query_length": length}}
        inp = validator.validate_python(json.loads(json.dumps(payload)))
        assert inp.context_cat.tolist() == [device] and inp.context_dense.tolist() == [length]
    warm = validator.validate_python(synthetic_payload(ds.spec, n=4, m=2))
    assert warm.context_cat.tolist() == [0] and warm.context_dense.tolist() == [0.0]
    # Without context features the bodies are what they always were.
    assert "context" not in synthetic_payload(fake_spec(), n=4)


def test_the_openapi_example_is_a_valid_request() -> None:
    example = copy.deepcopy(RerankRequest.model_config["json_schema_extra"]["examples"][0])
    spec = FeatureSpec(
        source="example",
        user_categorical=[CategoricalFeature("activity_level", 4)],
        user_dense=["hist_activity"],
        context_categorical=[CategoricalFeature("device", 3)],
        context_dense=["query_length"],
        item_categorical=[CategoricalFeature("duration_bucket", 5)],
        item_dense=["log_duration"],
        n_categories=10,
        n_creators=12,
    )
    inp = RequestValidator(spec, ("pipeline",)).validate_python(example)
    assert inp.context_cat.tolist() == [1] and inp.context_dense.tolist() == [2.0]
    assert "context" in RerankRequest.model_json_schema()["properties"]


@pytest.fixture(scope="module")
def service_client() -> Iterator[tuple[ContextService, TestClient]]:
    service = ContextService()
    with TestClient(create_app(service, timeout_s=1.0)) as client:
        assert wait_ready(client).status_code == 200
        yield service, client


def test_http_request_with_context(service_client: tuple[ContextService, TestClient]) -> None:
    service, client = service_client
    response = client.post("/v1/rerank", json=context_payload())
    assert response.status_code == 200, response.text
    assert response.json()["items"] == ["a", "b", "c"]
    last = service.calls[-1]
    assert last.context_cat.tolist() == [1, 3] and last.context_dense.tolist() == [2.5, 13.0]
    # The warm-up request the app sends itself passes validation with the context too.
    assert any(c.request_id == "warmup" and c.context_cat.tolist() == [0, 0]
               for c in service.calls)


def test_http_context_errors_are_422_naming_the_field(
        service_client: tuple[ContextService, TestClient]) -> None:
    _, client = service_client
    response = client.post("/v1/rerank", json=_edit("context.cat.page", 4))
    assert response.status_code == 422
    assert response.json() == {"error": "invalid request", "detail": [
        {"field": "context.cat.page",
         "message": "index 4 is outside the vocabulary [0, 4) (0 = unknown)"}]}
    missing = context_payload()
    del missing["context"]
    response = client.post("/v1/rerank", json=missing)
    assert response.status_code == 422
    assert {d["field"] for d in response.json()["detail"]} == {
        "context.cat.device", "context.cat.page", "context.dense.query_length",
        "context.dense.hour"}
