"""What passes between the HTTP layer and the re-ranking runtime.

The HTTP layer (:mod:`genrerank.serving.app`) validates a JSON request against the model's
:class:`~genrerank.data.schema.FeatureSpec` and hands the runtime a :class:`RerankInput` of
numpy arrays in the spec's feature order; the runtime (:mod:`genrerank.serving.runtime`)
answers with a :class:`RerankResult`. Anything implementing :class:`RerankService` can sit
behind the app (the tests use small fakes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from genrerank.data.schema import FeatureSpec

if TYPE_CHECKING:
    from genrerank.constraints import RequestConstraints


@dataclass
class RerankInput:
    """One validated request. ``n`` = number of candidates; features follow the spec's order."""

    item_ids: list[str]  # [n], unique
    user_cat: np.ndarray  # [len(spec.user_categorical)] int64, 0 = unknown
    user_dense: np.ndarray  # [len(spec.user_dense)] float32, |x| <= schema.MAX_ABS_NUMBER
    item_cat: np.ndarray  # [n, len(spec.item_categorical)] int64, each in [0, vocab_size)
    item_dense: np.ndarray  # [n, len(spec.item_dense)] float32, likewise
    upstream_score: np.ndarray  # [n] float32, likewise
    category: np.ndarray  # [n] int64 (0 when the client sends none): diversity generators
    creator: np.ndarray  # [n] int64 (0 when the client sends none)
    m: int  # list length to serve, 1 <= m <= n
    strategy: str  # one of RerankService.strategies
    k: int | None = None  # lists to propose (pipeline strategy); None = its configured K
    request_id: str | None = None
    #: Request context (query, device, page type), like user_cat / user_dense; empty when the
    #: spec has none. Defaults keep inputs built without them valid for such specs.
    context_cat: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    context_dense: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    #: [n] bool flags, None when the client sent none (read only by constraints).
    is_cold_start: np.ndarray | None = None
    is_long_tail: np.ndarray | None = None
    #: The request's constraints (or the service's default), compiled for these candidates
    #: and m and checked feasible by the validator; None = unconstrained.
    constraints: RequestConstraints | None = None

    @property
    def n(self) -> int:
        return len(self.item_ids)


@dataclass
class RerankResult:
    item_ids: list[str]  # [m] in display order
    scores: list[float]  # [m]: the model's probability of each served item at its position
    strategy: str
    model_version: str
    list_score: float | None = None  # pipeline: the evaluator's score of the served list
    timings_ms: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds
    cache_hits: int = 0
    cache_misses: int = 0


class RerankService(Protocol):
    """The runtime behind the HTTP app."""

    spec: FeatureSpec
    model_version: str
    strategies: tuple[str, ...]  # accepted values of RerankInput.strategy; the first is default
    max_candidates: int  # requests with more candidates are rejected (422)
    max_list_length: int  # the longest list the model can write (m above it: 422)
    # Optional: the longest item id in characters (longer: 422); services without it get
    # schema.DEFAULT_MAX_ITEM_ID_LENGTH (a Protocol cannot declare an attribute optional).

    def rerank(self, request: RerankInput) -> RerankResult: ...

    def cache_stats(self) -> dict[str, float]:
        """``hits``, ``misses``, ``size`` and ``capacity`` (items), ``bytes`` and
        ``capacity_bytes`` (the cache's own byte count and bound), ``hit_rate`` (0 when unused);
        a service may leave out any of them."""
        ...


class ModelUnavailable(RuntimeError):
    """The model could not be reached (a remote model server down or refusing): the HTTP layer
    answers 503 with ``Retry-After``, not 500, and the process keeps serving."""


class ModelTimeout(TimeoutError):
    """The model did not answer within its deadline (a slow remote model server): 504."""
