"""The constraint language: what a list must satisfy, as plain frozen data.

One :class:`ConstraintSet` is written once (Python, a JSON or TOML file, a run config's
``decode.constraints``, the ``"constraints"`` object of an HTTP request) and compiled per
request (:func:`genrerank.constraints.compile_constraints`) against that request's candidates.

Dict shape (JSON / TOML / HTTP)::

    {"quotas": [{"attribute": "category", "value": 3, "max": 2, "within": 6},
                {"attribute": "cold_start", "min": 1}],
     "max_per_creator": 2,
     "required": ["v1"],
     "forbidden": ["v9"],
     "spacing": [{"attribute": "category", "distance": 2}]}

Semantics, for a list of length ``L = min(m, real candidates)``:

- ``Quota(attribute, value, min, max, within)``: the number of listed items whose
  ``attribute`` equals ``value`` (``category`` / ``creator``: the candidate's index; for
  ``cold_start`` / ``long_tail`` ``value`` is None and the flagged items count) among the
  first ``min(within, L)`` positions (``within=None``: the whole list) lies in ``[min, max]``
  (``max=None``: no upper bound).
- ``max_per_creator``: no creator has more than that many items in the list.
- ``required``: every one of these item ids is in the list (an id that is not among the
  request's real candidates makes the request infeasible).
- ``forbidden``: none of these item ids is in the list (absent ids are ignored).
- ``Spacing(attribute, distance)``: two listed items with the same ``category`` (``creator``)
  are at least ``distance`` positions apart (``distance=2``: never adjacent; ``1``: no rule).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ATTRIBUTES",
    "FLAG_ATTRIBUTES",
    "SPACING_ATTRIBUTES",
    "ConstraintSet",
    "ConstraintSpecError",
    "Quota",
    "Spacing",
    "constraints_from_config",
    "load_constraints",
]

#: Attributes a quota may count: two indexed ones and two flags.
ATTRIBUTES = ("category", "creator", "cold_start", "long_tail")
#: Quota attributes that are flags (no ``value``: the flagged items count).
FLAG_ATTRIBUTES = ("cold_start", "long_tail")
#: Attributes a spacing rule may separate.
SPACING_ATTRIBUTES = ("category", "creator")


class ConstraintSpecError(ValueError):
    """A malformed constraint set. ``field`` is the offending key as a path
    (``quotas[0].attribute``), so the HTTP layer can answer ``constraints.<field>``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> ConstraintSpecError:
        """The same error with its field nested under ``prefix`` (``quotas[0]``)."""
        return ConstraintSpecError(f"{prefix}.{self.field}" if self.field else prefix,
                                   self.message)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _need_int(name: str, x: Any, low: int, *, optional: bool = False) -> None:
    if x is None and optional:
        return
    if not _is_int(x):
        raise ConstraintSpecError(name, f"must be an integer{' or null' if optional else ''}, "
                                        f"got {x!r}")
    if x < low:
        raise ConstraintSpecError(name, f"must be >= {low}, got {x}")


@dataclass(frozen=True)
class Quota:
    """At least ``min`` and at most ``max`` items with ``attribute == value`` among the first
    ``within`` positions (None: the whole list). See the module docstring."""

    attribute: str
    value: int | None = None
    min: int = 0
    max: int | None = None
    within: int | None = None

    def __post_init__(self) -> None:
        if self.attribute not in ATTRIBUTES:
            raise ConstraintSpecError(
                "attribute", f"must be one of {', '.join(map(repr, ATTRIBUTES))}, "
                             f"got {self.attribute!r}")
        if self.attribute in FLAG_ATTRIBUTES:
            if self.value is not None:
                raise ConstraintSpecError(
                    "value", f"{self.attribute!r} is a flag: leave value out (the flagged "
                             f"items count), got {self.value!r}")
        else:
            if self.value is None:
                raise ConstraintSpecError(
                    "value", f"{self.attribute!r} needs the index it counts")
            _need_int("value", self.value, 0)
        _need_int("min", self.min, 0)
        _need_int("max", self.max, 0, optional=True)
        _need_int("within", self.within, 1, optional=True)
        if self.max is not None and self.max < self.min:
            raise ConstraintSpecError("max", f"max {self.max} is below min {self.min}")

    def describe(self) -> str:
        """``category 3: max 2 within 6`` (for messages)."""
        what = self.attribute if self.value is None else f"{self.attribute} {self.value}"
        parts = []
        if self.min:
            parts.append(f"min {self.min}")
        if self.max is not None:
            parts.append(f"max {self.max}")
        where = f" within {self.within}" if self.within is not None else ""
        return f"{what}: {', '.join(parts) or 'no bound'}{where}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attribute": self.attribute}
        if self.value is not None:
            out["value"] = self.value
        if self.min:
            out["min"] = self.min
        for key in ("max", "within"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class Spacing:
    """Items sharing ``attribute`` stand at least ``distance`` positions apart."""

    attribute: str
    distance: int

    def __post_init__(self) -> None:
        if self.attribute not in SPACING_ATTRIBUTES:
            raise ConstraintSpecError(
                "attribute", f"must be one of {', '.join(map(repr, SPACING_ATTRIBUTES))}, "
                             f"got {self.attribute!r}")
        _need_int("distance", self.distance, 1)

    def describe(self) -> str:
        return f"{self.attribute} distance {self.distance}"

    def to_dict(self) -> dict[str, Any]:
        return {"attribute": self.attribute, "distance": self.distance}


_QUOTA_KEYS = ("attribute", "value", "min", "max", "within")
_SPACING_KEYS = ("attribute", "distance")
_SET_KEYS = ("quotas", "max_per_creator", "required", "forbidden", "spacing")


def _ids(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConstraintSpecError(name, f"must be a list of item ids, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConstraintSpecError(f"{name}[{i}]", f"must be a non-empty string, got "
                                                      f"{item!r}")
    return tuple(value)


def _entry(cls: type, keys: tuple[str, ...], path: str, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConstraintSpecError(path, f"must be an object, got {raw!r}")
    for key in raw:
        if key not in keys:
            raise ConstraintSpecError(f"{path}.{key}", f"unknown key; expected "
                                                       f"{', '.join(keys)}")
    if "attribute" not in raw:
        raise ConstraintSpecError(f"{path}.attribute", "missing")
    if cls is Spacing and "distance" not in raw:
        raise ConstraintSpecError(f"{path}.distance", "missing")
    try:
        return cls(**dict(raw))
    except ConstraintSpecError as exc:
        raise exc.under(path) from None


@dataclass(frozen=True)
class ConstraintSet:
    """Everything a list must satisfy; the empty set constrains nothing."""

    quotas: tuple[Quota, ...] = ()
    max_per_creator: int | None = None
    required: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    spacing: tuple[Spacing, ...] = field(default=())

    def __post_init__(self) -> None:
        # Lists are accepted from Python callers; tuples keep the set hashable.
        for name in ("quotas", "required", "forbidden", "spacing"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ConstraintSpecError(name, f"must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for i, q in enumerate(self.quotas):
            if not isinstance(q, Quota):
                raise ConstraintSpecError(f"quotas[{i}]", f"must be a Quota, got {q!r}")
        for i, s in enumerate(self.spacing):
            if not isinstance(s, Spacing):
                raise ConstraintSpecError(f"spacing[{i}]", f"must be a Spacing, got {s!r}")
        _need_int("max_per_creator", self.max_per_creator, 1, optional=True)
        _ids("required", self.required)
        _ids("forbidden", self.forbidden)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ConstraintSet:
        """Parse the JSON / TOML shape (module docstring). A bad key or value raises
        :class:`ConstraintSpecError` (a ValueError) naming it: ``quotas[0].attribute: ...``."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ConstraintSpecError("", f"constraints must be an object, got {d!r}")
        for key in d:
            if key not in _SET_KEYS:
                raise ConstraintSpecError(str(key), f"unknown key; expected "
                                                    f"{', '.join(_SET_KEYS)}")
        quotas = d.get("quotas") or []
        spacing = d.get("spacing") or []
        for name, value in (("quotas", quotas), ("spacing", spacing)):
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ConstraintSpecError(name, f"must be a list of objects, got {value!r}")
        return cls(
            quotas=tuple(_entry(Quota, _QUOTA_KEYS, f"quotas[{i}]", q)
                         for i, q in enumerate(quotas)),
            max_per_creator=d.get("max_per_creator"),
            required=_ids("required", d.get("required") or []),
            forbidden=_ids("forbidden", d.get("forbidden") or []),
            spacing=tuple(_entry(Spacing, _SPACING_KEYS, f"spacing[{i}]", s)
                          for i, s in enumerate(spacing)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The dict shape; ``from_dict(cs.to_dict()) == cs``. Empty parts are left out."""
        out: dict[str, Any] = {}
        if self.quotas:
            out["quotas"] = [q.to_dict() for q in self.quotas]
        if self.max_per_creator is not None:
            out["max_per_creator"] = self.max_per_creator
        if self.required:
            out["required"] = list(self.required)
        if self.forbidden:
            out["forbidden"] = list(self.forbidden)
        if self.spacing:
            out["spacing"] = [s.to_dict() for s in self.spacing]
        return out

    def is_empty(self) -> bool:
        """True when no list can violate the set (distance-1 spacing, bound-free quotas)."""
        return (self.max_per_creator is None and not self.required and not self.forbidden
                and all(s.distance <= 1 for s in self.spacing)
                and all(q.min == 0 and q.max is None for q in self.quotas))

    def attributes(self) -> set[str]:
        """The candidate attributes the set reads (``category``, ``creator``, flags)."""
        used = {q.attribute for q in self.quotas if q.min or q.max is not None}
        used |= {s.attribute for s in self.spacing if s.distance > 1}
        if self.max_per_creator is not None:
            used.add("creator")
        return used


def constraints_from_config(decode_cfg: Mapping[str, Any] | None) -> ConstraintSet | None:
    """The default constraints of a run config's ``decode`` section (``decode.constraints``,
    the dict shape), or None. Errors name ``decode.constraints.<key>``."""
    raw = (decode_cfg or {}).get("constraints")
    if raw is None:
        return None
    if isinstance(raw, ConstraintSet):
        return raw
    try:
        cs = ConstraintSet.from_dict(raw)
    except ConstraintSpecError as exc:
        raise exc.under("decode.constraints") from None
    return None if cs.is_empty() else cs


def load_constraints(path: str | Path) -> ConstraintSet:
    """A constraint set from a ``.json`` or ``.toml`` file (the dict shape at the top level).
    Errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"constraints file {path} does not exist") from None
    try:
        if path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise ValueError(f"{path}: constraints must be a .json or .toml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()} ({exc})") from None
    try:
        return ConstraintSet.from_dict(raw)
    except ConstraintSpecError as exc:
        raise ValueError(f"{path}: {exc}") from None
