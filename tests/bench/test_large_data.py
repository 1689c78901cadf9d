"""The large-data benchmark end to end at a tiny size: both phases in child processes, their
peak RSS measured, the results written."""

from __future__ import annotations

import json
from pathlib import Path

from genrerank.bench.large_data import run_large_data_benchmark


def test_large_data_benchmark_runs_both_phases(tmp_path: Path) -> None:
    result = run_large_data_benchmark(1500, 600, tmp_path / "results", tmp_path / "work",
                                      quick=True, batch_size=128, sample_requests=500)
    write, train = result["write"], result["train"]
    assert write["requests"] == 1500 and write["shards"] == 3
    assert write["disk_bytes"] > 0 and write["peak_rss_bytes"] > 50 * 2**20
    assert train["epoch_complete"] and train["trained_requests"] == train["epoch_requests"] == 1200
    assert train["statistics_sample_requests"] == 500
    assert train["peak_rss_bytes"] > 50 * 2**20 and train["requests_per_second"] > 0
    saved = json.loads((tmp_path / "results" / "large_data_quick.json").read_text())
    assert saved["train"]["steps"] == 10
    assert "| train (pointwise, streaming) |" in (tmp_path / "results" /
                                                  "large_data_quick.md").read_text()
    assert not (tmp_path / "work" / "kuaishou").exists()  # the data set is removed


def test_large_data_benchmark_with_the_shared_trainer(tmp_path: Path) -> None:
    result = run_large_data_benchmark(1200, 500, tmp_path / "results", tmp_path / "work",
                                      quick=True, batch_size=128, sample_requests=400,
                                      trainer=True)
    train = result["train"]
    assert train["trainer"] == "genrerank Trainer"
    assert train["epoch_complete"] and train["epoch_requests"] == 960
    assert train["steps"] == 8 and train["valid_requests"] == 120
    assert (tmp_path / "work" / "run" / "best").is_dir()
