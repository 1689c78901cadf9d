"""Real-log loaders: convert public logs into the genrerank request format.

Each loader is registered under its format name with ``@register_loader("name")`` and maps an
input folder plus keyword options to ``(pa.Table, FeatureSpec)``; :func:`convert` validates and
writes the result with :func:`genrerank.data.schema.write_dataset` (atomic: a failed run leaves
no output folder and never touches an existing one).

Formats: ``mind``, ``ebnerd``, ``avito``, ``kuairand``; see each module's docstring for what a
request is, which labels exist, how the split, the upstream score and the fairness flags are made.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

# Importing the format modules registers their loaders in LOADERS.
from genrerank.data.loaders import avito, ebnerd, kuairand, mind  # noqa: F401
from genrerank.data.loaders._common import LOADERS, Loader, register_loader
from genrerank.data.schema import DataValidationError, FeatureSpec, write_dataset

__all__ = [
    "DEFAULT_MAX_CANDIDATES", "LOADERS", "Loader", "cap_candidates", "convert", "load",
    "loader_options", "register_loader",
]

logger = logging.getLogger("genrerank.data.loaders")


def _get(fmt: str) -> Loader:
    try:
        return LOADERS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown format {fmt!r}; known formats: {', '.join(sorted(LOADERS))}"
        ) from None


def loader_options(fmt: str) -> dict[str, Any]:
    """The options a format accepts, with their defaults."""
    params = inspect.signature(_get(fmt)).parameters
    return {
        name: p.default for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def load(fmt: str, input_path: str | Path, **options: Any) -> tuple[pa.Table, FeatureSpec]:
    """Run the loader for ``fmt`` without writing anything."""
    loader = _get(fmt)
    known = loader_options(fmt)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for format {fmt!r}; known options: {sorted(known)}"
        )
    return loader(Path(input_path), **options)


#: Requests with more candidates than this are refused by :func:`convert` unless raised: one
#: MIND impression of 200,000 items converts fine and then asks training for 5.8 GB in one batch.
#: Re-ranking requests hold 5 to 500 candidates; the real logs we test on hold at most 283.
DEFAULT_MAX_CANDIDATES = 500


def cap_candidates(
    table: pa.Table, max_candidates: int, drop_oversized: bool = False, where: str = "input"
) -> tuple[pa.Table, int]:
    """Refuse (or, with ``drop_oversized``, drop) requests with more than ``max_candidates``
    candidates; returns the table and how many requests were dropped. Truncating instead would
    silently remove shown items and their feedback."""
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
    n = table.column("item_id").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    over = n > max_candidates
    if not over.any():
        return table, 0
    if not drop_oversized:
        row = int(np.flatnonzero(over)[0])
        rid = table.column("request_id")[row].as_py()
        raise DataValidationError(
            f"{where}: request_id {rid!r} has {int(n[row])} candidates, more than "
            f"max_candidates={max_candidates} ({int(over.sum())} such requests); raise "
            "--max-candidates or pass --drop-oversized"
        )
    return table.filter(pa.array(~over)), int(over.sum())


def convert(
    fmt: str,
    input_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    candidate_cap: int = DEFAULT_MAX_CANDIDATES,
    drop_oversized: bool = False,
    **options: Any,
) -> Path:
    """Convert the logs in ``input_path`` (format ``fmt``) into a data set folder ``out_dir``.

    Requests with more than ``candidate_cap`` candidates are an error naming the first one, or
    are dropped (counted in the log and in the spec's ``extra``) with ``drop_oversized``. (Named
    apart from the ``max_candidates`` option some loaders take, which fails on the input line.)"""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        # Fail before the (possibly long) conversion, not after it.
        raise FileExistsError(f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it")
    table, spec = load(fmt, input_path, **options)
    table, dropped = cap_candidates(table, candidate_cap, drop_oversized, where=str(input_path))
    if dropped:
        logger.warning("%s: dropped %d request(s) with more than %d candidates", fmt, dropped,
                       candidate_cap)
        spec.extra["dropped_oversized_requests"] = dropped
    path = write_dataset(out_dir, table, spec, overwrite=overwrite)
    logger.info("%s: wrote %d requests to %s", fmt, table.num_rows, path)
    return path
