"""The list ceiling on a model's own appeal (evaluation/ceilings.py, Simulator.list_ceiling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genrerank.data.dataset import RerankDataset
from genrerank.data.simulator import Simulator, request_index, simulate_to_dir
from genrerank.evaluation.ceilings import fit_calibration, list_ceiling, model_appeal
from genrerank.models import build_model


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_to_dir("kuaishou", 120, 3, tmp_path_factory.mktemp("sim") / "d",
                           progress=False)


def test_calibration_is_least_squares_over_real_candidates() -> None:
    truth = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 5.0]])
    estimate = 2.0 * truth + 1.0
    estimate[1, 2] = np.nan  # padding: ignored
    slope, intercept = fit_calibration(estimate, truth)
    assert slope == pytest.approx(0.5) and intercept == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="constant"):
        fit_calibration(np.ones((2, 3)), truth)


def test_the_true_appeal_gives_the_upper_bound_and_bad_appeal_is_refused(sim: Path) -> None:
    data = RerankDataset(sim, split="test")
    simulator = Simulator.from_spec(data.spec)
    state = simulator.requests(request_index(data.request_ids))
    _, upper = simulator.upper_bound(state, beam_width=4)
    assert np.allclose(simulator.list_ceiling(state, state.appeal, beam_width=4), upper)
    # Knowing less lowers it (on average): here, appeal shuffled within each request.
    rng = np.random.default_rng(0)
    shuffled = rng.permuted(state.appeal, axis=1)
    assert simulator.list_ceiling(state, shuffled, beam_width=4).mean() < upper.mean()
    with pytest.raises(ValueError, match="appeal must be"):
        simulator.list_ceiling(state, state.appeal[:, :5])
    bad = state.appeal.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        simulator.list_ceiling(state, bad)


def test_list_ceiling_of_a_model(sim: Path) -> None:
    valid, test = RerankDataset(sim, split="valid"), RerankDataset(sim, split="test")
    torch.manual_seed(0)
    model = build_model("pointwise", test.spec, {"dim": 8, "hidden": 8}).eval()
    appeal = model_appeal(model, test)
    assert appeal.shape == (len(test), test.spec.max_candidates)
    out = list_ceiling(model, valid, test, beam_width=2)
    assert out["requests"] == len(test) and out["calibration"]["fitted_on"] == "valid"
    for key in ("sort_headroom", "beam_headroom", "appeal_correlation", "beam_expected_gain"):
        assert np.isfinite(out[key]), key
    # The sort row is the model's own greedy list: sorting its click logits at position 0.
    order = np.argsort(-appeal, axis=1, kind="stable")[:, :6]
    simulator = Simulator.from_spec(test.spec)
    state = simulator.requests(request_index(test.request_ids))
    assert out["sort_expected_gain"] == pytest.approx(
        float(simulator.expected_gain(state, order).mean()))


def test_cli_list_ceiling_is_for_runs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from genrerank.cli import main

    config = tmp_path / "pipeline.json"
    config.write_text("{}")
    result = CliRunner().invoke(main, ["evaluate", "--pipeline", str(config), "--data",
                                       str(tmp_path), "--list-ceiling"])
    assert result.exit_code != 0 and "--list-ceiling applies to --run" in result.output
