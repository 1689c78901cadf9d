"""Summary statistics of a data set folder, for ``genrerank data stats DIR``.

:func:`dataset_stats` returns plain Python numbers (JSON-ready); :func:`format_stats` words them.
Label rates are per exposed item. A signal the source does not have is reported as ``"absent"``,
never as a rate of zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from genrerank.data.schema import BINARY_LABELS, KNOWN_LABELS, SPLITS, read_dataset

__all__ = ["dataset_stats", "format_stats"]


def _summary(lengths: np.ndarray) -> dict[str, float]:
    return {
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "max": int(lengths.max()),
    }


def dataset_stats(data_dir: str | Path) -> dict[str, Any]:
    """Counts, list sizes and label rates of the data set in ``data_dir``."""
    table, spec = read_dataset(data_dir)
    split = table["split"].to_numpy(zero_copy_only=False)
    n = table["item_id"].combine_chunks().value_lengths().to_numpy()
    m = table["exposed"].combine_chunks().value_lengths().to_numpy()
    exposed_total = int(m.sum())
    labels: dict[str, Any] = {}
    for name in KNOWN_LABELS:
        if name not in spec.labels:
            labels[name] = "absent"
            continue
        values = pc.list_flatten(table[f"label_{name}"]).to_numpy(zero_copy_only=False)
        values = values.astype(np.float64)
        if name in BINARY_LABELS:
            labels[name] = {
                "positives": int(values.sum()),
                "exposed": exposed_total,
                "rate": float(values.mean()) if len(values) else 0.0,
            }
        else:  # watch_time, seconds
            labels[name] = {
                "mean": float(values.mean()) if len(values) else 0.0,
                "nonzero_rate": float((values > 0).mean()) if len(values) else 0.0,
                "exposed": exposed_total,
            }
    times = table["time"].to_numpy()
    n_cand = int(n.sum())
    cold = pc.sum(pc.list_flatten(table["is_cold_start"]).cast("int64")).as_py() or 0
    tail = pc.sum(pc.list_flatten(table["is_long_tail"]).cast("int64")).as_py() or 0
    return {
        "path": str(data_dir),
        "source": spec.source,
        "requests": {"total": int(table.num_rows), **{s: int((split == s).sum()) for s in SPLITS}},
        "users": int(pc.count_distinct(table["user_id"]).as_py()),
        "items": int(pc.count_distinct(pc.list_flatten(table["item_id"])).as_py()),
        "candidates_per_request": _summary(n),
        "list_length": _summary(m),
        "exposed_items": exposed_total,
        "cold_start_share": cold / n_cand,
        "long_tail_share": tail / n_cand,
        "time": {"min": int(times.min()), "max": int(times.max())},
        "labels": labels,
    }


def _fmt_time(t: int) -> str:
    return str(np.datetime64(int(t), "s")).replace("T", " ")


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable report of :func:`dataset_stats`."""
    r = stats["requests"]
    c, m = stats["candidates_per_request"], stats["list_length"]
    lines = [
        f"data set: {stats['path']} (source: {stats['source']})",
        f"requests: {r['total']:,} (train {r['train']:,}, valid {r['valid']:,}, "
        f"test {r['test']:,})",
        f"users: {stats['users']:,}",
        f"distinct items: {stats['items']:,}",
        f"candidates per request (n): min {c['min']}, mean {c['mean']:.2f}, max {c['max']}",
        f"list length (m): min {m['min']}, mean {m['mean']:.2f}, max {m['max']}",
        f"time: {_fmt_time(stats['time']['min'])} .. {_fmt_time(stats['time']['max'])} UTC",
        f"cold-start candidates: {stats['cold_start_share']:.1%}, "
        f"long-tail candidates: {stats['long_tail_share']:.1%}",
        f"labels (per exposed item, {stats['exposed_items']:,} exposed):",
    ]
    for name, value in stats["labels"].items():
        if value == "absent":
            lines.append(f"  {name}: absent")
        elif "rate" in value:
            lines.append(
                f"  {name}: rate {value['rate']:.4f} ({value['positives']:,} / "
                f"{value['exposed']:,})"
            )
        else:
            lines.append(
                f"  {name}: mean {value['mean']:.2f} s, non-zero {value['nonzero_rate']:.4f}"
            )
    return "\n".join(lines)
