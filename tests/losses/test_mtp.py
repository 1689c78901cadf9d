"""The ``mtp`` loss (multi-token prediction heads) against hand-computed values, and padding."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.losses import build_loss, build_objective
from tests.losses._helpers import make_batch, output

INF = float("inf")


def _mtp_output(mtp_logits: torch.Tensor) -> object:
    b, n, m, _ = mtp_logits.shape
    return output(torch.zeros(b, n, m), mtp_logits=mtp_logits)


def test_hand_computed_two_heads() -> None:
    # One request: 3 candidates, logged list (2, 0, 1); K = 2 heads.
    # Pairs (state t, head i) with a logged target at t + i: (0, 1) -> item 0, (1, 1) -> item 1,
    # (0, 2) -> item 1. Columns are log-weights, so p = weight / column sum.
    batch = make_batch([3], [[2, 0, 1]])
    logits = torch.full((1, 3, 3, 2), 1e3)  # no target: large finite junk, must not matter
    logits[0, :, 0, 0] = torch.tensor([1.0, 1.0, 2.0]).log()  # p(0) = 1/4
    logits[0, :, 1, 0] = torch.tensor([3.0, 1.0, 0.0]).log()  # item 2 shown before: p(1) = 1/4
    logits[0, :, 0, 1] = torch.tensor([1.0, 3.0, 0.0]).log()  # p(1) = 3/4
    loss = build_loss("mtp")(_mtp_output(logits), batch)
    expected = (-math.log(1 / 4) - math.log(1 / 4) - math.log(3 / 4)) / 3  # = 1.020090
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(1.020090, abs=1e-6)


def test_padding_counts_for_nothing() -> None:
    """Request A (n = 3, m = 3) and B (n = 2, m = 2) in one padded batch: the loss is the sum
    over the real (t, i) pairs of both over their count (3 + 1), whatever the padded entries
    hold, and padded entries get no gradient."""
    torch.manual_seed(0)
    k = 2
    a = torch.randn(3, 3, k)
    b = torch.randn(2, 2, k)

    def batch_logits(garbage: float) -> tuple[object, torch.Tensor]:
        batch = make_batch([3, 2], [[2, 0, 1], [1, 0]], extra_n=1, extra_m=1, garbage=True)
        full = torch.full((2, 4, 4, k), garbage)
        full[0, :3, :3] = a
        full[1, :2, :2] = b
        full = full.masked_fill(~batch.candidate_mask[:, :, None, None], -INF)  # model contract
        return batch, full.requires_grad_()

    def pair(x: torch.Tensor, t: int, i: int, target: int) -> float:
        return float(torch.log_softmax(x[:, t, i - 1], dim=0)[target])

    # A: (0,1)->0, (1,1)->1, (0,2)->1; B: (0,1)->0.
    expected = -(pair(a, 0, 1, 0) + pair(a, 1, 1, 1) + pair(a, 0, 2, 1) + pair(b, 0, 1, 0)) / 4
    values = []
    for garbage in (0.0, 1e4):
        batch, full = batch_logits(garbage)
        loss = build_loss("mtp")(_mtp_output(full), batch)
        loss.backward()
        values.append(loss.item())
        grad = full.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert grad[:, :, 3].abs().sum() == 0  # padded position as state
        assert grad[1, :, 2:].abs().sum() == 0 and grad[1, 2:].abs().sum() == 0
        assert grad[0, :, 2].abs().sum() == 0  # last state of A: no target after it
    assert values[0] == pytest.approx(expected, rel=1e-5)
    assert values[1] == pytest.approx(expected, rel=1e-5)


def test_model_target_is_the_next_item_heads_distribution() -> None:
    # Same request; the next-item head's teacher-forced columns q(. | t) for t = 1, 2 (its
    # column t is the target of head i at state t - i). Pairs: (0,1) and (1,1) read q at 1 and
    # 2, (0,2) reads q at 2. Head columns as above: p = (1/4, 1/4, 1/2), (3/4, 1/4, 0), (1/4,
    # 3/4, 0).
    batch = make_batch([3], [[2, 0, 1]])
    logits = torch.full((1, 3, 3, 2), 1e3)
    logits[0, :, 0, 0] = torch.tensor([1.0, 1.0, 2.0]).log()
    logits[0, :, 1, 0] = torch.tensor([3.0, 1.0, 0.0]).log()
    logits[0, :, 0, 1] = torch.tensor([1.0, 3.0, 0.0]).log()
    q = torch.zeros(1, 3, 3)
    q[0, :, 0] = torch.tensor([0.2, 0.3, 0.5])  # never a target: column 0 has no head
    q[0, :, 1] = torch.tensor([0.5, 0.5, 0.0])
    q[0, :, 2] = torch.tensor([0.0, 1.0, 0.0])
    log_q = q.log().requires_grad_()
    out = output(log_q, mtp_logits=logits.requires_grad_())
    loss = build_loss("mtp", target="model")(out, batch)
    expected = (-(0.5 * math.log(1 / 4) + 0.5 * math.log(1 / 4))  # (0,1) against q(. | 1)
                - math.log(1 / 4)  # (1,1) against q(. | 2) = item 1
                - math.log(3 / 4)) / 3  # (0,2) against q(. | 2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert log_q.grad is None  # the next-item head is the teacher: no gradient through it
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    logits = logits.detach()
    # A one-hot teacher on the logged item is the "logged" target.
    onehot = torch.zeros(1, 3, 3)
    onehot[0, [2, 0, 1], [0, 1, 2]] = 1.0
    same = build_loss("mtp", target="model")(output(onehot.log(), mtp_logits=logits), batch)
    assert same.item() == pytest.approx(build_loss("mtp")(_mtp_output(logits), batch).item())
    with pytest.raises(ValueError, match="target"):
        build_loss("mtp", target="oracle")


def test_one_position_lists_and_missing_heads() -> None:
    batch = make_batch([3], [[1]])
    logits = torch.zeros(1, 3, 1, 3)
    assert build_loss("mtp")(_mtp_output(logits), batch).item() == 0.0  # no pair at all
    with pytest.raises(ValueError, match="mtp_logits"):
        build_loss("mtp")(output(torch.zeros(1, 3, 1)), batch)
    objective = build_objective([{"name": "mtp", "weight": 0.25}])
    assert objective.weights == {"mtp": 0.25}
