"""A Triton Inference Server model repository from an ONNX export, and its offline validation.

``genrerank export --run RUN --out DIR --triton REPO`` (or :func:`write_repository` on an
existing export folder) adds two models to ``REPO``, leaving any other model there alone::

    REPO/
      <name>_item_tower/          item_cat [Fic] int64, item_dense [Fid] fp32, item_hash [1] int64
        config.pbtxt                -> item_static [d] fp32      (batch = items)
        1/model.onnx
      <name>_model/               user_cat, user_dense, context_cat, context_dense [F],
        config.pbtxt                item_static [-1, d], upstream_score / candidate_mask /
        1/model.onnx                category [-1], position_mask [-1] -> log_probs [-1, -1],
                                    click_logits [-1, -1], item_repr [-1, d]  (batch = requests)

Both have ``max_batch_size > 0`` (the first dimension of every input and output is the batch and
``dims`` omit it), ``dynamic_batching { }``, and ``platform: "onnxruntime_onnx"``; ``gpu=True``
puts the instances on the GPU (``KIND_GPU``: ONNX Runtime's CUDA execution provider) with the
TensorRT execution accelerator (or the CUDA one alone, ``accelerator="cuda"``).

**What the batch dimension means.** The per-request graph already takes a padded batch
``[B, N, ...]`` with ``candidate_mask`` (the library's rule: padding plus masks, checked by the
export's parity test on ragged requests). Triton's dynamic batcher concatenates requests along
the first dimension only when their other dimensions are equal, so the client
(:class:`~genrerank.serving.triton.backend.TritonBackend`) pads every request's candidates to a
bucket (:func:`candidate_bucket`: the next power of two, at least 8, within the model's limit)
with ``candidate_mask = False``, and its positions to the model's list length with
``position_mask = False``: requests with 33-64 candidates then batch together, and a padded
request's outputs on its real candidates and positions equal the unpadded ones (tested). The
item tower's batch is items: a request's cache misses are one Triton request of R rows, and the
batcher merges the rows of concurrent requests.

``backend="python"`` writes the same models for Triton's Python backend instead: ``model.py``
(:mod:`genrerank.serving.triton.python_model`) runs the same ``model.onnx`` with ONNX Runtime.
It exists for the CPU test machine, whose ``tritonserver`` (from the ``nvidia-pytriton`` wheel)
has no ONNX Runtime backend; deployments use the ``onnxruntime_onnx`` repository.

The per-request model's config carries the export's manifest (feature spec, decoder, model
version, limits, list-context table) as parameter ``genrerank_manifest``, so a service started
with only the server's URL knows what it serves and checks it is the model it expects.

:func:`validate_repository` parses each ``config.pbtxt`` with Triton's own protobuf definitions
(``tritonclient.grpc.model_config_pb2`` + ``google.protobuf.text_format``) and checks it against
its ``model.onnx``: input and output names, data types, dims (``-1`` where the graph's axis is
dynamic or of width 0, which Triton does not accept), the dynamic batch dimension, the batching
and platform settings. It runs after every write, so a repository that does not check is never
published.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genrerank.serving.export import load_manifest, verified_files

__all__ = [
    "MANIFEST_PARAMETER",
    "TritonRepositoryError",
    "candidate_bucket",
    "check_model_name",
    "model_names",
    "validate_repository",
    "write_repository",
]

#: Parameter of the per-request model's config that holds the (trimmed) export manifest.
MANIFEST_PARAMETER = "genrerank_manifest"
#: Parameter naming which genrerank graph a model is (``item_tower`` / ``model``).
GRAPH_PARAMETER = "genrerank_graph"
CONFIG_FILE = "config.pbtxt"
GRAPHS = ("item_tower", "model")
#: Requests per batch of the per-request model; items per batch of the item tower.
DEFAULT_MAX_BATCH = {"item_tower": 4096, "model": 64}
#: How long the dynamic batcher may hold a request to fill a batch (microseconds).
DEFAULT_QUEUE_DELAY_US = 200
#: Manifest entries the service does not need (hashes, parity reports): kept out of the config.
_MANIFEST_DROP = ("files", "parity", "parity_int8", "int8_graphs", "model_config")
_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16",
                   6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16",
                   11: "TYPE_FP64", 16: "TYPE_BF16"}


class TritonRepositoryError(ValueError):
    """A repository that cannot be written or does not validate (one line naming the file and
    what is wrong; a ValueError, so the command line prints it without a traceback)."""


def model_names(name: str) -> dict[str, str]:
    """``{graph: Triton model name}`` for a repository prefix ``name``."""
    return {g: f"{name}_{g}" for g in GRAPHS}


def check_model_name(name: str) -> str:
    """``name`` if it can prefix Triton model folder names (letters, digits, ``_``, ``-``)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise TritonRepositoryError(f"model name {name!r}: use letters, digits, '_' and '-'")
    return name


def candidate_bucket(n: int, limit: int | None = None) -> int:
    """The padded candidate count of a request with ``n`` candidates: the next power of two
    (at least 8), or ``limit`` (the model's maximum) when that is smaller; never below ``n``."""
    bucket = max(8, 1 << max(n - 1, 0).bit_length())
    if limit:
        bucket = min(bucket, int(limit))
    return max(bucket, n)


# --------------------------------------------------------------------------- ONNX side


@dataclass(frozen=True)
class _Tensor:
    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable
    batch_dynamic: bool


def _onnx_tensors(path: Path) -> tuple[list[_Tensor], list[_Tensor]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    # Initializers listed as inputs (older exporters) are weights, not feeds.
    weights = {i.name for i in graph.initializer}

    def convert(value: Any) -> _Tensor:
        ttype = value.type.tensor_type
        dtype = _ONNX_TO_TRITON.get(ttype.elem_type)
        if dtype is None:
            raise TritonRepositoryError(f"{path}: {value.name} has ONNX element type "
                                        f"{ttype.elem_type}, which Triton cannot carry")
        shape = list(ttype.shape.dim)
        if not shape:
            raise TritonRepositoryError(f"{path}: {value.name} is a scalar; Triton batching "
                                        "needs a first (batch) dimension")
        first = shape[0]
        dynamic = not (first.HasField("dim_value") and first.dim_value > 0)
        # Triton accepts dims >= 1 or -1: a symbolic axis and a width-0 axis (no context
        # features) are both -1, and the client sends the actual width.
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                     for d in shape[1:])
        return _Tensor(value.name, dtype, dims, dynamic)

    inputs = [convert(v) for v in graph.input if v.name not in weights]
    return inputs, [convert(v) for v in graph.output]


# --------------------------------------------------------------------------- config


def _model_config(name: str, graph: str, inputs: list[_Tensor], outputs: list[_Tensor], *,
                  backend: str, gpu: bool, accelerator: str, instances: int,
                  max_batch_size: int, queue_delay_us: int, threads: int,
                  manifest: dict[str, Any] | None) -> Any:
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    if backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
    else:
        config.backend = "python"
    for tensors, field in ((inputs, config.input), (outputs, config.output)):
        for t in tensors:
            entry = field.add(name=t.name, data_type=mc.DataType.Value(t.data_type))
            if t.dims:
                entry.dims.extend(t.dims)
            else:
                # A per-row scalar ([batch] in the graph): Triton wants dims [1], reshaped away.
                entry.dims.append(1)
                entry.reshape.SetInParent()
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    group = config.instance_group.add(count=instances)
    group.kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    if gpu:
        acc = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name=accelerator)
        if accelerator == "tensorrt":
            # FP32: the parity check was made in float32; FP16 would need its own check.
            acc.parameters["precision_mode"] = "FP32"
            acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
    params = {GRAPH_PARAMETER: graph}
    if backend == "onnxruntime" and not gpu:
        params["intra_op_thread_count"] = str(threads)  # the ORT backend's own parameter
    if backend == "python":
        params["intra_op_threads"] = str(threads)
    if manifest is not None:
        params[MANIFEST_PARAMETER] = json.dumps(manifest, sort_keys=True)
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def _trimmed_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in _MANIFEST_DROP}


def _is_ours(model_dir: Path) -> bool:
    try:
        return GRAPH_PARAMETER in (model_dir / CONFIG_FILE).read_text()
    except OSError:
        return False


def write_repository(
    onnx_dir: str | Path, repo_dir: str | Path, *, name: str | None = None,
    backend: str = "onnxruntime", gpu: bool = False, accelerator: str = "tensorrt",
    instances: int = 1, max_batch_size: dict[str, int] | None = None,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, threads: int = 1,
) -> dict[str, Any]:
    """Add the export ``onnx_dir``'s item tower and per-request graph to the Triton repository
    ``repo_dir`` as ``<name>_item_tower`` and ``<name>_model`` (``name`` defaults to the model
    name); returns what :func:`validate_repository` reports for them. Each model folder is
    written under a temporary name, validated, then renamed, so a failure leaves any previous
    version in place; folders of other models are never touched, and a folder of that name not
    written by genrerank is refused."""
    if backend not in ("onnxruntime", "python"):
        raise TritonRepositoryError(f"backend must be 'onnxruntime' or 'python', got {backend!r}")
    if accelerator not in ("tensorrt", "cuda"):
        raise TritonRepositoryError(f"accelerator must be 'tensorrt' or 'cuda', got "
                                    f"{accelerator!r}")
    if gpu and backend == "python":
        raise TritonRepositoryError("the python-backend repository is the CPU stand-in; write "
                                    "the onnxruntime one for GPU instances")
    if instances < 1 or threads < 1 or queue_delay_us < 0:
        raise TritonRepositoryError("instances and threads must be >= 1, queue_delay_us >= 0")
    manifest = load_manifest(onnx_dir)
    where = Path(onnx_dir)
    if manifest["stepwise"] or manifest["kind"] != "generator":
        # The autoregressive models decode step by step with a KV cache: one Triton round trip
        # per position and per beam. Not done: it would need sequence batching or an ensemble.
        raise TritonRepositoryError(
            f"{where}: model {manifest['model_name']!r} ({manifest['kind']}, "
            f"{'step by step' if manifest['stepwise'] else 'list scores'}) has no Triton "
            "repository yet; supported: generators that write a matrix (nar4rec, pointwise, "
            "prm, logging)")
    files = verified_files(where, manifest)  # the hashes: a swapped graph is refused here
    name = check_model_name(name or manifest["model_name"])
    sizes = {**DEFAULT_MAX_BATCH, **(max_batch_size or {})}
    if min(sizes.values()) < 1:
        raise TritonRepositoryError(f"max_batch_size must be >= 1 for dynamic batching, got "
                                    f"{sizes}")
    repo = Path(repo_dir)
    if repo.exists() and not repo.is_dir():
        raise TritonRepositoryError(f"{repo} is a file, not a model repository folder")
    names = model_names(name)
    for model in names.values():
        target = repo / model
        if target.exists() and not _is_ours(target):
            raise TritonRepositoryError(f"{target} exists and was not written by genrerank "
                                        "export --triton; refusing to replace it")
    repo.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for graph, model in names.items():
            inputs, outputs = _onnx_tensors(files[graph])
            config = _model_config(
                model, graph, inputs, outputs, backend=backend, gpu=gpu,
                accelerator=accelerator, instances=instances, max_batch_size=sizes[graph],
                queue_delay_us=queue_delay_us, threads=threads,
                manifest=_trimmed_manifest(manifest) if graph == "model" else None)
            tmp = Path(tempfile.mkdtemp(prefix=f".{model}.", dir=repo))
            written.append(tmp)
            (tmp / "1").mkdir()
            shutil.copyfile(files[graph], tmp / "1" / "model.onnx")
            if backend == "python":
                # Copied, not imported: it imports the stub's triton_python_backend_utils.
                shutil.copyfile(Path(__file__).with_name("python_model.py"),
                                tmp / "1" / "model.py")
            from google.protobuf import text_format

            (tmp / CONFIG_FILE).write_text(text_format.MessageToString(config))
            tmp.chmod(0o755)
            _validate_model(tmp, expect_name=model)
        for tmp, model in zip(written, names.values(), strict=True):
            target = repo / model
            if target.exists():
                old = target.with_name(f".{model}.old")
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
    finally:
        for tmp in written:
            shutil.rmtree(tmp, ignore_errors=True)
    return validate_repository(repo, name=name)


# --------------------------------------------------------------------------- validation


def _parse_config(path: Path) -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise TritonRepositoryError(f"{path}: not a Triton ModelConfig ({exc})") from None


def _validate_model(model_dir: Path, expect_name: str | None = None) -> dict[str, Any]:
    from tritonclient.grpc import model_config_pb2 as mc

    cfg_path = model_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise TritonRepositoryError(f"{model_dir}: no {CONFIG_FILE}")
    config = _parse_config(cfg_path)
    name = expect_name or model_dir.name
    if config.name != name:
        raise TritonRepositoryError(f"{cfg_path}: name {config.name!r} differs from its folder "
                                    f"{name!r} (Triton requires them equal)")
    if config.platform == "onnxruntime_onnx":
        backend = "onnxruntime"
    elif config.backend == "python" and config.platform == "":
        backend = "python"
        if not (model_dir / "1" / "model.py").is_file():
            raise TritonRepositoryError(f"{model_dir}/1: python backend without model.py")
    else:
        raise TritonRepositoryError(f"{cfg_path}: platform {config.platform!r} backend "
                                    f"{config.backend!r}; expected platform "
                                    "'onnxruntime_onnx' (or the python CPU stand-in)")
    if config.max_batch_size < 1:
        raise TritonRepositoryError(f"{cfg_path}: max_batch_size {config.max_batch_size}; must "
                                    "be > 0 for dynamic batching")
    if not config.HasField("dynamic_batching"):
        raise TritonRepositoryError(f"{cfg_path}: no dynamic_batching")
    gpu_groups = [g for g in config.instance_group if g.kind == mc.ModelInstanceGroup.KIND_GPU]
    accelerators = [a.name for a in
                    config.optimization.execution_accelerators.gpu_execution_accelerator]
    if gpu_groups and not set(accelerators) & {"tensorrt", "cuda"}:
        raise TritonRepositoryError(f"{cfg_path}: GPU instances without a tensorrt or cuda "
                                    "gpu_execution_accelerator")
    onnx_path = model_dir / "1" / "model.onnx"
    if not onnx_path.is_file():
        raise TritonRepositoryError(f"{model_dir}/1: no model.onnx")
    inputs, outputs = _onnx_tensors(onnx_path)
    for kind, declared, actual in (("input", config.input, inputs),
                                   ("output", config.output, outputs)):
        by_name = {t.name: t for t in actual}
        names = [d.name for d in declared]
        if sorted(names) != sorted(by_name):
            raise TritonRepositoryError(
                f"{cfg_path}: {kind}s {sorted(names)} differ from the ONNX graph's "
                f"{sorted(by_name)}")
        for d in declared:
            t = by_name[d.name]
            dtype = mc.DataType.Name(d.data_type)
            if dtype != t.data_type:
                raise TritonRepositoryError(f"{cfg_path}: {kind} {d.name} is {dtype}, the ONNX "
                                            f"graph's is {t.data_type}")
            if not t.batch_dynamic:
                raise TritonRepositoryError(f"{onnx_path}: {kind} {d.name} has a fixed first "
                                            "dimension; Triton's batch dimension must be "
                                            "dynamic")
            dims = tuple(d.dims)
            seen = tuple(d.reshape.shape) if d.HasField("reshape") else dims
            if seen != t.dims:
                raise TritonRepositoryError(
                    f"{cfg_path}: {kind} {d.name} dims {list(dims)}"
                    f"{f' reshaped to {list(seen)}' if d.HasField('reshape') else ''} differ "
                    f"from the ONNX graph's {list(t.dims)} (batch dimension omitted)")
            if any(x < 1 and x != -1 for x in dims) or not dims:
                raise TritonRepositoryError(f"{cfg_path}: {kind} {d.name} dims {list(dims)}: "
                                            "each must be >= 1 or -1")
    manifest = None
    if MANIFEST_PARAMETER in config.parameters:
        try:
            manifest = json.loads(config.parameters[MANIFEST_PARAMETER].string_value)
        except json.JSONDecodeError as exc:
            raise TritonRepositoryError(f"{cfg_path}: parameter {MANIFEST_PARAMETER} is not "
                                        f"JSON ({exc})") from None
    return {
        "name": config.name, "backend": backend, "max_batch_size": config.max_batch_size,
        "instance_kinds": [mc.ModelInstanceGroup.Kind.Name(g.kind)
                           for g in config.instance_group],
        "accelerators": accelerators,
        "inputs": {t.name: [t.data_type, list(t.dims)] for t in inputs},
        "outputs": {t.name: [t.data_type, list(t.dims)] for t in outputs},
        "graph": (config.parameters[GRAPH_PARAMETER].string_value
                  if GRAPH_PARAMETER in config.parameters else None),
        "model_version": (manifest or {}).get("model_version"),
    }


def validate_repository(repo_dir: str | Path, name: str | None = None) -> dict[str, Any]:
    """Check every model of ``repo_dir`` (or only ``<name>_item_tower`` and ``<name>_model``)
    offline; returns ``{model: summary}``, raises :class:`TritonRepositoryError` at the first
    problem."""
    repo = Path(repo_dir)
    if not repo.is_dir():
        raise TritonRepositoryError(f"{repo}: no such model repository folder")
    if name is not None:
        dirs = [repo / m for m in model_names(name).values()]
        for d in dirs:
            if not d.is_dir():
                raise TritonRepositoryError(f"{d}: missing (write it with genrerank export "
                                            "--triton)")
    else:
        dirs = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not dirs:
            raise TritonRepositoryError(f"{repo}: no models")
    return {d.name: _validate_model(d) for d in dirs}
