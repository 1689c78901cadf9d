"""Parity of an ONNX export with its PyTorch model: same numbers (<= 1e-4), same lists.

Run by :func:`genrerank.serving.export.export_run` before an export folder is published, and by
the tests. The request set is fixed and synthetic (drawn from the feature spec with a seed):
ragged sizes with padding, so masks are exercised, and a dynamic batch, n and m different from
the ones the graphs were traced with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrerank.decoding import decode, random_lists
from genrerank.models.base import RerankModel
from genrerank.serving.backends import best_lists, decoder_config
from genrerank.serving.export import PARITY_TOLERANCE, make_batch, synthetic_requests
from genrerank.serving.onnx_model import OnnxModel

#: Candidates per request of the parity set (one padded batch).
PARITY_SIZES = [60, 45, 20, 9, 4]


def _finite_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| over the entries finite in both; inf if they are not finite in the same
    places (a masked -inf that became a number, or the reverse, is a failure)."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fa, fb):
        return math.inf
    return float(np.abs(a[fa] - b[fb]).max()) if fa.any() else 0.0


def _skeleton_diff(model: RerankModel, onnx: OnnxModel, batch: Any,
                   feeds: dict[str, np.ndarray]) -> float:
    """Max difference of the skeleton's count log-probabilities (what the plan reads; the
    logits of an absent category's one possible class are arbitrary, its log-probability is
    0 in both)."""
    from genrerank.constraints.skeleton import log_softmax_np

    x = model.fill.encode(batch)
    ref = torch.log_softmax(model.count_logits(x, batch.category, batch.candidate_mask)[0], -1)
    memory = onnx._run("encoder", feeds)[0]
    got = onnx._run("skeleton", {"memory": memory, "category": feeds["category"],
                                 "candidate_mask": feeds["candidate_mask"]})[0]
    return _finite_max_diff(log_softmax_np(got), ref.numpy())


def check_parity(model: RerankModel, onnx_dir: str | Path, manifest: dict[str, Any],
                 sizes: list[int] | None = None, seed: int = 1, int8: bool = False
                 ) -> dict[str, Any]:
    """Compare every graph in ``onnx_dir`` with ``model``; returns a report with
    ``max_abs_diff`` per output, ``lists_identical`` and ``passed`` (float graphs only)."""
    model.eval()
    onnx = OnnxModel(onnx_dir, manifest=manifest, int8=int8)
    m = max(1, min(int(manifest.get("max_positions") or 6), 6))
    req = synthetic_requests(model.spec, sizes or PARITY_SIZES, m, seed=seed)
    diffs: dict[str, float] = {}
    with torch.inference_mode():
        static = model.item_embedding(req["item_cat"], req["item_dense"], req["item_hash"])
    mask = req["candidate_mask"]
    onnx_static = onnx.item_embedding(req["item_cat"][mask].numpy(),
                                      req["item_dense"][mask].numpy(),
                                      req["item_hash"][mask].numpy())
    diffs["item_static"] = _finite_max_diff(onnx_static, static[mask].numpy())
    context = {"context_cat": req["context_cat"], "context_dense": req["context_dense"]}
    feeds = OnnxModel.request_feeds(req["user_cat"].numpy(), req["user_dense"].numpy(),
                                    static.numpy(), req["upstream_score"].numpy(), mask.numpy(),
                                    req["category"].numpy(),
                                    **{k: v.numpy() for k, v in context.items()})
    batch = make_batch(req["user_cat"], req["user_dense"], static, req["upstream_score"], mask,
                       req["position_mask"], category=req["category"], **context)
    lists_identical = True
    with torch.inference_mode():
        if model.kind == "evaluator":
            lists = random_lists(mask, m, k=8, seed=seed)
            ref = model.score_lists(batch, lists)
            got = onnx.score_lists(feeds, lists.numpy())
            diffs["scores"] = _finite_max_diff(got, ref.numpy())
            lists_identical = bool((got.argmax(1) == ref.numpy().argmax(1)).all())
        elif model.stepwise:
            name, params = decoder_config(manifest.get("decode") or {})
            # A hierarchical model plans first: its lists follow the plan at the run's slack.
            plan = {} if onnx.skeleton is None else {"slack": params.get("slack")}
            if onnx.skeleton is not None:
                diffs["count_log_probs"] = _skeleton_diff(model, onnx, batch, feeds)
            ref_lists = model.generate(batch, m, "greedy", **plan)
            got_lists, got_lp = onnx.greedy(feeds, m, **plan)
            lists_identical = bool(np.array_equal(got_lists, ref_lists.numpy()))
            # Log-probabilities of the same choices under teacher forcing in PyTorch.
            forced = make_batch(req["user_cat"], req["user_dense"], static,
                                req["upstream_score"], mask, ref_lists >= 0,
                                category=req["category"], **context)
            forced.exposed = ref_lists.clamp_min(0)
            lp = model(forced).log_probs
            ref_lp = lp.gather(1, forced.exposed.unsqueeze(1)).squeeze(1)
            ref_lp = torch.where(ref_lists >= 0, ref_lp, 0.0)
            diffs["step_log_probs"] = _finite_max_diff(got_lp, ref_lp.numpy())
            if name == "beam":
                width = int(params.get("beam_width", 4))
                ref_beam = best_lists(model.generate(batch, m, "beam", beam_width=width, k=1,
                                                     **plan))
                got_beam, _ = onnx.beam(feeds, m, width, **plan)
                lists_identical = lists_identical and bool(np.array_equal(got_beam, ref_beam))
        else:
            out = model(batch)
            got = onnx.matrix(feeds, m)
            names = ["log_probs", "click_logits", "item_repr"]
            refs = [out.log_probs, out.click_logits, out.item_repr]
            for name, g_out, r in zip(names, got, refs, strict=True):
                if name == "click_logits":
                    r = r.masked_fill(~mask.unsqueeze(-1), 0.0)
                    g_out = np.where(mask.numpy()[..., None], g_out, 0.0)
                diffs[name] = _finite_max_diff(g_out, r.numpy())
            name, params = decoder_config(manifest.get("decode") or {})
            params = {**model.decoder_inputs(name, batch, out), **params}
            ref_lists = best_lists(decode(name, out.log_probs, mask, m, **params))
            if name == "contrastive":
                params["item_repr"] = torch.from_numpy(got[2])
            if name == "context":  # serving decodes with the manifest's copy of the table
                params.update(manifest["list_context"])
            got_lists = best_lists(decode(name, torch.from_numpy(got[0]), mask, m, **params))
            lists_identical = bool(np.array_equal(got_lists, ref_lists))
        # The cached item embeddings must not change what the model computes from raw features.
        raw = make_batch(req["user_cat"], req["user_dense"], None, req["upstream_score"], mask,
                         req["position_mask"], item_cat=req["item_cat"],
                         item_dense=req["item_dense"], category=req["category"],
                         item_hash=req["item_hash"], **context)
        if model.kind != "evaluator" and not model.stepwise:
            diffs["raw_vs_cached_log_probs"] = _finite_max_diff(
                model(raw).log_probs.numpy(), model(batch).log_probs.numpy())
    worst = max(diffs.values()) if diffs else 0.0
    failures = [f"{k}: {v:.3g}" for k, v in diffs.items() if not v <= PARITY_TOLERANCE]
    if not lists_identical:
        failures.append("decoded lists differ")
    return {
        "sizes": sizes or PARITY_SIZES,
        "list_length": m,
        "tolerance": PARITY_TOLERANCE,
        "max_abs_diff": {k: (v if math.isfinite(v) else "inf") for k, v in diffs.items()},
        "worst": worst if math.isfinite(worst) else "inf",
        "lists_identical": lists_identical,
        "int8": int8,
        "passed": not failures,
        "failures": failures,
    }
