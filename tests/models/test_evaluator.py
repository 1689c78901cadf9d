"""The list evaluator: shapes, padding invariance, list scores, training signal."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.losses import build_objective
from genrerank.losses.base import ListScoreOutput
from genrerank.models import MODELS, build_model
from genrerank.models.evaluator import ListEvaluator, compact_lists
from tests.models._requests import shrink_request

SIGNALS = ["click", "like", "long_view"]
WEIGHTS = {"click": 1.0, "like": 1.5, "long_view": 0.8}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    out = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 64, 0, out, progress=False)
    return RerankDataset(out)


def evaluator(data: RerankDataset, **config: object) -> ListEvaluator:
    torch.manual_seed(0)
    model = build_model("evaluator", data.spec, {"dim": 16, **config})
    assert isinstance(model, ListEvaluator)
    return model.eval()


def manual_score(model: ListEvaluator, batch, lists: torch.Tensor) -> torch.Tensor:
    """[B, K] discounted gain from forward() on one list at a time (trailing empty slots)."""
    out = torch.zeros(lists.shape[:2])
    for k in range(lists.shape[1]):
        logits = model(batch, lists[:, k]).signal_logits
        for b in range(lists.shape[0]):
            for j in range(lists.shape[2]):
                if lists[b, k, j] >= 0:
                    gain = sum(WEIGHTS[s] * torch.sigmoid(logits[s][b, j]) for s in SIGNALS)
                    out[b, k] += gain / math.log2(j + 2)
    return out


def test_registered_as_evaluator(data: RerankDataset) -> None:
    assert MODELS["evaluator"] is ListEvaluator
    assert ListEvaluator.kind == "evaluator"
    model = evaluator(data)
    assert model.signals == SIGNALS  # watch_time has no gain weight
    with pytest.raises(ValueError, match="does not write"):
        model.generate(collate([data[0]]), 6)
    with pytest.raises(ValueError, match="divisible"):
        build_model("evaluator", data.spec, {"dim": 10, "heads": 4})


def test_forward_shapes(data: RerankDataset) -> None:
    model = evaluator(data)
    batch = collate([shrink_request(data[0], 20), data[1]])
    out = model(batch)
    assert isinstance(out, ListScoreOutput)
    assert set(out.signal_logits) == set(SIGNALS)
    for logits in out.signal_logits.values():
        assert logits.shape == (2, 6)
        assert torch.isfinite(logits).all()
        assert (logits[0, 3:] == 0).all()  # padded positions of the short request


@pytest.mark.parametrize("causal", [True, False])
def test_padding_changes_nothing(data: RerankDataset, causal: bool) -> None:
    model = evaluator(data, causal=causal)
    short = shrink_request(data[2], 25)
    alone = collate([short])
    padded = collate([short, data[3]])  # pads request 0 to n = 60, m = 6
    a, p = model(alone).signal_logits, model(padded).signal_logits
    for s in SIGNALS:
        torch.testing.assert_close(p[s][0, :3], a[s][0], atol=1e-5, rtol=1e-5)
    lists = torch.tensor([[[2, 0, 1], [24, 3, -1], [-1, -1, -1]]])
    big = torch.full((2, 3, 6), -1)
    big[0, :, :3] = lists[0]
    big[1] = torch.arange(18).reshape(3, 6)
    torch.testing.assert_close(model.score_lists(padded, big)[0],
                               model.score_lists(alone, lists)[0], atol=1e-5, rtol=1e-5)


def test_causal_positions_ignore_items_below(data: RerankDataset) -> None:
    model = evaluator(data)
    batch = collate([data[4]])
    first = model(batch, torch.tensor([[5, 6, 7, 8]])).signal_logits
    second = model(batch, torch.tensor([[5, 6, 9, 30]])).signal_logits
    for s in SIGNALS:
        torch.testing.assert_close(first[s][:, :2], second[s][:, :2])
        assert not torch.allclose(first[s][:, 2:], second[s][:, 2:])


def test_empty_slots_are_dropped(data: RerankDataset) -> None:
    model = evaluator(data)
    batch = collate([data[5]])
    gappy = model(batch, torch.tensor([[-1, 4, -1, 2, 9, -1]])).signal_logits
    dense = model(batch, torch.tensor([[4, 2, 9]])).signal_logits
    for s in SIGNALS:
        torch.testing.assert_close(gappy[s][0, [1, 3, 4]], dense[s][0])
        assert (gappy[s][0, [0, 2, 5]] == 0).all()
    lists, filled, order = compact_lists(torch.tensor([[-1, 4, -1, 2]]))
    assert lists.tolist() == [[4, 2, 0, 0]] and filled.tolist() == [[True, True, False, False]]
    assert order[0, :2].tolist() == [1, 3]


def test_score_lists_is_the_discounted_gain(data: RerankDataset) -> None:
    model = evaluator(data)
    batch = collate([shrink_request(data[6], 30), data[7]])
    torch.manual_seed(1)
    lists = torch.stack([torch.stack([torch.randperm(30)[:6] for _ in range(4)]) for _ in range(2)])
    lists[0, 1, 4:] = -1  # a shorter list
    scores = model.score_lists(batch, lists)
    assert scores.shape == (2, 4)
    torch.testing.assert_close(scores, manual_score(model, batch, lists), atol=1e-5, rtol=1e-5)
    plain = model.score_lists(batch, lists, discount=False)
    assert (plain > scores).all()  # 1 / log2(j + 2) < 1 from position 1 on


def test_unavailable_lists_score_minus_inf(data: RerankDataset) -> None:
    model = evaluator(data)
    batch = collate([data[8], data[9]])
    lists = torch.arange(6).repeat(2, 3, 1)
    lists[1, 2] = -1  # an empty list is no list
    scores = model.score_lists(batch, lists)
    assert torch.isfinite(scores[0]).all() and torch.isfinite(scores[1, :2]).all()
    assert scores[1, 2] == -math.inf
    valid = torch.tensor([[True, False, True], [True, True, True]])
    masked = model.score_lists(batch, lists, valid)
    assert masked[0, 1] == -math.inf
    torch.testing.assert_close(masked[0, [0, 2]], scores[0, [0, 2]])
    with pytest.raises(ValueError, match=r"\[B, K, m\]"):
        model.score_lists(batch, lists[0])
    with pytest.raises(ValueError, match="max_positions"):
        model.score_lists(batch, torch.arange(7).repeat(2, 1, 1))


def test_training_steps_reduce_the_loss(data: RerankDataset) -> None:
    torch.manual_seed(0)
    model = build_model("evaluator", data.spec, {"dim": 16, "dropout": 0.0})
    objective = build_objective([{"name": "signal_bce"}])
    batch = collate([data[i] for i in range(len(data))])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        total, _ = objective(model(batch), batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < 0.7 * losses[0]


def test_heads_follow_the_spec_gain_weights() -> None:
    from genrerank.data.schema import FeatureSpec
    from tests.conftest import purchase_spec

    model = build_model("evaluator", purchase_spec(), {"dim": 16})
    assert model.signals == ["purchase"]  # dwell weighs 0 and is not binary
    assert model.gain_weights == {"purchase": 2.0}
    spec = FeatureSpec(**{**purchase_spec().to_dict(), "gain_weights": {"dwell": 1.0}})
    with pytest.raises(ValueError, match=r"evaluator: needs a binary signal .* purchase "
                                         r"\(binary, gain 0\), dwell \(nonnegative, gain 1\)"):
        build_model("evaluator", spec, {"dim": 16})


def test_signal_probabilities_match_forward(data: RerankDataset) -> None:
    model = evaluator(data)
    batch = collate([shrink_request(data[6], 30), data[7]])
    lists = torch.tensor([[[-1, 4, -1, 2, 9, -1]], [[3, 0, 7, 1, -1, -1]]])
    probs = model.signal_probabilities(batch, lists)
    assert set(probs) == set(SIGNALS)
    logits = model(batch, lists[:, 0]).signal_logits
    filled = lists[:, 0] >= 0
    for s in SIGNALS:
        assert probs[s].shape == (2, 1, 6)
        torch.testing.assert_close(probs[s][:, 0][filled], torch.sigmoid(logits[s])[filled],
                                   atol=1e-6, rtol=1e-5)
        assert (probs[s][:, 0][~filled] == 0).all()


def test_signal_probabilities_give_score_lists(data: RerankDataset) -> None:
    model = evaluator(data)
    batch = collate([shrink_request(data[6], 30), data[7]])
    torch.manual_seed(2)
    lists = torch.stack([torch.stack([torch.randperm(30)[:6] for _ in range(4)]) for _ in range(2)])
    lists[0, 1, 4:] = -1  # a shorter list
    lists[1, 3] = -1  # an empty list
    probs = model.signal_probabilities(batch, lists)
    discount = torch.log2(torch.arange(6, dtype=torch.float32) + 2.0)
    gain = sum(WEIGHTS[s] * probs[s] for s in SIGNALS) / discount
    total = torch.where(lists >= 0, gain, 0.0).sum(-1)
    scores = model.score_lists(batch, lists)
    torch.testing.assert_close(total[scores > -math.inf], scores[scores > -math.inf],
                               atol=1e-5, rtol=1e-5)
    assert (total[1, 3] == 0).all()
