"""Smoke test of ``genrerank bench quality`` on a tiny simulated avito world (no shared data).

One benchmark run (module fixture, two seeds so the std has something to be computed over), then
checks on its JSON, its files, and the evaluation calls it made (spied on).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from genrerank import experiment
from genrerank.bench import quality
from genrerank.bench.quality import (
    ABLATIONS,
    DECODING,
    DERIVED,
    FEATURES,
    MODELS,
    ROWS,
    QualitySettings,
    mean_std,
    output_paths,
    run_quality_benchmark,
    summarize,
    variant_overrides,
)

SEEDS = (0, 1)
SETTINGS = QualitySettings(
    simulated={"avito": 300},
    ablation_dataset="avito",  # ablations and decoding too, on the cheapest world
    epochs=1,
    patience=1,
    dim=8,
    batch_size=64,
    upper_bound_beam_width=2,
    k_values=(1, 2, 4),
    ge_k=2,
    ablation_seeds=2,
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("results")
    scratch = tmp_path_factory.mktemp("scratch")
    full = output_paths(out, quick=False)
    for path in full.values():
        path.write_text("full results")
    calls: list[dict[str, Any]] = []
    scores: list[dict[str, Any]] = []
    real_evaluate = quality.evaluate_model
    real_score = experiment.ListScorer.__call__

    def spy(model, dataset, decoder, decoder_params=None, name="model", beam_width=16,
            propensities=None):
        result = real_evaluate(model, dataset, decoder, decoder_params, name, beam_width,
                               propensities)
        calls.append({
            # The splits of the rows actually evaluated, read from the data, not from a label.
            "splits": set(dataset.table.column("split").to_pylist()),
            "decoder": decoder,
            "params": dict(decoder_params or {}),
            "result": result,
        })
        return result

    def score_spy(self, model, decoder, params):
        value = real_score(self, model, decoder, params)
        scores.append({"splits": set(self.valid.table.column("split").to_pylist()),
                       "decoder": decoder, "params": dict(params), "value": value})
        return value

    mp = pytest.MonkeyPatch()
    mp.setattr(quality, "evaluate_model", spy)
    # What model selection and every decoding choice score lists with.
    mp.setattr(experiment.ListScorer, "__call__", score_spy)
    mp.setattr(tempfile, "tempdir", str(scratch))  # so the test can see the work dir go
    try:
        result = run_quality_benchmark(
            quick=True, out_dir=out, seeds=SEEDS, shared_data=scratch / "absent",
            progress=False, settings=SETTINGS,
        )
    finally:
        mp.undo()
    return {"result": result, "calls": calls, "scores": scores, "out": out, "full": full,
            "scratch": scratch}


def test_json_structure(bench: dict[str, Any]) -> None:
    result = bench["result"]
    on_disk = json.loads(output_paths(bench["out"], quick=True)["json"].read_text())
    assert on_disk == result
    for key in ("date", "wall_time_s", "machine", "quick", "seeds", "settings", "configs",
                "what_varies", "targets", "datasets", "estimated_full_run_s"):
        assert key in result, key
    assert result["quick"] is True and result["seeds"] == list(SEEDS)
    avito = result["datasets"]["avito"]
    assert set(avito["runs"]) == set(MODELS) | set(ABLATIONS) | set(DERIVED)
    for variant, records in avito["runs"].items():
        assert [r["seed"] for r in records] == list(SEEDS), variant
        summary = avito["summary"][variant]
        assert {"auc", "gauc", "logloss", "ndcg@5", "recall@5", "list_gain"} <= set(
            summary["offline"])
        assert {"expected_gain", "headroom_captured", "category_entropy", "creator_gini",
                "cold_start_share"} <= set(summary["online"])
    assert set(avito["decoding"]["summary"]) == set(DECODING)
    assert len(avito["decoding"]["runs"]) == len(SEEDS)
    # The data seed differs per seed on the simulator.
    assert len(set(avito["data"]["data_seeds"])) == len(SEEDS)
    # No shared data: the real logs are skipped with a reason.
    for name in ("mind", "ebnerd"):
        assert "not found" in result["datasets"][name]["skipped"]
    # Same budget for every trained model.
    budgets = {(c["train"]["epochs"], c["train"]["patience"], c["train"]["batch_size"])
               for c in result["configs"].values()}
    assert budgets == {(1, 1, 64)}
    widths = {c["model"]["dim"] for c in result["configs"].values() if "dim" in c["model"]}
    assert widths == {8}
    assert "logging" in result["configs"]  # the baseline is trained by the same trainer
    assert set(result["targets"]) == {"a", "b", "d", "e", "f", "g"}
    # The learnable-ceiling rows come from the oracle, between the logging policy and the bound.
    for row in quality.CEILINGS:
        gain = avito["summary"][row]["online"]["expected_gain"]["mean"]
        bound = avito["summary"]["logging"]["online"]["upper_bound_expected_gain"]["mean"]
        assert gain <= bound + 1e-9


def test_generator_evaluator_section(bench: dict[str, Any]) -> None:
    result = bench["result"]
    ge = result["datasets"]["avito"]["generator_evaluator"]
    assert len(ge["runs"]) == len(SEEDS)
    families = ge["summary"]["families"]
    assert set(families) == set(quality.GE_FAMILIES)
    for per_k in families.values():
        assert set(per_k) == {"1", "2", "4"}
        for row in per_k.values():
            # A perfect evaluator can only do better than the trained one on the same lists.
            assert row["oracle_pick_expected_gain"]["mean"] >= row["expected_gain"]["mean"] - 1e-9
            assert row["distinct_lists_mean"]["mean"] <= 4
    assert 0.0 <= ge["summary"]["evaluator"]["offline"]["click_auc"]["mean"] <= 1.0
    d = result["targets"]["d"]
    assert d["status"] in ("met", "not met")
    assert d["best_single"] in {*ROWS, *(f"{f} (K=1)" for f in families)}
    assert output_paths(bench["out"], quick=True)["kcurve"].stat().st_size > 10_000
    md = output_paths(bench["out"], quick=True)["md"].read_text()
    assert "## Generator-evaluator (avito, test split)" in md and "(c) on avito" in md


def test_std_is_over_seeds(bench: dict[str, Any]) -> None:
    avito = bench["result"]["datasets"]["avito"]
    for variant in ("pointwise", "nar4rec"):
        runs = avito["runs"][variant]
        for section, metric in (("online", "expected_gain"), ("offline", "ndcg@5")):
            values = [r[section][metric] for r in runs]
            stat = avito["summary"][variant][section][metric]
            assert stat["values"] == pytest.approx(values)
            assert stat["n"] == len(SEEDS)
            assert stat["mean"] == pytest.approx(np.mean(values))
            assert stat["std"] == pytest.approx(np.std(values, ddof=1))


def test_mean_std_and_summarize() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3,
                                         "values": [1.0, 2.0, 3.0]}
    one = mean_std([0.5])
    assert one["mean"] == 0.5 and one["std"] is None  # no std from a single seed
    nan = mean_std([1.0, float("nan"), 3.0])
    assert nan["n"] == 2 and nan["values"][1] is None and nan["std"] == pytest.approx(math.sqrt(2))
    s = summarize([{"offline": {"auc": 0.6, "requests": 10}}, {"offline": {"auc": 0.8,
                                                                          "requests": 10}}])
    assert set(s["offline"]) == {"auc"}  # counts are not metrics
    assert s["offline"]["auc"]["mean"] == pytest.approx(0.7)


def test_decoding_is_selected_on_valid_and_reported_on_test(bench: dict[str, Any]) -> None:
    scores, calls = bench["scores"], bench["calls"]
    # Model selection and decoding choices score lists on the valid split only; everything
    # reported is on test.
    assert scores and all(c["splits"] == {"valid"} for c in scores)
    assert calls and all(c["splits"] == {"test"} for c in calls)
    avito = bench["result"]["datasets"]["avito"]
    auto = [v for v in ABLATIONS if v.startswith("nar4rec")]
    selected = [r for v in (*auto, *DERIVED, "autoregressive") for r in avito["runs"][v]]
    assert selected and all(r["decode_selection"] for r in selected)
    for run in selected:
        sel = run["decode_selection"]
        assert sel["split"] == "valid" and sel["criterion"] == "expected_gain"
        # The chosen decoder is the best on valid, and it is what was reported on test.
        assert sel["values"][sel["chosen"]] == max(sel["values"].values())
        params = {k: v for k, v in run["decoder"].items() if k != "name"}
        assert quality._selection({"scores": {}}, run["decoder"]["name"], params)[
            "chosen"] == sel["chosen"]
    sat = avito["runs"]["pointwise_satiation"]
    assert all(r["decoder"]["name"] == "satiation" for r in sat)
    assert all(r["decoder"]["penalty"] in experiment.PENALTY_GRID for r in sat)
    # The decoding table's contrastive row is the nar4rec run with its valid-chosen decoder.
    for run, dec in zip(avito["runs"]["nar4rec"], avito["decoding"]["runs"], strict=True):
        assert dec["contrastive"]["decoder"] == run["decoder"]


def test_quick_does_not_overwrite_full(bench: dict[str, Any]) -> None:
    quick = output_paths(bench["out"], quick=True)
    assert {p.name for p in quick.values()} == {"quality_quick.json", "quality_quick.md",
                                                "quality_quick.png", "quality_quick_kcurve.png"}
    for path in bench["full"].values():
        assert path.read_text() == "full results"
    md = quick["md"].read_text()
    for heading in ("## avito", "## Ablations", "## Decoding strategies", "## Targets", " ± "):
        assert heading in md
    assert quick["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_work_dir_is_removed(bench: dict[str, Any]) -> None:
    assert "work_dir" not in bench["result"]
    assert not list(Path(bench["scratch"]).glob("genrerank-quality-*"))


def test_variants_change_only_the_named_loss_terms() -> None:
    base = quality.resolve_config("nar4rec")["loss"]
    for name in ("unlikelihood", "likelihood"):
        model, (override,) = variant_overrides(f"nar4rec_{name}")
        terms = json.loads(override.split("=", 1)[1])
        assert model == "nar4rec"
        assert [t["name"] for t in terms] == [
            name if t["name"] == "gain_bce" else t["name"] for t in base]
    assert variant_overrides("pointwise") == ("pointwise", ())
    assert variant_overrides("pointwise_no_affinity") == (
        "pointwise", ("model.features.affinity=false",))
    assert variant_overrides("pointwise_with_interaction") == (
        "pointwise", ("model.features.interaction=true",))
    assert variant_overrides("nar4rec_no_list_context") == (
        "nar4rec", ("model.list_context=false",))
    assert variant_overrides("pointwise_no_min_count") == (
        "pointwise", ("model.features.min_count=0",))
    model, off = variant_overrides("pointwise_no_features")
    assert model == "pointwise" and off == tuple(
        f"model.features.{f}={0 if f == 'min_count' else 'false'}" for f in FEATURES)
    for bad in ("pointwise_no_colour", "pointwise_with_features", "pointwise_with_min_count"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_overrides(bad)


def test_ablation_variants_are_checked_before_any_work(tmp_path: Path) -> None:
    settings = QualitySettings.quick()
    settings.ablation_variants = ("nar4rec_no_list_context", "pointwise_no_colour")
    with pytest.raises(ValueError, match="unknown ablation variant"):
        run_quality_benchmark(quick=True, out_dir=tmp_path, settings=settings, progress=False)
    assert not any(tmp_path.iterdir())


def test_merge_replaces_only_the_rows_measured_again(bench: dict[str, Any], tmp_path: Path
                                                      ) -> None:
    out = tmp_path / "results"
    out.mkdir()
    first = output_paths(bench["out"], quick=True)["json"]
    earlier = json.loads(first.read_text())
    earlier["invocations"] = "an older file's description"  # older files hold one string
    (out / first.name).write_text(json.dumps(earlier))
    before = json.loads(first.read_text())["datasets"]["avito"]
    settings = QualitySettings(simulated={"avito": 300}, ablation_dataset="avito", epochs=1,
                               patience=1, dim=8, batch_size=64, upper_bound_beam_width=2,
                               ablations=False, models=("structured",))
    merged = run_quality_benchmark(quick=True, out_dir=out, seeds=SEEDS, progress=False,
                                   shared_data=tmp_path / "absent", settings=settings,
                                   merge=True)
    avito = merged["datasets"]["avito"]
    # The structured rows are the new ones; every other row is the first run's, untouched.
    assert [r["seed"] for r in avito["runs"]["structured"]] == list(SEEDS)
    for variant, records in before["runs"].items():
        if variant != "structured":
            assert avito["runs"][variant] == records, variant
    assert avito["generator_evaluator"] == before["generator_evaluator"]
    assert avito["summary"]["structured"] == summarize(avito["runs"]["structured"])
    assert merged["invocations"][0] == "an older file's description"
    assert merged["invocations"][-1]["models"] == ["structured"]
    assert len(merged["invocations"]) == 2
    md = output_paths(out, quick=True)["md"].read_text()
    assert "- an older file's description" in md and ": structured on avito" in md
    # Other seeds than the file's are refused before any work.
    with pytest.raises(ValueError, match="seeds"):
        run_quality_benchmark(quick=True, out_dir=out, seeds=(5,), progress=False,
                              shared_data=tmp_path / "absent", settings=settings, merge=True)
