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

import pyarrow as pa

# Importing the format modules registers their loaders in LOADERS.
from genrerank.data.loaders import avito, ebnerd, kuairand, mind  # noqa: F401
from genrerank.data.loaders._common import LOADERS, Loader, register_loader
from genrerank.data.schema import FeatureSpec, write_dataset

__all__ = ["LOADERS", "Loader", "convert", "load", "loader_options", "register_loader"]

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


def convert(
    fmt: str,
    input_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Convert the logs in ``input_path`` (format ``fmt``) into a data set folder ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        # Fail before the (possibly long) conversion, not after it.
        raise FileExistsError(f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it")
    table, spec = load(fmt, input_path, **options)
    path = write_dataset(out_dir, table, spec, overwrite=overwrite)
    logger.info("%s: wrote %d requests to %s", fmt, table.num_rows, path)
    return path
