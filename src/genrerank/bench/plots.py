"""Figures of the quality benchmark (matplotlib, Agg: no display needed).

Built on :class:`matplotlib.figure.Figure` directly rather than pyplot, so nothing touches the
global backend or keeps figures alive in a long-running process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MODEL_COLORS = {
    "logging": "#9e9e9e",
    "pointwise": "#4c72b0",
    "prm": "#55a868",
    "nar4rec": "#c44e52",
    "nar4rec_unlikelihood": "#dd8452",
    "autoregressive": "#937860",
    "pointwise_satiation": "#8172b3",
    "learnable ceiling: sort": "#dddddd",
    "learnable ceiling: beam": "#bbbbbb",
}
#: Ablation variants of the quality benchmark and their bar labels.
ABLATION_LABELS = {
    "nar4rec": "nar4rec\n(gain_bce)", "nar4rec_unlikelihood": "nar4rec\n(unlikelihood)",
    "pointwise": "pointwise\n(all features)", "pointwise_no_features": "no\nfeatures",
    "pointwise_no_standardize": "no\nstandardize", "pointwise_no_request_context": "no\ncontext",
    "pointwise_no_affinity": "no\naffinity", "pointwise_no_interaction": "no\ninteraction",
    "pointwise_with_interaction": "with\ninteraction",
    "pointwise_no_category_cross": "no\ncategory\ncross", "pointwise_no_min_count": "no\nmin count",
    "nar4rec_no_list_context": "nar4rec\n(no list\ncontext)",
}
FAMILY_COLORS = {"mmr": "#55a868", "perturb": "#8c8c8c", "nar4rec": "#c44e52",
                 "autoregressive": "#937860", "mix": "#4c72b0"}
DECODER_COLOR = "#c44e52"


def _stat(summary: Mapping[str, Any], row: str, section: str, metric: str) -> tuple[float, float]:
    s = summary.get(row, {}).get(section, {}).get(metric) or {}
    mean = s.get("mean")
    std = s.get("std")
    return (float("nan") if mean is None else mean, 0.0 if std is None else std)


def _bars(ax: Any, labels: Sequence[str], means: Sequence[float], stds: Sequence[float],
          colors: Sequence[str], fmt: str = "{:.3f}") -> None:
    xs = range(len(labels))
    ax.bar(xs, means, yerr=stds, color=colors, capsize=4, edgecolor="black", linewidth=0.5)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    for x, m, s in zip(xs, means, stds, strict=True):
        if m == m:  # skip NaN
            # Above the error bar, where the label cannot hide behind it.
            ax.annotate(fmt.format(m), (x, m + s), textcoords="offset points", xytext=(0, 3),
                        ha="center", va="bottom", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _reference(ax: Any, summary: Mapping[str, Any], metric: tuple[str, str]) -> None:
    """The logging policy's level as a dashed line: the number every model must beat."""
    value, _ = _stat(summary, "logging", *metric)
    if value == value:
        ax.axhline(value, color=MODEL_COLORS["logging"], linestyle="--", linewidth=1.2,
                   label=f"logging {value:.3f}")
        ax.legend(fontsize=8, loc="lower right")


def plot_quality(result: Mapping[str, Any], path: str | Path) -> Path:
    """Four panels: expected gain per model (ablation data set) with the upper bound, headroom
    per model on each simulated data set, the ablations, and the decoding strategies.
    Error bars: std over seeds."""
    path = Path(path)
    ds_name = result["settings"]["ablation_dataset"]
    datasets = result["datasets"]
    main = datasets.get(ds_name, {})
    fig = Figure(figsize=(13, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    seeds = len(result.get("seeds", []))
    fig.suptitle(f"genrerank quality benchmark{' (quick)' if result.get('quick') else ''}: "
                 f"mean ± std over {seeds} seed(s), test split", fontsize=13)

    ax = axes[0][0]
    if "summary" in main and main.get("simulated"):
        models = [m for m in MODEL_COLORS if m in main["summary"]
                  and m != "nar4rec_unlikelihood"]
        stats = [_stat(main["summary"], m, "online", "expected_gain") for m in models]
        _bars(ax, [m.replace("learnable ceiling: ", "ceiling:\n").replace("_", "\n")
                   for m in models], [s[0] for s in stats], [s[1] for s in stats],
              [MODEL_COLORS[m] for m in models])
        upper, _ = _stat(main["summary"], "logging", "online", "upper_bound_expected_gain")
        if upper == upper:
            ax.axhline(upper, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"upper bound {upper:.3f}", (len(models) - 0.5, upper),
                        xytext=(0, -12), textcoords="offset points", ha="right", fontsize=8)
            ax.set_ylim(0, upper * 1.12)
        ax.set_title(f"{ds_name}: online expected list gain")
        ax.set_ylabel("expected gain per request")
    else:
        ax.text(0.5, 0.5, f"{ds_name}: not run", ha="center", transform=ax.transAxes)

    ax = axes[0][1]
    sim = [n for n, e in datasets.items() if e.get("simulated") and "summary" in e]
    models = ["pointwise", "pointwise_satiation", "prm", "nar4rec", "autoregressive"]
    width = 0.8 / max(len(sim), 1)
    for k, name in enumerate(sim):
        stats = [_stat(datasets[name]["summary"], m, "online", "headroom_captured")
                 for m in models]
        xs = [i + (k - (len(sim) - 1) / 2) * width for i in range(len(models))]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3,
               label=name, edgecolor="black", linewidth=0.5,
               color=["#4c72b0", "#dd8452", "#55a868", "#8172b3"][k % 4])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)), [m.replace("_", "\n") for m in models])
    ax.set_title("headroom captured: (policy - logging) / (upper bound - logging)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if sim:
        ax.legend(fontsize=8)

    ax = axes[1][0]
    if "summary" in main:
        # The ablations ran on the first seed(s) only: compare them on those seeds.
        first = set(result.get("seeds", [])[: result["settings"].get("ablation_seeds", 1)])
        variants = [v for v in ABLATION_LABELS if v in main.get("runs", {})]
        metric = ("online", "expected_gain") if main.get("simulated") else ("offline", "auc")
        stats = []
        for v in variants:
            values = [r.get(metric[0], {}).get(metric[1]) for r in main["runs"][v]
                      if r["seed"] in first]
            values = [x for x in values if x is not None]
            stats.append((float(np.mean(values)) if values else float("nan"), 0.0))
        _bars(ax, [ABLATION_LABELS[v] for v in variants], [s[0] for s in stats],
              [s[1] for s in stats],
              [MODEL_COLORS.get(v, MODEL_COLORS["pointwise"]) for v in variants])
        ax.set_title(f"{ds_name}: ablations, seed(s) {sorted(first)} ({metric[1]})")
        _reference(ax, main["summary"], metric)
        stats.append(_stat(main["summary"], "logging", *metric))
        lows = [s[0] - s[1] for s in stats if s[0] == s[0]]
        if lows:
            ax.set_ylim(min(lows) * 0.9, max(s[0] + s[1] for s in stats if s[0] == s[0]) * 1.05)

    ax = axes[1][1]
    decoding = main.get("decoding", {}).get("summary", {})
    if decoding:
        names = list(decoding)
        metric = ("online", "expected_gain") if main.get("simulated") else ("offline", "auc")
        stats = [_stat(decoding, d, *metric) for d in names]
        chosen = sorted({(r.get("decode_selection") or {}).get("chosen", "")
                         for r in main["runs"].get("nar4rec", [])} - {""})
        labels = [f"chosen on valid\n({' / '.join(c.split('(')[0] for c in chosen)})"
                  if d == "contrastive" else d for d in names]
        _bars(ax, labels, [s[0] for s in stats], [s[1] for s in stats],
              [DECODER_COLOR] * len(names))
        ax.set_title(f"{ds_name}: decoding strategies on nar4rec ({metric[1]})")
        _reference(ax, main["summary"], metric)
        stats.append(_stat(main["summary"], "logging", *metric))
        lows = [s[0] - s[1] for s in stats if s[0] == s[0]]
        if lows:
            ax.set_ylim(min(lows) * 0.9, max(s[0] + s[1] for s in stats if s[0] == s[0]) * 1.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path


def plot_k_curve(result: Mapping[str, Any], path: str | Path) -> Path:
    """Generator-evaluator against K: expected gain of the served list (solid, band = std over
    seeds) and of the oracle's pick among the same K lists (dotted: what a perfect evaluator
    would serve), per generator family; logging and the upper bound as reference lines. The x
    axis is logarithmic, so diminishing returns show as a flattening curve."""
    ds = result["settings"]["ablation_dataset"]
    summary = result["datasets"][ds]["generator_evaluator"]["summary"]
    fig = Figure(figsize=(11, 4.6))
    FigureCanvasAgg(fig)
    gain_ax, head_ax = fig.subplots(1, 2)
    for family, per_k in summary["families"].items():
        ks = sorted(int(k) for k in per_k)
        color = FAMILY_COLORS.get(family)
        for ax, metric in ((gain_ax, "expected_gain"), (head_ax, "headroom_captured")):
            means = [per_k[str(k)][metric]["mean"] for k in ks]
            stds = [per_k[str(k)][metric]["std"] or 0.0 for k in ks]
            ax.plot(ks, means, marker="o", color=color, label=family, linewidth=1.8)
            ax.fill_between(ks, [m - s for m, s in zip(means, stds, strict=True)],
                            [m + s for m, s in zip(means, stds, strict=True)],
                            color=color, alpha=0.12)
            oracle = [per_k[str(k)][f"oracle_pick_{metric}"]["mean"] for k in ks]
            ax.plot(ks, oracle, linestyle=":", color=color, linewidth=1.2)
    for ax in (gain_ax, head_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (lists proposed)")
        ax.grid(alpha=0.3)
    logging = summary["logging_expected_gain"]["mean"]
    upper = summary["upper_bound_expected_gain"]["mean"]
    gain_ax.axhline(logging, color=MODEL_COLORS["logging"], linestyle="--", linewidth=1.2,
                    label=f"logging {logging:.3f}")
    gain_ax.axhline(upper, color="black", linestyle="--", linewidth=1.0,
                    label=f"upper bound {upper:.3f}")
    gain_ax.set_ylabel("expected gain (oracle)")
    gain_ax.set_title(f"{ds}: served list (solid), oracle pick of the K (dotted)", fontsize=10)
    head_ax.axhline(0.0, color=MODEL_COLORS["logging"], linestyle="--", linewidth=1.0)
    head_ax.set_ylabel("headroom captured")
    head_ax.set_title("headroom = (G-E - logging) / (upper bound - logging)", fontsize=10)
    gain_ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
