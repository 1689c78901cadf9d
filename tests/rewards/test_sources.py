"""Signal sources: logged labels, the evaluator, the simulator's oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.simulator import Simulator, request_index, simulate_to_dir
from genrerank.models import build_model
from genrerank.models.evaluator import ListEvaluator
from genrerank.rewards import (
    EvaluatorSignals,
    ListReward,
    LoggedSignals,
    OracleSignals,
    require_training_source,
)
from tests.rewards.test_terms import hand_batch


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 64, 0, out, progress=False)
    return out


def random_lists(batch, k: int, m: int, seed: int, holes: bool = True) -> torch.Tensor:
    """[B, K, m] distinct real candidates per list; with ``holes`` some empty slots inside."""
    g = torch.Generator().manual_seed(seed)
    b = batch.batch_size
    out = torch.full((b, k, m), -1)
    n = batch.candidate_mask.sum(1)
    for i in range(b):
        for j in range(k):
            out[i, j] = torch.randperm(int(n[i]), generator=g)[:m]
    if holes:
        out[:, 0, 1] = -1
        out[:, -1, m // 2:] = -1
    return out


def test_logged_accepts_the_logged_list_and_rejects_others() -> None:
    batch = hand_batch()
    lists = torch.tensor([[[0, 2, 1], [-1, -1, -1]], [[1, 0, -1], [1, 0, -1]]])
    sig = LoggedSignals().signals(batch, lists)
    assert sig.source == "logged"
    torch.testing.assert_close(sig.values["click"][0, 0], torch.tensor([1.0, 0.0, 1.0]))
    assert (sig.values["click"][0, 1] == 0).all()
    torch.testing.assert_close(sig.values["like"][1, 1], torch.tensor([0.0, 1.0, 0.0]))
    # narrower and wider than M: compared over the width of the lists, padding with -1
    LoggedSignals().signals(batch, lists[..., :2])
    LoggedSignals().signals(batch, torch.cat([lists, torch.full((2, 2, 1), -1)], -1))
    other = lists.clone()
    other[1, 1] = torch.tensor([0, 1, -1])
    with pytest.raises(ValueError, match=r"request 1, list 1\); score other lists"):
        LoggedSignals().signals(batch, other)


def test_require_training_source(sim_dir) -> None:
    data = RerankDataset(sim_dir)
    model = build_model("evaluator", data.spec, {"dim": 16})
    require_training_source(LoggedSignals(), "train")
    require_training_source(EvaluatorSignals(model), "train")
    with pytest.raises(ValueError, match="'oracle' reward is for evaluation only"):
        require_training_source(OracleSignals(data), "finetune")
    with pytest.raises(ValueError, match="need a model that scores lists"):
        EvaluatorSignals(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_oracle_needs_simulator_data(tiny_dataset) -> None:
    with pytest.raises(ValueError, match="'tiny' is not from the simulator"):
        OracleSignals(RerankDataset(tiny_dataset))


def test_oracle_engagement_is_the_expected_gain(sim_dir) -> None:
    data = RerankDataset(sim_dir, "test")  # a split: request_index differs from the position
    assert len(data) >= 2
    sim = Simulator.from_spec(data.spec)
    batch = collate([data[i] for i in range(min(len(data), 5))])
    lists = random_lists(batch, 3, 6, seed=0)
    source = OracleSignals(data)
    sig = source.signals(batch, lists)
    assert set(sig.values) == set(data.spec.labels)
    reward = ListReward({"engagement": 1.0},
                        {"engagement": {"gain_weights": sim.config.gain_weights,
                                        "scroll": "own"}})
    out = reward(batch, lists, source)
    b, k, m = lists.shape
    positions = [int(np.flatnonzero(data.rows == r)[0]) for r in batch.request_index.tolist()]
    state = sim.requests(request_index(data.request_ids[positions]))
    flat = lists.reshape(b * k, m).numpy()
    expected = sim.expected_gain(state.take(np.repeat(np.arange(b), k)), np.maximum(flat, 0),
                                 flat >= 0).reshape(b, k)
    np.testing.assert_allclose(out.total.numpy(), expected, atol=1e-5, rtol=0)


def test_evaluator_dcg_engagement_is_score_lists(sim_dir) -> None:
    data = RerankDataset(sim_dir)
    torch.manual_seed(0)
    model = build_model("evaluator", data.spec, {"dim": 16})
    assert isinstance(model, ListEvaluator)
    model.eval()
    batch = collate([data[i] for i in range(4)])
    lists = random_lists(batch, 3, 6, seed=1, holes=False)
    lists[:, -1, 3:] = -1  # a shorter list (trailing empty slots)
    reward = ListReward({"engagement": 1.0}, {"engagement": {"scroll": "dcg"}}, spec=data.spec)
    out = reward(batch, lists, EvaluatorSignals(model))
    assert out.source == "evaluator"
    torch.testing.assert_close(out.total, model.score_lists(batch, lists), atol=1e-5, rtol=0)


def test_simulated_feedback_is_seeded_trainable_labelled_and_centred_on_the_oracle(
        sim_dir) -> None:
    from genrerank.rewards import SimulatedFeedback

    ds = RerankDataset(sim_dir, split="test")
    batch = collate([ds[i] for i in range(len(ds))])
    lists = random_lists(batch, 2, 4, seed=5, holes=False)
    first = SimulatedFeedback(ds, seed=3).signals(batch, lists)
    again = SimulatedFeedback(ds, seed=3).signals(batch, lists)
    other = SimulatedFeedback(ds, seed=4).signals(batch, lists)
    assert first.source == "simulated_feedback"
    for s in first.values:
        assert torch.equal(first.values[s], again.values[s])  # seeded
        if s != "watch_time":  # realised events, not expectations
            assert set(first.values[s].unique().tolist()) <= {0.0, 1.0}
    assert any(not torch.equal(first.values[s], other.values[s]) for s in first.values)
    source = SimulatedFeedback(ds, seed=0)
    assert source.for_training and source.online_stand_in
    require_training_source(source, "test")  # allowed to train, unlike the oracle
    # Averaged over many draws the sampled click rate approaches the oracle's expectation.
    exact = OracleSignals(ds).signals(batch, lists).values["click"].sum()
    draws = torch.stack([source.signals(batch, lists).values["click"].sum()
                         for _ in range(400)])
    assert abs(float(draws.mean()) - float(exact)) < 4 * float(draws.std()) / 20 + 1e-6
