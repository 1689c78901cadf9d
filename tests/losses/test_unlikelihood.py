"""Unlikelihood loss, list utility R and the tau threshold against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genrerank.losses import UnlikelihoodLoss, build_loss, list_utility, utility_threshold
from genrerank.metrics.ranking import list_gain
from tests.losses._helpers import GARBAGE_LABEL, log_probs_from_logits, make_batch, output

P_GOOD = torch.tensor([[0.5, 0.25], [0.25, 0.25], [0.25, 0.5]])  # n = 3, m = 2
P_BAD = torch.tensor([[0.8, 0.5], [0.2, 0.5]])  # n = 2, m = 2


def two_lists(garbage: bool = False, extra: int = 0):
    # Request 0 clicked at position 0: R = 1 / log2(2) = 1.  Request 1 no feedback: R = 0.
    return make_batch(
        [3, 2],
        [[0, 1], [0, 1]],
        {"click": [[1.0, 0.0], [0.0, 0.0]]},
        extra_n=extra,
        extra_m=extra,
        garbage=garbage,
    )


def test_hand_computed_good_and_bad_lists() -> None:
    batch = two_lists()
    lp = log_probs_from_logits([P_GOOD.log(), P_BAD.log()], batch)
    loss = build_loss("unlikelihood", tau=0.5)(output(lp), batch)
    # good (R = 1 >= 0.5): -log 0.5 - log 0.25           = 0.693147 + 1.386294
    # bad  (R = 0 <  0.5): -log(1 - 0.8) - log(1 - 0.5)  = 1.609438 + 0.693147
    # / 4 valid positions                                 = 1.095507
    expected = (-math.log(0.5) - math.log(0.25) - math.log(0.2) - math.log(0.5)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(1.095507, abs=1e-5)


def test_ul_weight_scales_only_the_unlikelihood_terms() -> None:
    batch = two_lists()
    lp = log_probs_from_logits([P_GOOD.log(), P_BAD.log()], batch)
    loss = build_loss("unlikelihood", tau=0.5, ul_weight=2.0)(output(lp), batch)
    expected = (-math.log(0.5) - math.log(0.25) - 2 * (math.log(0.2) + math.log(0.5))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_all_lists_above_tau_is_likelihood_exactly() -> None:
    torch.manual_seed(1)
    raw = [torch.randn(3, 2), torch.randn(2, 2)]
    results = []
    for name, params in (("likelihood", {}), ("unlikelihood", {"tau": -1.0})):
        leaves = [r.clone().requires_grad_(True) for r in raw]
        batch = two_lists()
        loss = build_loss(name, **params)(output(log_probs_from_logits(leaves, batch)), batch)
        loss.backward()
        results.append((loss.detach(), [leaf.grad for leaf in leaves]))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b)


def test_list_utility_equal_to_tau_counts_as_good() -> None:
    batch = two_lists()
    lp = log_probs_from_logits([P_GOOD.log(), P_BAD.log()], batch)
    at_tau = build_loss("unlikelihood", tau=1.0)(output(lp), batch)  # R = 1 -> good
    expected = (-math.log(0.5) - math.log(0.25) - math.log(0.2) - math.log(0.5)) / 4
    assert at_tau.item() == pytest.approx(expected, rel=1e-5)


def test_all_lists_below_tau() -> None:
    batch = two_lists()
    lp = log_probs_from_logits([P_GOOD.log(), P_BAD.log()], batch)
    loss = build_loss("unlikelihood", tau=10.0)(output(lp), batch)
    # -log(1 - .5) - log(1 - .25) - log(1 - .8) - log(1 - .5), / 4
    expected = -(math.log(0.5) + math.log(0.75) + math.log(0.2) + math.log(0.5)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_p_to_one_is_finite(n: int) -> None:
    # n = 1: p = 1 exactly; n = 2: logits 100 vs -100, p = 1 in float32. Bad list.
    logits = torch.tensor([[100.0], [-100.0]][:n], requires_grad=True)
    batch = make_batch([n], [[0]], {"click": [[0.0]]})
    loss = build_loss("unlikelihood", tau=0.5)(
        output(log_probs_from_logits([logits], batch)), batch
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(-math.log(1e-5), rel=1e-3)  # capped at -log(eps)
    assert torch.isfinite(logits.grad).all()


def test_p_close_to_one_is_accurate() -> None:
    # p = 1 - 1e-3 (below the 1 - eps cap): -log(1 - p) = -log(1e-3) = 6.907755;
    # naive 1 - exp(log p) in float32 loses digits here, expm1 does not.
    p = 1 - 1e-3
    logits = torch.tensor([[math.log(p)], [math.log(1 - p)]], requires_grad=True)
    batch = make_batch([2], [[0]], {"click": [[0.0]]})
    loss = build_loss("unlikelihood", tau=0.5)(
        output(log_probs_from_logits([logits], batch)), batch
    )
    assert loss.item() == pytest.approx(-math.log(1e-3), rel=1e-4)
    loss.backward()
    # d/dz_0 of -log(1 - softmax(z)_0) = p_0 ; d/dz_1 = -p_0
    torch.testing.assert_close(logits.grad, torch.tensor([[p], [-p]]), rtol=1e-4, atol=1e-6)


def test_padding_changes_nothing() -> None:
    """Garbage labels at padded positions (which would make R huge), garbage log-probs and
    exposed indices: identical loss and gradients."""
    torch.manual_seed(2)
    raw = [torch.randn(3, 2), torch.randn(2, 2)]

    def run(pad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [r.clone().requires_grad_(True) for r in raw]
        batch = two_lists(garbage=pad, extra=2 * pad)
        if pad:
            assert (batch.labels["click"] == GARBAGE_LABEL).any()
        lp = log_probs_from_logits(leaves, batch, garbage=pad)
        loss = build_loss("unlikelihood", tau=0.5)(output(lp), batch)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    torch.testing.assert_close(loss1, loss0)
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0)
        assert torch.isfinite(g1).all()


def test_tau_required_but_settable_later() -> None:
    batch = two_lists()
    lp = log_probs_from_logits([P_GOOD.log(), P_BAD.log()], batch)
    loss = build_loss("unlikelihood")
    with pytest.raises(ValueError, match="tau"):
        loss(output(lp), batch)
    loss.tau = 0.5
    assert torch.isfinite(loss(output(lp), batch))


def test_invalid_params() -> None:
    with pytest.raises(ValueError, match="ul_weight"):
        UnlikelihoodLoss(tau=0.5, ul_weight=-1.0)
    with pytest.raises(ValueError, match="eps"):
        UnlikelihoodLoss(tau=0.5, eps=0.0)


# --- list utility R ------------------------------------------------------------------------


def test_list_utility_hand_computed() -> None:
    batch = make_batch(
        [4, 2],
        [[0, 1, 2], [1]],
        {
            "click": [[1.0, 0.0, 1.0], [1.0]],
            "like": [[0.0, 1.0, 0.0], [1.0]],
            "watch_time": [[30.0, 12.0, 5.0], [9.0]],  # no weight: ignored
        },
        extra_m=2,
        garbage=True,
    )
    r = list_utility(batch)
    # request 0: 1.0 / log2(2) + 1.5 / log2(3) + 1.0 / log2(4) = 1 + 0.946395 + 0.5
    # request 1: (1.0 + 1.5) / log2(2) = 2.5
    torch.testing.assert_close(r, torch.tensor([1 + 1.5 / math.log2(3) + 0.5, 2.5]))
    undiscounted = list_utility(batch, discount=False)
    torch.testing.assert_close(undiscounted, torch.tensor([3.5, 2.5]))
    only_clicks = list_utility(batch, weights={"click": 2.0}, discount=False)
    torch.testing.assert_close(only_clicks, torch.tensor([4.0, 2.0]))


def test_list_utility_matches_metrics_list_gain() -> None:
    rng = np.random.default_rng(0)
    lengths = [5, 1, 3, 4]
    exposed = [list(range(m)) for m in lengths]
    labels = {
        s: [rng.integers(0, 2, m).astype(float).tolist() for m in lengths]
        for s in ("click", "like", "long_view")
    }
    batch = make_batch([6] * 4, exposed, labels)
    ours = list_utility(batch).double().numpy()
    theirs = list_gain(
        {s: v.numpy() for s, v in batch.labels.items()}, batch.position_mask.numpy(), reduce=False
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_utility_threshold() -> None:
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert utility_threshold(r, 0.5) == 2.0
    assert utility_threshold(r, 0.25) == 1.0
    assert utility_threshold([1.0, float("nan"), 3.0], 0.5) == 2.0  # NaN rows dropped
    # 4 of 6 lists at R = 0: the median is 0, which would make every list "good"; tau moves
    # to the smallest R above 0 so that the zero-feedback lists count as bad.
    skewed = np.array([0.0, 0.0, 0.0, 0.0, 1.5, 2.0])
    assert utility_threshold(skewed, 0.5) == 1.5
    assert utility_threshold(skewed, 0.5, above_minimum=False) == 0.0
    assert utility_threshold([2.0, 2.0], 0.5) == 2.0  # all equal: every list good
    with pytest.raises(ValueError, match="quantile"):
        utility_threshold(r, 1.5)
    with pytest.raises(ValueError):
        utility_threshold([float("nan")], 0.5)
