"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_target(out_file: Path, overwrite: bool) -> None:
    """Refuse to write over a folder, or over a file unless ``overwrite``."""
    if out_file.is_dir():
        raise ValueError(f"{out_file} is a folder; give the Parquet file to write")
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} exists; pass --overwrite to replace it")


def write_table_atomic(table: pa.Table, out_file: str | Path, overwrite: bool = False) -> Path:
    """Write ``table`` to ``out_file`` by way of a temporary file in the same folder renamed
    into place: readers see the old file or the new one, and a failure leaves no new file."""
    out_file = Path(out_file)
    check_target(out_file, overwrite)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the lists from others
        pq.write_table(table, tmp)
        check_target(out_file, overwrite)  # again: it may have appeared meanwhile
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_file
