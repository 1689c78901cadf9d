"""Auxiliary click (BCE) and list-length (CE) losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.losses import ClickBCELoss, build_loss
from tests.losses._helpers import embed, make_batch, output


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def zeros_log_probs(batch) -> torch.Tensor:
    b, n = batch.candidate_mask.shape
    return torch.zeros(b, n, batch.position_mask.shape[1])


# n = 3, m = 2; exposed = (1 at position 0, 2 at position 1): gathered logits 0.0 and 2.0.
CLICK_LOGITS = torch.tensor([[5.0, -3.0], [0.0, 7.0], [9.0, 2.0]])


def test_click_bce_hand_computed() -> None:
    batch = make_batch([3], [[1, 2]], {"click": [[1.0, 0.0]]})
    out = output(zeros_log_probs(batch), click_logits=CLICK_LOGITS.unsqueeze(0))
    loss = build_loss("click_bce")(out, batch)
    # clicked at logit 0: -log sigmoid(0) = log 2 = 0.693147
    # not clicked at logit 2: -log(1 - sigmoid(2)) = log(1 + e^2) = 2.126928; / 2 positions
    expected = (math.log(2) + softplus(2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    weighted = build_loss("click_bce", pos_weight=3.0)(out, batch)
    assert weighted.item() == pytest.approx((3 * math.log(2) + softplus(2.0)) / 2, rel=1e-6)


def test_click_bce_other_signal_and_positive_counts() -> None:
    # A like count of 2 counts as positive (target 1).
    batch = make_batch([3], [[1, 2]], {"click": [[0.0, 0.0]], "like": [[2.0, 0.0]]})
    out = output(zeros_log_probs(batch), click_logits=CLICK_LOGITS.unsqueeze(0))
    loss = build_loss("click_bce", signal="like")(out, batch)
    assert loss.item() == pytest.approx((math.log(2) + softplus(2.0)) / 2, rel=1e-6)


def test_click_bce_padding_changes_nothing() -> None:
    torch.manual_seed(4)
    raw = [torch.randn(3, 2), torch.randn(2, 1)]
    exposed, clicks = [[1, 2], [0]], {"click": [[1.0, 0.0], [1.0]]}

    def run(pad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [r.clone().requires_grad_(True) for r in raw]
        batch = make_batch([3, 2], exposed, clicks, extra_n=2 * pad, extra_m=2 * pad, garbage=pad)
        n, m = batch.candidate_mask.shape[1], batch.position_mask.shape[1]
        logits = embed(leaves, (n, m), float("nan") if pad else 0.0)
        loss = build_loss("click_bce")(output(zeros_log_probs(batch), click_logits=logits), batch)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    torch.testing.assert_close(loss1, loss0)
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0)
        assert torch.isfinite(g1).all()


def test_click_bce_errors() -> None:
    batch = make_batch([3], [[1, 2]], {"like": [[1.0, 0.0]]})
    with pytest.raises(ValueError, match="click_logits"):
        build_loss("click_bce")(output(zeros_log_probs(batch)), batch)
    out = output(zeros_log_probs(batch), click_logits=CLICK_LOGITS.unsqueeze(0))
    with pytest.raises(ValueError, match=r"no 'click' signal \(it has \['like'\]\)"):
        build_loss("click_bce")(out, batch)
    with pytest.raises(ValueError, match="pos_weight"):
        ClickBCELoss(pos_weight=0.0)


def test_list_length_hand_computed_and_gradient() -> None:
    # Request 0: length 2, logits (0, 0, 0, 0)          -> log 4 = 1.386294
    # Request 1: length 1, logits (0, log 3, 0, 0): p = 3/6 -> log 2 = 0.693147; mean over 2
    batch = make_batch([3, 2], [[0, 1], [1]])
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), 0.0, 0.0]])
    logits.requires_grad_(True)
    loss = build_loss("list_length")(output(zeros_log_probs(batch), length_logits=logits), batch)
    assert loss.item() == pytest.approx((math.log(4) + math.log(2)) / 2, rel=1e-6)
    loss.backward()
    onehot = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(logits.grad, (torch.softmax(logits.detach(), 1) - onehot) / 2)


def test_list_length_ignores_padding_rows_and_positions() -> None:
    # Extra padded positions do not change the lengths; a row without candidates (pure batch
    # padding) with NaN logits is excluded from the mean.
    batch = make_batch([3, 0], [[0, 1], []], extra_m=2, garbage=True)
    logits = torch.tensor([[0.0] * 5, [float("nan")] * 5], requires_grad=True)
    loss = build_loss("list_length")(output(zeros_log_probs(batch), length_logits=logits), batch)
    assert loss.item() == pytest.approx(math.log(5), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_list_length_of_one_and_errors() -> None:
    batch = make_batch([1], [[0]])
    logits = torch.tensor([[-1e4, 1e4]])  # confident and right: loss ~ 0
    loss = build_loss("list_length")(output(zeros_log_probs(batch), length_logits=logits), batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="classes"):
        build_loss("list_length")(
            output(zeros_log_probs(batch), length_logits=torch.zeros(1, 1)), batch
        )
    with pytest.raises(ValueError, match="length_logits"):
        build_loss("list_length")(output(zeros_log_probs(batch)), batch)
