"""gain_bce: item-level credit, against hand-computed values, padding and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.losses import ModelOutput, build_loss
from genrerank.losses.gain import slot_gain
from tests.losses._helpers import embed, make_batch


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# n = 3, m = 2; exposed = (1 at position 0, 2 at position 1): gathered logits 0.0 and 2.0.
LOGITS = torch.tensor([[5.0, -3.0], [0.0, 7.0], [9.0, 2.0]])


def output(logits: torch.Tensor) -> ModelOutput:
    return ModelOutput(log_probs=torch.log_softmax(logits, dim=1), logits=logits)


def test_slot_gain_is_the_normalised_weighted_signals() -> None:
    batch = make_batch([3], [[1, 2]], {"click": [[1.0, 1.0]], "like": [[1.0, 0.0]]})
    # click 1.0 + like 1.5 over the largest possible 2.5; the second slot has a click only.
    torch.testing.assert_close(slot_gain(batch, {"click": 1.0, "like": 1.5, "long_view": 0.8}),
                               torch.tensor([[1.0, 0.4]]))


def test_gain_bce_hand_computed() -> None:
    batch = make_batch([3], [[1, 2]], {"click": [[1.0, 1.0]], "like": [[1.0, 0.0]]})
    loss = build_loss("gain_bce")(output(LOGITS.unsqueeze(0)), batch)
    # target 1.0 at logit 0: log 2; target 0.4 at logit 2: softplus(2) - 0.4 * 2.
    expected = (math.log(2) + softplus(2.0) - 0.4 * 2.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    clicks_only = build_loss("gain_bce", weights={"click": 1.0})(output(LOGITS.unsqueeze(0)), batch)
    assert clicks_only.item() == pytest.approx((math.log(2) + softplus(2.0) - 2.0) / 2, rel=1e-6)


def test_gain_bce_padding_changes_nothing() -> None:
    torch.manual_seed(3)
    raw = [torch.randn(3, 2), torch.randn(2, 1)]
    exposed, labels = [[1, 2], [0]], {"click": [[1.0, 0.0], [1.0]], "like": [[0.0, 0.0], [1.0]]}

    def run(pad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [r.clone().requires_grad_(True) for r in raw]
        batch = make_batch([3, 2], exposed, labels, extra_n=2 * pad, extra_m=2 * pad, garbage=pad)
        n, m = batch.candidate_mask.shape[1], batch.position_mask.shape[1]
        logits = embed(leaves, (n, m), float("-inf") if pad else 0.0)
        loss = build_loss("gain_bce")(ModelOutput(log_probs=logits, logits=logits), batch)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    torch.testing.assert_close(loss1, loss0)
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0)
        assert torch.isfinite(g1).all()


def test_gain_bce_errors() -> None:
    batch = make_batch([3], [[1, 2]], {"click": [[1.0, 0.0]]})
    with pytest.raises(ValueError, match="needs ModelOutput.logits"):
        build_loss("gain_bce")(ModelOutput(log_probs=torch.zeros(1, 3, 2)), batch)
    with pytest.raises(ValueError, match="none of the gain signals"):
        build_loss("gain_bce", weights={"like": 1.0})(output(LOGITS.unsqueeze(0)), batch)
    with pytest.raises(ValueError, match="weights"):
        build_loss("gain_bce", weights={"click": 0.0})
