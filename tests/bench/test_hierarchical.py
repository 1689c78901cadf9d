"""Smoke test of ``genrerank bench hierarchical`` (tiny data and budget): every row, the JSON,
the Markdown and the plot, the target check, ``--merge`` and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from genrerank.bench.hierarchical import (
    ROWS,
    HierarchicalSettings,
    output_paths,
    run_hierarchical_benchmark,
    targets,
)
from genrerank.bench.quality import QualitySettings
from genrerank.cli import main

TINY = HierarchicalSettings(simulated={"kuaishou": 300},
                            budget=QualitySettings(epochs=1, patience=1, dim=16, batch_size=64),
                            latency_requests=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("hierarchical")
    return run_hierarchical_benchmark(True, out, settings=TINY, progress=False), out


def test_every_row_has_the_oracle_columns_and_a_latency(run: tuple[dict[str, Any], Path]
                                                        ) -> None:
    result, _ = run
    ds = result["datasets"]["kuaishou"]
    assert set(ds["summary"]) == set(ROWS)
    for row in ROWS:
        (record,) = ds["runs"][row]
        online = record["online"]
        for key in ("expected_gain", "headroom_captured", "category_entropy"):
            assert isinstance(online[key], float)
        assert record["latency"]["requests"] == 3 and record["latency"]["median_ms"] > 0
    # The derived rows decode the trained hierarchical run at another slack.
    assert ds["runs"]["hierarchical_no_plan"][0]["decoder"]["slack"] == -1
    assert ds["runs"]["hierarchical_slack1"][0]["decoder"]["slack"] == 1
    # The trained rows were selected on valid (their valid list score is recorded).
    for row in ("autoregressive", "hierarchical", "nar4rec"):
        assert "list_score" in ds["summary"][row]["valid"]
    assert ds["invocation"]["seeds"] == [0]


def test_files_and_targets(run: tuple[dict[str, Any], Path]) -> None:
    result, out = run
    paths = output_paths(out, quick=True)
    assert json.loads(paths["json"].read_text())["targets"] == result["targets"]
    md = paths["md"].read_text()
    assert "## kuaishou" in md and "hierarchical_no_plan" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t = result["targets"]
    assert t["status"] in ("met", "missed")
    assert t["gain_at_least_autoregressive"] == (t["hierarchical_gain"]
                                                 >= t["autoregressive_gain"])
    assert targets({"datasets": {}}) == {"status": "not run"}


def test_merge_keeps_the_other_data_sets(run: tuple[dict[str, Any], Path],
                                         tmp_path: Path) -> None:
    result, _ = run
    path = output_paths(tmp_path, quick=True)["json"]
    earlier = {"datasets": {"large": result["datasets"]["kuaishou"]}}
    path.write_text(json.dumps(earlier))
    # A run whose data set list is empty: only the merge happens.
    empty = HierarchicalSettings(simulated={}, budget=TINY.budget, latency_requests=1)
    merged = run_hierarchical_benchmark(True, tmp_path, settings=empty, progress=False,
                                        merge=True)
    assert merged["datasets"] == earlier["datasets"]
    assert "## large" in output_paths(tmp_path, quick=True)["md"].read_text()
    # Without --merge the earlier data sets are gone.
    alone = run_hierarchical_benchmark(True, tmp_path, settings=empty, progress=False)
    assert alone["datasets"] == {}


def test_command_line_checks_datasets(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["bench", "hierarchical", "--datasets", "kuaishou",
                                    "--out", str(tmp_path)])
    assert res.exit_code != 0 and "PRESET=REQUESTS" in res.output
