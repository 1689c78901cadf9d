"""``data convert`` output against the public import path, column by column.

A loader's impressions table is written to Parquet and imported with the shipped mapping through
:func:`genrerank.data.import_table` (the file reader, not the in-memory path the loader uses),
then both written data sets are read back and compared. Expected differences, and only these:
``spec.extra`` (provenance: the loader's notes vs the importer's), and ``label_kinds`` /
``gain_weights`` (the mapping declares click as binary with gain 1.0; the loaders keep the
library defaults, which are the same; compared through :func:`gain_weights` and ``label_kind``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from genrerank.data import import_table
from genrerank.data.importer.mapping import Mapping
from genrerank.data.schema import read_dataset
from genrerank.data.signals import gain_weights

#: Spec fields allowed to differ (see the module docstring).
SPEC_DIFFERENCES = ("extra", "label_kinds", "gain_weights")


def import_via_file(
    impressions: pa.Table, vocabularies: dict[str, list[Any]] | None, mapping: str | Mapping,
    folder: Path,
) -> Path:
    """Write ``impressions`` as Parquet and import it into ``folder / "imported"``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "impressions.parquet"
    pq.write_table(impressions, path)
    return import_table(path, mapping, folder / "imported", vocabularies=vocabularies)


def assert_same_dataset(converted: Path, imported: Path) -> None:
    """Same columns, values and spec (but :data:`SPEC_DIFFERENCES`); a failure names the column
    and the first request where it differs."""
    t0, s0 = read_dataset(converted, validate=True)
    t1, s1 = read_dataset(imported, validate=True)
    assert t0.schema == t1.schema
    assert t0.num_rows == t1.num_rows
    rid = t0.column("request_id").to_pylist()
    for name in t0.column_names:
        a, b = t0.column(name), t1.column(name)
        if not a.equals(b):
            va, vb = a.to_pylist(), b.to_pylist()
            i = next(i for i in range(len(va)) if va[i] != vb[i])
            raise AssertionError(
                f"column {name!r} differs first at request {rid[i]!r}: convert {va[i]!r}, "
                f"import {vb[i]!r}"
            )
    d0, d1 = s0.to_dict(), s1.to_dict()
    for key in SPEC_DIFFERENCES:
        d0.pop(key)
        d1.pop(key)
    assert d0 == d1
    assert gain_weights(s0) == gain_weights(s1)
    assert [s0.label_kind(s) for s in s0.labels] == [s1.label_kind(s) for s in s1.labels]
