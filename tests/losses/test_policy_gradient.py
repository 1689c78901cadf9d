"""PPO with a group baseline: advantages, entropy and the loss against hand values, the clip,
and the rollout ``prepare_batch`` builds from a tiny autoregressive model."""

from __future__ import annotations

import copy
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.losses import ModelOutput
from genrerank.losses.base import list_log_probs
from genrerank.losses.policy_gradient import (
    PolicyGradientLoss,
    RolloutBatch,
    group_advantages,
    position_entropy,
)
from genrerank.models import build_model
from tests.losses._helpers import make_batch

INF = float("inf")


def test_group_advantages_by_hand() -> None:
    reward = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 4.0, 2.0]])
    adv = group_advantages(reward)
    std = math.sqrt(2.0 / 3.0)  # population std of (1, 2, 3) and, x2, of (0, 4, 2)
    expected = torch.tensor([[-1 / std, 0.0, 1 / std], [0.0, 0.0, 0.0],
                             [-1 / std, 1 / std, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-4)
    assert torch.equal(adv[1], torch.zeros(3))  # a constant group teaches nothing
    assert torch.allclose(adv.sum(1), torch.zeros(3), atol=1e-5)


def test_position_entropy_by_hand_ignores_impossible_candidates_and_padding() -> None:
    batch = make_batch([3, 2], [[0, 1], [1]])
    lp = torch.tensor([
        # row 0: column 0 = (1/2, 1/2, 0), column 1 = (1, 0, 0)
        [[math.log(0.5), 0.0], [math.log(0.5), -INF], [-INF, -INF]],
        # row 1: column 0 = (1/4, 3/4, -), column 1 is padding (garbage)
        [[math.log(0.25), 5.0], [math.log(0.75), float("nan")], [-INF, 3.0]],
    ])
    h = position_entropy(lp, batch)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert h.tolist() == pytest.approx([math.log(2.0) / 2, h1], abs=1e-6)


def _rollout(out: ModelOutput, old_shift: float, advantage: list[float],
             ref_shift: list[float]) -> RolloutBatch:
    batch = make_batch([3, 3, 2, 2], [[0, 1], [2, 0], [1], [0, 1]])
    logp = list_log_probs(out.log_probs.detach(), batch)
    return RolloutBatch(**{f.name: getattr(batch, f.name) for f in fields(Batch)}, group_size=2,
                        old_log_prob=logp - old_shift, ref_log_prob=logp + torch.tensor(ref_shift),
                        advantage=torch.tensor(advantage), reward=torch.tensor([1.0, 0, 2, 3]))


def _output() -> ModelOutput:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 2, generator=gen)
    logits[2:, 2, :] = -INF  # rows 2, 3 have two candidates
    return ModelOutput(log_probs=torch.log_softmax(logits, 1).requires_grad_(True))


def test_loss_by_hand_with_ratio_one_kl_and_entropy() -> None:
    out = _output()
    adv = [1.0, -1.0, 0.5, -0.5]
    ref_shift = [0.3, -0.2, 0.0, 1.0]  # q = log pi_ref - log pi
    batch = _rollout(out, 0.0, adv, ref_shift)
    loss_fn = PolicyGradientLoss(group_size=2, kl_weight=0.5, entropy_weight=0.1)
    loss = loss_fn(out, batch)
    kl = sum(math.exp(q) - q - 1 for q in ref_shift) / 4
    entropy = position_entropy(out.log_probs.detach(), batch).mean().item()
    # by hand too, for the first row (two valid positions, three candidates)
    p = out.log_probs.detach()[0].exp()
    h0 = float(-(p * p.log()).sum(0).mean())
    assert position_entropy(out.log_probs.detach(), batch)[0].item() == pytest.approx(h0, 1e-6)
    expected = -sum(adv) / 4 + 0.5 * kl - 0.1 * entropy
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    stats = {k: v.item() for k, v in loss_fn.last_stats.items()}
    assert stats["kl_ref"] == pytest.approx(kl, abs=1e-6)
    assert stats["reward"] == pytest.approx(1.5)
    assert stats["clip_fraction"] == 0.0
    assert stats["entropy"] == pytest.approx(entropy, abs=1e-6)


def test_clipped_ratio_with_positive_advantage_has_no_gradient() -> None:
    out = _output()
    # ratio = e^0.5 > 1.2 on every row
    batch = _rollout(out, 0.5, [1.0, 2.0, 0.5, 3.0], [0.0] * 4)
    loss_fn = PolicyGradientLoss(group_size=2, clip=0.2, kl_weight=0.0, entropy_weight=0.0)
    loss = loss_fn(out, batch)
    loss.backward()
    assert torch.equal(torch.nan_to_num(out.log_probs.grad), torch.zeros_like(out.log_probs))
    assert loss.item() == pytest.approx(-1.2 * (1 + 2 + 0.5 + 3) / 4, abs=1e-6)
    assert loss_fn.last_stats["clip_fraction"].item() == 1.0
    # A negative advantage is not clipped on that side: the gradient flows.
    out2 = _output()
    loss_fn(out2, _rollout(out2, 0.5, [-1.0, 2.0, 0.5, 3.0], [0.0] * 4)).backward()
    assert out2.log_probs.grad[0].abs().sum() > 0
    assert out2.log_probs.grad[1:].abs().sum() == 0


def test_forward_refuses_a_plain_batch_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="rollouts"):
        PolicyGradientLoss()(_output(), make_batch([3, 3, 2, 2], [[0], [0], [0], [0]]))
    for k in (1, 0):
        with pytest.raises(ValueError, match="group_size"):
            PolicyGradientLoss(group_size=k)
    with pytest.raises(ValueError, match="clip"):
        PolicyGradientLoss(clip=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        PolicyGradientLoss(kl_weight=-1.0)


def _model(spec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("autoregressive", spec, {"dim": 16, "n_heads": 4, "n_kv_heads": 2,
                                                "dropout": 0.0})


def _reward(batch: Batch, lists: torch.Tensor) -> torch.Tensor:
    """A deterministic reward of the lists [B, K, m]: the first item's index, plus a bit."""
    return lists[..., 0].float() + 0.1 * lists.clamp_min(0).sum(-1).float()


def test_prepare_batch_builds_a_grouped_rollout(tiny_dataset: Path) -> None:
    data = RerankDataset(tiny_dataset)
    batch = collate([data[i] for i in range(len(data))])
    model = _model(data.spec, 0)
    reference = _model(data.spec, 1)  # another function: ref log-probs must be its own
    k = 3
    loss_fn = PolicyGradientLoss(group_size=k)
    with pytest.raises(ValueError, match="no reference"):
        loss_fn.prepare_batch(model, batch, seed=0)
    loss_fn.attach(reference, _reward)
    assert all(not p.requires_grad for p in reference.parameters())
    model.train()
    rolled = loss_fn.prepare_batch(model, batch, seed=5)
    assert model.training  # draw restores the mode
    b, m = batch.batch_size, batch.exposed.shape[1]
    assert isinstance(rolled, RolloutBatch) and rolled.group_size == k
    assert rolled.exposed.shape == (b * k, m)
    for name in ("old_log_prob", "ref_log_prob", "advantage", "reward"):
        assert getattr(rolled, name).shape == (b * k,), name
    rows = torch.arange(b).repeat_interleave(k)
    assert torch.equal(rolled.request_index, batch.request_index[rows])
    assert torch.equal(rolled.candidate_mask, batch.candidate_mask[rows])
    assert torch.equal(rolled.position_mask.sum(1), batch.position_mask.sum(1)[rows])
    assert rolled.labels == {}
    for r in range(b * k):  # distinct real candidates at the valid positions
        items = rolled.exposed[r][rolled.position_mask[r]].tolist()
        assert len(set(items)) == len(items)
        assert all(rolled.candidate_mask[r, i] for i in items)
    lists = torch.where(rolled.position_mask, rolled.exposed, -1).view(b, k, m)
    assert torch.allclose(rolled.reward, _reward(batch, lists).reshape(-1))
    assert torch.allclose(rolled.advantage.view(b, k).sum(1), torch.zeros(b), atol=1e-4)
    assert torch.allclose(rolled.advantage,
                          group_advantages(rolled.reward.view(b, k)).reshape(-1))
    model.eval()
    with torch.no_grad():
        teacher = list_log_probs(model(rolled).log_probs, rolled)
        ref = list_log_probs(reference(rolled).log_probs, rolled)
    assert torch.allclose(rolled.old_log_prob, teacher, atol=1e-4)
    assert torch.allclose(rolled.ref_log_prob, ref, atol=1e-4)
    assert not torch.allclose(rolled.ref_log_prob, rolled.old_log_prob, atol=1e-3)
    # seeded: the same seed draws the same lists
    again = loss_fn.prepare_batch(model, batch, seed=5)
    assert torch.equal(again.exposed, rolled.exposed)
    # and the loss runs on the rollout with a gradient into the policy
    model.train()
    loss = loss_fn(model(rolled), rolled)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in reference.parameters())


def test_prepare_batch_refuses_a_model_that_cannot_draw(tiny_dataset: Path) -> None:
    data = RerankDataset(tiny_dataset)
    batch = collate([data[i] for i in range(len(data))])
    torch.manual_seed(0)
    nar = build_model("nar4rec", data.spec, {"dim": 16})
    assert getattr(nar, "draw", None) is None
    loss_fn = PolicyGradientLoss(group_size=2)
    loss_fn.attach(copy.deepcopy(nar), _reward)
    with pytest.raises(ValueError, match="nar4rec.*autoregressive"):
        loss_fn.prepare_batch(nar, batch, seed=0)
