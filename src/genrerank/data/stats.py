"""Summary statistics of a data set folder, for ``genrerank data stats DIR``.

:func:`dataset_stats` returns plain Python numbers (JSON-ready); :func:`format_stats` words them.
Label statistics are per exposed item, for every signal of the data set whatever its name: a
rate for binary signals, a mean (and non-zero share) for nonnegative ones. A built-in signal the
source does not have is reported as ``"absent"``, never as a rate of zero. ``gain_weights`` are the
weights list metrics and gain losses use (:func:`genrerank.data.signals.gain_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from genrerank.data.schema import KNOWN_LABELS, SPLITS, read_dataset
from genrerank.data.signals import click_signal, gain_weights

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
    # The data set's own signals first, then the built-in ones it lacks.
    for name in [*spec.labels, *(s for s in KNOWN_LABELS if s not in spec.labels)]:
        if name not in spec.labels:
            labels[name] = "absent"
            continue
        values = pc.list_flatten(table[f"label_{name}"]).to_numpy(zero_copy_only=False)
        values = values.astype(np.float64)
        if spec.label_kind(name) == "binary":
            labels[name] = {
                "positives": int(values.sum()),
                "exposed": exposed_total,
                "rate": float(values.mean()) if len(values) else 0.0,
            }
        else:  # nonnegative: watch time in seconds, dwell, counts...
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
        "gain_weights": gain_weights(spec),
        "click_signal": click_signal(spec),
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
            unit = " s" if name == "watch_time" else ""  # the one signal whose unit we know
            lines.append(
                f"  {name}: mean {value['mean']:.2f}{unit}, non-zero {value['nonzero_rate']:.4f}"
            )
    weights = stats.get("gain_weights") or {}
    if weights:
        lines.append("gain weights (list metrics, gain losses): "
                     + ", ".join(f"{s} {w:g}" for s, w in weights.items()))
    if "click_signal" in stats:
        lines.append(f"click signal (click head, AUC, clicks@k): {stats['click_signal'] or 'none'}")
    return "\n".join(lines)
