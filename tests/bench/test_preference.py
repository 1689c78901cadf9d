"""``genrerank bench preference`` end to end at a toy scale: the teacher rows (the structured
model as reward model and proposer) are trained, compared and written; the numbers themselves
are the benchmark's business, not the test's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from genrerank.bench.preference import (
    PreferenceSettings,
    output_paths,
    run_preference_benchmark,
)

TEACHER_ROWS = ("teacher", "ge_k16_teacher", "dpo_teacher", "ppo_teacher")


def test_teacher_rows_run_end_to_end(tmp_path: Path) -> None:
    settings = PreferenceSettings(
        simulated={"kuaishou": 400}, epochs=1, patience=1, dim=8, ge_k=4,
        finetune_overrides=("train.epochs=1", "train.batch_size=64"),
        ppo_overrides=("loss.0.group_size=2", "train.eval_every=0"),
        upper_bound_beam_width=2, pareto=False, policies=TEACHER_ROWS, out_stem="toy")
    result = run_preference_benchmark(False, tmp_path, seeds=(0,), settings=settings)
    paths = output_paths(tmp_path, False, "toy")
    assert json.loads(paths["json"].read_text())["settings"]["policies"] == list(TEACHER_ROWS)
    record = result["datasets"]["kuaishou"]["records"][0]
    assert set(record["policies"]) == {"reference", *TEACHER_ROWS}
    assert "nearline" not in record  # no evaluator pairs were asked for
    assert record["nearline_teacher"]["winner_share"]
    check = record["nearline_teacher_oracle_check"]
    assert check["oracle_pick_gain"] >= check["evaluator_pick_gain"] - 1e-9
    for name in ("dpo_teacher", "ppo_teacher"):
        row = record["policies"][name]
        assert {"vs_reference", "vs_ge_k16_teacher", "vs_teacher"} <= set(row)
        assert math.isfinite(row["kl_to_reference"])  # a sampled estimate: may dip below 0
    assert all("teacher_engagement" in row for row in record["policies"].values())
    text = paths["md"].read_text()
    assert "structured reward" in text and "vs teacher" in text
    assert "How right is the structured model's reward?" in text


def test_unknown_policy_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown policies"):
        run_preference_benchmark(False, tmp_path, settings=PreferenceSettings(
            policies=("dpo", "sft")))
    assert not list(tmp_path.iterdir())
