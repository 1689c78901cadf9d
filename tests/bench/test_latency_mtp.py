"""Smoke test of the multi-token prediction section of ``genrerank bench latency`` (tiny
training, a few requests and runs): its structure, the identical-lists guarantee, the targets,
and ``--variants`` on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from genrerank.bench.latency import LatencySettings, output_paths, run_latency_benchmark
from genrerank.bench.latency_mtp import MTP_VARIANTS, REFERENCE, mtp_targets
from genrerank.cli import main

TINY = LatencySettings(variants=(), runs=3, min_runs=2, warmup_runs=1, warmup_s=0.0,
                       memory=False, threads=1, max_discard_s=0.0, mtp_presets=("kuaishou",),
                       mtp_train_requests=60, mtp_epochs=1, mtp_batch_size=16,
                       mtp_eval_requests=6, mtp_timed_requests=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("latency_mtp")
    return run_latency_benchmark(out_dir=out, settings=TINY, progress=False), out


def test_section_structure(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    assert result["cells"] == []  # only MTP variants asked for: no random-weight grid
    section = result["mtp"]
    assert section["heads"] == TINY.mtp_heads
    (entry,) = section["presets"]
    assert (entry["preset"], entry["n"], entry["m"], entry["batch_size"]) == ("kuaishou", 60, 6,
                                                                              1)
    assert entry["eval_requests"] == 6 and entry["timed_requests"] == 3
    training = entry["training"]
    assert training["steps"] >= 1 and training["config"]["mtp_heads"] == TINY.mtp_heads
    assert {"name": "mtp", "weight": TINY.mtp_weight, "target": "model"} in training["loss"]
    assert list(entry["variants"]) == [REFERENCE, *MTP_VARIANTS]
    ref = entry["variants"][REFERENCE]
    assert ref["steps_per_list"] == 6.0 and ref["speedup_p50"] == 1.0
    verified = entry["variants"]["autoregressive_mtp"]
    assert verified["identical_to_greedy"] == 1.0  # by construction
    unverified = entry["variants"]["autoregressive_mtp_unverified"]
    for stats in (verified, unverified):
        assert 1 <= stats["steps_min"] <= stats["steps_per_list"] <= stats["steps_max"] <= 6
        assert 0.0 <= stats["acceptance"] <= 1.0 and 0.0 <= stats["identical_to_greedy"] <= 1.0
        assert stats["step_reduction"] == pytest.approx(6.0 / stats["steps_per_list"])
    # Unchecked proposals: every call keeps k + 1 items after the first call's one.
    assert unverified["steps_per_list"] == 1 + -(-(6 - 1) // (TINY.mtp_heads + 1))
    assert unverified["acceptance"] == 1.0
    for stats in entry["variants"].values():
        assert stats["runs"] == 3 and 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["max_ms"]
        assert stats["speedup_p50"] == pytest.approx(ref["p50_ms"] / stats["p50_ms"])
    # No m = 50 preset in this run: the targets say so instead of inventing a value.
    assert [t["status"] for t in section["targets"]] == ["not measured"] * 3


def test_files(run: tuple[dict[str, Any], Path]) -> None:
    result, out = run
    paths = output_paths(out, quick=False, mtp_only=True)
    assert paths["json"].name == "latency_mtp.json"  # a full run's latency.json stays
    assert not output_paths(out, quick=False)["json"].exists()
    assert json.loads(paths["json"].read_text()) == result
    md = paths["md"].read_text()
    assert "## Multi-token prediction" in md and "autoregressive_mtp_unverified" in md
    assert "identical to greedy" in md and "## p50 / p99" not in md  # no grid this time
    assert "--variants autoregressive_mtp,autoregressive_mtp_unverified" in md


def test_targets_judgement() -> None:
    def preset(m: int, steps: float, speed: float, same: float) -> dict[str, Any]:
        return {"preset": "x", "n": 10 * m, "m": m, "variants": {"autoregressive_mtp": {
            "step_reduction": steps, "speedup_p50": speed, "identical_to_greedy": same}}}

    lines = mtp_targets([preset(6, 9.0, 9.0, 1.0), preset(50, 2.4, 1.3, 1.0)])
    assert [(t["measure"], t["value"], t["status"]) for t in lines] == [
        ("step_reduction", 2.4, "met"), ("speedup_p50", 1.3, "not met"),
        ("identical_to_greedy", 1.0, "met")]


def test_cli_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genrerank.bench import latency

    seen: list[LatencySettings] = []
    monkeypatch.setattr(latency, "run_latency_benchmark",
                        lambda quick, out_dir, settings: seen.append(settings))
    args = ["bench", "latency", "--out", str(tmp_path), "--variants"]
    res = CliRunner().invoke(main, [*args, "autoregressive,autoregressive_mtp"])
    assert res.exit_code == 0, res.output
    assert seen[-1].variants == ("autoregressive",)
    assert seen[-1].mtp_variants == ("autoregressive_mtp",)
    res = CliRunner().invoke(main, [*args, "autoregressive_mtp,autoregressive_mtp_unverified",
                                    "--presets", "large", "--quick"])
    assert res.exit_code == 0, res.output
    assert seen[-1].variants == () and seen[-1].mtp_presets == ("large",)
    assert seen[-1].mtp_variants == tuple(MTP_VARIANTS)
    assert seen[-1].mtp_train_requests == LatencySettings.quick().mtp_train_requests
    monkeypatch.undo()
    bad = CliRunner().invoke(main, [*args, "autoregressive_nope"])
    assert bad.exit_code == 1 and "autoregressive_mtp" in bad.output
