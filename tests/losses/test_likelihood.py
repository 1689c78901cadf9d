"""Likelihood loss against hand-computed values on tiny probability matrices."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.losses import build_loss
from tests.losses._helpers import log_probs_from_logits, make_batch, output

# One request, n = 3 candidates x m = 2 positions; each column sums to 1.
P = torch.tensor([[0.5, 0.25], [0.25, 0.25], [0.25, 0.5]])


def test_hand_computed_single_list() -> None:
    batch = make_batch([3], [[0, 1]])
    lp = log_probs_from_logits([P.log()], batch)
    # exposed = (0 at position 0, 1 at position 1): p^ = 0.5 and 0.25.
    # L = (-log 0.5 - log 0.25) / 2 valid positions = (0.693147 + 1.386294) / 2 = 1.039721
    loss = build_loss("likelihood")(output(lp), batch)
    assert loss.item() == pytest.approx((-math.log(0.5) - math.log(0.25)) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(1.039721, abs=1e-6)


def test_normalised_by_valid_positions_of_the_batch() -> None:
    # Request A (m = 2) as above; request B: n = 2, m = 1, p^ = 0.8.
    # L = (-log .5 - log .25 - log .8) / 3 positions (NOT the mean of the two per-list means).
    pb = torch.tensor([[0.2], [0.8]])
    batch = make_batch([3, 2], [[0, 1], [1]])
    lp = log_probs_from_logits([P.log(), pb.log()], batch)
    loss = build_loss("likelihood")(output(lp), batch)
    expected = (-math.log(0.5) - math.log(0.25) - math.log(0.8)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ties_uniform_columns_give_log_n() -> None:
    batch = make_batch([4], [[2, 0, 3]])
    lp = log_probs_from_logits([torch.zeros(4, 3)], batch)  # all tied: p = 1/4 everywhere
    loss = build_loss("likelihood")(output(lp), batch)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)


def test_list_of_length_one() -> None:
    # Single candidate: p = 1 -> loss 0; two candidates with p^ = 0.75 -> -log 0.75.
    batch = make_batch([1], [[0]])
    lp = log_probs_from_logits([torch.zeros(1, 1)], batch)
    assert build_loss("likelihood")(output(lp), batch).item() == pytest.approx(0.0, abs=1e-7)
    batch = make_batch([2], [[1]])
    lp = log_probs_from_logits([torch.tensor([[0.25], [0.75]]).log()], batch)
    loss = build_loss("likelihood")(output(lp), batch)
    assert loss.item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_gradient_is_softmax_minus_onehot_over_count() -> None:
    # d/dz_ij of -log softmax(z_.j)[e_j] / K = (p_ij - 1[i = e_j]) / K, K = 2 valid positions.
    logits = torch.tensor([[0.3, -1.0], [1.2, 0.0], [-0.5, 2.0]], requires_grad=True)
    batch = make_batch([3], [[1, 2]])
    loss = build_loss("likelihood")(output(log_probs_from_logits([logits], batch)), batch)
    loss.backward()
    onehot = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    expected = (torch.softmax(logits.detach(), dim=0) - onehot) / 2
    torch.testing.assert_close(logits.grad, expected)


def test_padding_changes_nothing() -> None:
    """Garbage in padded candidates (huge logits, masked), padded positions (NaN log-probs,
    out-of-list exposed index) and extra padding: same loss, same gradients."""
    torch.manual_seed(0)
    raw = [torch.randn(3, 2), torch.randn(2, 1)]
    exposed = [[0, 2], [1]]

    def run(pad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [r.clone().requires_grad_(True) for r in raw]
        batch = make_batch([3, 2], exposed, extra_n=2 * pad, extra_m=3 * pad, garbage=pad)
        loss = build_loss("likelihood")(output(log_probs_from_logits(leaves, batch, pad)), batch)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    torch.testing.assert_close(loss1, loss0)
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0)
        assert torch.isfinite(g1).all()


def test_batch_without_valid_positions_is_zero() -> None:
    batch = make_batch([2], [[]], extra_m=2)
    logits = torch.zeros(2, 0, requires_grad=True)
    loss = build_loss("likelihood")(output(log_probs_from_logits([logits], batch)), batch)
    assert loss.item() == 0.0
    loss.backward()
