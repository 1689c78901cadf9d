"""Request validation into RerankInput, and payload_from_dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from genrerank.data.dataset import RerankDataset
from genrerank.data.schema import CategoricalFeature, FeatureSpec
from genrerank.serving.schema import (
    DEFAULT_MAX_ITEM_ID_LENGTH,
    MAX_ABS_NUMBER,
    RequestValidationFailed,
    RequestValidator,
    RerankRequest,
    format_loc,
    payload_from_dataset,
    synthetic_payload,
)
from tests.serving.conftest import FakeService, fake_spec, valid_payload


def _validator() -> RequestValidator:
    return RequestValidator.for_service(FakeService())


def test_valid_payload_becomes_spec_ordered_arrays() -> None:
    inp = _validator().validate_json(json.dumps(valid_payload()))
    assert inp.item_ids == ["a", "b", "c", "d", "e"]
    assert inp.n == 5 and inp.m == 3
    assert inp.strategy == "pipeline"  # the service's first strategy
    assert inp.k is None and inp.request_id == "req-1"
    np.testing.assert_array_equal(inp.user_cat, [2])
    np.testing.assert_array_equal(inp.user_dense, np.array([0.5], np.float32))
    assert inp.item_cat.shape == (5, 1) and inp.item_cat.dtype == np.int64
    np.testing.assert_array_equal(inp.item_cat[:, 0], [1, 2, 3, 0, 9])
    assert inp.item_dense.shape == (5, 2) and inp.item_dense.dtype == np.float32
    np.testing.assert_allclose(inp.item_dense[:, 1], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(inp.item_dense[:, 0], [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-6)
    assert inp.upstream_score.dtype == np.float32
    np.testing.assert_array_equal(inp.category, [1, 1, 2, 3, 4])
    np.testing.assert_array_equal(inp.creator, [0, 6, 2, 2, 1])
    assert inp.item_cat.flags.c_contiguous and inp.item_dense.flags.c_contiguous


def test_dense_order_follows_the_spec_not_the_body() -> None:
    payload = valid_payload()
    dense = payload["candidates"]["dense"]
    payload["candidates"]["dense"] = {"d2": dense["d2"], "d1": dense["d1"]}
    inp = _validator().validate_python(payload)
    np.testing.assert_allclose(inp.item_dense[:, 1], [1, 2, 3, 4, 5])


def test_optional_fields_default() -> None:
    payload = valid_payload()
    del payload["candidates"]["category"], payload["candidates"]["creator"]
    del payload["request_id"]
    payload["strategy"], payload["k"] = "greedy", 4
    inp = _validator().validate_python(payload)
    np.testing.assert_array_equal(inp.category, np.zeros(5, np.int64))
    np.testing.assert_array_equal(inp.creator, np.zeros(5, np.int64))
    assert inp.category.dtype == np.int64
    assert inp.request_id is None and inp.strategy == "greedy" and inp.k == 4


def test_user_may_be_omitted_when_the_spec_has_no_user_features() -> None:
    spec = FeatureSpec(
        source="t", item_categorical=[CategoricalFeature("c", 3)], item_dense=[], labels=["click"]
    )
    validator = RequestValidator(spec, ("s",), max_candidates=10, max_list_length=3)
    body = {"candidates": {"ids": ["x", "y"], "upstream_score": [1, 0], "cat": {"c": [1, 2]}}}
    inp = validator.validate_python({**body, "m": 2})
    assert inp.user_cat.shape == (0,) and inp.user_dense.shape == (0,)
    assert inp.item_dense.shape == (2, 0) and inp.item_cat.shape == (2, 1)


def test_errors_are_collected_and_name_fields() -> None:
    payload = valid_payload()
    payload["candidates"]["dense"]["d1"][3] = float("nan")
    payload["candidates"]["cat"]["icat"][1] = True
    with pytest.raises(RequestValidationFailed) as info:
        _validator().validate_python(payload)
    fields = {e.field: e.message for e in info.value.errors}
    assert fields["candidates.dense.d1[3]"] == "NaN is not allowed"
    assert "boolean" in fields["candidates.cat.icat[1]"]
    assert "candidates.dense.d1[3]: NaN is not allowed" in str(info.value)


def test_many_bad_values_are_capped() -> None:
    payload = valid_payload()
    n = 300
    payload["candidates"] = {
        "ids": [str(i) for i in range(n)],
        "upstream_score": ["x"] * n,
        "cat": {"icat": [0] * n},
        "dense": {"d1": [0.0] * n, "d2": [0.0] * n},
    }
    with pytest.raises(RequestValidationFailed) as info:
        _validator().validate_python(payload)
    assert len(info.value.errors) == 20


def test_format_loc() -> None:
    assert format_loc(("candidates", "dense", "d1", 3)) == "candidates.dense.d1[3]"
    assert format_loc(()) == "body"
    assert format_loc(("m",)) == "m"


def test_synthetic_payload_is_valid() -> None:
    inp = _validator().validate_python(synthetic_payload(fake_spec(), n=8, m=1))
    assert inp.n == 8 and inp.m == 1


def test_request_model_schema_documents_the_contract() -> None:
    schema = RerankRequest.model_json_schema()
    assert {"candidates", "m", "user", "strategy", "k", "request_id"} <= set(schema["properties"])
    assert schema["required"] == ["candidates", "m"]


# --------------------------------------------------------------------------- item id length


def _errors(validator: RequestValidator, payload: dict) -> dict[str, str]:
    with pytest.raises(RequestValidationFailed) as info:
        validator.validate_python(payload)
    return {e.field: e.message for e in info.value.errors}


def test_default_item_id_limit_accepts_normal_ids_and_ids_at_the_limit() -> None:
    assert DEFAULT_MAX_ITEM_ID_LENGTH == 256
    validator = _validator()
    assert validator.max_item_id_length == 256  # FakeService has no max_item_id_length
    payload = valid_payload()
    payload["candidates"]["ids"] = [
        "v21093",
        "3f2b8c1e-9a4d-4e7b-8c2a-5d6e7f8a9b0c",  # a UUID
        "N" * 256,  # exactly at the limit
        "\U0001f600" * 256,  # 256 characters of 4 bytes each: characters, not bytes, count
        "https://example.com/item/12345?ref=feed",
    ]
    assert validator.validate_python(payload).item_ids == payload["candidates"]["ids"]


def test_an_over_long_item_id_is_refused_with_its_position() -> None:
    payload = valid_payload()
    payload["candidates"]["ids"][3] = "x" * 257
    payload["candidates"]["ids"][4] = "y" * 50_000
    fields = _errors(_validator(), payload)
    assert fields == {
        "candidates.ids[3]": "item id of 257 characters; at most 256 are accepted",
        "candidates.ids[4]": "item id of 50000 characters; at most 256 are accepted",
    }


def test_the_item_id_limit_is_configurable_and_read_from_the_service() -> None:
    service = FakeService()
    service.max_item_id_length = 3  # type: ignore[attr-defined]
    validator = RequestValidator.for_service(service)
    payload = valid_payload()
    payload["candidates"]["ids"][1] = "abcd"
    assert _errors(validator, payload) == {
        "candidates.ids[1]": "item id of 4 characters; at most 3 are accepted"
    }
    payload["candidates"]["ids"][1] = "abc"
    assert validator.validate_python(payload).item_ids[1] == "abc"
    with pytest.raises(ValueError, match="max_item_id_length must be >= 1"):
        RequestValidator(fake_spec(), ("s",), max_item_id_length=0)


def test_a_duplicate_long_id_is_not_echoed_in_full() -> None:
    payload = valid_payload()
    payload["candidates"]["ids"][0] = payload["candidates"]["ids"][2] = "d" * 200
    message = _errors(_validator(), payload)["candidates.ids[2]"]
    assert "(200 characters) at positions 0 and 2" in message and len(message) < 120


def test_an_over_long_item_id_is_a_422_over_http(client: TestClient) -> None:
    payload = valid_payload()
    payload["candidates"]["ids"][3] = "z" * 50_000
    response = client.post("/v1/rerank", json=payload)
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid request",
        "detail": [
            {
                "field": "candidates.ids[3]",
                "message": "item id of 50000 characters; at most 256 are accepted",
            }
        ],
    }
    payload["candidates"]["ids"][3] = "z" * 256
    assert client.post("/v1/rerank", json=payload).status_code == 200


# --------------------------------------------------------------------------- number magnitude


def test_numbers_up_to_the_magnitude_bound_are_accepted() -> None:
    assert MAX_ABS_NUMBER == 1e9
    payload = valid_payload()
    payload["user"]["dense"]["ud"] = -MAX_ABS_NUMBER
    payload["candidates"]["upstream_score"][0] = MAX_ABS_NUMBER
    payload["candidates"]["dense"]["d2"][4] = -1e-45  # float32 subnormals are fine
    inp = _validator().validate_python(payload)
    assert inp.upstream_score[0] == np.float32(1e9) and inp.user_dense[0] == np.float32(-1e9)


def test_numbers_beyond_the_magnitude_bound_are_refused() -> None:
    # Finite and within float32, but the model's squares overflow: NaN scores, once a 500.
    payload = valid_payload()
    payload["user"]["dense"]["ud"] = 1e30
    payload["candidates"]["upstream_score"][1] = -3.4e38
    payload["candidates"]["dense"]["d1"][2] = 2e9
    payload["candidates"]["dense"]["d2"][0] = 1e39  # beyond float32 too
    assert _errors(_validator(), payload) == {
        "user.dense.ud": "1e+30 is too large: numbers must be within [-1e9, 1e9]",
        "candidates.upstream_score[1]": "-3.4e+38 is too large: numbers must be within "
        "[-1e9, 1e9]",
        "candidates.dense.d1[2]": "2000000000.0 is too large: numbers must be within [-1e9, 1e9]",
        "candidates.dense.d2[0]": "1e+39 does not fit in float32",
    }


# --------------------------------------------------------------------------- payload_from_dataset


@pytest.fixture(scope="module")
def sim_dataset(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    from genrerank.data.simulator import simulate_to_dir

    out: Path = tmp_path_factory.mktemp("serving") / "sim"
    simulate_to_dir("kuaishou", 50, seed=0, out_dir=out, progress=False)
    return RerankDataset(out, split="test")  # a split: row indices differ from table rows


def test_payload_from_dataset_round_trips(sim_dataset: RerankDataset) -> None:
    ds = sim_dataset
    spec = ds.spec
    validator = RequestValidator(spec, ("pipeline",), spec.max_candidates, spec.max_list_length)
    for index in range(len(ds)):
        payload = payload_from_dataset(ds, index)
        inp = validator.validate_json(json.dumps(payload))  # plain JSON types only
        item = ds[index]
        assert inp.request_id == ds.request_ids[index]
        assert inp.item_ids == ds.table.column("item_id")[index].as_py()
        assert inp.m == len(item["exposed"])
        for name in ("user_cat", "item_cat", "category", "creator"):
            np.testing.assert_array_equal(getattr(inp, name), item[name], err_msg=name)
        for name in ("user_dense", "item_dense", "upstream_score"):
            got, want = getattr(inp, name), item[name]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want, err_msg=name)  # exact: float32 round trip


def test_payload_from_dataset_options(sim_dataset: RerankDataset) -> None:
    payload = payload_from_dataset(sim_dataset, 0, m=2, strategy="greedy", k=4)
    assert payload["m"] == 2 and payload["strategy"] == "greedy" and payload["k"] == 4
    assert "strategy" not in payload_from_dataset(sim_dataset, 0)
    names = [f.name for f in sim_dataset.spec.item_categorical]
    assert list(payload["candidates"]["cat"]) == names
