"""The re-ranking runtime: PyTorch and ONNX backends agree, the item cache, ragged requests,
the pipeline strategy and the Reranker's refusals. Requests are real simulated ones, validated
exactly as the HTTP layer does (payload_from_dataset -> RequestValidator)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genrerank.data.dataset import RerankDataset
from genrerank.pipeline import Pipeline
from genrerank.serving.runtime import (
    OnnxBackend,
    Reranker,
    TorchBackend,
    load_reranker,
    raw_batch,
)
from genrerank.serving.schema import RequestValidator, payload_from_dataset
from genrerank.serving.types import RerankInput, RerankResult
from tests.serving._runs import make_run
from tests.serving.test_export import shared_export, shared_run, simulated

TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    # TorchBackend sets torch's global thread count; later tests in this process keep theirs.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    return RerankDataset(simulated(tmp_path_factory), "test")


def _request(service: Reranker, ds: RerankDataset, index: int, **changes: Any) -> RerankInput:
    """Request ``index`` as the app would hand it over; ``changes`` edit the payload first."""
    payload = payload_from_dataset(ds, index)
    payload.update(changes)
    return RequestValidator.for_service(service).validate_python(payload)


def _cut(payload: dict[str, Any], n: int) -> dict[str, Any]:
    """The payload with only its first ``n`` candidates."""
    cands = payload["candidates"]
    for key in ("ids", "upstream_score", "category", "creator"):
        cands[key] = cands[key][:n]
    for group in ("cat", "dense"):
        cands[group] = {name: values[:n] for name, values in cands[group].items()}
    return payload


def _assert_served(result: RerankResult, inp: RerankInput) -> None:
    """m distinct candidates of this request, each with a probability."""
    assert len(result.item_ids) == inp.m
    assert len(set(result.item_ids)) == inp.m
    assert set(result.item_ids) <= set(inp.item_ids)
    assert len(result.scores) == inp.m
    assert all(0.0 < s <= 1.0 for s in result.scores), result.scores


def _same(a: RerankResult, b: RerankResult) -> None:
    assert a.item_ids == b.item_ids
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=TOLERANCE)


# --------------------------------------------------------------------------- torch vs onnx


@pytest.mark.parametrize(
    ("name", "decoder"),
    [("nar4rec", "contrastive"), ("autoregressive", "beam"), ("pointwise", "greedy")],
)
def test_torch_and_onnx_backends_serve_the_same_lists(
    name: str, decoder: str, tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    onnx_dir, _ = shared_export(tmp_path_factory, name)
    torch_rr = load_reranker(run_dir=shared_run(tmp_path_factory, name))
    onnx_rr = load_reranker(onnx_dir=onnx_dir)
    assert isinstance(torch_rr.backend, TorchBackend) and isinstance(onnx_rr.backend, OnnxBackend)
    assert torch_rr.backend.decoder == onnx_rr.backend.decoder == decoder  # the run's decoder
    assert torch_rr.model_version == onnx_rr.model_version
    assert torch_rr.strategies == onnx_rr.strategies == (name,)
    assert len(dataset) >= 10
    for index in range(len(dataset)):
        inp = _request(torch_rr, dataset, index)
        assert (inp.n, inp.m, inp.strategy) == (60, 6, name)
        want, got = torch_rr.rerank(inp), onnx_rr.rerank(inp)
        _same(got, want)
        _assert_served(got, inp)
        assert got.strategy == name and got.model_version == onnx_rr.model_version
        assert got.list_score is None
        assert {"items", "model"} <= set(got.timings_ms)


def test_the_learned_context_decoder_serves_the_same_lists_from_onnx(
    tmp_path: Path, dataset: RerankDataset
) -> None:
    """NAR4Rec with the ``context`` decoder: serving reads the learned table from the manifest
    and writes the lists PyTorch writes (the table is random, so it changes lists)."""
    from genrerank.serving.export import export_run

    run = make_run(tmp_path / "run", "nar4rec", dataset.spec, decode={"name": "context"})
    report = export_run(run, tmp_path / "onnx")
    torch_rr = load_reranker(run_dir=run)
    onnx_rr = load_reranker(onnx_dir=tmp_path / "onnx")
    assert torch_rr.backend.decoder == onnx_rr.backend.decoder == "context"
    assert report["parity"]["lists_identical"]
    # The same weights decoded greedily: the table must change some lists.
    greedy_rr = load_reranker(run_dir=make_run(tmp_path / "greedy", "nar4rec", dataset.spec,
                                                decode={"name": "greedy"}))
    differs = 0
    for index in range(len(dataset)):
        inp = _request(torch_rr, dataset, index)
        want, got = torch_rr.rerank(inp), onnx_rr.rerank(inp)
        _same(got, want)
        _assert_served(got, inp)
        differs += greedy_rr.rerank(inp).item_ids != got.item_ids
    assert differs > 0


@pytest.mark.parametrize("name", ["nar4rec", "autoregressive"])
def test_hashed_item_id_embeddings_are_served_from_the_ids(
    name: str, tmp_path: Path, dataset: RerankDataset
) -> None:
    """A model with hashed item-id embeddings: the ONNX item tower takes the id hashes, parity
    holds, PyTorch and ONNX serve the same lists, and the same features under other ids give
    other lists (the ids are read, not only the features). The packaged feature options (the
    category crosses, the known-value buffers of ``min_count``) are on too: they travel into
    the graphs with the same parity."""
    from genrerank.serving.export import export_run

    run = make_run(tmp_path / "run", name, dataset.spec,
                   features={"item_id_buckets": 64, "category_cross": True, "min_count": 5})
    report = export_run(run, tmp_path / "onnx")
    assert report["parity"]["passed"] and report["parity"]["lists_identical"]
    torch_rr = load_reranker(run_dir=run)
    onnx_rr = load_reranker(onnx_dir=tmp_path / "onnx")
    differs = 0
    for index in range(len(dataset)):
        inp = _request(torch_rr, dataset, index)
        want, got = torch_rr.rerank(inp), onnx_rr.rerank(inp)
        _same(got, want)
        renamed = dataclasses.replace(inp, item_ids=[f"other-{i}" for i in inp.item_ids])
        moved = onnx_rr.rerank(renamed)
        _same(moved, torch_rr.rerank(renamed))
        differs += [i.removeprefix("other-") for i in moved.item_ids] != got.item_ids
    assert differs > 0


# --------------------------------------------------------------------------- item cache


def test_a_repeated_request_is_served_from_the_cache(
    tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    onnx_dir, _ = shared_export(tmp_path_factory, "nar4rec")
    cached = load_reranker(onnx_dir=onnx_dir, cache_size=1000)
    uncached = load_reranker(onnx_dir=onnx_dir, cache_size=0)
    inp = _request(cached, dataset, 0)
    first = cached.rerank(inp)
    assert (first.cache_hits, first.cache_misses) == (0, 60)
    second = cached.rerank(inp)
    assert (second.cache_hits, second.cache_misses) == (60, 0)
    reference = uncached.rerank(inp)
    assert (reference.cache_hits, reference.cache_misses) == (0, 60)
    # Cached vectors give exactly what computing them afresh gives.
    assert second.item_ids == first.item_ids == reference.item_ids
    assert second.scores == first.scores == reference.scores
    stats = cached.cache_stats()
    assert stats["hits"] == 60 and stats["misses"] == 60 and stats["size"] == 60
    assert stats["hit_rate"] == 0.5
    assert uncached.cache_stats()["size"] == 0

    # Another model version: the vectors of the old one are dropped and recomputed.
    cached.cache.bind("another-model-version")
    third = cached.rerank(inp)
    assert (third.cache_hits, third.cache_misses) == (0, 60)
    assert third.item_ids == reference.item_ids and third.scores == reference.scores


def test_changed_item_features_are_recomputed_not_served_stale(
    tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    onnx_dir, _ = shared_export(tmp_path_factory, "pointwise")
    cached = load_reranker(onnx_dir=onnx_dir, cache_size=1000)
    uncached = load_reranker(onnx_dir=onnx_dir, cache_size=0)
    payload = payload_from_dataset(dataset, 1)
    cached.rerank(RequestValidator.for_service(cached).validate_python(payload))
    # Same ids, but a dense feature of the first 5 candidates has changed.
    dense = payload["candidates"]["dense"]
    first = next(iter(dense))
    dense[first] = [v + 3.0 if i < 5 else v for i, v in enumerate(dense[first])]
    inp = RequestValidator.for_service(cached).validate_python(payload)
    got = cached.rerank(inp)
    assert (got.cache_hits, got.cache_misses) == (55, 5)
    want = uncached.rerank(inp)
    assert got.item_ids == want.item_ids and got.scores == want.scores


def test_requests_of_different_sizes(
    tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    # n varies per request (60, then 7, unlike anything traced); m = 3 < the trained 6.
    onnx_dir, _ = shared_export(tmp_path_factory, "nar4rec")
    onnx_rr = load_reranker(onnx_dir=onnx_dir, cache_size=1000)
    torch_rr = load_reranker(run_dir=shared_run(tmp_path_factory, "nar4rec"), cache_size=0)
    fresh = load_reranker(onnx_dir=onnx_dir, cache_size=0)
    validator = RequestValidator.for_service(onnx_rr)
    full = validator.validate_python(payload_from_dataset(dataset, 2, m=3))
    short = validator.validate_python(_cut(payload_from_dataset(dataset, 2, m=3), 7))
    assert (full.n, full.m, short.n, short.m) == (60, 3, 7, 3)

    for inp in (full, short):
        got = onnx_rr.rerank(inp)
        _same(got, torch_rr.rerank(inp))
        _assert_served(got, inp)
    # The short request's 7 items were cached by the full one: all hits, same answer as without
    # a cache (vectors do not depend on the request they were computed in).
    again = onnx_rr.rerank(short)
    assert (again.cache_hits, again.cache_misses) == (7, 0)
    reference = fresh.rerank(short)
    assert again.item_ids == reference.item_ids and again.scores == reference.scores
    assert set(again.item_ids) <= set(full.item_ids[:7])


# --------------------------------------------------------------------------- pipeline


def test_pipeline_strategy_serves_the_evaluators_best_list(
    tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    evaluator_run = shared_run(tmp_path_factory, "evaluator")
    config = {
        "evaluator": str(evaluator_run),
        "generators": [
            {"type": "logging"},
            {"type": "mmr", "diversities": [0.3, 0.7]},
            {"type": "perturb", "count": 4, "swaps": 2, "seed": 0},
        ],
    }
    backend = TorchBackend(shared_run(tmp_path_factory, "pointwise"))
    reranker = Reranker(backend, pipeline=Pipeline.from_config(config))
    assert reranker.strategies == ("pointwise", "pipeline")
    for index in range(3):
        inp = _request(reranker, dataset, index, strategy="pipeline", m=5)
        result = reranker.rerank(inp)
        assert result.strategy == "pipeline"
        assert result.model_version == backend.version
        _assert_served_pipeline(result, inp)
        # list_score is the evaluator's discounted sum of the per-position gains it reports.
        discounted = sum(s / math.log2(j + 2) for j, s in enumerate(result.scores))
        assert result.list_score == pytest.approx(discounted, rel=1e-5)
        # The upstream order is one of the proposals, so the served list scores at least as well.
        upstream = np.argsort(-inp.upstream_score, kind="stable")[: inp.m]
        with torch.inference_mode():
            score = reranker.pipeline.evaluator.score_lists(
                raw_batch(inp), torch.from_numpy(upstream)[None, None]
            )
        assert result.list_score >= float(score[0, 0]) - 1e-6

    # k = 1: only the first generator's list (the upstream order) is proposed, so it is served.
    inp = _request(reranker, dataset, 0, strategy="pipeline", m=5, k=1)
    result = reranker.rerank(inp)
    upstream = np.argsort(-inp.upstream_score, kind="stable")[: inp.m]
    assert result.item_ids == [inp.item_ids[i] for i in upstream]


def _assert_served_pipeline(result: RerankResult, inp: RerankInput) -> None:
    assert len(result.item_ids) == inp.m and len(set(result.item_ids)) == inp.m
    assert set(result.item_ids) <= set(inp.item_ids)
    assert len(result.scores) == inp.m and all(math.isfinite(s) for s in result.scores)
    assert result.list_score is not None and math.isfinite(result.list_score)


# --------------------------------------------------------------------------- refusals


def test_an_evaluator_run_alone_cannot_be_served(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(ValueError, match="is a list evaluator: it scores lists but writes none"):
        load_reranker(run_dir=shared_run(tmp_path_factory, "evaluator"))


def test_unknown_strategies_are_refused(
    tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    reranker = load_reranker(run_dir=shared_run(tmp_path_factory, "pointwise"))
    inp = _request(reranker, dataset, 0)
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; accepted: \['pointwise'\]"):
        reranker.rerank(dataclasses.replace(inp, strategy="nope"))
    with pytest.raises(ValueError, match="needs the service started with --pipeline"):
        reranker.rerank(dataclasses.replace(inp, strategy="pipeline"))


def test_max_candidates_is_capped_by_the_models_input_limit(
    tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    run = shared_run(tmp_path_factory, "prm")
    # prm's learned input-rank table has 60 rows (the data's largest n): no more candidates.
    assert load_reranker(run_dir=run, max_candidates=500).max_candidates == 60
    assert load_reranker(run_dir=run, max_candidates=10).max_candidates == 10
    # Models without such a table take the configured limit as is.
    pointwise = shared_run(tmp_path_factory, "pointwise")
    assert load_reranker(run_dir=pointwise, max_candidates=500).max_candidates == 500
    reranker = load_reranker(run_dir=run, max_candidates=500)
    inp = _request(reranker, dataset, 0)
    _assert_served(reranker.rerank(inp), inp)  # n = 60, at the limit


def test_load_reranker_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        load_reranker()
    with pytest.raises(ValueError, match="exactly one of"):
        load_reranker(run_dir=tmp_path, onnx_dir=tmp_path)
    with pytest.raises(ValueError, match="--int8 applies to an ONNX export"):
        load_reranker(run_dir=tmp_path, int8=True)
