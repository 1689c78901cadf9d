"""Progress reports: a bar on a terminal, plain timed lines in a log file, nothing disabled."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from genrerank.utils.progress import INTERVAL_ENV, format_seconds, progress


class Clock:
    """A fake monotonic clock that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_interval_with_rate_and_time_left() -> None:
    clock, log = Clock(), io.StringIO()
    bar = progress(range(4000), "train epoch 3/15", "steps", interval=30, clock=clock,
                   stream=log)
    for i, _ in enumerate(bar):
        clock.now += 0.01  # 100 steps/s
        if i == 2999:
            bar.set_postfix(loss="0.4321")
    lines = log.getvalue().splitlines()
    # One line per 30 s of a 40 s loop, then the final one.
    assert len(lines) == 2
    assert re.fullmatch(r"train epoch 3/15: 3001/4000 steps \(75%\), 100 steps/s, "
                        r"elapsed 30 s, remaining 10 s, loss 0\.4321", lines[0]), lines[0]
    assert lines[1] == "train epoch 3/15: 4000/4000 steps (100%), 100 steps/s, elapsed 40 s, " \
                       "loss 0.4321"


def test_counting_with_update_and_a_resumed_start() -> None:
    clock, log = Clock(), io.StringIO()
    with progress(None, "rerank", "requests", total=1000, initial=600, interval=5,
                  clock=clock, stream=log) as bar:
        for _ in range(4):
            clock.now += 2.0
            bar.update(50)  # 25 requests/s: the rate counts this run's work only
    lines = log.getvalue().splitlines()
    assert lines[0] == ("rerank: 750/1000 requests (75%), 25.0 requests/s, elapsed 6 s, "
                        "remaining 10 s")
    assert lines[-1] == "rerank: 800/1000 requests (80%), 25.0 requests/s, elapsed 8 s"
    assert len(lines) == 2
    log2 = io.StringIO()
    with progress(500, "rerank", "requests", interval=0, clock=clock, stream=log2) as bar:
        bar.update(100)
    assert log2.getvalue().splitlines()[0].startswith("rerank: 100/500 requests (20%)")


def test_disabled_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0")
    for stream in (io.StringIO(), Tty()):
        assert list(progress(range(5), "x", "steps", enabled=False, stream=stream)) == [
            0, 1, 2, 3, 4]
        assert stream.getvalue() == ""


def test_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, log = Clock(), io.StringIO()
    monkeypatch.setenv(INTERVAL_ENV, "2")
    for _ in progress(range(10), "sim", "chunks", clock=clock, stream=log):
        clock.now += 1.0
    # Every 2 s of 10; at the end only the final line (no "remaining 0 s" line before it).
    assert [ln.split(" chunks")[0] for ln in log.getvalue().splitlines()] == [
        "sim: 2/10", "sim: 4/10", "sim: 6/10", "sim: 8/10", "sim: 10/10"]
    assert "remaining" not in log.getvalue().splitlines()[-1]
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.warns(UserWarning, match=INTERVAL_ENV):
        bar = progress(range(3), "sim", "chunks", clock=clock, stream=io.StringIO())
    assert bar.interval == 30.0


def test_a_terminal_gets_a_tqdm_bar() -> None:
    term = Tty()
    for _ in progress(range(3), "simulate kuaishou", "chunks", stream=term):
        pass
    text = term.getvalue()
    assert "\r" in text and "simulate kuaishou" in text and "3/3" in text
    assert "remaining" not in text  # tqdm's own format, not the log lines


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0.4, 14, 65, 3600 + 7 * 60 + 3)] == [
        "0 s", "14 s", "1 min 05 s", "1 h 07 min"]
    assert format_seconds(float("inf")) == "?"


def test_training_and_the_simulator_report_in_a_log(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from genrerank.data.dataset import RerankDataset
    from genrerank.data.simulator import simulate_to_dir
    from genrerank.training import Trainer
    from tests.training import TinyObjective, make_model, small_config

    monkeypatch.setenv(INTERVAL_ENV, "0")  # a line per step
    data = simulate_to_dir("avito", 100, 0, tmp_path / "sim", progress=True)
    err = capsys.readouterr().err
    assert re.search(r"^simulate avito: 1/1 chunks \(100%\), .*elapsed \d+ s$", err, re.M), err
    train, valid = RerankDataset(data, split="train"), RerankDataset(data, split="valid")
    steps = -(-len(train) // 32)
    for shown in (True, False):
        trainer = Trainer(make_model(train.spec), TinyObjective(), train, valid,
                          small_config(epochs=2, progress=shown), tmp_path / f"run{shown}")
        trainer.fit()
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("train epoch")]
        if not shown:
            assert lines == []
            continue
        # One line per step (the last one only as the final line), per epoch.
        assert len(lines) == 2 * steps
        assert re.fullmatch(rf"train epoch 2/2: 1/{steps} steps \(\d+%\), [\d.]+ steps/s, "
                            r"elapsed \d+ s, remaining \d+ s, loss \d\.\d{4}",
                            lines[steps]), lines[steps]
