"""signal_bce (the list evaluator's loss) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.losses import build_loss, build_objective
from genrerank.losses.base import ListScoreOutput
from tests.losses._helpers import embed, make_batch, output


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def bce(logit: float, target: float) -> float:
    """-log sigmoid(logit) if target else -log(1 - sigmoid(logit))."""
    return softplus(-logit) if target else softplus(logit)


# One request, m = 2 positions.
CLICK = torch.tensor([[0.0, 2.0]])
LIKE = torch.tensor([[-1.0, 3.0]])
LABELS = {"click": [[1.0, 0.0]], "like": [[2.0, 0.0]]}  # a like count of 2 counts as positive


def test_signal_bce_hand_computed() -> None:
    batch = make_batch([3], [[1, 2]], LABELS)
    out = ListScoreOutput({"click": CLICK, "like": LIKE})
    click = (bce(0.0, 1) + bce(2.0, 0)) / 2  # (log 2 + log(1 + e^2)) / 2
    like = (bce(-1.0, 1) + bce(3.0, 0)) / 2
    assert build_loss("signal_bce")(out, batch).item() == pytest.approx(click + like, rel=1e-6)
    weighted = build_loss("signal_bce", weights={"click": 2.0, "like": 0.5})(out, batch)
    assert weighted.item() == pytest.approx(2.0 * click + 0.5 * like, rel=1e-6)


def test_signal_bce_through_build_objective() -> None:
    batch = make_batch([3], [[1, 2]], LABELS)
    total, parts = build_objective([{"name": "signal_bce"}])(
        ListScoreOutput({"click": CLICK}), batch)
    assert total.item() == pytest.approx((bce(0.0, 1) + bce(2.0, 0)) / 2, rel=1e-6)
    assert set(parts) == {"signal_bce"}


def test_signal_bce_padding_changes_nothing() -> None:
    torch.manual_seed(3)
    raw = {"click": [torch.randn(2), torch.randn(1)], "like": [torch.randn(2), torch.randn(1)]}
    labels = {"click": [[1.0, 0.0], [1.0]], "like": [[0.0, 1.0], [0.0]]}

    def run(pad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = {s: [r.clone().requires_grad_(True) for r in rs] for s, rs in raw.items()}
        batch = make_batch([3, 2], [[1, 2], [0]], labels, extra_n=2 * pad, extra_m=2 * pad,
                           garbage=pad)
        m = batch.position_mask.shape[1]
        # Padded positions hold NaN / garbage labels: neither may reach value or gradient.
        logits = {s: embed(ls, (m,), float("nan") if pad else 0.0) for s, ls in leaves.items()}
        loss = build_loss("signal_bce")(ListScoreOutput(logits), batch)
        loss.backward()
        return loss.detach(), [leaf.grad for ls in leaves.values() for leaf in ls]

    plain, grads = run(False)
    padded, grads_padded = run(True)
    assert torch.isfinite(padded)
    torch.testing.assert_close(padded, plain)
    for g, gp in zip(grads, grads_padded, strict=True):
        torch.testing.assert_close(gp, g)
    # Averaged over the 3 valid positions of the batch.
    expected = sum(
        bce(float(raw[s][k][j]), labels[s][k][j])
        for s in raw for k in range(2) for j in range(len(labels[s][k]))
    ) / 3
    assert plain.item() == pytest.approx(expected, rel=1e-5)


def test_signal_bce_missing_signals() -> None:
    batch = make_batch([3], [[1, 2]], {"click": [[1.0, 0.0]]})
    # The batch lacks "like": that signal is skipped, the click term remains.
    out = ListScoreOutput({"click": CLICK, "like": LIKE})
    loss = build_loss("signal_bce")(out, batch)
    assert loss.item() == pytest.approx((bce(0.0, 1) + bce(2.0, 0)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="none of the model's signals.*like"):
        build_loss("signal_bce")(ListScoreOutput({"like": LIKE}), batch)


def test_signal_bce_bad_input() -> None:
    batch = make_batch([3], [[1, 2]], {"click": [[1.0, 0.0]]})
    with pytest.raises(ValueError, match="ListScoreOutput"):
        build_loss("signal_bce")(output(torch.zeros(1, 3, 2)), batch)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        build_loss("signal_bce", weights={"click": -1.0})
    with pytest.raises(TypeError, match="unknown parameter"):
        build_loss("signal_bce", signal="click")
