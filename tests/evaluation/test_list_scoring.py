"""Assessing a list evaluator on a tiny simulated data set: ranges, determinism, the lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.evaluation.list_scoring import (
    candidate_lists,
    evaluate_list_scorer,
    generator_names,
)
from genrerank.experiment import evaluate_run, train_run
from genrerank.models import build_model


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 64, 0, out, progress=False)
    return out


@pytest.fixture(scope="module")
def data(sim_dir) -> RerankDataset:
    return RerankDataset(sim_dir, split=["valid", "test"])


@pytest.fixture(scope="module")
def model(data: RerankDataset) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("evaluator", data.spec, {"dim": 16}).eval()


def test_candidate_lists_are_valid_lists(data: RerankDataset) -> None:
    batch = collate([data[i] for i in range(len(data))])
    lists = candidate_lists(batch, np.random.default_rng(0))
    names = generator_names()
    assert lists.shape == (len(data), len(names), 6)
    n = batch.candidate_mask.sum(1).numpy()
    for b in range(len(data)):
        for k in range(len(names)):
            row = lists[b, k]
            assert (row >= 0).all() and (row < n[b]).all()
            assert len(set(row.tolist())) == 6  # no repeated item
    np.testing.assert_array_equal(lists[:, 0], batch.exposed.numpy())  # the logged list
    np.testing.assert_array_equal(lists[:, 1], np.tile(np.arange(6), (len(data), 1)))
    bring_in = [k for k, name in enumerate(names) if name.startswith("bring_in")]
    assert (lists[:, bring_in] >= 6).any(-1).all()  # brings in an item beyond position m


def test_evaluate_list_scorer_ranges_and_determinism(model, data: RerankDataset) -> None:
    first = evaluate_list_scorer(model, data, seed=3)
    again = evaluate_list_scorer(model, data, seed=3)
    assert json.dumps(first) == json.dumps(again)
    assert first["requests"] == len(data)
    for s in ("click", "like", "long_view"):
        metrics = first["offline"]["signals"][s]
        assert metrics["auc"] is None or 0.0 <= metrics["auc"] <= 1.0
        assert metrics["logloss"] > 0 and 0 < metrics["mean_predicted"] < 1
    oracle = first["oracle"]
    assert oracle["lists_per_request"] == len(generator_names())
    for key in ("spearman_pooled", "spearman_within_request"):
        assert -1.0 <= oracle[key] <= 1.0
        assert -1.0 <= oracle["undiscounted_score"][key] <= 1.0
    assert 0 < oracle["spearman_within_request_n"] <= len(data)
    assert 0.0 <= oracle["pick_is_best_rate"] <= 1.0
    # The best of K is at least every single list, including the evaluator's pick.
    best = oracle["best_of_k_gain"]
    for key in ("evaluator_pick_gain", "logged_gain", "upstream_gain", "random_pick_gain"):
        assert 0.0 <= oracle[key] <= best + 1e-9
    assert sum(oracle["picked_family_share"].values()) == pytest.approx(1.0)
    other = evaluate_list_scorer(model, data, seed=4)
    assert other["oracle"]["spearman_pooled"] != first["oracle"]["spearman_pooled"]
    with pytest.raises(ValueError, match="list evaluator"):
        evaluate_list_scorer(build_model("pointwise", data.spec), data)


def test_train_and_evaluate_run(sim_dir, tmp_path) -> None:
    run = tmp_path / "run"
    best = train_run("evaluator", sim_dir, run, overrides=("train.epochs=1", "model.dim=16"))
    assert np.isfinite(best["loss"])
    result = evaluate_run(run, sim_dir, tmp_path / "eval.json")
    assert result["model"] == "evaluator" and "oracle" in result
    assert json.loads((tmp_path / "eval.json").read_text())["oracle"] == result["oracle"]
