"""SimCTG-style contrastive loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.losses import ContrastiveLoss, build_loss
from tests.losses._helpers import embed, make_batch, output

R2 = math.sqrt(0.5)
# x1 = (1, 0), x2 = (0, 1), x3 = (3, 3) (cosine ignores the scale):
# s12 = 0, s13 = s23 = 0.707107, s_ii = 1. With rho = 0.5 the hinge of an ordered pair is
# max(0, 0.5 - 1 + s_ij): (1,2) -> 0, (1,3) and (2,3) -> 0.207107, each counted twice.
# L = 4 * 0.207107 / (3 * 2) = 0.138071
THREE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
THREE_VALUE = 4 * (0.5 - 1 + R2) / 6


def dummy_log_probs(batch) -> torch.Tensor:
    b, n = batch.candidate_mask.shape
    return torch.zeros(b, n, batch.position_mask.shape[1])


def item_only(**params):
    return build_loss("contrastive", position=False, **params)


def test_item_term_hand_computed() -> None:
    batch = make_batch([3], [[0]])
    out = output(dummy_log_probs(batch), item_repr=THREE.unsqueeze(0))
    loss = item_only(margin=0.5)(out, batch)
    assert loss.item() == pytest.approx(THREE_VALUE, rel=1e-6)
    assert loss.item() == pytest.approx(0.138071, abs=1e-6)


def test_identical_vectors_give_margin() -> None:
    # s_ij = s_ii = 1 -> every pair's hinge is rho: L = rho. Shared [M, D] position table.
    batch = make_batch([2], [[0, 1]])
    table = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    loss = build_loss("contrastive", margin=0.3, item=False)(
        output(dummy_log_probs(batch), position_repr=table), batch
    )
    assert loss.item() == pytest.approx(0.3, rel=1e-6)


def test_total_is_item_plus_position() -> None:
    batch = make_batch([3], [[0, 1]])
    out = output(
        dummy_log_probs(batch),
        item_repr=THREE.unsqueeze(0),
        position_repr=torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
    )
    loss = build_loss("contrastive", margin=0.5)(out, batch)
    assert loss.item() == pytest.approx(THREE_VALUE + 0.5, rel=1e-6)
    # Orthogonal positions: hinge max(0, 0.5 - 1 + 0) = 0.
    out.position_repr = torch.eye(2)
    assert build_loss("contrastive")(out, batch).item() == pytest.approx(THREE_VALUE, rel=1e-6)


def test_single_candidate_request_is_excluded_not_nan() -> None:
    # Request 0 has n = 1 (no pairs), request 1 the THREE vectors: the mean is over
    # request 1 only (THREE_VALUE, not THREE_VALUE / 2), and nothing is NaN.
    batch = make_batch([1, 3], [[0], [0]])
    reprs = embed([torch.tensor([[5.0, 1.0]]), THREE], (3, 2), 0.0).requires_grad_(True)
    loss = item_only()(output(dummy_log_probs(batch), item_repr=reprs), batch)
    assert loss.item() == pytest.approx(THREE_VALUE, rel=1e-6)
    loss.backward()
    assert torch.isfinite(reprs.grad).all()


def test_all_single_candidate_requests_give_zero() -> None:
    batch = make_batch([1, 1], [[0], [0]])
    reprs = torch.randn(2, 1, 4, requires_grad=True)
    loss = item_only()(output(dummy_log_probs(batch), item_repr=reprs), batch)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(reprs.grad, torch.zeros_like(reprs))


def test_padding_changes_nothing() -> None:
    """NaN / huge vectors at padded candidates and positions: same loss and gradients."""
    torch.manual_seed(3)
    items = [torch.randn(4, 3), torch.randn(2, 3)]
    positions = [torch.randn(3, 3), torch.randn(1, 3)]

    def run(pad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [t.clone().requires_grad_(True) for t in items + positions]
        batch = make_batch([4, 2], [[0, 1, 2], [1]], extra_n=2 * pad, extra_m=2 * pad)
        n, m = batch.candidate_mask.shape[1], batch.position_mask.shape[1]
        fill = float("nan") if pad else 0.0
        out = output(
            dummy_log_probs(batch),
            item_repr=embed(leaves[:2], (n, 3), fill),
            position_repr=embed(leaves[2:], (m, 3), -1e30 if pad else 0.0),
        )
        loss = build_loss("contrastive", margin=0.8)(out, batch)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    assert loss0.item() > 0
    torch.testing.assert_close(loss1, loss0)
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0)
        assert torch.isfinite(g1).all()


def test_per_request_positions_use_position_mask() -> None:
    # Request 0 positions identical (hinge rho each), request 1 has m = 1 (excluded).
    batch = make_batch([2, 2], [[0, 1], [0]])
    reprs = torch.tensor([[[1.0, 1.0], [2.0, 2.0]], [[1.0, 0.0], [1.0, 0.0]]])
    loss = build_loss("contrastive", margin=0.5, item=False)(
        output(dummy_log_probs(batch), position_repr=reprs), batch
    )
    assert loss.item() == pytest.approx(0.5, rel=1e-6)


def test_zero_vector_is_finite() -> None:
    batch = make_batch([2], [[0]])
    reprs = torch.zeros(1, 2, 3, requires_grad=True)
    loss = item_only()(output(dummy_log_probs(batch), item_repr=reprs), batch)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, rel=1e-6)  # s = 0 for all pairs, s_ii = 0 too
    assert torch.isfinite(reprs.grad).all()


def test_missing_representations_and_bad_params() -> None:
    batch = make_batch([2], [[0]])
    with pytest.raises(ValueError, match="item_repr"):
        build_loss("contrastive")(output(dummy_log_probs(batch)), batch)
    with pytest.raises(ValueError, match="position_repr"):
        build_loss("contrastive", item=False)(output(dummy_log_probs(batch)), batch)
    with pytest.raises(ValueError):
        ContrastiveLoss(item=False, position=False)
    with pytest.raises(ValueError, match="item_repr must be"):
        item_only()(output(dummy_log_probs(batch), item_repr=torch.zeros(1, 5, 3)), batch)
