"""``genrerank serve --model-server URL``: the runtime backend whose model runs on Triton.

:class:`TritonBackend` is the :class:`~genrerank.serving.runtime.OnnxBackend` with its two
graphs replaced by gRPC calls to the models that ``genrerank export --triton`` wrote
(:mod:`genrerank.serving.triton.repository`): the service keeps request validation, the item
cache, constraints and decoding, and Triton runs the item tower (on the cache's misses) and the
per-request graph. The decoding code is literally the ONNX backend's, so both serve the same
lists from the same graph outputs.

What the service needs to know about the model (feature spec, decoder, version, limits,
list-context table) is read from the per-request model's config on the server (parameter
``genrerank_manifest``), so a service needs only the URL. Each request's candidates are padded
to a bucket and its positions to the model's list length (masks False) so that Triton's dynamic
batcher can stack concurrent requests (see the repository module); the outputs are cut back.

Failures: a server that is down or refuses (gRPC UNAVAILABLE and other transport errors) raises
:class:`~genrerank.serving.types.ModelUnavailable` (HTTP 503); a call past ``timeout_s``
raises :class:`~genrerank.serving.types.ModelTimeout` (504); the gRPC deadline also frees the
service's model worker, so a hung server cannot hold it. :meth:`TritonBackend.ready_check` is
what ``/readyz`` asks: both models ready and still the version the service started with.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from genrerank.data.schema import FeatureSpec
from genrerank.serving.backends import OnnxBackend, decoder_config
from genrerank.serving.onnx_model import OnnxModel
from genrerank.serving.triton.repository import (
    GRAPH_PARAMETER,
    MANIFEST_PARAMETER,
    candidate_bucket,
)
from genrerank.serving.types import ModelTimeout, ModelUnavailable

__all__ = ["TritonBackend", "TritonGraphs", "pad_feeds"]

#: gRPC status codes that mean "the server is not there / not serving": 503, not 500.
_UNAVAILABLE = ("UNAVAILABLE", "CANCELLED", "UNKNOWN", "RESOURCE_EXHAUSTED", "ABORTED")
#: The outputs the service reads (click_logits is not needed to decode: not transferred).
_OUTPUTS = ("log_probs", "item_repr")


def _np_to_triton(a: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(a.dtype))


def _status(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    text = str(status() if callable(status) else status or "")
    return text.rsplit(".", 1)[-1]  # "StatusCode.UNAVAILABLE" -> "UNAVAILABLE"


class TritonGraphs:
    """The export's graphs on a Triton server, with the interface of
    :class:`~genrerank.serving.onnx_model.OnnxModel` that the ONNX backend reads
    (``manifest``, ``stepwise``, ``item_embedding``, ``matrix``, ``request_feeds``)."""

    stepwise = False

    def __init__(self, url: str, model: str | None = None, *, timeout_s: float = 1.0,
                 connect_timeout_s: float = 30.0) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.timeout_s = timeout_s
        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        config = self._connect(model, connect_timeout_s)
        self.model = config.name
        try:
            self.manifest: dict[str, Any] = json.loads(
                config.parameters[MANIFEST_PARAMETER].string_value)
        except (KeyError, json.JSONDecodeError):
            raise ValueError(f"{url}: model {self.model!r} has no {MANIFEST_PARAMETER} "
                             "parameter; write its repository with genrerank export "
                             "--triton") from None
        self.item_tower = self.model.removesuffix("_model") + "_item_tower"
        tower = self._call(self.client.get_model_config, self.item_tower).config
        self.tower_batch = int(tower.max_batch_size)
        self.tower_inputs = [i.name for i in tower.input]
        self.max_batch = int(config.max_batch_size)
        self.version: str = self.manifest["model_version"]
        self.positions = self.manifest.get("max_list_length")
        self.max_candidates = self.manifest.get("max_candidates")

    # ------------------------------------------------------------------ connection

    def _connect(self, model: str | None, wait_s: float) -> Any:
        """The per-request model's config, waiting up to ``wait_s`` for the server (a
        service started with its model server is not refused for being a second early)."""
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + wait_s
        while True:
            try:
                if model is None:
                    model = self._find_model()
                return self.client.get_model_config(model, client_timeout=5.0).config
            except InferenceServerException as exc:
                status = _status(exc) or "error"
                if status not in _UNAVAILABLE + ("DEADLINE_EXCEEDED",):
                    raise ValueError(f"model server {self.url}: model {model!r}: {status}: "
                                     f"{exc.message()}") from None
                if time.monotonic() > deadline:
                    raise ValueError(f"model server {self.url} not reachable within "
                                     f"{wait_s:g} s: {status}: {exc.message()}") from None
            time.sleep(0.5)

    def _find_model(self) -> str:
        """The one per-request genrerank model in the server's repository."""
        index = self.client.get_model_repository_index(client_timeout=5.0).models
        names = []
        for entry in index:
            if not entry.name.endswith("_model") or entry.state != "READY":
                continue
            config = self.client.get_model_config(entry.name, client_timeout=5.0).config
            if config.parameters[GRAPH_PARAMETER].string_value == "model":
                names.append(entry.name)
        if len(names) != 1:
            raise ValueError(f"model server {self.url}: found {len(names)} ready genrerank "
                             f"models ({', '.join(names) or 'none'}); name one with "
                             "--model-name")
        return names[0]

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, client_timeout=self.timeout_s, **kwargs)
        except InferenceServerException as exc:
            status = _status(exc)
            if status == "DEADLINE_EXCEEDED":
                raise ModelTimeout(f"model server {self.url} did not answer within "
                                   f"{self.timeout_s:g} s") from None
            if status in _UNAVAILABLE or not status:
                raise ModelUnavailable(f"model server {self.url} unavailable: "
                                       f"{exc.message()}") from None
            raise RuntimeError(f"model server {self.url}: {status}: {exc.message()}") from None

    def ready_check(self) -> str | None:
        """None when both models are ready and still serve the version this service started
        with; else why not (one line)."""
        from tritonclient.utils import InferenceServerException

        try:
            for name in (self.item_tower, self.model):
                if not self.client.is_model_ready(name, client_timeout=1.0):
                    return f"model {name} not ready on {self.url}"
            config = self.client.get_model_config(self.model, client_timeout=1.0).config
            served = json.loads(config.parameters[MANIFEST_PARAMETER].string_value)
        except InferenceServerException as exc:
            return f"model server {self.url}: {_status(exc) or 'error'}: {exc.message()}"
        except (KeyError, json.JSONDecodeError):
            return f"model {self.model} on {self.url} lost its {MANIFEST_PARAMETER}"
        if served.get("model_version") != self.version:
            # The item cache and responses are keyed by the version: restart to pick it up.
            return (f"model server now serves {served.get('model_version')}, this service "
                    f"started with {self.version}; restart it")
        return None

    # ------------------------------------------------------------------ graphs

    def _infer(self, model: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]
               ) -> list[np.ndarray]:
        grpc = self._grpc
        inputs = []
        for name, value in feeds.items():
            tensor = grpc.InferInput(name, list(value.shape), _np_to_triton(value))
            tensor.set_data_from_numpy(np.ascontiguousarray(value))
            inputs.append(tensor)
        wanted = [grpc.InferRequestedOutput(o) for o in outputs]
        result = self._call(self.client.infer, model, inputs, outputs=wanted)
        # Writable copies: the decoders hand them to torch, which warns on read-only memory.
        return [np.require(result.as_numpy(o), requirements="W") for o in outputs]

    def item_embedding(self, item_cat: np.ndarray, item_dense: np.ndarray,
                       item_hash: np.ndarray | None = None) -> np.ndarray:
        rows = item_cat.shape[0]
        feeds = {"item_cat": np.asarray(item_cat, np.int64),
                 "item_dense": np.asarray(item_dense, np.float32)}
        if "item_hash" in self.tower_inputs:
            if item_hash is None:
                raise ValueError("this export embeds item ids: pass item_hash")
            feeds["item_hash"] = np.asarray(item_hash, np.int64).reshape(rows, 1)
        parts = []
        for start in range(0, rows, self.tower_batch):  # within the model's max_batch_size
            chunk = {k: v[start:start + self.tower_batch] for k, v in feeds.items()}
            parts.append(self._infer(self.item_tower, chunk, ("item_static",))[0])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    request_feeds = staticmethod(OnnxModel.request_feeds)

    def matrix(self, feeds: dict[str, np.ndarray], m: int) -> list[np.ndarray | None]:
        """``log_probs [B, n, m], None, item_repr [B, n, d]`` as ``OnnxModel.matrix``, from a
        call padded to the candidate bucket and the model's positions (masks False)."""
        b, n = feeds["upstream_score"].shape
        if b > self.max_batch:
            raise ValueError(f"{b} requests in one call; the model's max_batch_size is "
                             f"{self.max_batch}")
        padded = pad_feeds(feeds, m, self.positions, self.max_candidates)
        log_probs, item_repr = self._infer(self.model, padded, _OUTPUTS)
        return [log_probs[:, :n, :m], None, item_repr[:, :n]]


#: Per-candidate inputs of the per-request graph (padded along their second axis).
_CANDIDATE_INPUTS = ("item_static", "upstream_score", "candidate_mask", "category")


def pad_feeds(feeds: dict[str, np.ndarray], m: int, positions: int | None,
              max_candidates: int | None) -> dict[str, np.ndarray]:
    """The per-request graph's inputs for lists of length ``m``, padded so that requests of
    similar size have equal shapes and Triton's dynamic batcher can stack them: candidates to
    :func:`~genrerank.serving.triton.repository.candidate_bucket` (zeros, ``candidate_mask``
    False), positions to ``positions`` (the model's list length; ``position_mask`` False past
    m). The outputs on the real candidates and positions are unchanged (tested)."""
    n = feeds["upstream_score"].shape[1]
    width = candidate_bucket(n, max_candidates) - n
    padded = {}
    for name, value in feeds.items():
        if name in _CANDIDATE_INPUTS and width:
            value = np.pad(value, [(0, 0), (0, width)] + [(0, 0)] * (value.ndim - 2))
        padded[name] = value
    position_mask = np.zeros((feeds["upstream_score"].shape[0], max(m, int(positions or 0))),
                             dtype=np.bool_)
    position_mask[:, :m] = True
    padded["position_mask"] = position_mask
    return padded


class TritonBackend(OnnxBackend):
    """:class:`OnnxBackend` whose graphs run on a Triton server at ``url`` (gRPC)."""

    name = "triton"

    def __init__(self, url: str, model: str | None = None, *, timeout_s: float = 1.0,
                 connect_timeout_s: float = 30.0) -> None:
        # Not OnnxBackend.__init__: nothing is loaded locally, everything comes from the server.
        self.onnx = TritonGraphs(url, model, timeout_s=timeout_s,  # type: ignore[assignment]
                                 connect_timeout_s=connect_timeout_s)
        manifest = self.onnx.manifest
        from genrerank.constraints import constraints_from_config

        self.model_name = manifest["model_name"]
        self.kind = manifest["kind"]
        self.spec = FeatureSpec.from_dict(manifest["feature_spec"])
        self.version = manifest["model_version"]
        self.decoder, self.decoder_params = decoder_config(manifest.get("decode") or {})
        self.default_constraints = constraints_from_config(manifest.get("decode"))
        self.max_candidates = manifest.get("max_candidates")
        self.max_list_length = manifest.get("max_list_length")

    def ready_check(self) -> str | None:
        return self.onnx.ready_check()
