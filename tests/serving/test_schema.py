"""Request validation into RerankInput, and payload_from_dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genrerank.data.dataset import RerankDataset
from genrerank.data.schema import CategoricalFeature, FeatureSpec
from genrerank.serving.schema import (
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
