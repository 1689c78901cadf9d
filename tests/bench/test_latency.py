"""Smoke test of ``genrerank bench latency`` with tiny settings (two small presets, batch 1 and 3,
a few runs), plus the timing loop, the targets and the memory child on their own."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from genrerank.bench.latency import (
    RATIOS,
    VARIANTS,
    LatencySettings,
    measure_memory,
    output_paths,
    random_lists,
    run_latency_benchmark,
    targets,
    time_cell,
)
from genrerank.cli import main

# One thread and no discarding: the test's time does not depend on what else the machine runs.
# The multi-token prediction section (it trains models) has its own test: test_latency_mtp.py.
TINY = LatencySettings(presets=("avito", "kuaishou"), batch_sizes=(1, 3), runs=4, min_runs=2,
                       warmup_runs=1, warmup_s=0.0, memory=False, threads=1, max_discard_s=0.0,
                       mtp_variants=())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("latency")
    return run_latency_benchmark(out_dir=out, settings=TINY, progress=False), out


def test_result_structure(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    assert result["machine"]["threads"] == TINY.threads
    assert result["machine"]["torch"]
    assert result["skipped"] == {}
    cells = result["cells"]
    assert [(c["preset"], c["batch_size"]) for c in cells] == [
        ("avito", 1), ("avito", 3), ("kuaishou", 1), ("kuaishou", 3)]
    assert [(c["n"], c["m"]) for c in cells] == [(5, 5), (5, 5), (60, 6), (60, 6)]
    for c in cells:
        assert c["runs"] == c["runs_requested"] == 4 and not c["capped"]
        assert c["warmup_runs"] == 1
        assert list(c["variants"]) == list(VARIANTS)  # every model, side by side
        for stats in c["variants"].values():
            assert stats["runs"] == 4
            assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
            assert "memory" not in stats  # memory=False


def test_ratios_are_computed_from_the_measured_p50s(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    for c in result["cells"]:
        assert set(c["ratios"]) == set(RATIOS)
        for name, (num, den) in RATIOS.items():
            expected = c["variants"][num]["p50_ms"] / c["variants"][den]["p50_ms"]
            assert c["ratios"][name] == pytest.approx(expected)
    lines = result["targets"]
    first = [t for t in lines if t["target"].startswith("nar4rec within")]
    assert len(first) == 1 and first[0]["where"].startswith("kuaishou (n = 60, m = 6), batch 1")
    kuaishou_1 = result["cells"][2]
    assert first[0]["value"] == pytest.approx(kuaishou_1["ratios"]["nar4rec / pointwise"])
    assert first[0]["status"] == ("met" if first[0]["value"] <= 1.5 else "not met")
    # No m = 50 cell in this run: those targets say so instead of inventing a value.
    assert [t["status"] for t in lines if t["where"] == "m = 50"] == ["not measured"] * 2


def test_files(run: tuple[dict[str, Any], Path]) -> None:
    result, out = run
    paths = output_paths(out, quick=False)
    assert json.loads(paths["json"].read_text()) == result
    md = paths["md"].read_text()
    assert "| setting" in md and "nar4rec contrastive" in md and "AR no cache" in md
    assert "1 intra-op thread**" in md and "Wall time" in md and "other CPU" in md
    assert "nar4rec within 1.5x of pointwise" in md
    assert output_paths(out, quick=True)["md"].name == "latency_quick.md"


def test_time_cell_round_robin_and_cap() -> None:
    order: list[str] = []

    def call(key: str) -> Any:
        return lambda: (order.append(key), time.sleep(0.002))

    calls = {k: call(k) for k in ("a", "b", "c")}
    settings = LatencySettings(runs=100, min_runs=3, warmup_runs=1, warmup_s=0.0,
                               cell_budget_s=0.01, max_discard_s=0.0)
    cell = time_cell(calls, settings)
    # One warm-up round, then 3 timed rounds: the cap's count is recorded, never hidden.
    assert cell["capped"] and cell["runs"] == 3 and cell["runs_requested"] == 100
    assert all(s["runs"] == 3 for s in cell["variants"].values())
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert rounds == [list("abc"), list("abc"), list("bca"), list("cab")]


def test_contended_blocks_are_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    from genrerank.bench import latency

    reports = iter([(1.5, 0.01), (0.0, 0.01), (0.0, 0.01)])  # first timed block: busy machine
    monkeypatch.setattr(latency.CpuProbe, "measure", lambda self: next(reports))
    waits: list[float] = []
    monkeypatch.setattr(latency, "wait_for_quiet",
                        lambda busy, limit: waits.append(limit) or 0.5)
    order: list[str] = []
    calls = {k: (lambda k=k: order.append(k)) for k in ("a", "b")}
    settings = LatencySettings(runs=2, warmup_runs=1, warmup_s=0.0, block_s=0.0)
    cell = time_cell(calls, settings)
    assert cell["rounds_discarded"] == 1 and cell["discarded_s"] == pytest.approx(0.01)
    assert waits == [pytest.approx(settings.max_discard_s - 0.01)]  # idled once, within budget
    assert cell["waited_for_quiet_s"] == 0.5
    assert cell["runs"] == 2 and all(s["runs"] == 2 for s in cell["variants"].values())
    assert cell["other_processes_cores"] == 0.0
    # warm-up, the discarded round, then two kept rounds; the rotation goes on regardless
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_wait_for_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    from genrerank.bench import latency

    reports = iter([(1.0, 0.01), (0.5, 0.01), (0.1, 0.01), (1.0, 0.01)])
    monkeypatch.setattr(latency.CpuProbe, "measure", lambda self: next(reports))
    waited = latency.wait_for_quiet(0.2, limit_s=10.0, poll_s=0.001)
    assert 0.003 <= waited < 1.0 and next(reports) == (1.0, 0.01)  # stopped at the quiet poll
    assert latency.wait_for_quiet(0.2, limit_s=0.0, poll_s=0.001) < 0.01  # no budget: no wait


def test_targets_judgement() -> None:
    def cell(n: int, m: int, b: int, ratios: dict[str, float]) -> dict[str, Any]:
        return {"preset": "x", "n": n, "m": m, "batch_size": b, "ratios": ratios}

    lines = targets([
        cell(60, 6, 1, {"nar4rec / pointwise": 1.4}),
        cell(500, 50, 1, {"autoregressive / nar4rec": 4.0, "no-cache / cache": 2.5}),
    ])
    assert [(t["ratio"], t["status"]) for t in lines] == [
        ("nar4rec / pointwise", "met"),
        ("autoregressive / nar4rec", "not met"),
        ("no-cache / cache", "met"),
    ]


def test_random_lists_use_real_candidates_only() -> None:
    import torch

    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    lists = random_lists(mask, 3, 5, seed=0)
    assert lists.shape == (2, 5, 3)
    assert set(lists[0].flatten().tolist()) <= {0, 1, 2}
    assert (lists[0] >= 0).all() and (lists[0].sort(-1).values == torch.arange(3)).all()
    assert (lists[1, :, 0] == 0).all() and (lists[1, :, 1:] == -1).all()


def test_missing_model_is_a_skip_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genrerank.models import MODELS

    monkeypatch.delitem(MODELS, "evaluator")
    settings = replace(TINY, presets=("avito",), batch_sizes=(1,), runs=2,
                       variants=("pointwise", "evaluator"))
    result = run_latency_benchmark(out_dir=tmp_path, settings=settings, progress=False)
    assert "evaluator" in result["skipped"]
    assert list(result["cells"][0]["variants"]) == ["pointwise"]
    assert "skipped" in (tmp_path / "latency.md").read_text()


def test_memory_child(tmp_path: Path) -> None:
    from genrerank.data.simulator import simulate_to_dir

    data = simulate_to_dir("avito", 4, 0, tmp_path / "avito", progress=False,
                           allow_missing_splits=True)
    mem = measure_memory(data, "pointwise", 2, LatencySettings(threads=1))
    assert "error" not in mem, mem
    assert mem["call_peak_mib"] >= 0 and mem["process_peak_mib"] > mem["call_peak_mib"]
    assert mem["method"]


def test_cli(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["bench", "latency", "--presets", "avito", "--batch-sizes",
                                    "1", "--runs", "2", "--threads", "1", "--no-memory",
                                    "--max-discard", "0", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "latency.json").read_text())
    assert result["machine"]["threads"] == 1 and result["settings"]["runs"] == 2
    assert result["cells"][0]["runs"] == 2
    bad = CliRunner().invoke(main, ["bench", "latency", "--presets", "nope", "--out",
                                    str(tmp_path)])
    assert bad.exit_code == 1 and "unknown preset" in bad.output
