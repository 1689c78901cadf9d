"""Policy-gradient fine-tuning (PPO's clipped objective with GRPO's group baseline) of a
stepwise generator against a list reward.

Each training batch of B requests becomes a rollout (:meth:`PolicyGradientLoss.prepare_batch`,
called by the shared trainer before the forward pass): ``group_size`` K lists per request are
sampled from the current policy (independent draws, duplicates kept, so the group is an unbiased
sample), scored by the reward function (the evaluator's reward: the simulator's oracle never
trains), and each list's advantage is its reward normalised within its request's group,
``A = (r - mean_K r) / (std_K r + eps)``: no value network, and requests that are easy or hard
for every list teach nothing. The loss over the B*K lists is

    L = -mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)) + kl_weight * KL - entropy_weight * H

with ``rho = pi(y|x) / pi_old(y|x)`` (pi_old = the policy that sampled, i.e. these weights just
before the step), KL the per-list k3 estimate ``exp(q) - q - 1``, ``q = log pi_ref(y|x) -
log pi(y|x)``, against the frozen reference, and H the mean per-position entropy of the policy
along the sampled lists (exploration bonus). With one update per rollout (the trainer's step)
rho is 1 in value and the clip never binds; its gradient is the group-normalised REINFORCE
gradient. Dropout must be off (fine-tuning turns it off) so that rho starts at exactly 1.

Only models that sample lists step by step (``draw``: the autoregressive model) can be tuned
this way: NAR4Rec's factorised probability is not the distribution its decoders draw from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from genrerank.data.dataset import Batch, take_rows
from genrerank.losses.base import Loss, ModelOutput, list_log_probs, register_loss

RewardFn = Callable[[Batch, torch.Tensor], torch.Tensor]  # (batch, lists [B,K,m]) -> [B,K]


@dataclass
class RolloutBatch(Batch):
    """B*K sampled lists (rows of request b are ``b*K .. b*K+K-1``) with what the loss needs."""

    group_size: int = 1
    old_log_prob: torch.Tensor | None = None  # [B*K] under the policy that sampled
    ref_log_prob: torch.Tensor | None = None  # [B*K] under the frozen reference
    advantage: torch.Tensor | None = None  # [B*K] group-normalised reward
    reward: torch.Tensor | None = None  # [B*K]


def group_advantages(reward: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[B, K]`` rewards -> advantages normalised within each request's group of K (0 where
    every list of a request has the same reward)."""
    mean = reward.mean(1, keepdim=True)
    std = reward.std(1, keepdim=True, unbiased=False)
    return (reward - mean) / (std + eps)


def position_entropy(log_probs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[B]`` mean entropy of the position distributions ``log_probs [B, N, M]`` over each
    row's valid positions (impossible candidates, ``-inf``, add nothing)."""
    finite = torch.isfinite(log_probs)
    lp = torch.where(finite, log_probs, torch.zeros((), device=log_probs.device))
    h = -(lp.exp() * lp).masked_fill(~finite, 0.0).sum(1)  # [B, M]
    h = torch.where(batch.position_mask, h, torch.zeros((), device=h.device))
    return h.sum(1) / batch.position_mask.sum(1).clamp_min(1)


@register_loss("ppo")
class PolicyGradientLoss(Loss):
    def __init__(self, group_size: int = 8, temperature: float = 1.0, clip: float = 0.2,
                 kl_weight: float = 0.05, entropy_weight: float = 0.001) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(f"loss 'ppo': group_size must be >= 2 (the baseline is the group "
                             f"mean), got {group_size}")
        for name, value in (("temperature", temperature), ("clip", clip)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"loss 'ppo': {name} must be > 0, got {value}")
        for name, value in (("kl_weight", kl_weight), ("entropy_weight", entropy_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"loss 'ppo': {name} must be >= 0, got {value}")
        self.group_size = int(group_size)
        self.temperature = float(temperature)
        self.clip = float(clip)
        self.kl_weight = float(kl_weight)
        self.entropy_weight = float(entropy_weight)
        # Held outside the module tree: never saved with the objective, never optimised.
        self._attached: tuple[nn.Module, RewardFn] | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    def attach(self, reference: nn.Module, reward_fn: RewardFn) -> None:
        """The frozen reference model and the reward of sampled lists (the evaluator's)."""
        for p in reference.parameters():
            p.requires_grad_(False)
        self._attached = (reference.eval(), reward_fn)

    @torch.no_grad()
    def prepare_batch(self, model: nn.Module, batch: Batch, seed: int) -> RolloutBatch:
        if self._attached is None:
            raise ValueError("loss 'ppo' has no reference and reward attached (use "
                             "genrerank finetune --method ppo)")
        draw = getattr(model, "draw", None)
        if draw is None:
            raise ValueError(f"loss 'ppo' samples lists step by step; model "
                             f"{getattr(model, 'name', type(model).__name__)!r} cannot (use an "
                             "autoregressive generator)")
        reference, reward_fn = self._attached
        k = self.group_size
        generator = torch.Generator(device=batch.candidate_mask.device).manual_seed(seed)
        lists, old = draw(batch, batch.position_mask.sum(1), k, temperature=self.temperature,
                          generator=generator)
        # Inference tensors cannot index an autograd graph later: plain copies.
        lists, old = lists.clone(), old.clone()
        reward = reward_fn(batch, lists).clone().float()
        b, _, m = lists.shape
        rows = torch.arange(b, device=lists.device).repeat_interleave(k)
        flat = lists.reshape(b * k, m)
        rolled = take_rows(batch, rows, exposed=flat.clamp_min(0), position_mask=flat >= 0,
                           labels={})
        ref = list_log_probs(reference(rolled).log_probs, rolled)
        return RolloutBatch(**{f.name: getattr(rolled, f.name) for f in fields(Batch)},
                            group_size=k, old_log_prob=old.reshape(-1).float(),
                            ref_log_prob=ref.float(),
                            advantage=group_advantages(reward).reshape(-1),
                            reward=reward.reshape(-1))

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        if not isinstance(batch, RolloutBatch):
            raise ValueError("loss 'ppo' reads rollouts (genrerank finetune --method ppo); this "
                             "batch has none")
        logp = list_log_probs(out.log_probs, batch)
        ratio = torch.exp(logp - batch.old_log_prob)
        adv = batch.advantage
        surrogate = torch.minimum(ratio * adv,
                                  ratio.clamp(1 - self.clip, 1 + self.clip) * adv).mean()
        q = batch.ref_log_prob - logp
        kl = (torch.exp(q) - q - 1).mean()
        entropy = position_entropy(out.log_probs, batch).mean()
        self.last_stats = {
            "reward": batch.reward.mean(),
            "kl_ref": kl.detach(),
            "entropy": entropy.detach(),
            "clip_fraction": ((ratio.detach() - 1).abs() > self.clip).float().mean(),
        }
        return -surrogate + self.kl_weight * kl - self.entropy_weight * entropy
