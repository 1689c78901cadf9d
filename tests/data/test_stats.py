"""``data stats`` on a data set with signals of any name."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.data.stats import dataset_stats


def test_stats_report_named_signals_by_kind(purchase_dataset: Path) -> None:
    stats = dataset_stats(purchase_dataset)
    labels = stats["labels"]
    # purchase = tiny's clicks: 3 of 7 exposed items; dwell 10, 20 (x2) and 10, 20, 30.
    assert labels["purchase"] == {"positives": 3, "exposed": 7, "rate": pytest.approx(3 / 7)}
    assert labels["dwell"] == {"mean": pytest.approx(120 / 7), "nonzero_rate": 1.0,
                               "exposed": 7}
    assert labels["click"] == "absent" and labels["watch_time"] == "absent"
    assert stats["gain_weights"] == {"purchase": 2.0, "dwell": 0.0}
    assert stats["click_signal"] == "purchase"
    result = CliRunner().invoke(main, ["data", "stats", str(purchase_dataset)])
    assert result.exit_code == 0, result.output
    assert "  purchase: rate 0.4286 (3 / 7)" in result.output
    assert "  dwell: mean 17.14, non-zero 1.0000" in result.output  # no unit: not watch_time
    assert "gain weights (list metrics, gain losses): purchase 2, dwell 0" in result.output
    assert "click signal (click head, AUC, clicks@k): purchase" in result.output
