"""The model backends of the re-ranking runtime: one request's model call, in PyTorch eager
(:class:`TorchBackend`, from a run folder) or ONNX Runtime (:class:`OnnxBackend`, from an
export folder). A model server's backend (:mod:`genrerank.serving.triton.backend`) extends the
ONNX one. :mod:`genrerank.serving.runtime` puts a backend behind the item cache and the decoder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrerank.constraints import constraints_from_config
from genrerank.data.schema import FeatureSpec
from genrerank.decoding import DecodedLists, decode
from genrerank.serving.export import make_batch, model_version
from genrerank.serving.types import RerankInput

__all__ = ["OnnxBackend", "TorchBackend", "best_lists", "decoder_config", "first_list"]


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


def _context(inp: RerankInput) -> dict[str, torch.Tensor]:
    """The request context of ``inp`` as make_batch's keyword arguments (batch of one)."""
    return {"context_cat": _t(inp.context_cat)[None], "context_dense": _t(inp.context_dense)[None]}
