"""The import mapping: which column of an impressions table is which, read from TOML or a dict.

Top-level keys (all optional): ``layout`` (``"long"``: one row per shown item, the default;
``"wide"``: one row per request with list columns), ``source`` (the data set's name, default
``"import"``), ``position_base`` (1 or 0, default 1; long layout only), ``time_format`` (a
``strptime`` format; default: integers are unix seconds, text is ISO 8601, times without a zone
are UTC), ``list_separator`` (separator of list cells in a wide CSV / TSV, default ``";"``),
``seed`` (breaks upstream-score ties, default 0), ``long_tail_quantile`` (default 0.8).

Sections: ``[columns]`` (request_id, time, user_id, item_id, position; optional upstream_score,
category, creator, is_cold_start, is_long_tail), ``[signals]`` (name -> column, kind, gain, fill),
``[features.user]`` / ``[features.item]`` / ``[features.context]`` (name -> column, kind and its
options), ``[split]``, ``[derived]``, ``[duplicates]`` and ``[candidates]``; see the package
docstring of :mod:`genrerank.data.importer` for what each does. An unknown key is an error naming
the closest known one.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from genrerank.data.schema import DEFAULT_LABEL_KINDS, LABEL_KINDS, SPLITS, DataValidationError
from genrerank.data.splits import DEFAULT_FRACTIONS

LAYOUTS = ("long", "wide")
FEATURE_GROUPS = ("user", "item", "context")
FEATURE_KINDS = ("categorical", "dense", "tags")
SPLIT_METHODS = ("time", "user", "column")
DUPLICATE_POLICIES = ("error", "drop", "merge")
TRANSFORMS = ("none", "log1p")

#: Roles of ``[columns]``; the first five are required (position only in the long layout).
REQUIRED_COLUMNS = ("request_id", "time", "user_id", "item_id", "position")
OPTIONAL_COLUMNS = ("upstream_score", "category", "creator", "is_cold_start", "is_long_tail")
#: Columns that hold one value per shown item (a list per request in the wide layout).
ITEM_ROLES = ("item_id", "upstream_score", "category", "creator", "is_cold_start",
              "is_long_tail")

_TOP_KEYS = ("layout", "source", "position_base", "time_format", "list_separator", "seed",
             "long_tail_quantile", "columns", "signals", "features", "split", "derived",
             "duplicates", "candidates")
_SIGNAL_KEYS = ("column", "kind", "gain", "fill")
_FEATURE_KEYS = {
    "categorical": ("column", "kind", "vocab_cap", "hash_buckets"),
    "dense": ("column", "kind", "fill", "transform"),
    "tags": ("column", "kind", "sep", "top_k"),
}
_ALL_FEATURE_KEYS = tuple(sorted({k for keys in _FEATURE_KEYS.values() for k in keys}))
_SPLIT_KEYS = ("method", "fractions", "column", "values")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # the format's rule for signal names
_FEATURE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class Signal:
    """One logged signal: ``label_<name>`` in the data set, one value per shown item."""

    name: str
    column: str
    kind: str  # "binary" (0 or 1) | "nonnegative" (>= 0)
    gain: float = 1.0
    fill: float | None = None  # value for an empty cell; None: an empty cell is an error


@dataclass(frozen=True)
class Feature:
    """One user, item or context feature."""

    group: str  # "user" | "item" | "context"
    name: str
    column: str
    kind: str  # "categorical" | "dense" | "tags"
    vocab_cap: int | None = None  # categorical: most frequent training values kept
    hash_buckets: int = 0  # categorical: extra indices for values outside the vocabulary
    fill: float = 0.0  # dense: value of an empty cell
    transform: str = "none"  # dense: "none" | "log1p" (sign(x) * log1p(|x|))
    sep: str = "|"  # tags: separator inside a cell
    top_k: int = 16  # tags: the most frequent training tags become 0/1 dense features

    @property
    def qualified(self) -> str:
        """``group.name``, the key in ``vocabularies.json`` and the import report."""
        return f"{self.group}.{self.name}"


@dataclass(frozen=True)
class SplitRule:
    method: str = "time"
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    column: str | None = None
    #: method "column": split name -> the raw values (compared as text) that mean it; empty =
    #: the column already holds train / valid / test.
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Mapping:
    """A validated import mapping. Build it with :func:`load_mapping` (or ``from_dict``)."""

    columns: dict[str, str]
    signals: tuple[Signal, ...]
    features: tuple[Feature, ...] = ()
    layout: str = "long"
    source: str = "import"
    position_base: int = 1
    time_format: str | None = None
    list_separator: str = ";"
    seed: int = 0
    long_tail_quantile: float = 0.8
    split: SplitRule = field(default_factory=SplitRule)
    derived: tuple[str, ...] = ()
    duplicates: str = "error"
    #: Column of the impressions table -> its name in the candidates table, where they differ.
    candidate_columns: dict[str, str] = field(default_factory=dict)
    where: str = "mapping"  # the file it came from, for error messages

    def column(self, role: str) -> str | None:
        return self.columns.get(role)

    def group(self, group: str) -> list[Feature]:
        return [f for f in self.features if f.group == group]

    def to_dict(self) -> dict[str, Any]:
        """The mapping as plain data (recorded in the data set's provenance)."""
        out = asdict(self)
        out.pop("where")
        return json.loads(json.dumps(out))  # tuples as lists, as after a JSON round trip

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "mapping") -> Mapping:
        """Validate ``data`` (parsed TOML); errors are one line naming ``where`` and the key."""
        return _parse(data, where)


def load_mapping(mapping: str | Path | dict[str, Any] | Mapping) -> Mapping:
    """A :class:`Mapping` from a TOML file path, a dict of the same shape, or a Mapping."""
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, dict):
        return Mapping.from_dict(mapping)
    path = Path(mapping)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mapping file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{path}: not valid TOML: {exc}") from exc
    return Mapping.from_dict(data, where=str(path))


# --------------------------------------------------------------------------- parsing


class _Parser:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, what: str) -> NoReturn:
        raise DataValidationError(f"{self.where}: {key}: {what}")

    def known(self, table: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(
                    f"{prefix}{key}", f"unknown key{hint}; known keys: {', '.join(allowed)}"
                )

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {type(value).__name__} {value!r}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(key, f"{value!r} is not one of {', '.join(choices)}{hint}")
        return value

    def integer(self, value: Any, key: str, low: int, high: int | None = None) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        if not ok or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            self.fail(key, f"expected an integer {bound}, got {value!r}")
        return value

    def number(self, value: Any, key: str) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            self.fail(key, f"expected a finite number, got {value!r}")
        return float(value)


def _parse(data: dict[str, Any], where: str) -> Mapping:
    p = _Parser(where)
    p.table(data, "mapping")
    p.known(data, _TOP_KEYS, "")
    layout = p.choice(data.get("layout", "long"), "layout", LAYOUTS)

    columns = p.table(data.get("columns", {}), "[columns]")
    p.known(columns, REQUIRED_COLUMNS + OPTIONAL_COLUMNS, "[columns] ")
    cols = {role: p.string(v, f"[columns] {role}") for role, v in columns.items()}
    required = [r for r in REQUIRED_COLUMNS if not (r == "position" and layout == "wide")]
    missing = [r for r in required if r not in cols]
    if missing:
        p.fail("[columns]", f"missing required key(s) {missing}")
    if layout == "wide" and "position" in cols:
        p.fail("[columns] position", "not used with layout = 'wide': the order of the item "
               "list is the display order")

    raw_signals = p.table(data.get("signals", {}), "[signals]")
    if not raw_signals:
        p.fail("[signals]", "declare at least one signal, e.g. "
               'click = {column = "clicked", kind = "binary"}')
    signals = []
    for name, spec in raw_signals.items():
        key = f"[signals] {name}"
        if not _NAME.match(name):
            p.fail(key, "a signal name is a lowercase identifier (letters, digits, underscores, "
                   "starting with a letter)")
        if isinstance(spec, str):
            spec = {"column": spec}
        spec = p.table(spec, key)
        p.known(spec, _SIGNAL_KEYS, f"{key}.")
        if "column" not in spec:
            p.fail(key, "missing key 'column'")
        if "kind" in spec:
            kind = p.choice(spec["kind"], f"{key}.kind", LABEL_KINDS)
        elif name in DEFAULT_LABEL_KINDS:
            kind = DEFAULT_LABEL_KINDS[name]
        else:
            p.fail(key, f"missing key 'kind' ({' or '.join(LABEL_KINDS)})")
        fill = spec.get("fill")
        signals.append(Signal(
            name=name,
            column=p.string(spec["column"], f"{key}.column"),
            kind=kind,
            gain=p.number(spec.get("gain", 1.0), f"{key}.gain"),
            fill=None if fill is None else p.number(fill, f"{key}.fill"),
        ))

    features = []
    raw_features = p.table(data.get("features", {}), "[features]")
    p.known(raw_features, FEATURE_GROUPS, "[features] ")
    for group in FEATURE_GROUPS:
        entries = p.table(raw_features.get(group, {}), f"[features.{group}]")
        for name, spec in entries.items():
            features.append(_feature(p, group, name, spec))

    split = _split(p, p.table(data.get("split", {}), "[split]"))
    derived_table = p.table(data.get("derived", {}), "[derived]")
    p.known(derived_table, ("names",), "[derived] ")
    names = derived_table.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        p.fail("[derived] names", f"expected a list of feature names, got {names!r}")
    _check_derived(p, names)
    clash = sorted({n for n in names} & {f.name for f in features if f.group == "item"})
    if clash:
        p.fail("[derived] names", f"{clash} clash with [features.item] names")

    dup_table = p.table(data.get("duplicates", {}), "[duplicates]")
    p.known(dup_table, ("policy",), "[duplicates] ")
    policy = p.choice(dup_table.get("policy", "error"), "[duplicates] policy",
                      DUPLICATE_POLICIES)

    time_format = data.get("time_format")
    if time_format is not None:
        time_format = p.string(time_format, "time_format")
    quantile = p.number(data.get("long_tail_quantile", 0.8), "long_tail_quantile")
    if not 0 < quantile < 1:
        p.fail("long_tail_quantile", f"must lie strictly between 0 and 1, got {quantile}")
    if layout == "wide" and "position_base" in data:
        p.fail("position_base", "not used with layout = 'wide'")
    cand_table = p.table(data.get("candidates", {}), "[candidates]")
    p.known(cand_table, ("columns",), "[candidates] ")
    renames = p.table(cand_table.get("columns", {}), "[candidates] columns")
    usable = sorted({cols[r] for r in ("request_id", *ITEM_ROLES) if r in cols}
                    | {f.column for f in features if f.group == "item"})
    for key, value in renames.items():
        if key not in usable:
            close = difflib.get_close_matches(str(key), usable, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.fail(f"[candidates] columns.{key}", f"not a request id or item-level column of "
                   f"the mapping{hint}; those are {', '.join(usable)}")
        p.string(value, f"[candidates] columns.{key}")
    return Mapping(
        columns=cols,
        signals=tuple(signals),
        features=tuple(features),
        layout=layout,
        source=p.string(data.get("source", "import"), "source"),
        position_base=p.integer(data.get("position_base", 1), "position_base", 0, 1),
        time_format=time_format,
        list_separator=p.string(data.get("list_separator", ";"), "list_separator"),
        seed=p.integer(data.get("seed", 0), "seed", 0),
        long_tail_quantile=quantile,
        split=split,
        derived=tuple(names),
        duplicates=policy,
        candidate_columns=dict(renames),
        where=where,
    )


def _feature(p: _Parser, group: str, name: str, spec: Any) -> Feature:
    key = f"[features.{group}] {name}"
    if not _FEATURE_NAME.match(name):
        p.fail(key, "a feature name is an identifier (letters, digits, underscores, starting "
               "with a letter)")
    spec = p.table(spec, key)
    p.known(spec, _ALL_FEATURE_KEYS, f"{key}.")
    if "column" not in spec or "kind" not in spec:
        p.fail(key, "needs 'column' and 'kind' (categorical, dense or tags)")
    kind = p.choice(spec["kind"], f"{key}.kind", FEATURE_KINDS)
    wrong = [k for k in spec if k not in _FEATURE_KEYS[kind]]
    if wrong:
        p.fail(f"{key}.{wrong[0]}", f"does not apply to kind {kind!r}; "
               f"{kind} takes {', '.join(_FEATURE_KEYS[kind])}")
    cap = spec.get("vocab_cap")
    return Feature(
        group=group,
        name=name,
        column=p.string(spec["column"], f"{key}.column"),
        kind=kind,
        vocab_cap=None if cap is None else p.integer(cap, f"{key}.vocab_cap", 1),
        hash_buckets=p.integer(spec.get("hash_buckets", 0), f"{key}.hash_buckets", 0),
        fill=p.number(spec.get("fill", 0.0), f"{key}.fill"),
        transform=p.choice(spec.get("transform", "none"), f"{key}.transform", TRANSFORMS),
        sep=p.string(spec.get("sep", "|"), f"{key}.sep"),
        top_k=p.integer(spec.get("top_k", 16), f"{key}.top_k", 1),
    )


def _split(p: _Parser, table: dict[str, Any]) -> SplitRule:
    p.known(table, _SPLIT_KEYS, "[split] ")
    method = p.choice(table.get("method", "time"), "[split] method", SPLIT_METHODS)
    fractions = table.get("fractions", list(DEFAULT_FRACTIONS))
    if (
        not isinstance(fractions, list) or len(fractions) != 3
        or any(isinstance(f, bool) or not isinstance(f, int | float) or f < 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-9
    ):
        p.fail("[split] fractions",
               f"expected three non-negative numbers (train, valid, test) summing to 1, got "
               f"{fractions!r}")
    column = table.get("column")
    values: dict[str, tuple[str, ...]] = {}
    if method == "column":
        column = p.string(column, "[split] column")
        raw = p.table(table.get("values", {}), "[split] values")
        p.known(raw, SPLITS, "[split] values.")
        for split, vals in raw.items():
            vals = vals if isinstance(vals, list) else [vals]
            if not vals or not all(isinstance(v, str | int) for v in vals):
                p.fail(f"[split] values.{split}", f"expected a list of values, got {vals!r}")
            values[split] = tuple(str(v) for v in vals)
        seen: dict[str, str] = {}
        for split, vals in values.items():
            for v in vals:
                if v in seen:
                    p.fail(f"[split] values.{split}", f"value {v!r} is also listed under "
                           f"{seen[v]!r}")
                seen[v] = split
    else:
        for key in ("column", "values"):
            if key in table:
                p.fail(f"[split] {key}", "only used with method = 'column'")
    return SplitRule(method=method, fractions=tuple(float(f) for f in fractions),  # type: ignore[arg-type]
                     column=column, values=values)


def _check_derived(p: _Parser, names: list[str]) -> None:
    if not names:
        return
    try:
        from genrerank.data.derived import DERIVED_FEATURES
    except ImportError:  # the module is optional; without it no derived feature is known
        p.fail("[derived] names", "derived features need genrerank.data.derived, which this "
               "installation lacks")
    for name in names:
        if name not in DERIVED_FEATURES:
            close = difflib.get_close_matches(name, list(DERIVED_FEATURES), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.fail("[derived] names", f"unknown derived feature {name!r}{hint}; known: "
                   f"{', '.join(sorted(DERIVED_FEATURES))}")
    if len(set(names)) != len(names):
        p.fail("[derived] names", "a name is listed twice")
