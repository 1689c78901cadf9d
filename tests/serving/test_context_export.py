"""Request context features through ONNX export, its parity check and both serving backends.

Exports are slow, so each model (one per graph kind: matrix, evaluator, encoder + step) is
exported once per module, from a seeded untrained run on a tiny data set with context features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genrerank.data.dataset import RerankDataset
from genrerank.serving.export import export_run
from genrerank.serving.onnx_model import OnnxModel
from genrerank.serving.parity import check_parity
from genrerank.serving.runtime import load_reranker
from genrerank.serving.schema import RequestValidator, payload_from_dataset
from genrerank.training.checkpoint import load_model, save_checkpoint
from tests.data.test_context_dataset import write_context_dataset
from tests.serving._runs import make_run

MODELS = ("pointwise", "evaluator", "autoregressive")
CONTEXT_INPUTS = ["context_cat", "context_dense"]


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # TorchBackend sets the global thread count
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    return RerankDataset(write_context_dataset(tmp_path_factory.mktemp("ctx") / "d"))


def _context_run(run: Path, name: str, data: RerankDataset) -> Path:
    """A seeded untrained run whose context statistics are not the identity, so the graphs
    must carry them (the evaluator standardises with running statistics of its own)."""
    extra = {"max_positions": 6} if name == "evaluator" else {}  # its export traces m = 4
    make_run(run, name, data.spec, seed=1, **extra)
    model, _ = load_model(run, "best")
    model.fit_statistics(data)
    norm = getattr(model, "context_norm", None)
    if norm is not None:
        norm.running_mean.fill_(3.0)
        norm.running_var.fill_(4.0)
    else:
        assert model.features.context_std.item() != 1.0
    save_checkpoint(run / "best", model, {"epoch": 0, "step": 0})
    return run


Exported = tuple[Path, Path, dict[str, Any]]  # run, export folder, manifest


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, data: RerankDataset
           ) -> Callable[[str], Exported]:
    """Exports a model's context run on first use, then hands back the same folder."""
    root = tmp_path_factory.mktemp("exports")
    done: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in done:
            run = _context_run(root / f"run-{name}", name, data)
            done[name] = (run, root / f"onnx-{name}", export_run(run, root / f"onnx-{name}"))
        return done[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_export_with_context_passes_parity_and_reads_the_context(
        name: str, export: Callable[[str], Exported]) -> None:
    run, onnx_dir, manifest = export(name)
    assert manifest["parity"]["passed"], manifest["parity"]
    request_graph = "encoder" if name == "autoregressive" else "model"
    assert manifest["graphs"][request_graph]["inputs"][2:4] == CONTEXT_INPUTS
    model, _ = load_model(run, "best")
    onnx = OnnxModel(onnx_dir)
    assert onnx.inputs[request_graph][2:4] == CONTEXT_INPUTS
    # Parity again on another seed and sizes: the synthetic requests carry random context.
    report = check_parity(model, onnx_dir, manifest, sizes=[5, 2, 3], seed=7)
    assert report["passed"], report
    # The graph is not blind to the context: two contexts, different numbers.
    b, n = 2, 3
    static = np.random.default_rng(0).normal(size=(b, n, 16)).astype(np.float32)
    feeds = [OnnxModel.request_feeds(
        np.zeros((b, 1)), np.zeros((b, 1)), static, np.ones((b, n)), np.ones((b, n), bool),
        context_cat=np.array([[c], [0]]), context_dense=np.array([[x], [1.0]]))
        for c, x in ((1, 0.5), (2, 9.0))]
    if name == "evaluator":
        lists = np.array([[[0, 1, 2]]] * b)
        outs = [onnx.score_lists(f, lists) for f in feeds]
    elif name == "autoregressive":
        outs = [onnx._start(f)[1] for f in feeds]  # the first position's log-probabilities
    else:
        outs = [onnx.matrix(f, 2)[0] for f in feeds]
    assert not np.allclose(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])  # request 1's context is unchanged


@pytest.mark.parametrize("name", ["pointwise", "autoregressive"])
def test_both_backends_serve_a_context_request_alike(
        name: str, export: Callable[[str], Exported], data: RerankDataset) -> None:
    run, onnx_dir, _ = export(name)
    torch_rr, onnx_rr = load_reranker(run_dir=run), load_reranker(onnx_dir=onnx_dir)
    validator = RequestValidator.for_service(torch_rr)
    for index in range(len(data)):
        payload = payload_from_dataset(data, index, m=2)
        inp = validator.validate_python(payload)
        want, got = torch_rr.rerank(inp), onnx_rr.rerank(inp)
        assert got.item_ids == want.item_ids
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-4)
        # Another context: the request's probabilities move, in both backends alike.
        payload["context"] = {"cat": {"device": 2 if index != 1 else 1},
                              "dense": {"query_length": 40.0}}
        other = validator.validate_python(payload)
        moved_torch, moved_onnx = torch_rr.rerank(other), onnx_rr.rerank(other)
        np.testing.assert_allclose(moved_onnx.scores, moved_torch.scores, rtol=0, atol=1e-4)
        assert not np.allclose(moved_torch.scores, want.scores, rtol=0, atol=1e-6)


def test_an_export_without_context_inputs_still_serves(
        export: Callable[[str], Exported]) -> None:
    """Graphs exported before the context inputs existed lack them: feeds are cut to the
    inputs each graph has (and a missing one is left for ONNX Runtime to name)."""
    _, onnx_dir, _ = export("pointwise")
    onnx = OnnxModel(onnx_dir)
    seen: list[set[str]] = []

    class Session:
        def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            seen.append(set(feeds))
            return [np.zeros(1)]

    onnx.sessions = {"model": Session()}
    onnx.inputs = {"model": ["user_cat", "user_dense", "item_static", "upstream_score",
                             "candidate_mask", "category", "position_mask"]}
    feeds = OnnxModel.request_feeds(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 2, 16)),
                                    np.zeros((1, 2)), np.ones((1, 2), bool))
    assert set(CONTEXT_INPUTS) <= set(feeds)
    onnx.matrix(feeds, 1)
    assert seen == [set(onnx.inputs["model"])]
