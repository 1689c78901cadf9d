"""What every trainable re-ranker shares: a registry, a config dataclass, one forward signature.

A model is built by name from a FeatureSpec and a config dict (``build_model("nar4rec", spec,
{"dim": 64})``), takes a padded :class:`~genrerank.data.dataset.Batch` and returns a
:class:`~genrerank.losses.base.ModelOutput` whose ``log_probs [B, N, M]`` are a log-softmax over
candidates for each position. Models that score items rather than positions (pointwise, PRM)
express their scores as the same matrix, so every loss, decoder and metric works on all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.decoding import DecodedLists, decode

MODELS: dict[str, type[RerankModel]] = {}


def register_model(name: str) -> Callable[[type[RerankModel]], type[RerankModel]]:
    def add(cls: type[RerankModel]) -> type[RerankModel]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls

    return add


class RerankModel(nn.Module):
    """Base class: subclasses set ``Config`` (a dataclass) and implement ``forward``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object

    def __init__(self, spec: FeatureSpec, config: Any) -> None:
        super().__init__()
        self.spec = spec
        self.config = config

    #: "generator" models write lists; an "evaluator" scores lists it is given.
    kind: ClassVar[str] = "generator"
    #: True for models whose lists depend on earlier choices (autoregressive): their
    #: ``log_probs`` are teacher-forced on the logged list, and lists come from ``generate``.
    stepwise: ClassVar[bool] = False
    #: True for models that score lists they are given (``score_lists``,
    #: ``signal_probabilities``): usable as a pipeline's evaluator or a reward model.
    scores_lists: ClassVar[bool] = False
    #: Why the ONNX export and the service cannot take this model yet ("" = they can).
    not_servable: ClassVar[str] = ""

    def forward(self, batch: Batch) -> Any:  # -> ModelOutput
        raise NotImplementedError

    def item_embedding(self, item_cat: torch.Tensor, item_dense: torch.Tensor,
                       item_hash: torch.Tensor | None = None) -> torch.Tensor:
        """The request-independent item vectors ``[..., d]`` this model puts in
        ``Batch.item_static``: what serving computes once per item and caches. ``item_hash``
        (:mod:`genrerank.data.ids`) is read only by models with hashed item-id embeddings."""
        features = getattr(self, "features", None)
        if features is None:
            raise ValueError(f"model {self.name!r} reads no item features; nothing to embed")
        return features.item_static(item_cat, item_dense, item_hash)

    def fit_statistics(self, dataset: Any) -> None:
        """Set data statistics (feature standardisation) from the TRAINING split; the shared
        trainer calls this once before the first step of a fresh run."""
        features = getattr(self, "features", None)
        if features is not None and hasattr(features, "fit_statistics"):
            features.fit_statistics(dataset)

    def input_limits(self) -> tuple[int | None, int | None]:
        """The most candidates and the longest list this model accepts (None: no limit):
        learned position tables cannot be indexed past their size."""
        positions = getattr(self, "max_positions", None)
        bias = getattr(self, "position_bias", None)
        if positions is None and isinstance(bias, torch.Tensor):
            positions = bias.numel()
        return None, positions

    @torch.inference_mode()
    def generate(
        self, batch: Batch, list_length: int | torch.Tensor | None, decoder: str = "greedy",
        **params: Any,
    ) -> torch.Tensor | DecodedLists:
        """Lists for ``batch``: ``[B, m]`` (single-list decoders) or DecodedLists ``[B, K, m]``.

        Matrix models decode their ``[B, N, M]`` log-probabilities with a named decoder from
        :mod:`genrerank.decoding`; autoregressive models override this and decode step by step.
        ``list_length`` follows the decoders' convention (an int, or per-request lengths ``[B]``);
        ``None`` lets a model with a list-length head choose each request's length (see
        :meth:`predicted_lengths`).
        """
        if list_length is None:
            # Every position column is computed; each request keeps its predicted length.
            out = self(batch, list_length=self.input_limits()[1])
            list_length = predicted_lengths(out, batch)
        elif isinstance(list_length, torch.Tensor):
            out = self(batch)  # per-request lengths: the batch's own positions
        else:
            out = self(batch, list_length=list_length)
        params = {**self.decoder_inputs(decoder, batch, out), **params}
        return decode(decoder, out.log_probs, batch.candidate_mask, list_length, **params)

    def decoder_inputs(self, decoder: str, batch: Batch, out: Any) -> dict[str, Any]:
        """What a named decoder reads besides the score matrix: contrastive the item vectors,
        satiation and context the candidates' categories, context the model's learned list
        context table (:mod:`genrerank.modules.list_context`)."""
        extra: dict[str, Any] = {}
        if decoder == "contrastive":
            extra["item_repr"] = out.item_repr
        if decoder in ("satiation", "context"):
            extra["category"] = batch.category
        if decoder == "context":
            extra.update(list_context_params(self))
        return extra


def list_context_params(model: nn.Module) -> dict[str, Any]:
    """``{"pair", "decay"}`` of a model's learned list context, for the ``context`` decoder."""
    context = getattr(model, "list_context", None)
    if context is None:
        raise ValueError(f"decoder 'context' needs a model with a learned list context; "
                         f"{getattr(model, 'name', type(model).__name__)!r} has none")
    return {"pair": context.pair.detach(), "decay": float(context.decay.detach())}


def predicted_lengths(out: Any, batch: Batch) -> torch.Tensor:
    """``[B]`` list lengths from a model's list-length head (``ModelOutput.length_logits``,
    trained by the ``list_length`` loss): the most likely length, at least 1 and at most the
    request's candidates and the matrix's positions."""
    logits = getattr(out, "length_logits", None)
    if logits is None:
        raise ValueError("this model has no list-length head: pass list_length")
    width = out.log_probs.shape[2]
    lengths = logits[:, : width + 1].argmax(1)
    return torch.minimum(lengths.clamp_min(1), batch.candidate_mask.sum(1)).clamp_max(width)


def make_config(cls: type, values: dict[str, Any] | None) -> Any:
    """Build a config dataclass, naming any key it does not have."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__qualname__}: unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def build_model(name: str, spec: FeatureSpec, config: dict[str, Any] | None = None) -> RerankModel:
    """A model by registry name (import genrerank.models first so all are registered)."""
    import genrerank.models  # noqa: F401  (registers the built-in models)

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    cls = MODELS[name]
    return cls(spec, make_config(cls.Config, config))
