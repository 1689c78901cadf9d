"""The JSON contract of the genrerank re-ranking API, and its validation.

``POST /v1/rerank``
-------------------

The body is *columnar*: one list per field rather than one object per candidate, because
parsing 60-500 nested objects per request costs more than the model call::

    {
      "request_id": "abc-123",                 # optional string, echoed in the response
      "user": {                                # may be omitted when the spec has no user features
        "cat":   {"<user categorical>": 3, ...},      # int in [0, vocab_size), 0 = unknown
        "dense": {"<user dense>": 0.25, ...}          # finite number
      },
      "context": {                             # request context (query, device, page type);
        "cat":   {"<context categorical>": 2, ...},   # same rules as "user"; may be omitted
        "dense": {"<context dense>": 1.5, ...}        # when the spec has no context features
      },
      "candidates": {
        "ids": ["item-1", "item-2", ...],             # n unique, non-empty strings (1)
        "upstream_score": [0.9, 0.7, ...],            # n finite numbers
        "cat":   {"<item categorical>": [1, 4, ...], ...},   # each n ints in [0, vocab_size)
        "dense": {"<item dense>": [0.1, 2.0, ...], ...},     # each n finite numbers
        "category": [3, 3, 7, ...],                   # optional: n ints in [0, n_categories)
        "creator":  [12, 40, 12, ...],                # optional: n ints in [0, n_creators)
        "is_cold_start": [false, true, ...],          # optional: n booleans (constraints)
        "is_long_tail":  [true, false, ...]           # optional: n booleans (constraints)
      },
      "m": 6,                                  # list length to serve: 1 <= m <= n
      "strategy": "pipeline",                  # optional; default: the service's first strategy
      "k": 8,                                  # optional int >= 1: lists to propose (pipeline)
      "constraints": {"quotas": [...], ...}    # optional: business constraints (2)
    }

(1) At most 256 characters each by default (``genrerank serve --max-item-id-length``): ids are
keys of the server's item cache, so their size is bounded.

(2) The :mod:`genrerank.constraints` dict shape (``quotas``, ``max_per_creator``, ``required``,
``forbidden``, ``spacing``); the served list then satisfies every constraint, whatever the
model's decoder. Without it, a ``decode.constraints`` default of the served run applies. The
constraints read each candidate's ``category`` (``candidates.category``, else an item
feature ``candidates.cat.category``), ``creator`` (``candidates.creator``, else
``candidates.cat.creator``) and flags (``candidates.is_cold_start`` / ``is_long_tail``); a
constraint on an attribute the request does not carry is a ``422``
(``constraints.quotas[0].attribute``), and so is a malformed set (the field named, e.g.
``constraints.quotas[0].min``) or one that no list of length m satisfies (``constraints``, the
message naming the constraints that conflict). The ``pipeline`` strategy takes no constraints.

Every feature named in the model's :class:`~genrerank.data.schema.FeatureSpec` is required and
no other name is accepted. Integers must be JSON integers (``2.0`` and ``true`` are rejected);
numbers may be integers or floats but never ``NaN`` / ``Infinity`` (which Python's JSON encoder
writes by default), and at most 1e9 in magnitude (far beyond any log-scaled or standardised
feature; values near float32's limit would overflow inside the model). Unknown top-level keys
are rejected too, so a misspelt ``"stratgy"`` is an error rather than silently ignored.
``category`` / ``creator`` default to zeros (unknown); diversity-aware strategies then see all
items as one category and one creator, so send them when you have them.

Response ``200``::

    {"request_id": "abc-123", "items": ["item-7", ...], "scores": [0.31, ...],
     "list_score": 0.82 | null, "strategy": "pipeline", "model_version": "...",
     "timings_ms": {"parse": 0.2, "queue": 0.0, <runtime stages>..., "total": 3.1}}

``items`` are the served ids in display order (``m`` of them), ``scores`` the model's
probability for each at its position, ``list_score`` the evaluator's score of the whole list
(pipeline strategy only).

Errors
------

Every error has the same shape: ``{"error": "<kind>", "detail": ...}``. For a rejected request
(``422``, or ``413`` when the body is larger than the server's limit) ``detail`` is a list of
``{"field": "candidates.dense.duration[3]", "message": "NaN is not allowed"}``; fields are
written as dotted paths with ``[i]`` for list positions, ``body`` for the body as a whole.
``500`` (``"internal error"``), ``503`` and ``504`` (``"timeout"``) carry a string ``detail``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from genrerank.constraints import (
    ConstraintSearchLimit,
    ConstraintSet,
    ConstraintSpecError,
    InfeasibleConstraints,
    RequestConstraints,
    compile_constraints,
)
from genrerank.data.schema import FeatureSpec
from genrerank.serving.types import RerankInput

if TYPE_CHECKING:
    from genrerank.data.dataset import RerankDataset
    from genrerank.serving.types import RerankService

# --------------------------------------------------------------------------- pydantic models

# Strict types: pydantic's lax mode would turn "3", true or 2.0 into numbers and hide client bugs.
# Integers are bounded to int64 here so numpy conversion cannot overflow; the vocabulary bound
# depends on the spec and is checked with numpy afterwards.
Index = Annotated[int, Strict(), Field(ge=0, lt=2**63)]
# Strict float still accepts JSON integers (1 for 1.0); NaN / Infinity are parsed, then rejected.
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
ItemId = Annotated[str, Strict(), Field(min_length=1)]
StrictInt = Annotated[int, Strict()]
StrictStr = Annotated[str, Strict()]
StrictBool = Annotated[bool, Strict()]

_FORBID = ConfigDict(extra="forbid")

#: Largest accepted magnitude of a number. Features are log-scaled or standardised, so real
#: values are many orders below; the model overflows float32 from ~1e18 (its squares do).
MAX_ABS_NUMBER = 1e9
_FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Longest accepted item id, in characters (configurable per service): ids are keys of the item
#: cache and chosen by clients, so their size is bounded (catalogue ids are short: a UUID is 36).
DEFAULT_MAX_ITEM_ID_LENGTH = 256


class UserFeatures(BaseModel):
    model_config = _FORBID

    cat: dict[str, Index] = Field(
        default_factory=dict, description="user categorical features: name -> index"
    )
    dense: dict[str, Number] = Field(
        default_factory=dict, description="user dense features: name -> value"
    )


class ContextFeatures(BaseModel):
    """Request context (query, device, page type): one value per request, like user features."""

    model_config = _FORBID

    cat: dict[str, Index] = Field(
        default_factory=dict, description="context categorical features: name -> index"
    )
    dense: dict[str, Number] = Field(
        default_factory=dict, description="context dense features: name -> value"
    )


class Candidates(BaseModel):
    """Columnar candidates: every list has one entry per id, in the same order."""

    model_config = _FORBID

    ids: list[ItemId] = Field(description="n unique, non-empty item ids")
    upstream_score: list[Number] = Field(description="n scores from the ranking stage")
    cat: dict[str, list[Index]] = Field(
        default_factory=dict, description="item categorical features: name -> n indices"
    )
    dense: dict[str, list[Number]] = Field(
        default_factory=dict, description="item dense features: name -> n values"
    )
    category: list[Index] | None = Field(
        default=None, description="n item categories (diversity); default: all 0 (unknown)"
    )
    creator: list[Index] | None = Field(
        default=None, description="n item creators (diversity); default: all 0 (unknown)"
    )
    is_cold_start: list[StrictBool] | None = Field(
        default=None, description="n cold-start flags (read only by constraints)"
    )
    is_long_tail: list[StrictBool] | None = Field(
        default=None, description="n long-tail flags (read only by constraints)"
    )


class RerankRequest(BaseModel):
    """Body of ``POST /v1/rerank``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "request_id": "req-1",
                    "user": {"cat": {"activity_level": 2}, "dense": {"hist_activity": 0.3}},
                    "context": {"cat": {"device": 1}, "dense": {"query_length": 2.0}},
                    "candidates": {
                        "ids": ["a", "b", "c"],
                        "upstream_score": [0.9, 0.5, 0.4],
                        "cat": {"duration_bucket": [1, 3, 0]},
                        "dense": {"log_duration": [2.1, 3.0, 1.2]},
                        "category": [4, 4, 9],
                        "creator": [10, 11, 10],
                    },
                    "m": 2,
                    "strategy": "pipeline",
                }
            ]
        },
    )

    request_id: StrictStr | None = Field(default=None, description="echoed in the response")
    user: UserFeatures | None = Field(
        default=None, description="may be omitted when the model has no user features"
    )
    context: ContextFeatures | None = Field(
        default=None,
        description="request context (query, device, page type); may be omitted when the "
        "model has no context features",
    )
    candidates: Candidates
    m: StrictInt = Field(description="list length to serve, 1 <= m <= number of candidates")
    strategy: StrictStr | None = Field(
        default=None, description="default: the first of the service's strategies"
    )
    k: StrictInt | None = Field(default=None, description="lists to propose (pipeline), >= 1")
    constraints: dict[str, Any] | None = Field(
        default=None,
        description="business constraints the list must satisfy (genrerank.constraints dict "
        "shape: quotas, max_per_creator, required, forbidden, spacing)",
    )


class RerankResponse(BaseModel):
    """Body of a successful ``POST /v1/rerank`` (documentation; the app writes dicts)."""

    request_id: str | None
    items: list[str] = Field(description="served ids in display order")
    scores: list[float] = Field(description="model probability of each served item")
    list_score: float | None = Field(description="evaluator's score of the list (pipeline)")
    strategy: str
    model_version: str
    timings_ms: dict[str, float] = Field(description="stage -> milliseconds, plus 'total'")


class FieldErrorModel(BaseModel):
    field: str
    message: str


class ValidationErrorBody(BaseModel):
    """``422`` / ``413`` body."""

    error: str = "invalid request"
    detail: list[FieldErrorModel]


class ErrorBody(BaseModel):
    """``500`` / ``503`` / ``504`` body."""

    error: str
    detail: str


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class FieldError:
    field: str  # dotted path, e.g. "candidates.dense.duration[3]"; "body" for the whole body
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class RequestValidationFailed(ValueError):
    """The request breaks the contract; ``errors`` names each offending field."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))


#: At most this many errors are reported: a list of 500 NaNs should not make a 500-entry reply.
MAX_REPORTED_ERRORS = 20


def format_loc(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """``("candidates", "dense", "d1", 3)`` -> ``"candidates.dense.d1[3]"``; ``()``: ``"body"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _pydantic_message(err: dict[str, Any]) -> str:
    """Short, client-facing wording for pydantic's error types."""
    kind, value = err["type"], err.get("input")
    if kind == "finite_number" and isinstance(value, float):
        if math.isnan(value):
            return "NaN is not allowed"
        # Also reached by literals too large for a double (1e400), which parse as infinity.
        return f"{'' if value > 0 else '-'}Infinity is not allowed (numbers must be finite)"
    expected = {
        "int_type": "an integer",
        "float_type": "a number",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "an object",
        "model_type": "an object",
    }.get(kind)
    if expected is not None:
        return f"expected {expected}, got {_describe(value)}"
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "string_too_short":
        return "must be a non-empty string"
    if kind == "greater_than_equal" and value is not None:
        return f"{value!r} is negative; indices are >= 0 (0 = unknown)"
    if kind == "less_than":
        return f"{value!r} is too large"
    return str(err["msg"])


def errors_from_pydantic(exc: ValidationError) -> list[FieldError]:
    # include_url=False: the docs link is noise in an API reply.
    errs = exc.errors(include_url=False)
    return [
        FieldError(format_loc(e["loc"]), _pydantic_message(dict(e)))
        for e in errs[:MAX_REPORTED_ERRORS]
    ]


# --------------------------------------------------------------------------- validation


class RequestValidator:
    """Validates request bodies against one model's spec and limits; builds RerankInput.

    Built once per app: the name sets and vocabulary arrays are precomputed so a request only
    pays for pydantic's (Rust) parse plus a few vectorised numpy checks.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        strategies: tuple[str, ...] | list[str],
        max_candidates: int = 0,
        max_list_length: int = 0,
        max_item_id_length: int = DEFAULT_MAX_ITEM_ID_LENGTH,
        default_constraints: ConstraintSet | None = None,
    ) -> None:
        if not strategies:
            raise ValueError("RequestValidator: the service declares no strategies")
        if max_item_id_length < 1:
            raise ValueError(f"max_item_id_length must be >= 1, got {max_item_id_length}")
        self.max_item_id_length = int(max_item_id_length)
        # Applied to requests that send no constraints of their own (a run's decode default).
        self.default_constraints = (
            None if default_constraints is None or default_constraints.is_empty()
            else default_constraints)
        self.spec = spec
        self.strategies = tuple(strategies)
        self.max_candidates = int(max_candidates)  # <= 0: no limit
        self.max_list_length = int(max_list_length)  # <= 0: no limit
        self._user_cat_names = [f.name for f in spec.user_categorical]
        self._user_cat_vocab = np.array(
            [f.vocab_size for f in spec.user_categorical], dtype=np.int64
        )
        self._user_dense = list(spec.user_dense)
        self._context_cat_names = [f.name for f in spec.context_categorical]
        self._context_cat_vocab = np.array(
            [f.vocab_size for f in spec.context_categorical], dtype=np.int64
        )
        self._context_dense = list(spec.context_dense)
        self._item_cat_names = [f.name for f in spec.item_categorical]
        self._item_cat_paths = [f"candidates.cat.{name}" for name in self._item_cat_names]
        self._item_cat_vocab = [int(f.vocab_size) for f in spec.item_categorical]
        self._item_dense = list(spec.item_dense)
        self._float_paths = ["candidates.upstream_score"] + [
            f"candidates.dense.{name}" for name in self._item_dense
        ]
        # The on-disk format bounds category / creator by the spec (1 = only "unknown").
        self._n_categories = max(1, int(spec.n_categories))
        self._n_creators = max(1, int(spec.n_creators))
        # Per kind: (path prefix, kind, accepted names, [(names of a kind a client may confuse
        # it with, that kind's path)]): user and request context are easily mixed up.
        ucat, uden = self._user_cat_names, self._user_dense
        ccat, cden = self._context_cat_names, self._context_dense
        icat, iden = self._item_cat_names, self._item_dense
        user = [(ucat, "user.cat"), (uden, "user.dense")]
        context = [(ccat, "context.cat"), (cden, "context.dense")]
        self._name_checks = (
            ("user.cat", "user categorical", ucat, [user[1], *context]),
            ("user.dense", "user dense", uden, [user[0], *context]),
            ("context.cat", "context categorical", ccat, [context[1], *user]),
            ("context.dense", "context dense", cden, [context[0], *user]),
            ("candidates.cat", "item categorical", icat, [(iden, "candidates.dense")]),
            ("candidates.dense", "item dense", iden, [(icat, "candidates.cat")]),
        )

    @classmethod
    def for_service(cls, service: RerankService) -> RequestValidator:
        return cls(
            service.spec,
            service.strategies,
            service.max_candidates,
            service.max_list_length,
            getattr(service, "max_item_id_length", DEFAULT_MAX_ITEM_ID_LENGTH),
            getattr(service, "default_constraints", None),
        )

    # ---- entry points

    def validate_json(self, body: bytes | str) -> RerankInput:
        """Parse and validate a raw JSON body; raise :class:`RequestValidationFailed`."""
        try:
            req = RerankRequest.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationFailed(errors_from_pydantic(exc)) from None
        return self.to_input(req)

    def validate_python(self, payload: Any) -> RerankInput:
        """Validate an already-decoded body (e.g. :func:`payload_from_dataset`'s dict)."""
        try:
            req = RerankRequest.model_validate(payload)
        except ValidationError as exc:
            raise RequestValidationFailed(errors_from_pydantic(exc)) from None
        return self.to_input(req)

    # ---- the checks pydantic cannot do: they depend on the spec and the service limits

    def to_input(self, req: RerankRequest) -> RerankInput:
        errors: list[FieldError] = []
        user = req.user if req.user is not None else UserFeatures()
        context = req.context if req.context is not None else ContextFeatures()
        cands = req.candidates
        given = {
            "user.cat": user.cat,
            "user.dense": user.dense,
            "context.cat": context.cat,
            "context.dense": context.dense,
            "candidates.cat": cands.cat,
            "candidates.dense": cands.dense,
        }
        for path, kind, names, others in self._name_checks:
            present = given[path]
            for name in present:
                if name not in names:
                    where = [other_path for other, other_path in others if name in other]
                    hint = (
                        f" (it is declared under {where[0]})"
                        if where
                        else f"; expected {sorted(names)}"
                    )
                    errors.append(FieldError(f"{path}.{name}", f"unknown {kind} feature{hint}"))
            for name in names:
                if name not in present:
                    errors.append(FieldError(f"{path}.{name}", f"missing {kind} feature"))

        ids = cands.ids
        n = len(ids)
        if n == 0:
            errors.append(FieldError("candidates.ids", "no candidates"))
        if 0 < self.max_candidates < n:
            errors.append(
                FieldError(
                    "candidates.ids",
                    f"{n} candidates; this service accepts at most {self.max_candidates}",
                )
            )
        limit = self.max_item_id_length
        if n and max(map(len, ids)) > limit:  # ~10-30 us for 500 ids; positions on failure only
            errors.extend(
                FieldError(
                    f"candidates.ids[{i}]",
                    f"item id of {len(item_id)} characters; at most {limit} are accepted",
                )
                for i, item_id in enumerate(ids)
                if len(item_id) > limit
            )
        columns: list[tuple[str, list[Any] | None]] = [
            ("candidates.upstream_score", cands.upstream_score),
            ("candidates.category", cands.category),
            ("candidates.creator", cands.creator),
            ("candidates.is_cold_start", cands.is_cold_start),
            ("candidates.is_long_tail", cands.is_long_tail),
        ]
        columns += [(f"candidates.cat.{k}", v) for k, v in cands.cat.items()]
        columns += [(f"candidates.dense.{k}", v) for k, v in cands.dense.items()]
        for path, values in columns:
            if values is not None and len(values) != n:
                errors.append(
                    FieldError(path, f"has {len(values)} values for {n} candidates (len(ids))")
                )
        if len(set(ids)) != n:  # a set of 500 strings: ~10 us; positions only on failure
            seen: dict[str, int] = {}
            for i, item_id in enumerate(ids):
                if item_id in seen:
                    errors.append(
                        FieldError(
                            f"candidates.ids[{i}]",
                            f"duplicate id {_short(item_id)} at positions {seen[item_id]} and {i}",
                        )
                    )
                    break
                seen[item_id] = i

        m = req.m
        if m < 1:
            errors.append(FieldError("m", f"must be >= 1, got {m}"))
        elif n and m > n:
            errors.append(FieldError("m", f"m={m} is larger than the {n} candidates"))
        if 0 < self.max_list_length < m:
            errors.append(
                FieldError("m", f"m={m}; this model serves lists of at most {self.max_list_length}")
            )
        strategy = req.strategy if req.strategy is not None else self.strategies[0]
        if strategy not in self.strategies:
            errors.append(
                FieldError(
                    "strategy",
                    f"unknown strategy {_short(strategy)}; accepted: {list(self.strategies)}",
                )
            )
        if req.k is not None and req.k < 1:
            errors.append(FieldError("k", f"must be >= 1, got {req.k}"))
        constraint_set = None
        if req.constraints is not None:
            try:
                constraint_set = ConstraintSet.from_dict(req.constraints)
            except ConstraintSpecError as exc:
                where = f"constraints.{exc.field}" if exc.field else "constraints"
                errors.append(FieldError(where, exc.message))
        elif self.default_constraints is not None and strategy != "pipeline":
            constraint_set = self.default_constraints
        if constraint_set is not None and constraint_set.is_empty():
            constraint_set = None
        if constraint_set is not None and strategy == "pipeline":
            errors.append(FieldError("constraints", "the pipeline strategy does not decode "
                                                    "under constraints"))

        if errors:
            # Names, lengths or limits are wrong: the value arrays cannot even be assembled.
            raise RequestValidationFailed(errors[:MAX_REPORTED_ERRORS])

        # Values: one vectorised pass per dtype (numpy calls on tiny arrays cost ~1 us each,
        # so a call per column would dominate): vocabulary ranges and float32 overflow.
        user_cat = np.array([user.cat[name] for name in self._user_cat_names], dtype=np.int64)
        bad = user_cat >= self._user_cat_vocab
        for j in np.flatnonzero(bad):
            name, vocab = self._user_cat_names[j], int(self._user_cat_vocab[j])
            errors.append(FieldError(f"user.cat.{name}", _vocab_message(int(user_cat[j]), vocab)))
        context_cat = np.array(
            [context.cat[name] for name in self._context_cat_names], dtype=np.int64
        )
        for j in np.flatnonzero(context_cat >= self._context_cat_vocab):
            name, vocab = self._context_cat_names[j], int(self._context_cat_vocab[j])
            errors.append(
                FieldError(f"context.cat.{name}", _vocab_message(int(context_cat[j]), vocab))
            )

        with np.errstate(over="ignore"):  # finite float64 above ~3.4e38 -> inf: caught below
            user_dense = np.array(
                [user.dense[name] for name in self._user_dense], dtype=np.float64
            ).astype(np.float32)
            context_dense = np.array(
                [context.dense[name] for name in self._context_dense], dtype=np.float64
            ).astype(np.float32)
            floats = np.array(
                [cands.upstream_score, *(cands.dense[name] for name in self._item_dense)],
                dtype=np.float64,
            ).astype(np.float32)  # [1 + Fid, n]
        # Not just finite: values near float32's limit overflow inside the model (squares in
        # the upstream z-score and layer norms) and come back as NaN scores, a 500.
        for j in np.flatnonzero(~(np.abs(user_dense) <= MAX_ABS_NUMBER)):
            name = self._user_dense[j]
            errors.append(FieldError(f"user.dense.{name}", _overflow_message(user.dense[name])))
        for j in np.flatnonzero(~(np.abs(context_dense) <= MAX_ABS_NUMBER)):
            name = self._context_dense[j]
            errors.append(
                FieldError(f"context.dense.{name}", _overflow_message(context.dense[name]))
            )
        bad = ~(np.abs(floats) <= MAX_ABS_NUMBER)
        if bad.any():
            for r in np.flatnonzero(bad.any(axis=1)):
                i = int(np.argmax(bad[r]))
                path = self._float_paths[r]
                values = cands.upstream_score if r == 0 else cands.dense[self._item_dense[r - 1]]
                errors.append(FieldError(f"{path}[{i}]", _overflow_message(values[i])))

        int_rows = [cands.cat[name] for name in self._item_cat_names]
        int_paths = list(self._item_cat_paths)
        vocabs = list(self._item_cat_vocab)
        for path, values, vocab in (
            ("candidates.category", cands.category, self._n_categories),
            ("candidates.creator", cands.creator, self._n_creators),
        ):
            if values is not None:
                int_rows.append(values)
                int_paths.append(path)
                vocabs.append(vocab)
        ints = np.array(int_rows, dtype=np.int64).reshape(len(int_rows), n)  # >= 0: pydantic
        bad = ints >= np.array(vocabs, dtype=np.int64)[:, None]
        if bad.any():
            for r in np.flatnonzero(bad.any(axis=1)):
                i = int(np.argmax(bad[r]))
                message = _vocab_message(int(ints[r, i]), vocabs[r])
                errors.append(FieldError(f"{int_paths[r]}[{i}]", message))

        if errors:
            raise RequestValidationFailed(errors[:MAX_REPORTED_ERRORS])

        # Everything is present, of length n and in range: hand over spec-ordered arrays.
        n_ic = len(self._item_cat_names)
        extra = iter(ints[n_ic:])
        zeros = np.zeros(n, dtype=np.int64)
        category = next(extra).copy() if cands.category is not None else None
        if category is None:
            # Models read a candidate's category (user-history affinity): when the request
            # leaves it out, an item feature named "category" is the same thing.
            names = list(self._item_cat_names)
            category = ints[names.index("category")].copy() if "category" in names else zeros
        creator = next(extra).copy() if cands.creator is not None else None
        # What constraints read: the column the request sent, else the item feature so named.
        names = list(self._item_cat_names)
        if creator is None and "creator" in names:
            given_creator: np.ndarray | None = ints[names.index("creator")].copy()
        else:
            given_creator = creator
        attrs: dict[str, np.ndarray | None] = {
            "category": category if cands.category is not None or "category" in names
            else None,
            "creator": given_creator,
            "cold_start": None if cands.is_cold_start is None
            else np.array(cands.is_cold_start, dtype=np.bool_),
            "long_tail": None if cands.is_long_tail is None
            else np.array(cands.is_long_tail, dtype=np.bool_),
        }
        compiled = None
        if constraint_set is not None:
            compiled = self._compile_constraints(constraint_set, attrs, list(ids), m,
                                                 req.request_id, req.constraints is None)
        return RerankInput(
            item_ids=list(ids),
            user_cat=user_cat,
            user_dense=user_dense,
            item_cat=np.ascontiguousarray(ints[:n_ic].T),
            item_dense=np.ascontiguousarray(floats[1:].T),
            upstream_score=floats[0].copy(),
            category=category,
            creator=creator if creator is not None else zeros.copy(),
            m=m,
            strategy=strategy,
            k=req.k,
            request_id=req.request_id,
            context_cat=context_cat,
            context_dense=context_dense,
            is_cold_start=attrs["cold_start"],
            is_long_tail=attrs["long_tail"],
            constraints=compiled,
        )

    def _compile_constraints(self, cs: ConstraintSet, attrs: dict[str, np.ndarray | None],
                             ids: list[str], m: int, request_id: str | None,
                             default: bool) -> RequestConstraints:
        """The request's constraints compiled and checked feasible, or a 422 naming the
        constraint that reads an attribute the request lacks, or the conflicting ones."""
        source = "the model's default decode.constraints" if default else None
        for attr in sorted(cs.attributes()):
            if attrs[attr] is None:
                where = _constraint_path(cs, attr)
                send = {"category": "candidates.category (or an item feature 'category')",
                        "creator": "candidates.creator (or an item feature 'creator')",
                        "cold_start": "candidates.is_cold_start",
                        "long_tail": "candidates.is_long_tail"}[attr]
                field = "constraints" if default else f"constraints.{where}"
                why = f" ({source}: {where})" if default else ""
                raise RequestValidationFailed([FieldError(
                    field, f"reads each candidate's {attr}{why}: send {send}")])
        try:
            compiled = compile_constraints(
                cs, category=attrs["category"], creator=attrs["creator"],
                is_cold_start=attrs["cold_start"], is_long_tail=attrs["long_tail"],
                item_ids=ids, candidate_mask=None, list_length=m, request_id=request_id)
            compiled.check_feasible()
        except (InfeasibleConstraints, ConstraintSearchLimit) as exc:
            message = f"{exc} ({source})" if default else str(exc)
            raise RequestValidationFailed([FieldError("constraints", message)]) from None
        return compiled


def _constraint_path(cs: ConstraintSet, attr: str) -> str:
    """Where ``cs`` first reads candidate attribute ``attr`` (``quotas[0].attribute``)."""
    for i, q in enumerate(cs.quotas):
        if q.attribute == attr and (q.min or q.max is not None):
            return f"quotas[{i}].attribute"
    for i, s in enumerate(cs.spacing):
        if s.attribute == attr and s.distance > 1:
            return f"spacing[{i}].attribute"
    return "max_per_creator"


def _short(text: str, limit: int = 60) -> str:
    """``repr(text)``, cut to ``limit`` characters: client strings are echoed in error replies."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _vocab_message(value: int, vocab: int) -> str:
    return f"index {value} is outside the vocabulary [0, {vocab}) (0 = unknown)"


def _overflow_message(value: float) -> str:
    if abs(value) > _FLOAT32_MAX:
        return f"{value!r} does not fit in float32"
    bound = f"{MAX_ABS_NUMBER:.0e}".replace("e+0", "e").replace("e+", "e")  # "1e9"
    return f"{value!r} is too large: numbers must be within [-{bound}, {bound}]"


# --------------------------------------------------------------------------- payload builders


def synthetic_payload(spec: FeatureSpec, n: int, m: int = 1) -> dict[str, Any]:
    """A valid request of ``n`` made-up candidates (all features unknown / zero): warm-up."""
    payload: dict[str, Any] = {
        "request_id": "warmup",
        "user": {
            "cat": {f.name: 0 for f in spec.user_categorical},
            "dense": {name: 0.0 for name in spec.user_dense},
        },
        "candidates": {
            "ids": [f"warmup-{i}" for i in range(n)],
            "upstream_score": [float(n - i) / n for i in range(n)],
            "cat": {f.name: [0] * n for f in spec.item_categorical},
            "dense": {name: [0.0] * n for name in spec.item_dense},
        },
        "m": m,
    }
    if spec.context_categorical or spec.context_dense:  # else the body stays as it always was
        payload["context"] = {
            "cat": {f.name: 0 for f in spec.context_categorical},
            "dense": {name: 0.0 for name in spec.context_dense},
        }
    return payload


def payload_from_dataset(
    dataset: RerankDataset,
    index: int,
    m: int | None = None,
    strategy: str | None = None,
    k: int | None = None,
) -> dict[str, Any]:
    """The ``POST /v1/rerank`` JSON body for request ``index`` of ``dataset``.

    ``m`` defaults to the logged list length. Values are plain Python lists / numbers so
    ``json.dumps`` works (float32 values are widened to float64, which round-trips exactly).
    """
    spec = dataset.spec
    item = dataset[index]
    item_cat = np.asarray(item["item_cat"])
    item_dense = np.asarray(item["item_dense"], dtype=np.float32)
    user_cat = np.asarray(item["user_cat"]).tolist()
    user_dense = np.asarray(item["user_dense"], dtype=np.float32).astype(np.float64).tolist()
    context_cat = np.asarray(item["context_cat"]).tolist()
    context_dense = (
        np.asarray(item["context_dense"], dtype=np.float32).astype(np.float64).tolist()
    )
    payload: dict[str, Any] = {
        "request_id": str(dataset.request_ids[index]),
        "user": {
            "cat": {f.name: int(v) for f, v in zip(spec.user_categorical, user_cat, strict=True)},
            "dense": {name: float(v) for name, v in zip(spec.user_dense, user_dense, strict=True)},
        },
        "candidates": {
            "ids": [str(x) for x in dataset.table.column("item_id")[index].as_py()],
            "upstream_score": np.asarray(item["upstream_score"], dtype=np.float32)
            .astype(np.float64)
            .tolist(),
            "cat": {
                f.name: item_cat[:, j].astype(np.int64).tolist()
                for j, f in enumerate(spec.item_categorical)
            },
            "dense": {
                name: item_dense[:, j].astype(np.float64).tolist()
                for j, name in enumerate(spec.item_dense)
            },
            "category": np.asarray(item["category"]).astype(np.int64).tolist(),
            "creator": np.asarray(item["creator"]).astype(np.int64).tolist(),
        },
        "m": int(len(item["exposed"]) if m is None else m),
    }
    if spec.context_categorical or spec.context_dense:  # else the body stays as it always was
        payload["context"] = {
            "cat": {
                f.name: int(v)
                for f, v in zip(spec.context_categorical, context_cat, strict=True)
            },
            "dense": {
                name: float(v) for name, v in zip(spec.context_dense, context_dense, strict=True)
            },
        }
    if strategy is not None:
        payload["strategy"] = strategy
    if k is not None:
        payload["k"] = int(k)
    return payload
