"""The README's "Your own logs" walk-through, run as it stands: from a CSV of impressions to a
served re-ranker. A README change that breaks a step breaks this test."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from genrerank.bench.walkthrough import readme_walkthrough, run_walkthrough


def test_readme_walkthrough_runs_from_csv_to_served_lists(tmp_path: Path) -> None:
    script = readme_walkthrough()
    assert "genrerank data import --input" in script and "genrerank serve" in script
    result = run_walkthrough(tmp_path, script)
    assert result.returncode == 0, result.output[-4000:]
    shop = tmp_path / "shop"

    report = json.loads((shop / "data" / "import_report.json").read_text())
    assert report["requests"] == 2000
    evaluation = json.loads((shop / "nar4rec.json").read_text())
    assert evaluation  # metrics of the test split were written

    lists = pq.read_table(shop / "lists.parquet")
    assert lists.num_rows == report["splits"]["test"]
    for items, index in zip(lists.column("item_id").to_pylist(),
                            lists.column("candidate_index").to_pylist(), strict=True):
        assert len(items) == len(set(items)) == len(index) == 10

    # The served answer is the last line printed: the request's candidates, re-ranked.
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    request = json.loads((shop / "request.json").read_text())
    assert sorted(answer["items"]) == sorted(request["candidates"]["ids"])
    assert answer["model_version"].startswith("nar4rec-")
    assert [step.command.split()[:3] for step in result.steps][:2] == [
        ["genrerank", "data", "example"], ["genrerank", "data", "import"]]
