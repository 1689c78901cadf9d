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

from genrerank.constraints import constraints_from_config
from genrerank.data.dataset import Batch
from genrerank.data.ids import hash_item_ids
from genrerank.data.schema import FeatureSpec
from genrerank.decoding import DecodedLists, decode
from genrerank.serving.cache import DEFAULT_CACHE_BYTES, ItemEmbeddingCache
from genrerank.serving.export import make_batch, model_version
from genrerank.serving.schema import DEFAULT_MAX_ITEM_ID_LENGTH
from genrerank.serving.types import RerankInput, RerankResult

__all__ = ["OnnxBackend", "Reranker", "TorchBackend", "load_reranker"]

DEFAULT_MAX_CANDIDATES = 500
DEFAULT_CACHE_SIZE = 100_000


def _t(x: np.ndarray) -> torch.Tensor:
    # Arrays sliced from Arrow are read-only; torch wants writable memory (copies only then).
    return torch.from_numpy(np.require(x, requirements="W"))


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def decoder_config(decode_cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(decoder name, its parameters)`` from a run's or manifest's decode section; default
    constraints (``constraints``) are not a decoder parameter (see
    :func:`~genrerank.constraints.constraints_from_config`)."""
    cfg = dict(decode_cfg or {"name": "greedy"})  # run_decoding already dropped "selection"
    cfg.pop("constraints", None)
    return cfg.pop("name", "greedy"), cfg


def best_lists(out: torch.Tensor | DecodedLists) -> np.ndarray:
    """``[B, m]``: each request's (best) list, whatever the decoder returned."""
    lists = out.lists[:, 0] if isinstance(out, DecodedLists) else out
    return lists.numpy()


def first_list(out: torch.Tensor | DecodedLists) -> np.ndarray:
    return best_lists(out)[0]


class TorchBackend:
    """A trained run in PyTorch eager mode (inference mode, ``threads`` intra-op threads)."""

    name = "torch"

    def __init__(self, run_dir: str | Path, threads: int = 1) -> None:
        from genrerank.experiment import run_decoding
        from genrerank.training.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        self.model, meta = load_model(run_dir, "best")
        if self.model.not_servable:
            raise ValueError(f"model {meta['model_name']!r} cannot be served yet "
                             f"({self.model.not_servable})")
        self.model_name: str = meta["model_name"]
        self.kind: str = self.model.kind
        self.spec: FeatureSpec = self.model.spec
        self.version = model_version(run_dir)
        decode_cfg = run_decoding(run_dir)
        self.decoder, self.decoder_params = decoder_config(decode_cfg)
        self.default_constraints = constraints_from_config(decode_cfg)
        self.max_candidates, self.max_list_length = self.model.input_limits()

    @torch.inference_mode()
    def item_embedding(self, item_cat: np.ndarray, item_dense: np.ndarray,
                       item_hash: np.ndarray) -> np.ndarray:
        return self.model.item_embedding(_t(item_cat), _t(item_dense), _t(item_hash)).numpy()

    @torch.inference_mode()
    def write_list(self, inp: RerankInput, static: np.ndarray, timings: dict[str, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The list ``[m]`` (candidate indices) and each item's probability at its position."""
        start = time.perf_counter()
        mask = torch.ones(1, inp.n, dtype=torch.bool)
        batch = make_batch(_t(inp.user_cat)[None], _t(inp.user_dense)[None], _t(static)[None],
                           _t(inp.upstream_score)[None], mask,
                           torch.ones(1, inp.m, dtype=torch.bool),
                           category=_t(inp.category)[None], **_context(inp))
        model = self.model
        rcs = None if inp.constraints is None else [inp.constraints]
        if model.stepwise:
            out = model.generate(batch, inp.m, self.decoder, constraints=rcs,
                                 **self.decoder_params)
            lst = first_list(out)
            timings["model"] = _ms(start)
            start = time.perf_counter()
            # Probabilities of the chosen items: one teacher-forced pass over the written list.
            batch.exposed = torch.from_numpy(lst)[None].clamp_min(0)
            batch.position_mask = batch.exposed >= 0
            lp = model(batch).log_probs[0]
            probs = lp[batch.exposed[0], torch.arange(inp.m)].exp().numpy()
            timings["scores"] = _ms(start)
            return lst, probs
        out = model(batch, list_length=inp.m)
        timings["model"] = _ms(start)
        start = time.perf_counter()
        params = {**model.decoder_inputs(self.decoder, batch, out), **self.decoder_params}
        lst = first_list(decode(self.decoder, out.log_probs, mask, inp.m, constraints=rcs,
                                **params))
        probs = out.log_probs[0, torch.from_numpy(lst), torch.arange(inp.m)].exp().numpy()
        timings["decode"] = _ms(start)
        return lst, probs


class OnnxBackend:
    """An export folder run by ONNX Runtime (``threads`` intra-op threads, no spinning)."""

    name = "onnx"

    def __init__(self, onnx_dir: str | Path, threads: int = 1, int8: bool = False) -> None:
        from genrerank.serving.onnx_model import OnnxModel

        self.onnx = OnnxModel(onnx_dir, intra_op_threads=threads, int8=int8)
        manifest = self.onnx.manifest
        self.model_name = self.onnx.name
        self.kind = self.onnx.kind
        self.spec = self.onnx.spec
        self.version = self.onnx.version
        self.decoder, self.decoder_params = decoder_config(manifest.get("decode") or {})
        self.default_constraints = constraints_from_config(manifest.get("decode"))
        self.max_candidates = manifest.get("max_candidates")
        self.max_list_length = manifest.get("max_list_length")
        if self.onnx.stepwise and self.decoder not in ("greedy", "beam"):
            raise ValueError(f"{onnx_dir}: the ONNX runtime decodes the autoregressive model "
                             f"greedily or by beam search, not {self.decoder!r}")

    def item_embedding(self, item_cat: np.ndarray, item_dense: np.ndarray,
                       item_hash: np.ndarray) -> np.ndarray:
        return self.onnx.item_embedding(item_cat, item_dense, item_hash)

    def write_list(self, inp: RerankInput, static: np.ndarray, timings: dict[str, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        mask = np.ones((1, inp.n), dtype=np.bool_)
        feeds = self.onnx.request_feeds(inp.user_cat[None], inp.user_dense[None], static[None],
                                        inp.upstream_score[None], mask, inp.category[None],
                                        context_cat=inp.context_cat[None],
                                        context_dense=inp.context_dense[None])
        rcs = None if inp.constraints is None else [inp.constraints]
        if self.onnx.stepwise:
            # A hierarchical export plans inside greedy / beam (its skeleton graph, then the
            # plan's quotas merged with ``rcs``), at the run's decode slack if it sets one.
            slack = self.decoder_params.get("slack")
            if self.decoder == "beam":
                lists, lp = self.onnx.beam(feeds, inp.m,
                                           int(self.decoder_params.get("beam_width", 4)),
                                           constraints=rcs, slack=slack)
            else:
                lists, lp = self.onnx.greedy(feeds, inp.m, constraints=rcs, slack=slack)
            timings["model"] = _ms(start)
            return lists[0], np.exp(lp[0])
        log_probs, _, item_repr = self.onnx.matrix(feeds, inp.m)
        timings["model"] = _ms(start)
        start = time.perf_counter()
        params = dict(self.decoder_params)
        if self.decoder == "contrastive":
            params["item_repr"] = torch.from_numpy(item_repr)
        if self.decoder in ("satiation", "context"):
            params["category"] = _t(inp.category)[None]
        if self.decoder == "context":
            table = self.onnx.manifest.get("list_context")
            if not table:
                raise ValueError("decoder 'context' but the export has no list-context table")
            params.update(pair=table["pair"], decay=table["decay"])
        lp = torch.from_numpy(log_probs)
        lst = first_list(decode(self.decoder, lp, torch.from_numpy(mask), inp.m,
                                constraints=rcs, **params))
        probs = np.exp(log_probs[0, lst, np.arange(inp.m)])
        timings["decode"] = _ms(start)
        return lst, probs


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


def _context(inp: RerankInput) -> dict[str, torch.Tensor]:
    """The request context of ``inp`` as make_batch's keyword arguments (batch of one)."""
    return {"context_cat": _t(inp.context_cat)[None], "context_dense": _t(inp.context_dense)[None]}


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
        # Imported here: the triton package imports this module (its backend extends
        # OnnxBackend), and tritonclient is only needed by this backend.
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
