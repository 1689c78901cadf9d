from __future__ import annotations

import json
from pathlib import Path

from genrerank.bench.importing import run_import_benchmark
from genrerank.bench.walkthrough import run_walkthrough


def test_import_benchmark_writes_its_results(tmp_path: Path) -> None:
    result = run_import_benchmark(500, tmp_path, walkthrough=False)
    saved = json.loads((tmp_path / "import.json").read_text())
    assert saved["import"]["rows"] == result["import"]["rows"] == 500
    assert saved["import"]["requests"] == 50
    assert 0 < saved["import"]["peak_rss_bytes"] < 8 * 2**30
    assert "| rows | requests |" in (tmp_path / "import.md").read_text()


def test_walkthrough_steps_are_timed_in_order_and_a_failing_step_stops_it(tmp_path: Path) -> None:
    done = run_walkthrough(tmp_path / "a", "echo one\nsleep 0.3\necho two > out.txt\n")
    assert done.returncode == 0 and done.stdout == "one\n"
    assert [s.command for s in done.steps] == ["echo one", "sleep 0.3", "echo two > out.txt"]
    assert done.steps[1].seconds >= 0.29
    assert (tmp_path / "a" / "out.txt").read_text() == "two\n"
    failed = run_walkthrough(tmp_path / "b", "echo one\nfalse\necho never\n")
    assert failed.returncode != 0 and "never" not in failed.stdout
