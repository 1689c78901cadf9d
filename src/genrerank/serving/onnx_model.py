"""An exported model (:mod:`genrerank.serving.export`) run by ONNX Runtime on the CPU.

Sessions use ``intra_op_threads`` threads for one operator, one inter-op thread (these graphs
are chains; parallel branches are rare), and no spinning: spinning worker threads busy-wait
between operators and, on a 2-core machine shared with the HTTP server, fight the server for
the cores (the tail latency of a prototype jumped from ~1 ms to 11 ms with spinning on).

Lists are decoded the same way as in PyTorch: matrix models' log-probabilities go through the
run's decoder from :mod:`genrerank.decoding`; the autoregressive model is decoded step by step
with its KV cache living in ONNX Runtime tensors (greedy or beam search). The hierarchical
model decodes the same way under its plan: the ``skeleton`` graph reads the encoder's output,
and the counts, quotas and their merge with the request's constraints come from
:mod:`genrerank.constraints.skeleton`, the code the PyTorch model runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from genrerank.constraints.batch import allowed_mask, prepare_constraints
from genrerank.constraints.skeleton import (
    category_counts_np,
    plan_constraints,
    plan_from_logits,
)
from genrerank.data.schema import FeatureSpec
from genrerank.serving.export import load_manifest, verified_files

if TYPE_CHECKING:
    from genrerank.constraints import RequestConstraints

__all__ = ["OnnxModel", "session_options"]


def session_options(intra_op_threads: int = 1, spinning: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


class OnnxModel:
    """The graphs of one export folder. ``int8=True`` loads the quantized graphs.

    Every file the manifest lists is checked against its sha256 first, and every name must stay
    inside the folder (:func:`~genrerank.serving.export.verified_files`): a changed or swapped
    graph raises :class:`~genrerank.serving.export.ManifestError` naming the file.
    """

    def __init__(self, onnx_dir: str | Path, intra_op_threads: int = 1, int8: bool = False,
                 spinning: bool = False, manifest: dict[str, Any] | None = None) -> None:
        import onnxruntime as ort

        self.dir = Path(onnx_dir)
        self.manifest = manifest if manifest is not None else load_manifest(onnx_dir)
        self.spec = FeatureSpec.from_dict(self.manifest["feature_spec"])
        self.kind: str = self.manifest["kind"]
        self.stepwise: bool = self.manifest["stepwise"]
        self.name: str = self.manifest["model_name"]
        if int8 and "int8_graphs" not in self.manifest:
            raise ValueError(f"{onnx_dir}: exported without int8 graphs; re-export with "
                             "--quantize")
        files = verified_files(self.dir, self.manifest, int8=int8)
        self.int8 = int8
        self.version = self.manifest["model_version"] + ("-int8" if int8 else "")
        options = session_options(intra_op_threads, spinning)
        self.sessions = {
            g: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for g, path in files.items()
        }
        # Feeds are cut to each graph's inputs: an export made before the request context
        # inputs existed (or one whose exporter dropped an input nothing reads) lacks them.
        self.inputs = {g: [i.name for i in s.get_inputs()] for g, s in self.sessions.items()}
        if self.stepwise:
            self.step_inputs = self.inputs["step"]
            self.n_layers = sum(1 for n in self.step_inputs if n.startswith("past_key_"))
        #: The hierarchical model's planning parameters (``n_categories``, ``slack``), or None.
        self.skeleton: dict[str, Any] | None = self.manifest.get("skeleton")
        if self.skeleton is not None and "skeleton" not in self.sessions:
            raise ValueError(f"{onnx_dir}: the manifest plans with a skeleton stage but has "
                             "no skeleton graph; re-export the run")

    # ------------------------------------------------------------------ graphs

    def item_embedding(self, item_cat: np.ndarray, item_dense: np.ndarray,
                       item_hash: np.ndarray | None = None) -> np.ndarray:
        """``[R, d]`` float32 item vectors of ``R`` items; ``item_hash`` (their id hashes,
        :mod:`genrerank.data.ids`) is fed only to a graph that reads it."""
        session = self.sessions["item_tower"]
        wanted = {i.name for i in session.get_inputs()}
        feeds = {
            "item_cat": np.ascontiguousarray(item_cat, dtype=np.int64),
            "item_dense": np.ascontiguousarray(item_dense, dtype=np.float32),
        }
        if "item_hash" in wanted:
            if item_hash is None:
                raise ValueError("this export embeds item ids: pass item_hash")
            feeds["item_hash"] = np.ascontiguousarray(item_hash, dtype=np.int64)
        return session.run(None, feeds)[0]

    @staticmethod
    def request_feeds(user_cat: np.ndarray, user_dense: np.ndarray, item_static: np.ndarray,
                      upstream_score: np.ndarray, candidate_mask: np.ndarray,
                      category: np.ndarray | None = None, *,
                      context_cat: np.ndarray | None = None,
                      context_dense: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Inputs of the per-request graphs; ``category`` (each candidate's category, for the
        user-history affinity feature) defaults to 0 = unknown; ``context_cat [B, Fcc]`` /
        ``context_dense [B, Fcd]`` (request context) default to none (width 0)."""
        b = np.shape(upstream_score)[0]
        if category is None:
            category = np.zeros(np.shape(upstream_score), dtype=np.int64)
        if context_cat is None:
            context_cat = np.zeros((b, 0), dtype=np.int64)
        if context_dense is None:
            context_dense = np.zeros((b, 0), dtype=np.float32)
        return {
            "category": np.ascontiguousarray(category, dtype=np.int64),
            "user_cat": np.ascontiguousarray(user_cat, dtype=np.int64),
            "user_dense": np.ascontiguousarray(user_dense, dtype=np.float32),
            "context_cat": np.ascontiguousarray(context_cat, dtype=np.int64),
            "context_dense": np.ascontiguousarray(context_dense, dtype=np.float32),
            "item_static": np.ascontiguousarray(item_static, dtype=np.float32),
            "upstream_score": np.ascontiguousarray(upstream_score, dtype=np.float32),
            "candidate_mask": np.ascontiguousarray(candidate_mask, dtype=np.bool_),
        }

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        wanted = self.inputs[graph]  # a missing input is left for ONNX Runtime to name
        return self.sessions[graph].run(None, {k: v for k, v in feeds.items() if k in wanted})

    def matrix(self, feeds: dict[str, np.ndarray], m: int) -> list[np.ndarray]:
        """``log_probs, click_logits, item_repr`` of a matrix model for lists of length m."""
        b = feeds["upstream_score"].shape[0]
        return self._run("model", {**feeds, "position_mask": np.ones((b, m), dtype=np.bool_)})

    def score_lists(self, feeds: dict[str, np.ndarray], lists: np.ndarray) -> np.ndarray:
        """The evaluator's scores ``[B, K]`` of ``lists [B, K, m]`` (-1 = empty slot)."""
        return self._run(
            "model", {**feeds, "lists": np.ascontiguousarray(lists, dtype=np.int64)})[0]

    # ------------------------------------------------------------------ autoregressive

    def _start(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                             list[np.ndarray]]:
        out = self._run("encoder", feeds)
        k = 2 * self.n_layers
        mask = feeds["candidate_mask"]
        # The list-context term starts at 0 (nothing shown yet); the step graph updates it.
        state = {"memory": out[0], "pointer_keys": out[1], "candidate_mask": mask,
                 "category": feeds["category"], "context": np.zeros(mask.shape, np.float32)}
        for i in range(self.n_layers):
            state[f"memory_key_{i}"], state[f"memory_value_{i}"] = out[3 + 2 * i], out[4 + 2 * i]
        return state, out[2], list(out[3 + k:])

    def plan(self, memory: np.ndarray, feeds: dict[str, np.ndarray], lengths: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """The hierarchical model's plan: ``[B, C]`` counts per category summing to
        ``lengths [B]``, and ``[B, C]`` the candidates of each category, from the encoder's
        ``memory`` (what ``Hierarchical.plan`` computes in PyTorch)."""
        if self.skeleton is None:
            raise ValueError(f"model {self.name!r} has no skeleton stage to plan with")
        logits = self._run("skeleton", {"memory": memory, "category": feeds["category"],
                                        "candidate_mask": feeds["candidate_mask"]})[0]
        available = category_counts_np(feeds["category"], feeds["candidate_mask"],
                                       int(self.skeleton["n_categories"]))
        # Exports written before the "expected" plan existed planned by MAP.
        method = str(self.skeleton.get("plan", "map"))
        return plan_from_logits(logits, lengths, method), available

    def _planned(self, memory: np.ndarray, feeds: dict[str, np.ndarray], lengths: np.ndarray,
                 constraints: Sequence[RequestConstraints | None] | None, slack: int | None
                 ) -> Sequence[RequestConstraints | None] | None:
        """The constraints a hierarchical export decodes under: the plan's quotas merged with
        the request's ``constraints``, as ``Hierarchical.generate`` does (``slack`` overrides
        the exported config's; -1 = no plan). Other exports: ``constraints`` unchanged."""
        if self.skeleton is None:
            return constraints
        slack = int(self.skeleton.get("slack", 0)) if slack is None else int(slack)
        if slack < -1:
            raise ValueError(f"hierarchical: slack must be >= -1, got {slack}")
        if slack == -1:  # the fill alone (an ablation)
            return constraints
        counts, available = self.plan(memory, feeds, lengths)
        return plan_constraints(counts, available, feeds["category"], feeds["candidate_mask"],
                                lengths, slack, constraints)

    def _step(self, state: dict[str, np.ndarray], cache: list[np.ndarray], previous: np.ndarray,
              position: int, chosen: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = dict(state)
        feeds["previous"] = previous.astype(np.int64)
        feeds["position"] = np.array([position], dtype=np.int64)
        feeds["chosen"] = chosen
        for i in range(self.n_layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = cache[2 * i], cache[2 * i + 1]
        # Only the inputs the graph kept (an exporter drops an input the model never reads).
        out = self.sessions["step"].run(None, {k: feeds[k] for k in self.step_inputs})
        state["context"] = out[-1]
        return out[0], list(out[1:1 + 2 * self.n_layers])

    def greedy(self, feeds: dict[str, np.ndarray], m: int,
               constraints: Sequence[RequestConstraints | None] | None = None,
               slack: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Greedy lists ``[B, m]`` (-1 past a request's candidates) and the log-probability of
        each choice ``[B, m]``. ``constraints`` (one per request): each step picks among the
        candidates they allow, as the PyTorch model does. A hierarchical export also follows
        its plan (``slack`` as in ``Hierarchical.generate``; None = the exported config's)."""
        state, log_probs, cache = self._start(feeds)
        mask = feeds["candidate_mask"]
        b = mask.shape[0]
        rows = np.arange(b)
        lengths = np.minimum(mask.sum(1), m)
        constraints = self._planned(state["memory"], feeds, lengths, constraints, slack)
        rcs = prepare_constraints(constraints, torch.from_numpy(lengths), torch.from_numpy(mask))
        lists = np.full((b, m), -1, dtype=np.int64)
        picked_lp = np.zeros((b, m), dtype=np.float32)
        chosen = np.zeros_like(mask)
        for t in range(m):
            if t:
                log_probs, cache = self._step(state, cache, lists[:, t - 1].clip(0), t, chosen)
            if rcs is not None:
                allowed = allowed_mask(rcs, lists[:, :t], None, t < lengths)
                log_probs = np.where(allowed, log_probs, -np.inf)
            pick = log_probs.argmax(1)
            lists[:, t] = pick
            picked_lp[:, t] = log_probs[rows, pick]
            chosen[rows, pick] = True
        beyond = np.arange(m)[None, :] >= lengths[:, None]
        lists[beyond] = -1
        picked_lp[beyond] = 0.0
        return lists, picked_lp

    def beam(self, feeds: dict[str, np.ndarray], m: int, beam_width: int,
             constraints: Sequence[RequestConstraints | None] | None = None,
             slack: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Beam search, the same algorithm as ``Autoregressive._beam``: the best list per
        request ``[B, m]`` and the log-probability of each of its choices; ``constraints``
        and ``slack`` as in :meth:`greedy`, for every live beam."""
        b = feeds["candidate_mask"].shape[0]
        w = beam_width
        rep = np.repeat(np.arange(b), w)
        state, log_probs, cache = self._start(feeds)
        lengths = np.minimum(feeds["candidate_mask"].sum(1), m)
        constraints = self._planned(state["memory"], feeds, lengths, constraints, slack)
        state = {k: v[rep] for k, v in state.items()}
        cache = [c[rep] for c in cache]
        log_probs = log_probs[rep]
        rcs = prepare_constraints(constraints, torch.from_numpy(lengths),
                                  torch.from_numpy(feeds["candidate_mask"]))
        row_lengths = np.repeat(lengths, w)
        scores = np.full((b, w), -np.inf, dtype=np.float32)
        scores[:, 0] = 0.0
        lists = np.full((b, w, m), -1, dtype=np.int64)
        step_lp = np.zeros((b, w, m), dtype=np.float32)
        chosen = np.zeros((b * w, state["memory"].shape[1]), dtype=np.bool_)
        for t in range(m):
            if t:
                log_probs, cache = self._step(state, cache, lists[:, :, t - 1].reshape(-1),
                                              t, chosen)
            n = log_probs.shape[1]
            if rcs is not None:  # live beams still writing follow the constraints
                live = (t < row_lengths) & np.isfinite(scores.reshape(-1))
                allowed = allowed_mask(rcs, lists.reshape(b * w, m)[:, :t], rep, live)
                log_probs = np.where(allowed, log_probs, -np.inf)
            done = (t >= row_lengths)[:, None]
            frozen = np.full_like(log_probs, -np.inf)
            frozen[:, 0] = 0.0
            lp = np.where(done, frozen, log_probs)
            total = (scores.reshape(-1, 1) + lp).reshape(b, w * n)
            # Stable top-w (ties keep the lower flat index, like torch.topk on CPU in practice).
            flat = np.argsort(-total, axis=1, kind="stable")[:, :w]
            scores = np.take_along_axis(total, flat, 1)
            parent, item = flat // n, flat % n
            lists = np.take_along_axis(lists, parent[:, :, None], 1).copy()
            step_lp = np.take_along_axis(step_lp, parent[:, :, None], 1).copy()
            lists[:, :, t] = item
            step_lp[:, :, t] = np.take_along_axis(lp.reshape(b, w, n)[np.arange(b)[:, None],
                                                                      parent], item[:, :, None],
                                                  2)[..., 0]
            rows = (parent + np.arange(b)[:, None] * w).reshape(-1)
            state = {k: v[rows] for k, v in state.items()}
            cache = [c[rows] for c in cache]
            chosen = chosen[rows]
            chosen[np.arange(b * w), item.reshape(-1)] = True
        best, best_lp = lists[:, 0], step_lp[:, 0]
        beyond = np.arange(m)[None, :] >= lengths[:, None]
        best[beyond] = -1
        best_lp[beyond] = 0.0
        return best, best_lp
