"""ONNX export of a trained run: ``genrerank export --run RUN --out DIR``.

Serving splits every model in two graphs, so that the item side can be cached
(:mod:`genrerank.serving.cache`):

``item_tower.onnx``
    ``item_cat [R, Fic] int64, item_dense [R, Fid] float32 -> item_static [R, d]``: the
    request-independent part of each candidate's token (:meth:`RerankModel.item_embedding`).

``model.onnx`` (generators that write a matrix: nar4rec, pointwise, prm, logging)
    ``user_cat [B, Fuc], user_dense [B, Fud], context_cat [B, Fcc], context_dense [B, Fcd]``
    (request context: query, device, page type; width 0 when the spec has none), ``item_static
    [B, N, d], upstream_score [B, N], candidate_mask [B, N] bool, category [B, N],
    position_mask [B, M] bool -> log_probs [B, N, M],
    click_logits [B, N, M], item_repr [B, N, d]``; lists are decoded outside the graph with the
    run's decoder (:mod:`genrerank.decoding`), as in PyTorch.

``model.onnx`` (the evaluator)
    the same request inputs plus ``lists [B, K, m] int64`` (-1 = empty slot) ``-> scores [B, K]``.

``encoder.onnx`` + ``step.onnx`` (the autoregressive model)
    the encoder runs once per request and also writes the first position; the step graph writes
    one more position given the previous choice and the KV cache of the positions so far
    (``past_key_i / past_value_i [R, n_kv_heads, t, head_dim]`` in, ``present_*`` with t + 1
    out), so decoding runs step by step outside the graph with the cache in ONNX Runtime.

``encoder.onnx`` + ``step.onnx`` + ``skeleton.onnx`` (the hierarchical model)
    its fill's encoder and step graphs, exactly as for the autoregressive model, plus the
    skeleton stage: ``memory [B, N, d]`` (the encoder's output), ``category [B, N]``,
    ``candidate_mask [B, N] bool -> count_logits [B, C, K + 1]``. The plan (most likely counts,
    category quotas, merged with the request's constraints) is numpy outside the graphs
    (:mod:`genrerank.constraints.skeleton`); ``skeleton`` in the manifest records
    ``n_categories`` and the config's ``slack``.

Batch, candidates, list length, lists and cache length are dynamic axes. ``manifest.json``
records the model, its version, feature spec, decoder, graphs and the parity check: every graph
is run on a fixed set of synthetic requests (ragged, with padding) and compared with PyTorch
(max absolute difference over finite entries <= :data:`PARITY_TOLERANCE`, and identical decoded
lists). The folder is written to a temporary name and renamed when complete, so a failed export
never leaves a half-written or mixed folder behind.

Integrity: ``files`` in the manifest maps every file of the folder (graphs, int8 graphs and any
external-data file the exporter wrote; the manifest aside) to its sha256. Loading
(:func:`verified_files`, used by :class:`~genrerank.serving.onnx_model.OnnxModel`) re-hashes them
all and refuses a folder where one differs, so a swapped ``model.onnx`` cannot serve under the
old ``model_version``; every name in the manifest must stay inside the folder (no absolute path,
no ``..``, no symlink resolving outside). Manifests of format version 1 (before hashes) are
refused with a request to re-export: accepting them would let anyone bypass the check by
deleting ``files``, and an export is cheap to redo from its run. The check guards the files at
rest, not against a writer racing the loader.

``quantize=True`` also writes ``*.int8.onnx`` (ONNX Runtime dynamic int8 quantization of the
weights of matrix multiplications); its differences from PyTorch are measured and recorded, not
required to pass the float tolerance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.experiment import run_decoding
from genrerank.models.base import RerankModel
from genrerank.training.checkpoint import (
    MODEL_FILE,
    load_model,
    read_meta,
    replace_dir,
    resolve_checkpoint,
)
from genrerank.utils.io import atomic_write_json

__all__ = [
    "MANIFEST_FILE",
    "PARITY_TOLERANCE",
    "ExportError",
    "ManifestError",
    "export_path",
    "export_run",
    "file_sha256",
    "load_manifest",
    "make_batch",
    "model_version",
    "synthetic_requests",
    "verified_files",
]

MANIFEST_FILE = "manifest.json"
FORMAT = "genrerank.onnx"
#: 2: ``files`` holds the sha256 of every file; 1 had no hashes (refused, see the docstring).
FORMAT_VERSION = 2
OPSET = 18
PARITY_TOLERANCE = 1e-4

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """An export that could not be written or failed its parity check."""


class ManifestError(ExportError, ValueError):
    """An export folder that cannot be loaded: an unreadable or foreign manifest, a name that
    leaves the folder, a missing file or one whose sha256 differs from the manifest's. Also a
    ValueError, so the command line reports it in one line (like other bad input)."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (graphs can be large)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def export_path(onnx_dir: str | Path, name: Any) -> Path:
    """The resolved path of ``name``, a file named in the manifest of ``onnx_dir``; refused
    unless it is a relative path that stays inside the folder, symlinks followed."""
    where = Path(onnx_dir) / MANIFEST_FILE
    if not isinstance(name, str) or not name.strip():
        raise ManifestError(f"{where}: file name {name!r} is not a relative path")
    # Both syntaxes: a name written on one system may be read on the other.
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.anchor or ".." in pure.parts:
            raise ManifestError(f"{where}: file name {name!r} leaves the export folder "
                                "(absolute paths and '..' are refused)")
    try:
        root = Path(onnx_dir).resolve()
        path = (root / name).resolve()
    except (OSError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise ManifestError(f"{where}: file name {name!r} cannot be resolved ({exc})") from None
    if not path.is_relative_to(root):
        raise ManifestError(f"{where}: file {name!r} resolves to {path}, outside the export "
                            f"folder {root} (a symlink?)")
    return path


def _hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the manifest, by relative POSIX name."""
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE}


def verified_files(onnx_dir: str | Path, manifest: dict[str, Any], int8: bool = False
                   ) -> dict[str, Path]:
    """``{graph: path}`` of the float (or ``int8``) graphs, after checking that every file the
    manifest lists is inside the folder and has the sha256 recorded at export time."""
    onnx_dir = Path(onnx_dir)
    where = onnx_dir / MANIFEST_FILE
    hashes = manifest.get("files")
    if not isinstance(hashes, dict) or not hashes:
        raise ManifestError(f"{where}: no file hashes, so the graphs cannot be verified; "
                            f"re-export: {_reexport(onnx_dir, manifest)}")
    for name, expected in hashes.items():
        path = export_path(onnx_dir, name)
        if not isinstance(expected, str) or len(expected) != 64:
            raise ManifestError(f"{where}: the hash of {name!r} is not a sha256 hex digest")
        if not path.is_file():
            raise ManifestError(f"{path}: listed in {where} but missing; restore it or "
                                f"re-export: {_reexport(onnx_dir, manifest)}")
        actual = file_sha256(path)
        if actual != expected.lower():
            raise ManifestError(f"{path}: sha256 {actual[:12]}... differs from the manifest's "
                                f"{expected[:12]}... (the file changed after export); restore "
                                f"it or re-export: {_reexport(onnx_dir, manifest)}")
    graphs = manifest["int8_graphs"] if int8 else {
        g: info["file"] for g, info in manifest["graphs"].items()}
    out = {}
    for graph, name in graphs.items():
        out[graph] = export_path(onnx_dir, name)
        if name not in hashes:  # a graph outside the hashes would escape the check
            raise ManifestError(f"{where}: graph file {name!r} has no hash in 'files'")
    return out


def _reexport(onnx_dir: Path, manifest: dict[str, Any]) -> str:
    return f"genrerank export --run {manifest.get('source_run') or 'RUN'} --out {onnx_dir}"


def model_version(run_dir: str | Path, which: str = "best") -> str:
    """``<model name>-<first 12 hex digits of sha256(model.safetensors)>``: changes whenever
    the weights change, so caches keyed by it are invalidated by a new model."""
    ckpt = resolve_checkpoint(run_dir, which)
    name = read_meta(ckpt).get("model_name", "model")
    digest = hashlib.sha256((ckpt / MODEL_FILE).read_bytes()).hexdigest()[:12]
    return f"{name}-{digest}"


# --------------------------------------------------------------------------- inputs


def make_batch(
    user_cat: torch.Tensor, user_dense: torch.Tensor, item_static: torch.Tensor | None,
    upstream_score: torch.Tensor, candidate_mask: torch.Tensor,
    position_mask: torch.Tensor | None = None, *, item_cat: torch.Tensor | None = None,
    item_dense: torch.Tensor | None = None, category: torch.Tensor | None = None,
    creator: torch.Tensor | None = None, item_hash: torch.Tensor | None = None,
    context_cat: torch.Tensor | None = None, context_dense: torch.Tensor | None = None,
) -> Batch:
    """A Batch for inference (no labels, nothing logged), from precomputed item embeddings
    ``item_static`` or from the raw ``item_cat`` / ``item_dense``. ``context_cat`` /
    ``context_dense`` (request context) default to no such features (width 0)."""
    b, n = upstream_score.shape
    zeros = torch.zeros_like(candidate_mask, dtype=torch.long)
    if position_mask is None:
        position_mask = torch.ones(b, 1, dtype=torch.bool)
    if item_static is None and (item_cat is None or item_dense is None):
        raise ValueError("make_batch: give item_static, or item_cat and item_dense")
    return Batch(
        request_index=zeros[:, 0],
        user_cat=user_cat,
        user_dense=user_dense,
        context_cat=zeros.new_zeros(b, 0) if context_cat is None else context_cat,
        context_dense=user_dense.new_zeros(b, 0) if context_dense is None else context_dense,
        # Empty when item_static is set: it is not read then, so nothing can depend on them.
        item_cat=zeros.new_zeros(b, n, 0) if item_cat is None else item_cat,
        item_dense=upstream_score.new_zeros(b, n, 0) if item_dense is None else item_dense,
        upstream_score=upstream_score,
        category=zeros if category is None else category,
        creator=zeros if creator is None else creator,
        is_cold_start=torch.zeros_like(candidate_mask),
        is_long_tail=torch.zeros_like(candidate_mask),
        candidate_mask=candidate_mask,
        exposed=torch.zeros_like(position_mask, dtype=torch.long),
        position_mask=position_mask,
        labels={},
        item_static=item_static,
        item_hash=item_hash,
    )


def synthetic_requests(
    spec: FeatureSpec, sizes: list[int], m: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A fixed padded batch of requests with ``sizes`` candidates each (raw features): the
    parity set. Categorical values are drawn inside each vocabulary, dense ones from N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(sizes), max(sizes)
    cand_mask = torch.arange(n).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)

    def cats(features: list, shape: tuple[int, ...]) -> torch.Tensor:
        cols = [torch.randint(0, max(f.vocab_size, 1), shape, generator=g) for f in features]
        return torch.stack(cols, -1) if cols else torch.zeros(*shape, 0, dtype=torch.long)

    return {
        "user_cat": cats(spec.user_categorical, (b,)),
        "user_dense": torch.randn(b, len(spec.user_dense), generator=g),
        "item_cat": cats(spec.item_categorical, (b, n)) * cand_mask.unsqueeze(-1),
        "item_dense": torch.randn(b, n, len(spec.item_dense), generator=g)
        * cand_mask.unsqueeze(-1),
        "upstream_score": torch.randn(b, n, generator=g) * cand_mask,
        "item_hash": torch.randint(0, 2**31 - 1, (b, n), generator=g) * cand_mask,
        "candidate_mask": cand_mask,
        "category": torch.randint(0, max(spec.n_categories, 1), (b, n), generator=g) * cand_mask,
        "position_mask": torch.ones(b, m, dtype=torch.bool),
        # Drawn last, so the other inputs of a spec without context features are unchanged.
        "context_cat": cats(spec.context_categorical, (b,)),
        "context_dense": torch.randn(b, len(spec.context_dense), generator=g),
    }


# --------------------------------------------------------------------------- graph wrappers


class ItemTower(nn.Module):
    def __init__(self, model: RerankModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_cat: torch.Tensor, item_dense: torch.Tensor,
                item_hash: torch.Tensor) -> torch.Tensor:
        return self.model.item_embedding(item_cat, item_dense, item_hash)


class MatrixGraph(nn.Module):
    def __init__(self, model: RerankModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, user_cat: torch.Tensor, user_dense: torch.Tensor,
                context_cat: torch.Tensor, context_dense: torch.Tensor,
                item_static: torch.Tensor, upstream_score: torch.Tensor,
                candidate_mask: torch.Tensor, category: torch.Tensor, position_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = make_batch(user_cat, user_dense, item_static, upstream_score, candidate_mask,
                           position_mask, category=category, context_cat=context_cat,
                           context_dense=context_dense)
        out = self.model(batch)
        return out.log_probs, out.click_logits, out.item_repr


class EvaluatorGraph(nn.Module):
    """``score_lists`` without its Python-side chunking and checks."""

    def __init__(self, model: RerankModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, user_cat: torch.Tensor, user_dense: torch.Tensor,
                context_cat: torch.Tensor, context_dense: torch.Tensor,
                item_static: torch.Tensor, upstream_score: torch.Tensor,
                candidate_mask: torch.Tensor, category: torch.Tensor, lists: torch.Tensor
                ) -> torch.Tensor:
        from genrerank.models.evaluator import compact_lists

        ev = self.model
        batch = make_batch(user_cat, user_dense, item_static, upstream_score, candidate_mask,
                           category=category, context_cat=context_cat,
                           context_dense=context_dense)
        b, k, m = lists.shape
        compact, filled, _ = compact_lists(lists.reshape(b * k, m))
        tokens = ev._tokens(batch)
        # expand, not repeat_interleave: the exporter mistranslates repeat_interleave here.
        owner = torch.arange(b).unsqueeze(1).expand(b, k).reshape(-1)
        h = ev._gather(tokens, owner, compact)
        gain = ev.expected_signals(ev._encode(h, filled))
        gain = gain / torch.log2(torch.arange(m, dtype=gain.dtype) + 2.0)
        scores = torch.where(filled, gain, 0.0).sum(-1).reshape(b, k)
        return torch.where(filled.reshape(b, k, m).any(-1), scores, -math.inf)


class AREncoderGraph(nn.Module):
    """Encoder + the first position: ``memory, pointer_keys, log_probs_0, memory K/V and the
    first position's K/V per layer``."""

    def __init__(self, model: RerankModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, user_cat: torch.Tensor, user_dense: torch.Tensor,
                context_cat: torch.Tensor, context_dense: torch.Tensor,
                item_static: torch.Tensor, upstream_score: torch.Tensor,
                candidate_mask: torch.Tensor, category: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ar = self.model
        batch = make_batch(user_cat, user_dense, item_static, upstream_score, candidate_mask,
                           category=category, context_cat=context_cat,
                           context_dense=context_dense)
        x = ar.encode(batch)
        memory_kv = [layer.memory_kv(x) for layer in ar.layers]
        keys = ar.pointer_key(x)
        new = (ar.start + ar.positions[0]).expand(x.shape[0], 1, -1)
        log_probs, cache = ar.cached_step(new, None, memory_kv, candidate_mask[:, None, None, :],
                                          keys, ~candidate_mask)
        flat = [t for kv in memory_kv for t in kv] + [t for kv in cache for t in kv]
        return (x, keys, log_probs, *flat)


class SkeletonGraph(nn.Module):
    """The hierarchical model's skeleton stage: the fill's encoded candidates ``memory``
    (the encoder graph's first output, so serving encodes once), ``category`` and
    ``candidate_mask`` -> ``count_logits [B, C, K + 1]`` (-inf above a category's
    candidates)."""

    def __init__(self, model: RerankModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: torch.Tensor, category: torch.Tensor,
                candidate_mask: torch.Tensor) -> torch.Tensor:
        return self.model.count_logits(memory, category, candidate_mask)[0]


class ARStepGraph(nn.Module):
    """One more position: ``previous [R]`` (index chosen last), ``position [1]`` (its index t),
    ``chosen [R, N]`` (already in the list), ``category [R, N]`` and ``context [R, N]`` (the
    list-context term so far) and the caches -> ``log_probs [R, N]``, the grown caches and the
    updated ``context``."""

    fixed_inputs = 8  # inputs before the per-layer K/V tensors (*kv)

    def __init__(self, model: RerankModel) -> None:
        super().__init__()
        self.model = model
        self.n_layers = len(model.layers)

    def forward(self, previous: torch.Tensor, position: torch.Tensor, memory: torch.Tensor,
                pointer_keys: torch.Tensor, candidate_mask: torch.Tensor, chosen: torch.Tensor,
                category: torch.Tensor, context: torch.Tensor,
                *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ar = self.model
        n_layers = self.n_layers
        memory_kv = [(kv[2 * i], kv[2 * i + 1]) for i in range(n_layers)]
        past = [(kv[2 * (n_layers + i)], kv[2 * (n_layers + i) + 1]) for i in range(n_layers)]
        rows = torch.arange(memory.shape[0])
        token = ar.item_in(memory[rows, previous])
        new = (token + ar.positions.index_select(0, position)).unsqueeze(1)
        if ar.list_context is not None:
            context = ar.list_context.step(context, category, previous)
        blocked = chosen | ~candidate_mask
        log_probs, grown = ar.cached_step(new, past, memory_kv, candidate_mask[:, None, None, :],
                                          pointer_keys, blocked, context)
        return (log_probs, *[t for pair in grown for t in pair], context)


# --------------------------------------------------------------------------- export


def _dim(name: str) -> Any:
    return torch.export.Dim(name, min=1)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str],
            output_names: list[str], dynamic: dict[str, dict[int, str]]) -> None:
    dims: dict[str, Any] = {}
    shapes = []
    for name in input_names:
        axes = dynamic.get(name, {})
        shapes.append({axis: dims.setdefault(d, _dim(d)) for axis, d in axes.items()} or None)
    fixed = getattr(module, "fixed_inputs", None)
    if fixed is not None:  # forward(a, b, ..., *rest): the rest's shapes form one tuple
        shapes = [*shapes[:fixed], tuple(shapes[fixed:])]
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The exporter's and its optimizer's progress notes are not for our users.
        for name in ("torch.onnx", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=tuple(shapes), opset_version=OPSET, verbose=False,
        )
    if program is None:
        raise ExportError(f"torch.onnx.export returned nothing for {path.name}")
    program.save(str(path))


REQUEST_INPUTS = ["user_cat", "user_dense", "context_cat", "context_dense", "item_static",
                  "upstream_score", "candidate_mask", "category"]
REQUEST_AXES = {
    "user_cat": {0: "batch"}, "user_dense": {0: "batch"},
    "context_cat": {0: "batch"}, "context_dense": {0: "batch"},
    "item_static": {0: "batch", 1: "n"}, "upstream_score": {0: "batch", 1: "n"},
    "candidate_mask": {0: "batch", 1: "n"}, "category": {0: "batch", 1: "n"},
}


def _request_args(model: RerankModel, req: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        static = model.item_embedding(req["item_cat"], req["item_dense"], req["item_hash"])
    return (req["user_cat"], req["user_dense"], req["context_cat"], req["context_dense"],
            static, req["upstream_score"], req["candidate_mask"], req["category"])


def _is_hierarchical(model: RerankModel) -> bool:
    # By registry name: importing the model class here would tie the export module (which
    # serving imports) to one model file.
    return model.name == "hierarchical"


def _skeleton_info(model: RerankModel) -> dict[str, Any] | None:
    """What the runtime needs to plan a hierarchical model's lists (None for other models)."""
    if not _is_hierarchical(model):
        return None
    return {"n_categories": int(model.n_categories), "slack": int(model.config.slack),
            "plan": str(model.config.plan), "max_count": int(model.max_positions)}


def _export_graphs(model: RerankModel, out: Path, example: dict[str, torch.Tensor]
                   ) -> dict[str, Any]:
    """Write the model's graphs into ``out``; returns {graph: {inputs, outputs}}."""
    graphs: dict[str, Any] = {}
    skeleton = None
    if _is_hierarchical(model):
        # The lists are the fill's (an autoregressive model): its graphs, then the skeleton's.
        skeleton = SkeletonGraph(model)
        model = model.fill
    tower_args = (example["item_cat"].flatten(0, 1), example["item_dense"].flatten(0, 1),
                  example["item_hash"].flatten(0, 1))
    names = (["item_cat", "item_dense", "item_hash"], ["item_static"])
    _export(ItemTower(model), tower_args, out / "item_tower.onnx", *names,
            {"item_cat": {0: "rows"}, "item_dense": {0: "rows"}, "item_hash": {0: "rows"}})
    graphs["item_tower"] = {"file": "item_tower.onnx", "inputs": names[0], "outputs": names[1]}
    args = _request_args(model, example)
    if model.kind == "evaluator":
        b = args[0].shape[0]
        lists = torch.arange(4).repeat(b, 5, 1)  # K = 5, m = 4: sizes unlike B and n
        lists[:, 1, 3] = -1
        names = ([*REQUEST_INPUTS, "lists"], ["scores"])
        _export(EvaluatorGraph(model), (*args, lists), out / "model.onnx", *names,
                {**REQUEST_AXES, "lists": {0: "batch", 1: "k", 2: "m"}})
        graphs["model"] = {"file": "model.onnx", "inputs": names[0], "outputs": names[1]}
    elif model.stepwise:
        n_layers = len(model.layers)
        mem = [f"memory_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        past = [f"past_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        present = [f"present_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        enc_out = ["memory", "pointer_keys", "log_probs", *mem, *present]
        _export(AREncoderGraph(model), args, out / "encoder.onnx", REQUEST_INPUTS, enc_out,
                REQUEST_AXES)
        graphs["encoder"] = {"file": "encoder.onnx", "inputs": REQUEST_INPUTS,
                             "outputs": enc_out}
        with torch.no_grad():
            first = AREncoderGraph(model)(*args)
        x, keys, lp0 = first[:3]
        mem_kv = list(first[3:3 + 2 * n_layers])
        cache = list(first[3 + 2 * n_layers:])
        previous = lp0.argmax(1)
        # A second step (past length 1) first, so the example's cache length is not 1: a
        # dimension of size 1 would be specialised by the exporter.
        step = ARStepGraph(model)
        mask = args[REQUEST_INPUTS.index("candidate_mask")]
        category = args[REQUEST_INPUTS.index("category")]
        chosen = torch.zeros_like(mask)
        chosen[torch.arange(len(previous)), previous] = True
        context = torch.zeros(mask.shape)
        with torch.no_grad():
            second = step(previous, torch.tensor([1]), x, keys, mask, chosen, category, context,
                          *mem_kv, *cache)
        cache, context = list(second[1:-1]), second[-1]
        previous = second[0].argmax(1)
        chosen[torch.arange(len(previous)), previous] = True
        step_in = ["previous", "position", "memory", "pointer_keys", "candidate_mask", "chosen",
                   "category", "context", *mem, *past]
        step_out = ["log_probs", *present, "next_context"]
        rows_n = {0: "rows", 1: "n"}
        axes: dict[str, dict[int, str]] = {
            "previous": {0: "rows"}, "memory": rows_n, "pointer_keys": rows_n,
            "candidate_mask": rows_n, "chosen": rows_n, "category": rows_n, "context": rows_n,
        }
        axes.update({name: {0: "rows", 2: "n"} for name in mem})
        axes.update({name: {0: "rows", 2: "past"} for name in past})
        _export(step, (previous, torch.tensor([2]), x, keys, mask, chosen, category, context,
                       *mem_kv, *cache),
                out / "step.onnx", step_in, step_out, axes)
        graphs["step"] = {"file": "step.onnx", "inputs": step_in, "outputs": step_out}
        if skeleton is not None:
            names = (["memory", "category", "candidate_mask"], ["count_logits"])
            _export(skeleton, (x, category, mask), out / "skeleton.onnx", *names,
                    {"memory": {0: "batch", 1: "n"}, "category": {0: "batch", 1: "n"},
                     "candidate_mask": {0: "batch", 1: "n"}})
            graphs["skeleton"] = {"file": "skeleton.onnx", "inputs": names[0],
                                  "outputs": names[1]}
    else:
        names = ([*REQUEST_INPUTS, "position_mask"], ["log_probs", "click_logits", "item_repr"])
        _export(MatrixGraph(model), (*args, example["position_mask"]), out / "model.onnx",
                *names, {**REQUEST_AXES, "position_mask": {0: "batch", 1: "m"}})
        graphs["model"] = {"file": "model.onnx", "inputs": names[0], "outputs": names[1]}
    return graphs


def _quantize(out: Path, graphs: dict[str, Any]) -> dict[str, str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files = {}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process applies to convolutional models
    try:
        for name, graph in graphs.items():
            src = out / graph["file"]
            dst = src.with_suffix(".int8.onnx")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
            files[name] = dst.name
    finally:
        root.setLevel(level)
    return files


def export_run(
    run_dir: str | Path, out_dir: str | Path, *, quantize: bool = False, check: bool = True,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Export the run's best model to ``out_dir`` (see the module docstring); returns the
    manifest. Raises :class:`ExportError` when the parity check fails (nothing is written)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder; choose another --out")
    if out_dir.is_dir() and not (out_dir / MANIFEST_FILE).is_file() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not an ONNX export folder; refusing to "
                              "replace it")
    decode = run_decoding(run_dir)  # first: refuses a failed or unfinished run before any work
    model, meta = load_model(run_dir, "best")
    model.eval()
    if model.not_servable:
        raise ValueError(f"model {model.name!r} has no ONNX export yet ({model.not_servable})")
    spec = model.spec
    m = max(1, min(getattr(model, "max_positions", 6), 6))
    example = synthetic_requests(spec, [7, 5, 3], m, seed=0)
    version = model_version(run_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from a service user
    try:
        start = time.perf_counter()
        graphs = _export_graphs(model, tmp, example)
        export_s = time.perf_counter() - start
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": meta["model_name"],
            "model_version": version,
            "kind": model.kind,
            "stepwise": bool(model.stepwise),
            "max_positions": int(getattr(model, "max_positions", 0)),
            "max_candidates": model.input_limits()[0],
            "max_list_length": model.input_limits()[1],
            "feature_spec": spec.to_dict(),
            "model_config": meta.get("model_config") or {},
            "decode": decode,
            # The learned list-context table, for the ``context`` decoder outside the graphs.
            "list_context": (
                None if getattr(model, "list_context", None) is None or model.stepwise
                else {"pair": model.list_context.pair.detach().tolist(),
                      "decay": float(model.list_context.decay.detach())}),
            # The hierarchical model's planning parameters (n_categories, slack), else None.
            "skeleton": _skeleton_info(model),
            "source_run": str(run_dir.resolve()),
            "opset": OPSET,
            "graphs": graphs,
            "torch_version": torch.__version__,
            "export_seconds": round(export_s, 2),
        }
        if quantize:
            manifest["int8_graphs"] = _quantize(tmp, graphs)
        # Every file written so far, hashed before the parity check so that it loads the
        # graphs through the same verification as serving does.
        manifest["files"] = _hash_folder(tmp)
        if check:
            from genrerank.serving.parity import check_parity

            report = check_parity(model, tmp, manifest)
            manifest["parity"] = report
            if not report["passed"]:
                raise ExportError(f"ONNX export of {run_dir} failed its parity check: "
                                  f"{report['failures']}")
            if quantize:  # recorded, not required: int8 is meant to differ a little
                manifest["parity_int8"] = check_parity(model, tmp, manifest, int8=True)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, with a clear error for anything else."""
    path = Path(onnx_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_dir}: no {MANIFEST_FILE}; export a run first with "
                                "`genrerank export --run RUN --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version == 1:
        raise ManifestError(f"{path}: exported by an older genrerank without file hashes, so "
                            "its graphs cannot be verified; re-export: "
                            f"{_reexport(Path(onnx_dir), manifest)}")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path}: {FORMAT} manifest version {version!r}; this genrerank "
                            f"reads version {FORMAT_VERSION}")
    return manifest
