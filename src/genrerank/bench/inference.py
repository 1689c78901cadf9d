"""The in-process half of ``genrerank bench serving``: model time in PyTorch eager vs ONNX
Runtime (float32 and int8), the item-embedding cache's gain, and int8's change in quality.

**Model time** (one request, batch 1, as a service sees it): the part of a request after the
item embeddings, with the same inputs in both runtimes (``item_static`` precomputed):

- matrix generators (pointwise, prm, nar4rec): the model graph only (forward), and "+ decode"
  (the forward plus the run's decoder: greedy, or contrastive for nar4rec);
- autoregressive: encoder + the step-by-step greedy decode with the KV cache (the loop is the
  model; in ONNX Runtime it runs the exported encoder and step graphs);
- evaluator: scoring K = 16 lists of the request.

Weights are random (seeded) with the packaged default configs: time does not depend on them.
Timing uses :func:`genrerank.bench.latency.time_cell` (round-robin over variants, blocks with
other CPU load thrown away and repeated once the machine is quiet). PyTorch runs with
``torch.set_num_threads(threads)``, ONNX Runtime with ``threads`` intra-op threads and no
spinning, as the service does.

**Item cache**: :meth:`Reranker.rerank` end to end on a pool of test requests, with no cache
(every item embedded per request) vs. a warm cache (every item of the pool cached).

**int8 quality**: a nar4rec run trained briefly on simulated kuaishou logs, exported with int8
graphs; lists of the float32 and int8 graphs on the test split, scored exactly by the simulator
(expected gain), plus the share of identical lists and the max |log-prob| difference.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrerank.bench.latency import LatencySettings, machine_info, time_cell
from genrerank.data.dataset import RerankDataset, collate

__all__ = ["InferenceSettings", "inference_markdown", "run_inference_benchmark"]

MODELS = ("pointwise", "prm", "nar4rec", "autoregressive", "evaluator")
PRESETS = {"kuaishou": 60, "large": 500}


@dataclass(frozen=True)
class InferenceSettings:
    presets: tuple[str, ...] = ("kuaishou", "large")
    models: tuple[str, ...] = MODELS
    threads: int = 1
    runs: int = 200
    warmup_runs: int = 20
    cell_budget_s: float = 120.0
    max_discard_s: float = 120.0
    eval_lists: int = 16
    cache_pool: int = 100  # distinct test requests cycled in the cache measurement
    cache_runs: int = 300
    int8_requests: int = 6000  # simulated kuaishou requests the int8 quality model learns from
    int8_epochs: int = 3
    seed: int = 0

    @classmethod
    def quick(cls) -> InferenceSettings:
        return cls(runs=40, warmup_runs=5, cell_budget_s=20.0, max_discard_s=20.0,
                   cache_runs=60, int8_requests=2000, int8_epochs=1)

    def timing(self) -> LatencySettings:
        return replace(LatencySettings(), runs=self.runs, min_runs=5,
                       warmup_runs=self.warmup_runs, warmup_s=20.0,
                       cell_budget_s=self.cell_budget_s, max_discard_s=self.max_discard_s,
                       threads=self.threads)


def _summary(stats: Mapping[str, Any]) -> dict[str, float]:
    return {"p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "mean_ms": stats["mean_ms"]}


def _untrained_run(name: str, spec: Any, run_dir: Path, seed: int) -> Path:
    """A run folder of a randomly initialised model with its packaged config and decoder."""
    import json

    from genrerank.bench.latency import build_bench_model
    from genrerank.experiment import resolve_config
    from genrerank.training.checkpoint import save_checkpoint

    model = build_bench_model(name, spec, seed)
    save_checkpoint(run_dir / "best", model, {"epoch": 0, "step": 0})
    decode = dict(resolve_config(name)["decode"])
    if decode.get("name") == "auto":  # a training-time choice: time the generators' usual one
        decode = {"name": "greedy"} if model.stepwise else {"name": "contrastive", "alpha": "auto"}
    if decode.get("alpha") == "auto":  # a training-time choice; any alpha costs the same
        decode["alpha"] = 0.05
    decode.pop("selection", None)
    (run_dir / "run_config.json").write_text(json.dumps({"decode": decode}))
    return run_dir


def _calls(name: str, run_dir: Path, onnx_dir: Path, batch: Any, m: int, k: int,
           threads: int, seed: int) -> dict[str, Callable[[], Any]]:
    """Zero-argument timed calls: torch / onnx / onnx_int8 (model only and + decode)."""
    from genrerank.decoding import decode, random_lists
    from genrerank.serving.backends import TorchBackend
    from genrerank.serving.export import make_batch
    from genrerank.serving.onnx_model import OnnxModel

    backend = TorchBackend(run_dir, threads)
    model = backend.model
    with torch.inference_mode():
        static = model.item_embedding(batch.item_cat, batch.item_dense, batch.item_hash)
    b = make_batch(batch.user_cat, batch.user_dense, static, batch.upstream_score,
                   batch.candidate_mask, torch.ones(1, m, dtype=torch.bool),
                   category=batch.category)
    feeds = OnnxModel.request_feeds(batch.user_cat.numpy(), batch.user_dense.numpy(),
                                    static.numpy(), batch.upstream_score.numpy(),
                                    batch.candidate_mask.numpy(), batch.category.numpy())
    runtimes = {"onnx": OnnxModel(onnx_dir, threads),
                "onnx_int8": OnnxModel(onnx_dir, threads, int8=True)}
    calls: dict[str, Callable[[], Any]] = {}
    mask = batch.candidate_mask
    dec, params = backend.decoder, dict(backend.decoder_params)

    def infer(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return fn()
        return call

    if name == "evaluator":
        lists = random_lists(mask, m, k, seed)
        calls["torch"] = infer(lambda: model.score_lists(b, lists))
        for key, rt in runtimes.items():
            calls[key] = (lambda rt=rt: rt.score_lists(feeds, lists.numpy()))
        return calls
    if model.stepwise:
        calls["torch"] = infer(lambda: model.generate(b, m, "greedy"))
        for key, rt in runtimes.items():
            calls[key] = (lambda rt=rt: rt.greedy(feeds, m))
        return calls

    def torch_decode() -> Any:
        out = model(b, list_length=m)
        extra = {"item_repr": out.item_repr} if dec == "contrastive" else {}
        return decode(dec, out.log_probs, mask, m, **params, **extra)

    def onnx_decode(rt: Any) -> Any:
        lp, _, repr_ = rt.matrix(feeds, m)
        extra = {"item_repr": torch.from_numpy(repr_)} if dec == "contrastive" else {}
        return decode(dec, torch.from_numpy(lp), mask, m, **params, **extra)

    calls["torch"] = infer(lambda: model(b, list_length=m))
    calls["torch+decode"] = infer(torch_decode)
    for key, rt in runtimes.items():
        calls[key] = (lambda rt=rt: rt.matrix(feeds, m))
        calls[f"{key}+decode"] = infer(lambda rt=rt: onnx_decode(rt))
    return calls


#: ONNX Runtime session settings compared: (intra-op threads, spinning).
SESSION_VARIANTS = {"1 thread": (1, False), "2 threads": (2, False),
                    "2 threads, spinning": (2, True)}


def _session_options(onnx_dir: Path, batch: Any, m: int, settings: InferenceSettings
                     ) -> dict[str, Any]:
    """nar4rec's ONNX graph under each of :data:`SESSION_VARIANTS`, side by side."""
    from genrerank.serving.onnx_model import OnnxModel

    calls = {}
    for label, (threads, spinning) in SESSION_VARIANTS.items():
        rt = OnnxModel(onnx_dir, threads, spinning=spinning)
        static = rt.item_embedding(batch.item_cat[0].numpy(), batch.item_dense[0].numpy(),
                                  batch.item_hash[0].numpy())
        feeds = rt.request_feeds(batch.user_cat.numpy(), batch.user_dense.numpy(), static[None],
                                 batch.upstream_score.numpy(), batch.candidate_mask.numpy(),
                                 batch.category.numpy())
        calls[label] = (lambda rt=rt, feeds=feeds: rt.matrix(feeds, m))
    cell = time_cell(calls, settings.timing())
    return {"runs": cell["runs"], "other_processes_cores": cell["other_processes_cores"],
            "variants": {k: _summary(v) for k, v in cell["variants"].items()}}


class _Cursor:
    """The current request of a pool, shared by the timed calls of one round."""

    def __init__(self, pool: list[Any]) -> None:
        self.pool, self.i = pool, 0

    def advance(self) -> None:
        self.i = (self.i + 1) % len(self.pool)

    def call(self, reranker: Any) -> Callable[[], Any]:
        return lambda: reranker.rerank(self.pool[self.i])


def _cache_gain(run_dir: Path, onnx_dir: Path, ds: RerankDataset, table: Any, m: int,
                settings: InferenceSettings) -> dict[str, Any]:
    """Reranker.rerank per request: no cache vs a warm cache, PyTorch and ONNX Runtime."""
    from genrerank.serving.runtime import load_reranker
    from genrerank.serving.types import RerankInput

    ids = table.column("item_id")
    pool = []
    for i in range(min(settings.cache_pool, len(ds))):
        it = ds[i]
        pool.append(RerankInput(
            item_ids=ids[int(ds.rows[i])].as_py(), user_cat=it["user_cat"],
            user_dense=it["user_dense"], item_cat=np.array(it["item_cat"]),
            item_dense=np.array(it["item_dense"]), upstream_score=it["upstream_score"],
            category=it["category"], creator=it["creator"], m=m, strategy=""))
    out: dict[str, Any] = {}
    for backend in ("torch", "onnx"):
        src = {"run_dir": run_dir} if backend == "torch" else {"onnx_dir": onnx_dir}
        rerankers = {
            "no_cache": load_reranker(**src, threads=settings.threads, cache_size=0),
            "warm_cache": load_reranker(**src, threads=settings.threads, cache_size=10**6),
        }
        for rr in rerankers.values():
            for req in pool:  # warm-up; fills the warm cache with every item of the pool
                req.strategy = rr.strategies[0]
                rr.rerank(req)
        cursor = _Cursor(pool)
        calls = {key: cursor.call(rr) for key, rr in rerankers.items()}
        before = rerankers["warm_cache"].cache_stats()
        timing = replace(settings.timing(), runs=settings.cache_runs)
        # "_next" moves both rerankers on to the next request of the pool once per round.
        cell = time_cell({**calls, "_next": cursor.advance}, timing)
        stats = {k: _summary(v) for k, v in cell["variants"].items() if k != "_next"}
        after = rerankers["warm_cache"].cache_stats()  # hit rate over the timed calls only
        looked_up = (after["hits"] + after["misses"]) - (before["hits"] + before["misses"])
        stats["warm_cache"]["hit_rate"] = (after["hits"] - before["hits"]) / max(looked_up, 1)
        stats["no_cache"]["hit_rate"] = 0.0
        stats["speedup_p50"] = stats["no_cache"]["p50_ms"] / stats["warm_cache"]["p50_ms"]
        out[backend] = stats
    return out


def _int8_quality(work: Path, settings: InferenceSettings, progress: bool) -> dict[str, Any]:
    """Expected gain of float32 vs int8 lists of a briefly trained nar4rec (simulator)."""
    from genrerank.data.simulator import Simulator, request_index, simulate_to_dir
    from genrerank.decoding import decode
    from genrerank.experiment import train_run
    from genrerank.serving.backends import decoder_config
    from genrerank.serving.export import export_run
    from genrerank.serving.onnx_model import OnnxModel

    data = work / "int8_data"
    simulate_to_dir("kuaishou", settings.int8_requests, settings.seed, data, overwrite=True,
                    progress=False)
    run = work / "int8_run"
    start = time.perf_counter()
    train_run("nar4rec", data, run, overrides=(f"train.epochs={settings.int8_epochs}",
                                                f"train.progress={str(progress).lower()}"),
              overwrite=True)
    train_s = time.perf_counter() - start
    onnx_dir = work / "int8_onnx"
    manifest = export_run(run, onnx_dir, quantize=True)
    ds = RerankDataset(data, "test")
    batch = collate([ds[i] for i in range(len(ds))])
    m = batch.position_mask.shape[1]
    fp32, int8 = OnnxModel(onnx_dir, settings.threads), OnnxModel(onnx_dir, settings.threads,
                                                                    int8=True)
    dec, params = decoder_config(manifest.get("decode") or {})
    lists, lps = {}, {}
    for key, rt in (("float32", fp32), ("int8", int8)):
        static = rt.item_embedding(batch.item_cat.reshape(-1, batch.item_cat.shape[-1]).numpy(),
                                   batch.item_dense.reshape(-1, batch.item_dense.shape[-1])
                                   .numpy(), batch.item_hash.reshape(-1).numpy()
                                   ).reshape(*batch.candidate_mask.shape, -1)
        feeds = rt.request_feeds(batch.user_cat.numpy(), batch.user_dense.numpy(), static,
                                 batch.upstream_score.numpy(), batch.candidate_mask.numpy(),
                                 batch.category.numpy())
        lp, _, repr_ = rt.matrix(feeds, m)
        extra = {"item_repr": torch.from_numpy(repr_)} if dec == "contrastive" else {}
        out = decode(dec, torch.from_numpy(lp), batch.candidate_mask, m, **params, **extra)
        lists[key] = (out.lists[:, 0] if hasattr(out, "lists") else out).numpy()
        lps[key] = lp
    sim = Simulator.from_spec(ds.spec)
    state = sim.requests(request_index(ds.request_ids))
    gains = {k: sim.expected_gain(state, v) for k, v in lists.items()}
    finite = np.isfinite(lps["float32"]) & np.isfinite(lps["int8"])
    diff = gains["int8"] - gains["float32"]
    return {
        "train_requests": settings.int8_requests,
        "train_epochs": settings.int8_epochs,
        "train_seconds": round(train_s, 1),
        "test_requests": len(ds),
        "decoder": manifest.get("decode"),
        "expected_gain_float32": float(gains["float32"].mean()),
        "expected_gain_int8": float(gains["int8"].mean()),
        "gain_change": float(diff.mean()),
        "gain_change_se": float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1
        else None,
        "identical_lists": float((lists["float32"] == lists["int8"]).all(1).mean()),
        "max_abs_log_prob_diff": float(np.abs(lps["float32"] - lps["int8"])[finite].max()),
    }


def run_inference_benchmark(settings: InferenceSettings, work: Path,
                            progress: bool = True) -> dict[str, Any]:
    """Run every part; returns the JSON-ready results (``work`` holds runs and exports)."""
    from genrerank.data.simulator import simulate_dataset
    from genrerank.serving.export import export_run

    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    work.mkdir(parents=True, exist_ok=True)
    cells, cache, sessions = [], {}, {}
    try:
        for preset in settings.presets:
            table, spec = simulate_dataset(preset, 300, settings.seed)
            ds = RerankDataset((table, spec), "test")
            batch = collate([ds[0]])
            m = batch.position_mask.shape[1]
            for name in settings.models:
                run_dir = work / preset / name
                shutil.rmtree(run_dir, ignore_errors=True)
                _untrained_run(name, spec, run_dir, settings.seed)
                onnx_dir = work / preset / f"{name}_onnx"
                export_run(run_dir, onnx_dir, quantize=True)
                calls = _calls(name, run_dir, onnx_dir, batch, m, settings.eval_lists,
                               settings.threads, settings.seed)
                cell = time_cell(calls, settings.timing())
                variants = {k: _summary(v) for k, v in cell["variants"].items()}
                torch_ms = variants["torch"]["p50_ms"]
                cells.append({
                    "preset": preset, "n": int(batch.candidate_mask.shape[1]), "m": m,
                    "model": name, "runs": cell["runs"],
                    "other_processes_cores": cell["other_processes_cores"],
                    "variants": variants,
                    "onnx_over_torch_p50": variants["onnx"]["p50_ms"] / torch_ms,
                    "int8_over_torch_p50": variants["onnx_int8"]["p50_ms"] / torch_ms,
                })
                if progress:
                    print(f"[inference] {preset} {name}: " + ", ".join(
                        f"{k} {v['p50_ms']:.3f} ms" for k, v in variants.items()), flush=True)
                if name == "nar4rec":
                    sessions[preset] = _session_options(onnx_dir, batch, m, settings)
                    if progress:
                        print(f"[inference] {preset} session options: " + ", ".join(
                            f"{k} p50 {v['p50_ms']:.3f} p99 {v['p99_ms']:.3f} ms"
                            for k, v in sessions[preset]["variants"].items()), flush=True)
                    cache[preset] = _cache_gain(run_dir, onnx_dir, ds, table, m, settings)
                    if progress:
                        print(f"[inference] {preset} cache: {cache[preset]}", flush=True)
        quality = _int8_quality(work, settings, progress)
        if progress:
            print(f"[inference] int8 quality: {quality}", flush=True)
    finally:
        torch.set_num_threads(previous)
    result = {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
        "settings": asdict(settings),
        "machine": {**machine_info(settings.threads), "onnxruntime": _ort_version()},
        "cells": cells,
        "session_options": sessions,
        "cache": cache,
        "int8_quality": quality,
    }
    result["targets"] = inference_targets(result)
    return result


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def inference_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for cell in result["cells"]:
        if cell["preset"] == "kuaishou" and cell["model"] == "nar4rec":
            ratio = cell["onnx_over_torch_p50"]
            out.append({
                "target": "n = 60, one request: ONNX Runtime model time <= 0.5x PyTorch eager "
                          "(nar4rec)",
                "measured": f"{ratio:.2f}x (p50 {cell['variants']['onnx']['p50_ms']:.3f} ms vs "
                            f"{cell['variants']['torch']['p50_ms']:.3f} ms)",
                "met": ratio <= 0.5,
            })
    return out


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def inference_markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "### Model time, one request (p50 ms; p99 in parentheses)",
        "",
        f"{result['machine']['threads']} intra-op thread(s); PyTorch {result['machine']['torch']}"
        f" eager vs ONNX Runtime {result['machine']['onnxruntime']} (float32, int8). "
        "Matrix models: graph only, then + the run's decoder.",
        "",
        "| n | model | torch | onnx | onnx int8 | onnx / torch | torch + decode | "
        "onnx + decode |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        v = c["variants"]

        def cell(key: str, v: Mapping[str, Any] = v) -> str:
            s = v.get(key)
            return "-" if s is None else f"{s['p50_ms']:.3f} ({s['p99_ms']:.2f})"

        lines.append(f"| {c['n']} | {c['model']} | {cell('torch')} | {cell('onnx')} | "
                     f"{cell('onnx_int8')} | {c['onnx_over_torch_p50']:.2f}x | "
                     f"{cell('torch+decode')} | {cell('onnx+decode')} |")
    if result.get("session_options"):
        labels = list(SESSION_VARIANTS)
        lines += ["", "### ONNX Runtime session options, nar4rec graph (p50 ms; p99 in "
                  "parentheses)", "",
                  "One inter-op thread throughout (the graphs are chains). Measured on a quiet "
                  "machine; a server shares the cores with its HTTP work.", "",
                  "| n | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
        for preset, per in result["session_options"].items():
            v = per["variants"]
            lines.append(f"| {PRESETS.get(preset, preset)} | " + " | ".join(
                f"{v[k]['p50_ms']:.3f} ({v[k]['p99_ms']:.2f})" for k in labels) + " |")
    lines += ["", "### Item-embedding cache: `Reranker.rerank` per request, nar4rec (p50 ms)", "",
              "| n | backend | no cache | warm cache | hit rate | speed-up |",
              "|---:|---|---:|---:|---:|---:|"]
    for preset, per in result["cache"].items():
        for backend, s in per.items():
            lines.append(f"| {PRESETS.get(preset, preset)} | {backend} | "
                         f"{s['no_cache']['p50_ms']:.3f} | {s['warm_cache']['p50_ms']:.3f} | "
                         f"{s['warm_cache']['hit_rate']:.3f} | {s['speedup_p50']:.2f}x |")
    q = result["int8_quality"]
    lines += ["", "### int8 dynamic quantization: quality (nar4rec, simulated kuaishou test split)",
              "",
              f"Trained {q['train_epochs']} epoch(s) on {q['train_requests']:,} requests; "
              f"{q['test_requests']} test requests; decoder {q['decoder']}.", "",
              "| expected gain float32 | expected gain int8 | change (se) | identical lists | "
              "max abs log-prob diff |", "|---:|---:|---:|---:|---:|",
              f"| {q['expected_gain_float32']:.4f} | {q['expected_gain_int8']:.4f} | "
              f"{q['gain_change']:+.4f} ({_f(q['gain_change_se'], 4)}) | "
              f"{q['identical_lists']:.1%} | {q['max_abs_log_prob_diff']:.3g} |"]
    lines += ["", "### Targets", ""]
    for t in result["targets"]:
        lines.append(f"- {t['target']}: **{'met' if t['met'] else 'NOT met'}**, {t['measured']}")
    return "\n".join(lines) + "\n"
