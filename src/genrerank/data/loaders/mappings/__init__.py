"""Import mappings of the public logs: a loader = source-specific impressions table + mapping.

The MIND and EB-NeRD loaders first turn their raw files into a long impressions table (one row
per shown item, in display order, with the source's own features and flags already computed);
:func:`import_source` then builds the data set from it with the shipped mapping
``<source>.toml`` through :mod:`genrerank.data.importer`, the same path users' logs take. Only
what the importer cannot know comes from the loader: the vocabularies (MIND's come from
``news.tsv``, not from the shown items; both sources index the sorted distinct values, not
training frequency) and the provenance in ``spec.extra``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from importlib import resources
from typing import Any

import pyarrow as pa

from genrerank.data.importer.mapping import Mapping, load_mapping
from genrerank.data.schema import FeatureSpec
from genrerank.data.splits import DEFAULT_FRACTIONS

logger = logging.getLogger("genrerank.data.loaders")

#: The sources with a shipped mapping (``<name>.toml`` in this package).
MAPPINGS = ("mind", "ebnerd")


def mapping_path(name: str) -> str:
    """Where the shipped mapping of ``name`` lives (for provenance and ``data import``)."""
    if name not in MAPPINGS:
        raise ValueError(f"no shipped mapping {name!r}; known: {', '.join(MAPPINGS)}")
    return str(resources.files(__name__).joinpath(f"{name}.toml"))


def source_mapping(
    name: str,
    *,
    split_fractions: Iterable[float] | None = None,
    seed: int = 0,
    drop_features: Iterable[str] = (),
) -> Mapping:
    """The shipped mapping with the loader's run options (split fractions, tie-break seed), and
    without ``drop_features`` (features whose optional source column is absent)."""
    mp = load_mapping(mapping_path(name))
    fr = tuple(float(f) for f in (split_fractions if split_fractions is not None
                                  else DEFAULT_FRACTIONS))
    if len(fr) != 3:
        raise ValueError(f"split_fractions needs three numbers (train, valid, test), got {fr}")
    drop = set(drop_features)
    return dataclasses.replace(
        mp,
        seed=seed,
        split=dataclasses.replace(mp.split, fractions=fr),  # type: ignore[arg-type]
        features=tuple(f for f in mp.features if f.name not in drop),
    )


def import_source(
    mapping: Mapping, table: pa.Table, vocabularies: dict[str, list[Any]], extra: dict[str, Any]
) -> tuple[pa.Table, FeatureSpec]:
    """The data set of a loader's impressions ``table`` through the importer.

    The spec keeps what the loaders always wrote: the library's default label kinds and gains
    (not the mapping's explicit ``binary`` / 1.0, which mean the same) and the loader's
    ``extra``, plus the mapping it went through."""
    # Imported here: the importer imports genrerank.data.loaders._common, whose package imports
    # the loaders, which import this module.
    from genrerank.data.importer import import_arrow

    result = import_arrow(table, mapping, name=f"{mapping.source} impressions",
                          vocabularies=vocabularies)
    for warning in result.report["warnings"]:
        logger.info("%s: %s", mapping.source, warning)
    spec = result.spec
    spec.label_kinds, spec.gain_weights = {}, {}
    spec.extra = {**extra,
                  "import_mapping": f"genrerank/data/loaders/mappings/{mapping.source}.toml"}
    return result.table, spec
