"""The re-ranking runtime behind the HTTP service: one request in, one ordered list out.

Per request (:meth:`Reranker.rerank`):

1. **Item embeddings** (``timings_ms["items"]``): each candidate's request-independent vector
   comes from the :class:`~genrerank.serving.cache.ItemEmbeddingCache`; only the misses go
   through the model's item tower, and are then cached.
2. **Model** (``"model"``): the rest of the network on the request (upstream scores, user
   context, the candidates together), in PyTorch eager (:class:`TorchBackend`, from a run
   folder) or ONNX Runtime (:class:`OnnxBackend`, from an export folder).
3. **Decode** (``"decode"``): the run's decoder turns the model's output into the list (for the
   autoregressive model, decoding is the step loop itself and is counted under "model"),
   under the request's constraints (``RerankInput.constraints``, compiled and checked feasible
   by the validator) when it has any.

Strategy ``"pipeline"`` (when a pipeline config is given) instead runs the generator-evaluator
pipeline of :mod:`genrerank.pipeline` in PyTorch, with ``k`` lists proposed; the item cache and
ONNX do not apply to it (its generators and evaluator read raw features).

Scores: for each served item, the model's probability of that item at its position (matrix
models: its entry of the position's softmax; autoregressive: the step's pointer probability);
for the pipeline, the evaluator's expected gain at each position, and ``list_score`` = the
evaluator's score of the served list.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrerank.data.dataset import Batch
from genrerank.data.ids import hash_item_ids
from genrerank.serving.backends import (
    OnnxBackend,
    TorchBackend,
    _context,
    _ms,
    _t,
)
from genrerank.serving.cache import DEFAULT_CACHE_BYTES, ItemEmbeddingCache
from genrerank.serving.export import make_batch
from genrerank.serving.schema import DEFAULT_MAX_ITEM_ID_LENGTH
from genrerank.serving.types import RerankInput, RerankResult

__all__ = ["OnnxBackend", "Reranker", "TorchBackend", "load_reranker"]

DEFAULT_MAX_CANDIDATES = 500
DEFAULT_CACHE_SIZE = 100_000


class Reranker:
    """Implements :class:`~genrerank.serving.types.RerankService` over a backend."""

    def __init__(self, backend: TorchBackend | OnnxBackend, *,
                 cache_size: int = DEFAULT_CACHE_SIZE,
                 cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_candidates: int = DEFAULT_MAX_CANDIDATES,
                 max_item_id_length: int = DEFAULT_MAX_ITEM_ID_LENGTH,
                 pipeline: Any = None) -> None:
        if backend.kind != "generator":
            raise ValueError(f"model {backend.model_name!r} is a list evaluator: it scores lists "
                             "but writes none. Serve a generator run (with --pipeline to use "
                             "the evaluator).")
        self.backend = backend
        self.spec = backend.spec
        self.model_version = backend.version
        #: A run's ``decode.constraints``: the validator applies them to requests without any.
        self.default_constraints = getattr(backend, "default_constraints", None)
        limit = backend.max_candidates
        self.max_candidates = min(max_candidates, limit) if limit else max_candidates
        self.max_list_length = int(backend.max_list_length or self.max_candidates)
        if max_item_id_length < 1:
            raise ValueError(f"max_item_id_length must be >= 1, got {max_item_id_length}")
        self.max_item_id_length = max_item_id_length
        self.cache = ItemEmbeddingCache(cache_size, backend.version, max_bytes=cache_bytes)
        self.pipeline = pipeline
        self.strategies: tuple[str, ...] = (backend.model_name,) + (
            ("pipeline",) if pipeline is not None else ())
        self._dim: int | None = None
        # A remote model (a model server) says whether it can serve now, for /readyz; local
        # backends have no such check (ready once loaded), so the app asks nothing of them.
        check = getattr(backend, "ready_check", None)
        if check is not None:
            self.ready_check = check

    def cache_stats(self) -> dict[str, float]:
        return self.cache.stats()

    def item_vectors(self, inp: RerankInput) -> tuple[np.ndarray, int, int]:
        """``[n, d]`` item vectors from the cache, computing (and caching) the misses."""
        prints = self.cache.fingerprints(inp.item_cat, inp.item_dense)
        if self._dim is None:
            self._dim = int(self.backend.item_embedding(
                inp.item_cat[:1], inp.item_dense[:1], hash_item_ids(inp.item_ids[:1])).shape[-1])
        static, missing = self.cache.get_many(inp.item_ids, prints, self._dim)
        if missing:
            rows = np.asarray(missing)
            # Hashed only on a miss: the cache is keyed by id, so a hit already holds its part.
            fresh = self.backend.item_embedding(inp.item_cat[rows], inp.item_dense[rows],
                                                hash_item_ids([inp.item_ids[i] for i in missing]))
            static[rows] = fresh
            self.cache.put_many([inp.item_ids[i] for i in missing],
                                [prints[i] for i in missing], fresh)
        return static, inp.n - len(missing), len(missing)

    def rerank(self, request: RerankInput) -> RerankResult:
        if request.strategy == "pipeline":
            return self._pipeline(request)
        if request.strategy not in self.strategies:
            raise ValueError(f"unknown strategy {request.strategy!r}; "
                             f"accepted: {list(self.strategies)}")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        static, hits, misses = self.item_vectors(request)
        timings["items"] = _ms(start)
        lst, probs = self.backend.write_list(request, static, timings)
        keep = lst >= 0
        return RerankResult(
            item_ids=[request.item_ids[i] for i in lst[keep]],
            scores=[float(p) for p in probs[keep]],
            strategy=request.strategy,
            model_version=self.model_version,
            timings_ms=timings,
            cache_hits=hits,
            cache_misses=misses,
        )

    def _pipeline(self, request: RerankInput) -> RerankResult:
        if self.pipeline is None:
            raise ValueError("strategy 'pipeline' needs the service started with --pipeline")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        batch = raw_batch(request)
        served = self.pipeline.rerank(batch, request.m, max_lists=request.k)
        lst = served.lists[0]
        timings["pipeline"] = _ms(start)
        start = time.perf_counter()
        with torch.inference_mode():
            evaluator = self.pipeline.evaluator
            logits = evaluator(batch, lists=lst[None]).signal_logits
            stacked = torch.stack([logits[s] for s in evaluator.signals], -1)
            gains = evaluator.expected_signals(stacked)[0]
        timings["scores"] = _ms(start)
        keep = (lst >= 0).numpy()
        idx = lst.numpy()[keep]
        return RerankResult(
            item_ids=[request.item_ids[i] for i in idx],
            scores=[float(g) for g in gains.numpy()[keep]],
            strategy="pipeline",
            model_version=self.model_version,
            list_score=float(served.scores[0]),
            timings_ms=timings,
        )


def raw_batch(inp: RerankInput) -> Batch:
    """A one-request Batch with raw features (what the pipeline's models read)."""
    return make_batch(
        _t(inp.user_cat)[None], _t(inp.user_dense)[None], None, _t(inp.upstream_score)[None],
        torch.ones(1, inp.n, dtype=torch.bool), torch.ones(1, inp.m, dtype=torch.bool),
        item_cat=_t(inp.item_cat)[None], item_dense=_t(inp.item_dense)[None],
        category=_t(inp.category)[None], creator=_t(inp.creator)[None],
        item_hash=_t(hash_item_ids(inp.item_ids))[None], **_context(inp),
    )


def load_reranker(run_dir: str | Path | None = None, onnx_dir: str | Path | None = None, *,
                  threads: int = 1, int8: bool = False, cache_size: int = DEFAULT_CACHE_SIZE,
                  cache_bytes: int = DEFAULT_CACHE_BYTES,
                  max_candidates: int = DEFAULT_MAX_CANDIDATES,
                  max_item_id_length: int = DEFAULT_MAX_ITEM_ID_LENGTH,
                  pipeline_config: str | Path | None = None,
                  model_server: str | None = None, model_name: str | None = None,
                  timeout_s: float = 1.0) -> Reranker:
    """A Reranker from a run folder (PyTorch), an export folder (ONNX Runtime) or a Triton
    model server's URL (``model_server``, gRPC; ``model_name`` picks the per-request model when
    the server has several; ``timeout_s`` bounds each call to it).

    The item cache holds at most ``cache_size`` items and ``cache_bytes`` bytes (0: no cache);
    requests with an item id longer than ``max_item_id_length`` characters are rejected (422).
    """
    if sum(x is not None for x in (run_dir, onnx_dir, model_server)) != 1:
        raise ValueError("give exactly one of a run folder (--run), an ONNX export (--onnx) or "
                         "a Triton model server (--model-server)")
    if model_server is not None:
        if int8:
            raise ValueError("--int8 applies to an ONNX export (--onnx), not to --model-server")
        # Imported here: tritonclient (an optional dependency) is only needed by this backend.
        from genrerank.serving.triton.backend import TritonBackend

        backend: TorchBackend | OnnxBackend = TritonBackend(model_server, model_name,
                                                            timeout_s=timeout_s)
    elif run_dir is not None:
        if int8:
            raise ValueError("--int8 applies to an ONNX export (--onnx), not a run")
        backend = TorchBackend(run_dir, threads)
    else:
        backend = OnnxBackend(onnx_dir, threads, int8=int8)  # type: ignore[arg-type]
    pipeline = None
    if pipeline_config is not None:
        from genrerank.pipeline import Pipeline

        pipeline = Pipeline.from_config(pipeline_config)
    return Reranker(backend, cache_size=cache_size, cache_bytes=cache_bytes,
                    max_candidates=max_candidates, max_item_id_length=max_item_id_length,
                    pipeline=pipeline)
