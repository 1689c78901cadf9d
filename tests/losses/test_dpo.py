"""DPO on pairs of lists: the loss against hand-computed values, the masks, the NLL term, the
reported statistics, and a frozen reference that no optimizer step can touch."""

from __future__ import annotations

import copy
import math
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from genrerank.data.dataset import Batch, RerankDataset
from genrerank.data.pairs import PairDataset, PreferenceBatch
from genrerank.losses import ModelOutput, build_objective
from genrerank.losses.dpo import DPOLoss
from genrerank.models import build_model
from genrerank.preference.finetune import frozen, reference_log_probs
from tests.losses._helpers import make_batch

# 2 pairs, N = 3 candidates, M = 2 positions. Rows 0, 1: winners; rows 2, 3: losers.
# Row 1 (winner of pair 2) has one position only and row 3 (its loser) two candidates only.
N_CANDIDATES = [3, 3, 3, 2]
EXPOSED = [[2, 0], [1], [0, 1], [1, 0]]
# log p(candidate i at position j) for each row, [N][M]; the padded slots are set below.
LOG_PROBS = [
    [[-1.0, -0.3], [-2.0, -1.6], [-0.5, -2.2]],
    [[-1.2, -0.9], [-0.4, -1.1], [-2.5, -1.3]],
    [[-0.7, -1.9], [-1.5, -0.2], [-1.1, -2.4]],
    [[-0.6, -0.8], [-0.9, -0.6], [-3.0, -3.0]],
]
REF = [-2.0, -1.0, -1.5, -2.5]  # reference log-probabilities of the four lists


def _list_lp(row: int) -> float:
    return sum(LOG_PROBS[row][i][j] for j, i in enumerate(EXPOSED[row]))


def _preference_batch(garbage: bool = False, ref: list[float] | None = None) -> PreferenceBatch:
    batch = make_batch(N_CANDIDATES, EXPOSED, garbage=garbage)
    return PreferenceBatch(**{f.name: getattr(batch, f.name) for f in fields(Batch)}, pairs=2,
                           ref_log_prob=torch.tensor(ref or REF), reward=torch.zeros(4))


def _output(garbage: bool = False) -> ModelOutput:
    lp = torch.tensor(LOG_PROBS)
    if garbage:
        lp[1, :, 1] = float("nan")  # padded position of row 1
        lp[3, 2, :] = 1e6  # padded candidate of row 3
    else:
        lp[3, 2, :] = float("-inf")
    return ModelOutput(log_probs=lp.requires_grad_(True))


def _hand_loss(beta: float, ref: list[float] = REF) -> tuple[float, list[float]]:
    margins, terms = [], []
    for p in range(2):
        lw, ll = _list_lp(p), _list_lp(p + 2)
        m = beta * ((lw - ref[p]) - (ll - ref[p + 2]))
        margins.append(m)
        terms.append(-math.log(1.0 / (1.0 + math.exp(-m))))
    return sum(terms) / 2, margins


def test_loss_matches_the_hand_computed_value() -> None:
    beta = 0.5
    expected, margins = _hand_loss(beta)
    loss = DPOLoss(beta=beta)(_output(), _preference_batch())
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Sanity of the hand numbers: list log-probs -0.5 - 0.3, -0.4, -0.7 - 0.2, -0.9 - 0.8.
    assert [_list_lp(r) for r in range(4)] == pytest.approx([-0.8, -0.4, -0.9, -1.7])
    assert margins == pytest.approx([0.5 * (1.2 - 0.6), 0.5 * (0.6 - 0.8)])


def test_policy_equal_to_reference_gives_exactly_log_2() -> None:
    ref = [_list_lp(r) for r in range(4)]
    loss = DPOLoss(beta=3.0)(_output(), _preference_batch(ref=ref))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_padded_positions_and_candidates_change_nothing() -> None:
    clean_out, garbage_out = _output(), _output(garbage=True)
    loss_fn = DPOLoss(beta=0.5, nll_weight=0.3)
    clean = loss_fn(clean_out, _preference_batch())
    dirty = loss_fn(garbage_out, _preference_batch(garbage=True))
    assert torch.isfinite(dirty)
    assert dirty.item() == pytest.approx(clean.item(), abs=1e-6)
    clean.backward()
    dirty.backward()
    assert torch.isfinite(garbage_out.log_probs.grad).all()
    assert torch.allclose(garbage_out.log_probs.grad, clean_out.log_probs.grad)
    assert garbage_out.log_probs.grad[1, :, 1].abs().sum() == 0
    assert garbage_out.log_probs.grad[3, 2, :].abs().sum() == 0


def test_nll_weight_adds_the_winners_mean_per_position_nll() -> None:
    base = DPOLoss(beta=0.5)(_output(), _preference_batch()).item()
    loss_fn = DPOLoss(beta=0.5, nll_weight=0.25)
    with_nll = loss_fn(_output(), _preference_batch()).item()
    winner_nll = ((0.8 / 2) + (0.4 / 1)) / 2  # lengths 2 and 1
    assert with_nll - base == pytest.approx(0.25 * winner_nll, abs=1e-6)
    assert loss_fn.last_stats["winner_nll"].item() == pytest.approx(winner_nll, abs=1e-6)
    assert "winner_nll" not in DPOLoss(beta=0.5).last_stats


def test_last_stats_report_accuracy_margin_and_log_probs() -> None:
    beta = 0.5
    loss_fn = DPOLoss(beta=beta)
    loss = loss_fn(_output(), _preference_batch())
    _, margins = _hand_loss(beta)
    stats = {k: v.item() for k, v in loss_fn.last_stats.items()}
    assert stats["accuracy"] == pytest.approx(0.5)  # margins +0.3 and -0.1
    assert stats["margin"] == pytest.approx(sum(margins) / 2, abs=1e-6)
    assert stats["preference"] == pytest.approx(loss.item(), abs=1e-6)
    assert stats["chosen_log_prob"] == pytest.approx((-0.8 - 0.4) / 2, abs=1e-6)
    assert stats["rejected_log_prob"] == pytest.approx((-0.9 - 1.7) / 2, abs=1e-6)
    assert stats["chosen_minus_ref"] == pytest.approx((1.2 + 0.6) / 2, abs=1e-6)
    assert stats["rejected_minus_ref"] == pytest.approx((0.6 + 0.8) / 2, abs=1e-6)
    # The composite objective reports them as components.
    objective = build_objective([{"name": "dpo", "beta": beta}])
    _, components = objective(_output(), _preference_batch())
    assert components["dpo/accuracy"].item() == pytest.approx(0.5)
    assert components["dpo/margin"].item() == pytest.approx(sum(margins) / 2, abs=1e-6)


def test_a_plain_batch_and_bad_settings_are_refused() -> None:
    plain = make_batch(N_CANDIDATES, EXPOSED)
    with pytest.raises(ValueError, match="preference pairs"):
        DPOLoss()(_output(), plain)
    no_ref = _preference_batch()
    no_ref.ref_log_prob = None
    with pytest.raises(ValueError, match="preference pairs"):
        DPOLoss()(_output(), no_ref)
    for beta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            DPOLoss(beta=beta)
    with pytest.raises(ValueError, match="nll_weight"):
        DPOLoss(nll_weight=-0.1)


def _tiny_pairs_table() -> pa.Table:
    return pa.table({
        "request_id": ["r0"], "split": ["train"],
        "lists": pa.array([[[2, 0], [0, 1], [1, 2]]], pa.list_(pa.list_(pa.int32()))),
        "generators": [["a", "b", "c"]], "reward": [[1.0, 0.0, 0.2]],
        "pairs": pa.array([[[0, 1], [0, 2]]], pa.list_(pa.list_(pa.int32()))),
    })


def test_dpo_steps_train_the_policy_and_never_the_reference(tiny_dataset: Path) -> None:
    requests = RerankDataset(tiny_dataset, split="train")
    torch.manual_seed(0)
    model = build_model("autoregressive", requests.spec,
                        {"dim": 16, "n_heads": 4, "n_kv_heads": 2, "dropout": 0.0})
    reference = frozen(copy.deepcopy(model))
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    pairs = PairDataset(requests, _tiny_pairs_table(), "train")
    assert len(pairs) == 2
    pairs.set_reference_log_probs(reference_log_probs(reference, pairs))
    model.train()
    loss_fn = DPOLoss(beta=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(4):
        for batch in DataLoader(pairs, batch_size=2, collate_fn=pairs.collate_fn):
            optimizer.zero_grad()
            loss = loss_fn(model(batch), batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    # Same weights at the start: the reference's log-probs are the policy's, the loss is log 2.
    assert losses[0] == pytest.approx(math.log(2.0), abs=1e-5)
    assert losses[-1] < losses[0]
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    for k, v in reference.state_dict().items():
        assert torch.equal(before[k], v), k
    for p in reference.parameters():
        assert p.grad is None and not p.requires_grad
    assert not reference.training
