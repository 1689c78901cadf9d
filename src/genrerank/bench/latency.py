"""``genrerank bench latency``: inference latency and memory of every model, side by side.

What one timed call is (one call serves one batch of requests, as a re-ranking service would):

- ``pointwise``, ``prm``: forward + greedy decoding into a list of length m (sort by score).
- ``nar4rec``: forward + contrastive decoding (its default decoder; alpha fixed at
  ``contrastive_alpha`` and recorded: the packaged ``"auto"`` is a training-time choice, and any
  alpha > 0 costs the same); ``nar4rec_greedy``: forward + greedy.
- ``autoregressive``: encoder + m greedy decoder steps with the KV cache;
  ``autoregressive_no_cache``: the same, recomputing the whole prefix at every step.
- ``evaluator``: scoring K lists of length m per request (``score_lists``, the evaluator's half
  of a generator-evaluator pipeline; the lists are random and fixed, their content costs nothing).

Setup: the three simulator presets (``avito`` n = m = 5, ``kuaishou`` n = 60, m = 6, ``large``
n = 500, m = 50), a small simulated data set of each for realistic batches and feature specs;
batch = its first B requests. Models are built from their packaged default model configs,
randomly initialised (latency does not depend on the weights), ``.eval()``, and called under
``torch.inference_mode()`` with ``torch.set_num_threads(threads)`` (PyTorch eager).

Timing, per cell (preset, batch size): warm-up rounds, then R rounds; a round calls every model
once, round-robin, the starting model rotated each round, so drift and background load hit all
models alike. Each call is timed with ``time.perf_counter_ns``; the garbage collector is paused
while timing (as ``timeit`` does). p50 / p99 are percentiles (linear interpolation) over the R
calls. Budget: when R rounds of a cell would take longer than ``cell_budget_s`` (estimated from
the warm-up), the cell runs fewer rounds (at least ``min_runs``); the count is recorded per cell
(``runs``, ``runs_requested``, ``capped``) and shown in the table. Contention: the machine may
be shared, and a multi-threaded call stalls whenever another process holds one of its cores, so
timed rounds run in blocks of ~``block_s``; a block during which other processes used more than
``busy_cores`` cores (``/proc/stat`` minus this process) is thrown away and repeated once the
machine is quiet, up to ``max_discard_s`` per cell (counts recorded; see :func:`time_cell`).

Memory, per (model, preset, batch): a fresh child process holds the one model and the batch and
makes two calls (:func:`measure_call_memory`). The second is measured: freed heap memory is first
handed back to the OS (``malloc_trim``) and the kernel's peak-RSS mark reset
(``/proc/self/clear_refs``), so ``VmHWM - VmRSS before the call`` is the call's peak working
memory (activations, decoding state), not the weights, the runtime, or code paged in by a first
call. A fresh process per measurement keeps the other models' memory out of it.

Multi-token prediction: a section of its own (:mod:`genrerank.bench.latency_mtp`), batch 1 at
m = 6 and m = 50, where the autoregressive model is briefly TRAINED (how often self-speculative
decoding accepts proposals depends on the weights); ``--variants`` runs it alone.

Outputs ``latency.{json,md}`` (``latency_quick.*`` with ``--quick``, so a quick run never
overwrites the full results).
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.decoding import random_lists
from genrerank.utils.io import atomic_write_json, atomic_write_text
from genrerank.utils.tables import markdown_table

PRESETS = ("avito", "kuaishou", "large")
BATCH_SIZES = (1, 256)
#: variant -> (registered model, what is timed). Order = column order of the tables.
VARIANTS: dict[str, tuple[str, str]] = {
    "pointwise": ("pointwise", "greedy (sort by score)"),
    "prm": ("prm", "greedy (sort by score)"),
    "nar4rec_greedy": ("nar4rec", "greedy"),
    "nar4rec": ("nar4rec", "contrastive (default decoder)"),
    "autoregressive": ("autoregressive", "greedy, KV cache"),
    "autoregressive_no_cache": ("autoregressive", "greedy, no cache (prefix recomputed)"),
    "evaluator": ("evaluator", "score K lists per request"),
}
#: Ratios of p50 latencies: name -> (numerator variant, denominator variant).
RATIOS: dict[str, tuple[str, str]] = {
    "nar4rec / pointwise": ("nar4rec", "pointwise"),
    "nar4rec greedy / pointwise": ("nar4rec_greedy", "pointwise"),
    "autoregressive / nar4rec": ("autoregressive", "nar4rec"),
    "autoregressive / nar4rec greedy": ("autoregressive", "nar4rec_greedy"),
    "no-cache / cache": ("autoregressive_no_cache", "autoregressive"),
}
DATA_SEED = 0
MEMORY_METHOD = (
    "a fresh child process per (model, preset, batch) holds that model and batch and makes two "
    "calls; before the second, freed heap memory is returned to the OS (glibc malloc_trim) and "
    "the kernel's peak-RSS mark is reset (/proc/self/clear_refs); peak = VmHWM during the "
    "second call minus VmRSS just before it"
)
TIMING_METHOD = (
    "time.perf_counter_ns per call; warm-up rounds first, then timed rounds calling every model "
    "once, round-robin with the starting model rotated each round; gc paused while timing; "
    "percentiles by linear interpolation"
)


@dataclass
class LatencySettings:
    """Grid and budget of one benchmark run (``full()`` and ``quick()`` are the two presets)."""

    presets: tuple[str, ...] = PRESETS
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    variants: tuple[str, ...] = tuple(VARIANTS)
    runs: int = 200  # timed rounds per cell (fewer only where cell_budget_s caps a cell)
    min_runs: int = 5  # a capped cell still runs at least this many rounds
    warmup_runs: int = 10  # warm-up rounds per cell, at most ...
    warmup_s: float = 30.0  # ... stopping after this many seconds (at least one round)
    cell_budget_s: float = 1200.0  # estimated timed seconds per cell before its runs are cut
    block_s: float = 1.0  # timed rounds are checked for contention in blocks of this length
    busy_cores: float = 0.2  # a block where other processes used more cores is repeated ...
    #: ... (after idling until the machine is quiet) until this many seconds per cell went to
    #: thrown-away blocks and waiting; after that every block is kept.
    max_discard_s: float = 1800.0
    threads: int = 2
    eval_lists: int = 16  # K lists per request for the evaluator
    contrastive_alpha: float = 0.05
    seed: int = 0  # weights and evaluator lists
    memory: bool = True  # peak memory per (model, preset, batch) in child processes
    # Multi-token prediction section (bench/latency_mtp.py; no variants = not run).
    mtp_variants: tuple[str, ...] = ("autoregressive_mtp", "autoregressive_mtp_unverified")
    mtp_presets: tuple[str, ...] = ("kuaishou", "large")
    mtp_heads: int = 3
    mtp_train_requests: int = 600  # simulated per preset (80 % of them train, 10 % validate)
    mtp_epochs: int = 8  # 8 x 30 = 240 steps of batch 16
    mtp_batch_size: int = 16
    mtp_weight: float = 1.0  # of the mtp loss term
    mtp_target: str = "model"  # its target: the next-item head's choices (or "logged")
    mtp_eval_requests: int = 200  # decoded one at a time: steps, acceptance, identical lists
    mtp_timed_requests: int = 50  # timed calls cycle through the first of them

    @classmethod
    def full(cls) -> LatencySettings:
        return cls()

    @classmethod
    def quick(cls) -> LatencySettings:
        return cls(runs=30, min_runs=3, warmup_runs=3, warmup_s=10.0, cell_budget_s=60.0,
                   max_discard_s=60.0, mtp_train_requests=200, mtp_epochs=2,
                   mtp_eval_requests=30, mtp_timed_requests=10)


def output_paths(out_dir: str | Path, quick: bool, mtp_only: bool = False) -> dict[str, Path]:
    """``latency.{json,md}``, or ``latency_quick.*`` for a quick run; ``latency_mtp[_quick].*``
    when only the multi-token prediction section ran (it never overwrites a full run)."""
    stem = ("latency_mtp" if mtp_only else "latency") + ("_quick" if quick else "")
    return {ext: Path(out_dir) / f"{stem}.{ext}" for ext in ("json", "md")}


# ---------------------------------------------------------------------------- models and inputs


def model_config(name: str) -> dict[str, Any]:
    """The packaged default model config of ``name`` (``configs/<name>.json``), without name."""
    from genrerank.experiment import resolve_config

    return {k: v for k, v in resolve_config(name)["model"].items() if k != "name"}


def build_bench_model(name: str, spec: Any, seed: int) -> torch.nn.Module:
    """A randomly initialised model in eval mode (seeded, so parent and child agree)."""
    from genrerank.models import build_model

    torch.manual_seed(seed)
    return build_model(name, spec, model_config(name)).eval()


def make_call(
    variant: str, model: torch.nn.Module, batch: Batch, m: int, settings: LatencySettings,
    lists: torch.Tensor | None = None,
) -> Callable[[], Any]:
    """The zero-argument call that is timed for ``variant`` on ``batch``."""
    if variant in ("pointwise", "prm", "nar4rec_greedy"):
        return lambda: model.generate(batch, m, "greedy")
    if variant == "nar4rec":
        return lambda: model.generate(batch, m, "contrastive", alpha=settings.contrastive_alpha)
    if variant == "autoregressive":
        return lambda: model.generate(batch, m, "greedy", use_cache=True)
    if variant == "autoregressive_no_cache":
        return lambda: model.generate(batch, m, "greedy", use_cache=False)
    if variant == "evaluator":
        if lists is None:
            lists = random_lists(batch.candidate_mask, m, settings.eval_lists, settings.seed)
        return lambda: model.score_lists(batch, lists)
    raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")


def cell_batch(ds: RerankDataset, batch_size: int) -> Batch:
    """The first ``batch_size`` requests of ``ds``."""
    if len(ds) < batch_size:
        raise ValueError(f"need {batch_size} requests for the batch, the data set has {len(ds)}")
    return collate([ds[i] for i in range(batch_size)])


def missing_variants(variants: Sequence[str]) -> dict[str, str]:
    """Variants whose model is not registered (e.g. a model still being written): the reason."""
    from genrerank.models import MODELS

    return {v: f"model {VARIANTS[v][0]!r} is not registered" for v in variants
            if VARIANTS[v][0] not in MODELS}


# ---------------------------------------------------------------------------- timing


def summarize_ns(samples: Sequence[int]) -> dict[str, Any]:
    """p50 / p99 / mean / std / min / max in milliseconds of per-call times in ns."""
    ms = np.asarray(samples, dtype=np.float64) / 1e6
    return {
        "runs": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


class CpuProbe:
    """CPU time that OTHER processes used while this one timed (from /proc/stat), in cores.

    A multi-threaded call stalls whenever another process holds one of its cores, so timings
    are only comparable between runs on a quiet machine: 0.0 means nothing else ran.
    """

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is already in user / nice)
        ticks = [int(x) for x in fields[:8]]
        busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
        own = os.times()
        # Our own CPU time, memory children included (they count once they were waited for).
        mine = own.user + own.system + own.children_user + own.children_system
        return busy / os.sysconf("SC_CLK_TCK"), mine, time.perf_counter()

    def measure(self) -> tuple[float | None, float]:
        """``(mean cores busy with other processes, seconds)`` since the probe was made."""
        end = self._read()
        if self.start is None or end is None:
            return None, 0.0
        seconds = end[2] - self.start[2]
        if seconds <= 0:
            return None, 0.0
        busy, own = end[0] - self.start[0], end[1] - self.start[1]
        return max(busy - own, 0.0) / seconds, seconds


def wait_for_quiet(busy_cores: float, limit_s: float, poll_s: float = 2.0) -> float:
    """Sleep until other processes use at most ``busy_cores`` over one ``poll_s`` window, or
    ``limit_s`` has passed; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 + poll_s <= limit_s:
        probe = CpuProbe()
        time.sleep(poll_s)
        other, _ = probe.measure()
        if other is None or other <= busy_cores:
            break
    return time.perf_counter() - t0


def _rotated(keys: Sequence[str], r: int) -> list[str]:
    s = r % len(keys)
    return [*keys[s:], *keys[:s]]


def time_cell(calls: Mapping[str, Callable[[], Any]], settings: LatencySettings) -> dict[str, Any]:
    """Warm up, then time ``calls`` side by side (round-robin); returns per-variant stats.

    Timed rounds run in blocks of about ``block_s`` seconds. A block during which other
    processes used more than ``busy_cores`` cores on average is thrown away (the machine is
    shared; a multi-threaded call stalls when another process holds one of its cores); the cell
    then idles until the machine is quiet and repeats the block. Once ``max_discard_s`` seconds
    have gone to thrown-away blocks and waiting in this cell, every block is kept, and the
    cell's ``other_processes_cores`` shows the contention it saw.
    """
    keys = list(calls)
    warm: dict[str, list[int]] = {k: [] for k in keys}
    t0 = time.perf_counter()
    rounds = 0
    while rounds < max(settings.warmup_runs, 1):
        for k in _rotated(keys, rounds):
            s = time.perf_counter_ns()
            calls[k]()
            warm[k].append(time.perf_counter_ns() - s)
        rounds += 1
        if time.perf_counter() - t0 >= settings.warmup_s:
            break
    # The median warm-up call overestimates a steady-state call when there is one round only
    # (it includes the first call's one-off costs): the cap errs towards fewer runs.
    round_s = sum(float(np.median(v)) for v in warm.values()) / 1e9
    runs = settings.runs
    if round_s * runs > settings.cell_budget_s:
        runs = min(runs, max(settings.min_runs, int(settings.cell_budget_s // round_s)))
    block = max(1, math.ceil(settings.block_s / round_s)) if round_s > 0 else 1
    samples: dict[str, list[int]] = {k: [] for k in keys}
    kept = discarded = r = 0
    discarded_s = waited_s = kept_s = other_cpu_s = 0.0
    gc.collect()
    gc.disable()  # a collection inside one model's call would charge it to that model
    t1 = time.perf_counter()
    try:
        while kept < runs:
            n = min(block, runs - kept)
            got: dict[str, list[int]] = {k: [] for k in keys}
            probe = CpuProbe()
            for _ in range(n):
                for k in _rotated(keys, r):
                    s = time.perf_counter_ns()
                    calls[k]()
                    got[k].append(time.perf_counter_ns() - s)
                r += 1
            other, seconds = probe.measure()
            if (other is not None and other > settings.busy_cores
                    and discarded_s + waited_s + seconds <= settings.max_discard_s):
                discarded += n
                discarded_s += seconds
                # Idle until the machine is quiet again rather than compete with its other work.
                waited_s += wait_for_quiet(settings.busy_cores,
                                           settings.max_discard_s - discarded_s - waited_s)
                continue
            for k in keys:
                samples[k] += got[k]
            kept += n
            kept_s += seconds
            other_cpu_s += (other or 0.0) * seconds
    finally:
        gc.enable()
    return {
        "runs": runs,
        "runs_requested": settings.runs,
        "capped": runs < settings.runs,
        "warmup_runs": rounds,
        "warmup_s": t1 - t0,
        "estimated_round_s": round_s,
        "timed_s": time.perf_counter() - t1,
        "rounds_discarded": discarded,
        "discarded_s": discarded_s,
        "waited_for_quiet_s": waited_s,
        # Over the kept rounds: ~0 on a quiet machine.
        "other_processes_cores": other_cpu_s / kept_s if kept_s > 0 else None,
        "variants": {k: summarize_ns(v) for k, v in samples.items()},
    }


# ---------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False when that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Give freed heap memory back to the OS (glibc), so the next call's peak shows in RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def measure_call_memory(call: Callable[[], Any]) -> dict[str, Any]:
    """Peak RSS growth of one call of ``call`` over the RSS just before it (this process).

    The first call also pages in shared-library code and one-off state, so it is reported apart
    (``first_call_mib``); the headline ``call_peak_mib`` is a second call after the memory the
    first one freed was handed back to the OS (``malloc_trim``), so it shows as new RSS again.
    """
    resettable = _reset_peak_rss() and _proc_status_kib("VmRSS") is not None

    def one_call() -> tuple[int, int]:
        gc.collect()
        if resettable:
            _reset_peak_rss()
            before = _proc_status_kib("VmRSS") or 0
            call()
            return before, _proc_status_kib("VmHWM") or 0
        # No resettable mark: ru_maxrss is the lifetime peak (KiB on Linux), so a call that
        # stays below an earlier peak shows no growth.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    first_before, first_peak = one_call()
    trimmed = _malloc_trim()
    before, peak = one_call()
    return {
        "call_peak_mib": max(peak - before, 0) / 1024,
        "first_call_mib": max(first_peak - first_before, 0) / 1024,
        "rss_before_mib": before / 1024,
        "process_peak_mib": max(peak, first_peak) / 1024,
        "method": ("VmHWM reset" if resettable else "ru_maxrss (not resettable; growth may be "
                   "understated)") + (", malloc_trim between calls" if trimmed else ""),
    }


def memory_child(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Runs in the child: one model, one batch, one measured call."""
    settings = LatencySettings(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in payload["settings"].items()})
    torch.set_num_threads(settings.threads)
    ds = RerankDataset(payload["data_dir"])
    variant = payload["variant"]
    model = build_bench_model(VARIANTS[variant][0], ds.spec, settings.seed)
    batch = cell_batch(ds, payload["batch_size"])
    call = make_call(variant, model, batch, ds.spec.max_list_length, settings)
    with torch.inference_mode():
        return measure_call_memory(call)


def _memory_child_main(arg: str) -> None:
    print(json.dumps(memory_child(json.loads(arg))), flush=True)


def measure_memory(
    data_dir: Path, variant: str, batch_size: int, settings: LatencySettings
) -> dict[str, Any]:
    """:func:`memory_child` in a fresh Python process; ``{"error": ...}`` if it fails."""
    payload = {"data_dir": str(data_dir), "variant": variant, "batch_size": batch_size,
               "settings": asdict(settings)}
    code = ("import sys; from genrerank.bench.latency import _memory_child_main; "
            "_memory_child_main(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child exited with {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- ratios, targets


def cell_ratios(variants: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The :data:`RATIOS` of one cell from its measured p50s (None where a side is missing)."""
    out: dict[str, float | None] = {}
    for name, (num, den) in RATIOS.items():
        a, b = variants.get(num, {}).get("p50_ms"), variants.get(den, {}).get("p50_ms")
        out[name] = a / b if a is not None and b else None
    return out


def targets(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three targets, judged on the measured ratios (one line per matching cell)."""
    specs = [
        ("nar4rec within 1.5x of pointwise latency", "nar4rec / pointwise", "<=", 1.5,
         lambda c: c["n"] == 60 and c["batch_size"] == 1, "n = 60, batch 1"),
        ("autoregressive at least 5x slower than nar4rec", "autoregressive / nar4rec", ">=",
         5.0, lambda c: c["m"] == 50, "m = 50"),
        ("KV cache at least 2x faster than recomputation", "no-cache / cache", ">=", 2.0,
         lambda c: c["m"] == 50, "m = 50"),
    ]
    out: list[dict[str, Any]] = []
    for label, ratio, op, bound, where, where_text in specs:
        matching = [c for c in cells if where(c)]
        if not matching:
            out.append({"target": label, "ratio": ratio, "bound": f"{op} {bound}",
                        "where": where_text, "status": "not measured"})
        for c in matching:
            value = c["ratios"].get(ratio)
            status = ("not measured" if value is None
                      else "met" if (value <= bound if op == "<=" else value >= bound)
                      else "not met")
            out.append({"target": label, "ratio": ratio, "bound": f"{op} {bound}",
                        "where": f"{c['preset']} (n = {c['n']}, m = {c['m']}), "
                                 f"batch {c['batch_size']}",
                        "value": value, "status": status})
    return out


def render_targets(result: Mapping[str, Any]) -> str:
    lines = ["Targets (ratios of p50 latencies; nar4rec = its default contrastive decoding):"]
    for t in result["targets"]:
        value = "-" if t.get("value") is None else f"{t['value']:.2f}x"
        status = "NOT met" if t["status"] == "not met" else t["status"]
        lines.append(f"- {t['target']} ({t['ratio']} {t['bound']}) at {t['where']}: "
                     f"measured {value}: {status}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the benchmark


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "mode": "PyTorch eager, torch.inference_mode(), CPU, float32",
    }


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_latency_benchmark(
    quick: bool = False,
    out_dir: Path = Path("benchmarks/results"),
    settings: LatencySettings | None = None,
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Run the latency benchmark; writes ``latency[_quick].{json,md}`` and returns the JSON."""
    from genrerank.bench.latency_mtp import MTP_VARIANTS

    settings = settings or (LatencySettings.quick() if quick else LatencySettings.full())
    bad = [p for p in settings.presets if p not in PRESETS]
    bad += [v for v in settings.variants if v not in VARIANTS]
    bad += [v for v in settings.mtp_variants if v not in MTP_VARIANTS]
    if bad:
        raise ValueError(f"unknown preset(s) / variant(s) {bad}; presets {list(PRESETS)}, "
                         f"variants {[*VARIANTS, *MTP_VARIANTS]}")
    if not settings.batch_sizes or min(settings.batch_sizes) < 1 or settings.runs < 1:
        raise ValueError("batch sizes and runs must be >= 1")
    skipped = missing_variants(settings.variants)
    variants = [v for v in settings.variants if v not in skipped]
    started_at = dt.datetime.now(dt.UTC)
    t_start = time.perf_counter()
    load_start = _load()
    probe = CpuProbe()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    cells: list[dict[str, Any]] = []
    params: dict[str, dict[str, Any]] = {}
    # Only multi-token prediction variants asked for: no grid of random-weight models.
    grid = settings.presets if variants else ()
    mtp: dict[str, Any] | None = None
    bar = tqdm(total=len(grid) * len(settings.batch_sizes), desc="latency cells",
               unit="cell", disable=not progress)
    try:
        with tempfile.TemporaryDirectory(prefix="genrerank-latency-") as tmp:
            from genrerank.data.simulator import simulate_to_dir

            for preset in grid:
                data_dir = simulate_to_dir(preset, max(settings.batch_sizes), DATA_SEED,
                                           Path(tmp) / preset, progress=False,
                                           allow_missing_splits=True)  # batches, not training
                ds = RerankDataset(data_dir)
                m = ds.spec.max_list_length
                models = {name: build_bench_model(name, ds.spec, settings.seed)
                          for name in dict.fromkeys(VARIANTS[v][0] for v in variants)}
                params[preset] = {name: sum(p.numel() for p in mod.parameters())
                                  for name, mod in models.items()}
                for bs in settings.batch_sizes:
                    bar.set_postfix_str(f"{preset} batch {bs}")
                    batch = cell_batch(ds, bs)
                    calls = {v: make_call(v, models[VARIANTS[v][0]], batch, m, settings)
                             for v in variants}
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        timing = time_cell(calls, settings)
                    cell: dict[str, Any] = {
                        "preset": preset,
                        "n": int(batch.candidate_mask.shape[1]),
                        "m": m,
                        "batch_size": bs,
                        "mean_real_candidates": float(batch.candidate_mask.sum(1).float().mean()),
                        **timing,
                    }
                    if settings.memory:
                        for v in variants:
                            cell["variants"][v]["memory"] = measure_memory(data_dir, v, bs,
                                                                           settings)
                    cell["ratios"] = cell_ratios(cell["variants"])
                    cell["cell_wall_s"] = time.perf_counter() - t0
                    cells.append(cell)
                    if progress:
                        bar.write(_cell_line(cell))
                    bar.update()
                del models
            if settings.mtp_variants:
                from genrerank.bench.latency_mtp import run_mtp_section

                mtp = run_mtp_section(settings, Path(tmp) / "mtp", progress)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    wall = time.perf_counter() - t_start
    result: dict[str, Any] = {
        "benchmark": "latency",
        "quick": quick,
        "date": started_at.isoformat(timespec="seconds"),
        "wall_time_s": wall,
        "machine": machine_info(settings.threads),
        "load_average": {"start": load_start, "end": _load()},
        "other_processes_cores": probe.measure()[0],
        "settings": asdict(settings),
        "data": {"source": "simulator presets, first B requests", "data_seed": DATA_SEED,
                 "requests": max(settings.batch_sizes)},
        "models": {
            name: {"config": model_config(name), "parameters": {p: params[p].get(name)
                                                                for p in params}}
            for name in dict.fromkeys(VARIANTS[v][0] for v in variants)
        },
        "variants": {v: {"model": VARIANTS[v][0], "timed": VARIANTS[v][1]}
                     for v in settings.variants},
        "skipped": skipped,
        "timing_method": TIMING_METHOD,
        "memory_method": MEMORY_METHOD if settings.memory else "not measured",
        "cells": cells,
    }
    result["targets"] = targets(cells)
    if mtp is not None:
        result["mtp"] = mtp
    result = _json_safe(result)
    if write:
        paths = output_paths(out_dir, quick, mtp_only=not variants)
        atomic_write_json(paths["json"], result)
        atomic_write_text(paths["md"], render_markdown(result))
    if progress:
        print(render_targets(result), flush=True)
        if mtp is not None:
            from genrerank.bench.latency_mtp import render_mtp_targets

            print(render_mtp_targets(mtp), flush=True)
        if write:
            print(f"wrote {paths['json']} and {paths['md']} in {wall:.0f}s", flush=True)
    return result


def _cell_line(cell: Mapping[str, Any]) -> str:
    parts = ", ".join(f"{v} {s['p50_ms']:.2f}" for v, s in cell["variants"].items())
    return (f"{cell['preset']} batch {cell['batch_size']}: p50 ms {parts} "
            f"({cell['runs']} runs{' capped' if cell['capped'] else ''}, "
            f"{cell.get('rounds_discarded', 0)} discarded, {cell['cell_wall_s']:.0f}s, "
            f"other processes {_cores(cell.get('other_processes_cores'))} cores)")


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN / inf become null, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------- Markdown


def _short(variant: str) -> str:
    return {"nar4rec_greedy": "nar4rec greedy", "nar4rec": "nar4rec contrastive",
            "autoregressive": "AR cache", "autoregressive_no_cache": "AR no cache"}.get(
                variant, variant.replace("_", " "))


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _mib(x: float | None) -> str:
    return "-" if x is None else "< 0.1" if x < 0.05 else f"{x:,.1f}"


def _cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def summary_table(result: Mapping[str, Any]) -> str:
    """p50 / p99 per cell and variant, one row per (preset, batch)."""
    variants = [v for v in result["settings"]["variants"] if v not in result["skipped"]]
    rows = []
    for c in result["cells"]:
        row: dict[str, Any] = {"setting": c["preset"], "n": c["n"], "m": c["m"],
                               "batch": c["batch_size"]}
        for v in variants:
            s = c["variants"][v]
            row[_short(v)] = f"{_ms(s['p50_ms'])} / {_ms(s['p99_ms'])}"
        for v in result["skipped"]:
            row[_short(v)] = "skipped"
        row["runs"] = f"{c['runs']}{' (capped)' if c['capped'] else ''}"
        row["discarded"] = c.get("rounds_discarded", 0)
        row["other CPU"] = _cores(c.get("other_processes_cores"))
        rows.append(row)
    return markdown_table(rows)


def ratio_table(result: Mapping[str, Any]) -> str:
    rows = [{"setting": c["preset"], "n": c["n"], "m": c["m"], "batch": c["batch_size"],
             **{k: _ratio(v) for k, v in c["ratios"].items()}} for c in result["cells"]]
    return markdown_table(rows)


def detail_table(result: Mapping[str, Any]) -> str:
    rows = []
    for c in result["cells"]:
        for v, s in c["variants"].items():
            mem = s.get("memory") or {}
            rows.append({
                "setting": c["preset"], "batch": c["batch_size"], "model": v,
                "timed": result["variants"][v]["timed"],
                "p50 ms": _ms(s["p50_ms"]), "p99 ms": _ms(s["p99_ms"]),
                "mean ms": _ms(s["mean_ms"]), "min ms": _ms(s["min_ms"]),
                "p50 ms / request": _ms(s["p50_ms"] / c["batch_size"]),
                "runs": s["runs"],
                "peak MiB (call)": _mib(mem.get("call_peak_mib")),
            })
    return markdown_table(rows)


def render_markdown(result: Mapping[str, Any]) -> str:
    s, mach = result["settings"], result["machine"]
    quick = result["quick"]
    load = result["load_average"]
    capped = [c for c in result["cells"] if c["capped"]]
    waited = sum(c.get("waited_for_quiet_s", 0.0) for c in result["cells"])
    lines = [
        f"# Latency benchmark{' (quick)' if quick else ''}",
        "",
        f"Date: {result['date']}. Wall time of this run: **{result['wall_time_s'] / 60:.1f} min** "
        f"({waited / 60:.1f} min of it idle, waiting for other processes to finish). "
        f"Machine: {mach['cpu']}, {mach['cpu_count']} cores ({mach['affinity']} usable), "
        f"{mach['platform']}, Python {mach['python']}, torch {mach['torch']}. "
        f"{mach['mode']}, **{mach['threads']} intra-op "
        f"thread{'' if mach['threads'] == 1 else 's'}** "
        f"(`torch.set_num_threads`). Load average at the start "
        f"{_fmt_load(load['start'])}, at the end {_fmt_load(load['end'])} (other processes "
        "share the machine; every model in a cell saw the same conditions).",
        "",
        "One call = forward + decoding into a list of length m for one batch of requests: "
        "pointwise and prm greedy (sort by score); nar4rec greedy, and contrastive (its default "
        f"decoder, alpha = {s['contrastive_alpha']}); autoregressive (AR) greedy, step by step, "
        "with the KV cache and without (the prefix recomputed at every step); the evaluator "
        f"scoring K = {s['eval_lists']} given lists of length m per request. Randomly "
        "initialised models with the packaged default configs (latency does not depend on "
        "training); batches are the first B requests of a simulated data set of each preset.",
        "",
        f"Timing: {result['timing_method']}. Per cell: up to {s['warmup_runs']} warm-up rounds "
        f"(stopping after {s['warmup_s']:.0f} s), then {s['runs']} timed rounds, or fewer when "
        f"they would take more than {s['cell_budget_s']:.0f} s (at least {s['min_runs']}; the "
        "count is in the `runs` column). With fewer than 100 runs, p99 is the interpolated top "
        "of the sample (close to its maximum).",
        "",
        "The machine is shared. A multi-threaded call stalls whenever another process holds one "
        f"of its cores, so timed rounds run in blocks of ~{s['block_s']:.0f} s and a block "
        f"during which other processes used more than {s['busy_cores']} cores (/proc/stat minus "
        "this process) is thrown away and repeated once the machine is quiet again (column "
        "`discarded`: rounds thrown away), up to "
        f"{s['max_discard_s']:.0f} s per cell; `other CPU` = cores used by other processes "
        "during the kept rounds (0 = quiet). Over the whole run other processes used "
        f"{_cores(result.get('other_processes_cores'))} cores on average; this run threw away "
        f"{sum(c.get('discarded_s', 0.0) for c in result['cells']) / 60:.1f} min of timed "
        "rounds and waited "
        f"{sum(c.get('waited_for_quiet_s', 0.0) for c in result['cells']) / 60:.1f} min for "
        "quiet.",
        "",
        "## p50 / p99 latency per call (ms)",
        "",
        summary_table(result),
        "",
    ]
    limit = s["busy_cores"]
    busy = [c for c in result["cells"] if (c.get("other_processes_cores") or 0.0) > limit]
    if busy:
        lines += [f"**Warning**: other processes used more than {limit} cores while "
                  + ", ".join(f"{c['preset']} batch {c['batch_size']}" for c in busy)
                  + " were timed; those numbers are inflated by contention.", ""]
    if capped:
        lines += ["Capped cells (fewer runs, to keep the whole run within budget): "
                  + "; ".join(f"{c['preset']} batch {c['batch_size']}: {c['runs']} of "
                              f"{c['runs_requested']} runs (one round of all models ~"
                              f"{c['estimated_round_s']:.0f} s)" for c in capped) + ".", ""]
    if result["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{v}: {why}" for v, why in result["skipped"].items())
                  + ".", ""]
    lines += [
        "## Ratios of p50 latencies",
        "",
        ratio_table(result),
        "",
        render_targets(result),
        "",
        "## Every cell",
        "",
        detail_table(result),
        "",
        f"Peak memory: {result['memory_method']}. It is the working memory of one call "
        "(activations, decoding state), not the model's weights or the Python / torch runtime.",
        "",
    ]
    if not result["cells"]:  # --variants named only the multi-token prediction section
        lines = lines[:4]
    if "mtp" in result:
        from genrerank.bench.latency_mtp import render_mtp

        lines += [render_mtp(result["mtp"], s)]
    only = "" if result["cells"] else f" --variants {','.join(s['mtp_variants'])}"
    stem = output_paths(".", quick, mtp_only=bool(only))["json"].name
    lines += [
        f"Reproduce: `genrerank bench latency{' --quick' if quick else ''}{only}` "
        f"(`--threads {mach['threads']}`); everything is in `{stem}`.",
        "",
    ]
    return "\n".join(lines)


def _fmt_load(load: Sequence[float] | None) -> str:
    return "n/a" if not load else ", ".join(f"{x:.1f}" for x in load)


def settings_with(base: LatencySettings, **changes: Any) -> LatencySettings:
    """``base`` with the given fields changed (None values leave a field as it is)."""
    return replace(base, **{k: v for k, v in changes.items() if v is not None})
