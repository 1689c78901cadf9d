"""``genrerank bench hierarchical``: plan-then-fill against plain autoregressive and nar4rec.

What runs, on the simulator (the oracle scores every list; nothing here reads the test split
before reporting):

- Data sets: ``kuaishou`` (n = 60, m = 6, 20,000 requests) and ``large`` (n = 500, m = 50,
  1,000 requests, at most 5 epochs: its epochs are costly on 2 cores), simulated with data seed
  ``SIM_DATA_SEED + seed`` as in the quality benchmark.
- Trained models, each from its packaged config with the quality benchmark's budget (same max
  epochs, patience, batch size and width, ``train.seed = seed``), early-stopped and selected on
  the valid split, their ``"auto"`` decoding resolved on valid: ``autoregressive``,
  ``hierarchical`` and ``nar4rec``.
- Rows decoded from the trained hierarchical run, not trained again:
  ``hierarchical_no_plan`` (slack -1: the fill alone, which isolates what the plan adds) and
  ``hierarchical_slack1`` (each planned count may move by one).
- Columns: oracle expected gain, headroom captured, category entropy of the lists (from the
  oracle report), the valid list score the run was selected on, and the decoding latency per
  list at batch 1 (median over the first ``latency_requests`` test requests, the row's decoder,
  PyTorch on this machine's threads; compare rows within one run only).

Outputs ``hierarchical.{json,md,png}`` (``hierarchical_quick.*`` in quick mode).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrerank.bench.quality import (
    SIM_DATA_SEED,
    QualitySettings,
    _json_safe,
    budget_overrides,
    machine_info,
    mean_std,
    summarize,
)
from genrerank.data.dataset import RerankDataset, collate
from genrerank.evaluation.offline import decode_lists
from genrerank.experiment import RUN_CONFIG, evaluate_model, train_run
from genrerank.training import load_model
from genrerank.utils.io import atomic_write_json, atomic_write_text
from genrerank.utils.tables import markdown_table

TRAINED = ("autoregressive", "hierarchical", "nar4rec")
#: Rows decoded from the trained hierarchical run with another slack (see the docstring).
DERIVED = {"hierarchical_no_plan": -1, "hierarchical_slack1": 1}
ROWS = ("autoregressive", "nar4rec", "hierarchical", "hierarchical_slack1",
        "hierarchical_no_plan")
COLUMNS = ("expected_gain", "headroom_captured", "category_entropy", "creator_entropy")


@dataclass
class HierarchicalSettings:
    """Sizes and budget of one run; the trainer budget is the quality benchmark's."""

    simulated: dict[str, int] = field(
        default_factory=lambda: {"kuaishou": 20_000, "large": 1_000})
    budget: QualitySettings = field(default_factory=QualitySettings)
    #: Per data set, a lower cap on the epochs than the budget's: an epoch of ``large``
    #: (n = 500, m = 50) costs about 30 of kuaishou's per request on 2 cores.
    max_epochs: dict[str, int] = field(default_factory=lambda: {"large": 5})
    #: Upper-bound beam width of the oracle reference (the headroom's top), per data set: a
    #: beam over 500 candidates x 50 positions is the slowest part of ``large``.
    upper_bound_beam_width: dict[str, int] = field(
        default_factory=lambda: {"kuaishou": 16, "large": 4})
    latency_requests: int = 100

    @classmethod
    def quick(cls) -> HierarchicalSettings:
        return cls(simulated={"kuaishou": 3_000, "large": 600},
                   budget=QualitySettings(epochs=2, patience=1, dim=32),
                   latency_requests=20)


def output_paths(out_dir: str | Path, quick: bool) -> dict[str, Path]:
    stem = "hierarchical_quick" if quick else "hierarchical"
    return {ext: Path(out_dir) / f"{stem}.{ext}" for ext in ("json", "md", "png")}


def decode_latency_ms(model: torch.nn.Module, dataset: RerankDataset, decoder: str,
                      params: Mapping[str, Any], requests: int) -> dict[str, float]:
    """Median and p90 milliseconds to write one request's list at batch 1 (model pass and
    decoding; a stepwise model's decoding includes its encoder)."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(min(requests, len(dataset))):
            batch = collate([dataset[i]])
            start = time.perf_counter()
            decode_lists(model, batch, decoder, dict(params))
            times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
            "requests": len(times)}


def _read_decoding(run_dir: Path) -> tuple[str, dict[str, Any], Any]:
    decode = dict(json.loads((run_dir / RUN_CONFIG).read_text()).get("decode")
                  or {"name": "greedy"})
    chosen = decode.pop("selection", None)
    return decode.pop("name"), decode, chosen


def _row(model: torch.nn.Module, data_dir: Path, decoder: str, params: dict[str, Any],
         name: str, settings: HierarchicalSettings, preset: str) -> dict[str, Any]:
    test = RerankDataset(data_dir, split="test")
    t0 = time.perf_counter()
    result = evaluate_model(model, test, decoder, params, name=name,
                            beam_width=settings.upper_bound_beam_width.get(preset, 16))
    return {"decoder": {"name": decoder, **params}, "online": result["online"],
            "offline": result["offline"], "eval_s": time.perf_counter() - t0,
            "latency": decode_latency_ms(model, test, decoder, params,
                                         settings.latency_requests)}


def run_dataset(preset: str, n_requests: int, seeds: Sequence[int], work: Path,
                settings: HierarchicalSettings, say: Any) -> dict[str, Any]:
    from genrerank.data.simulator import simulate_to_dir

    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in ROWS}
    for seed in seeds:
        data_dir = work / "data" / preset / f"seed{seed}"
        simulate_to_dir(preset, n_requests, SIM_DATA_SEED + seed, data_dir, progress=False)
        for name in TRAINED:
            run_dir = work / "runs" / preset / f"seed{seed}" / name
            t0 = time.perf_counter()
            budget = settings.budget
            if preset in settings.max_epochs:
                budget = dataclasses.replace(
                    budget, epochs=min(budget.epochs, settings.max_epochs[preset]))
            best = train_run(name, data_dir, run_dir, overwrite=True,
                             overrides=budget_overrides(budget, name, seed))
            train_s = time.perf_counter() - t0
            model, _ = load_model(run_dir, "best")
            decoder, params, chosen = _read_decoding(run_dir)
            record = _row(model, data_dir, decoder, params, name, settings, preset)
            record.update(seed=seed, decode_selection=chosen,
                          train={"best": best, "train_s": train_s})
            runs[name].append(record)
            say(f"{preset} seed {seed} {name}: {_brief(record)} (train {train_s:.0f}s)")
            if name != "hierarchical":
                continue
            for row, slack in DERIVED.items():
                derived = _row(model, data_dir, decoder, {**params, "slack": slack}, row,
                               settings, preset)
                derived["seed"] = seed
                runs[row].append(derived)
                say(f"{preset} seed {seed} {row}: {_brief(derived)}")
        shutil.rmtree(data_dir, ignore_errors=True)
    summary = {r: summarize(v) for r, v in runs.items() if v}
    for r, v in runs.items():
        if v:
            summary[r]["latency"] = {"median_ms": mean_std([x["latency"]["median_ms"]
                                                             for x in v])}
    first = runs["autoregressive"][0]["online"] if runs["autoregressive"] else {}
    return {"requests": n_requests, "data_seeds": [SIM_DATA_SEED + s for s in seeds],
            "runs": runs, "summary": summary,
            "upper_bound_beam_width": first.get("upper_bound_beam_width")}


def _brief(record: Mapping[str, Any]) -> str:
    o = record["online"]
    return (f"gain {o['expected_gain']:.4f}, headroom {o['headroom_captured']:.3f}, "
            f"category entropy {o['category_entropy']:.3f}, "
            f"{record['latency']['median_ms']:.1f} ms/list")


def targets(result: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's target on kuaishou: hierarchical's expected gain at least plain
    autoregressive's, with a higher category entropy (means over the seeds)."""
    summary = result["datasets"].get("kuaishou", {}).get("summary", {})
    try:
        h, a = summary["hierarchical"]["online"], summary["autoregressive"]["online"]
    except KeyError:
        return {"status": "not run"}
    gain = h["expected_gain"]["mean"] >= a["expected_gain"]["mean"]
    entropy = h["category_entropy"]["mean"] > a["category_entropy"]["mean"]
    return {"hierarchical_gain": h["expected_gain"]["mean"],
            "autoregressive_gain": a["expected_gain"]["mean"],
            "hierarchical_entropy": h["category_entropy"]["mean"],
            "autoregressive_entropy": a["category_entropy"]["mean"],
            "gain_at_least_autoregressive": gain, "higher_entropy": entropy,
            "status": "met" if gain and entropy else "missed"}


def _fmt(stat: Mapping[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    std = stat.get("std")
    return f"{stat['mean']:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def render_markdown(result: Mapping[str, Any]) -> str:
    lines = [f"# Hierarchical generation benchmark{' (quick)' if result['quick'] else ''}", "",
             f"Seeds {result['seeds']}, {result['machine']['cpu_count']} CPU(s). Test split; "
             "mean ± std over the seeds. "
             "Command: `genrerank bench hierarchical"
             f"{' --quick' if result['quick'] else ''}`.", "",
             "Latency: median ms to write one list at batch 1 with the row's decoder (PyTorch); "
             "compare rows of one run only.", ""]
    for preset, ds in result["datasets"].items():
        inv = ds.get("invocation", {})
        lines += [f"## {preset} ({ds['requests']} requests; headroom's upper bound: beam "
                  f"width {ds.get('upper_bound_beam_width')})", "",
                  f"Run {inv.get('date', '?')}, {inv.get('wall_time_s', 0):.0f} s, "
                  f"{inv.get('torch_threads', '?')} torch thread(s).", ""]
        header = ["list", "decoder", "expected gain", "headroom", "category entropy",
                  "creator entropy", "valid list score", "ms / list"]
        rows = []
        for r in ROWS:
            s = ds["summary"].get(r)
            if not s:
                continue
            dec = ds["runs"][r][0]["decoder"]
            cells = [r, dec["name"] + (f" (slack {dec['slack']})" if "slack" in dec else ""),
                     *(_fmt(s["online"].get(c), 3 if c != "expected_gain" else 4)
                       for c in COLUMNS),
                     _fmt(s.get("valid", {}).get("list_score"), 3),
                     _fmt(s["latency"]["median_ms"], 1)]
            rows.append(dict(zip(header, cells, strict=True)))
        lines += [markdown_table(rows, header), ""]
    t = result["targets"]
    if t.get("status") != "not run":
        lines += ["## Target", "",
                  f"kuaishou: hierarchical expected gain {t['hierarchical_gain']:.4f} vs "
                  f"autoregressive {t['autoregressive_gain']:.4f}; category entropy "
                  f"{t['hierarchical_entropy']:.3f} vs {t['autoregressive_entropy']:.3f}: "
                  f"**{t['status']}**.", ""]
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = result["datasets"]
    fig = Figure(figsize=(12, 3.6 * max(len(datasets), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    if not datasets:
        fig.text(0.5, 0.5, "no data set was run", ha="center")
        fig.savefig(path, dpi=110)
        return path
    axes = fig.subplots(len(datasets), 3, squeeze=False)
    for row, (preset, ds) in enumerate(datasets.items()):
        names = [r for r in ROWS if r in ds["summary"]]
        for col, (section, metric, label) in enumerate((
                ("online", "headroom_captured", "headroom captured"),
                ("online", "category_entropy", "category entropy"),
                ("latency", "median_ms", "ms per list (batch 1)"))):
            stats = [ds["summary"][n][section][metric] for n in names]
            ax = axes[row][col]
            ax.bar(range(len(names)), [s["mean"] for s in stats],
                   yerr=[s.get("std") or 0 for s in stats], capsize=3,
                   color=["#888888", "#4477aa", "#cc6677", "#ddaa33", "#aaaaaa"][:len(names)])
            ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
            ax.set_title(f"{preset}: {label}", fontsize=10)
    fig.suptitle("hierarchical vs autoregressive vs nar4rec (test split, oracle)")
    fig.savefig(path, dpi=110)
    return path


def run_hierarchical_benchmark(quick: bool, out_dir: Path = Path("benchmarks/results"),
                               seeds: tuple[int, ...] = (0,), progress: bool = True,
                               settings: HierarchicalSettings | None = None,
                               merge: bool = False) -> dict[str, Any]:
    """Run the comparison; writes ``hierarchical[_quick].{json,md,png}`` and returns the JSON.

    ``merge``: keep the data sets of an existing result file that this run does not redo
    (e.g. ``kuaishou`` and ``large`` run as two processes, one core each); every data set
    records the invocation that produced it (``datasets[name]["invocation"]``)."""
    if not seeds:
        raise ValueError("seeds: need at least one seed")
    settings = settings or (HierarchicalSettings.quick() if quick else HierarchicalSettings())
    paths = output_paths(out_dir, quick)
    started, t0 = dt.datetime.now(dt.UTC), time.perf_counter()

    def say(message: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t0:7.1f}s] {message}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="genrerank-hierarchical-"))
    datasets: dict[str, Any] = {}
    try:
        for preset, n in settings.simulated.items():
            t_start = time.perf_counter()
            datasets[preset] = run_dataset(preset, n, seeds, work, settings, say)
            datasets[preset]["invocation"] = {
                "date": started.isoformat(timespec="seconds"), "seeds": list(seeds),
                "wall_time_s": time.perf_counter() - t_start,
                "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "hierarchical", "quick": quick,
        "date": started.isoformat(timespec="seconds"),
        "wall_time_s": time.perf_counter() - t0, "machine": machine_info(),
        "seeds": list(seeds), "settings": asdict(settings),
        "torch_threads": torch.get_num_threads(), "datasets": datasets}
    if merge and paths["json"].exists():
        earlier = json.loads(paths["json"].read_text())
        result["datasets"] = {**{k: v for k, v in earlier.get("datasets", {}).items()
                                 if k not in datasets}, **datasets}
    result["targets"] = targets(result)
    result = _json_safe(result)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths["json"], result)
    atomic_write_text(paths["md"], render_markdown(result))
    plot(result, paths["png"])
    say(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return result
