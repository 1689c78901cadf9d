"""Multi-token prediction loss: the autoregressive model's extra heads (models/mtp.py)."""

from __future__ import annotations

import torch

from genrerank.data.dataset import Batch
from genrerank.losses.base import Loss, ModelOutput, register_loss

MTP_TARGETS = ("logged", "model")


@register_loss("mtp")
class MTPLoss(Loss):
    """Cross-entropy of head i at the state of position t on the item at position t + i, over
    the pairs (t, i) whose position t + i is logged (``position_mask``), divided by their count
    in the batch.

    ``target``:

    - ``"logged"`` (default): the logged item at t + i, as the next-item head's likelihood does
      at t: ``-log p_i(exposed_{t+i} | state t)``.
    - ``"model"``: the next-item head's own teacher-forced distribution at t + i (detached,
      ``ModelOutput.log_probs[:, :, t + i]``): ``-sum_c q(c) log p_i(c | state t)``. Self-
      speculative decoding keeps a proposal when the next-item head would choose it, so heads
      that imitate that head are accepted more often than heads that imitate the logging policy
      (a next-item head trained by ``gain_bce`` estimates gains, it does not imitate the logs).

    ``p_i`` is the softmax over candidates of ``ModelOutput.mtp_logits[..., t, i - 1]`` (the
    model masks padded candidates and the logged items before t + i, as it masks column t + i of
    ``log_probs``). The term's ``weight`` in the run config sets its share of the objective,
    e.g. ``{"name": "mtp", "weight": 0.5, "target": "model"}``.
    """

    def __init__(self, target: str = "logged") -> None:
        super().__init__()
        if target not in MTP_TARGETS:
            raise ValueError(f"loss 'mtp': target must be one of {MTP_TARGETS}, got {target!r}")
        self.target = target

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        logits = self.require(out, "mtp_logits", "mtp")
        if logits.dim() != 4:
            raise ValueError(f"mtp_logits must be [B, N, M, K], got {tuple(logits.shape)}")
        m, k = logits.shape[2], logits.shape[3]
        log_probs = torch.log_softmax(logits.float(), dim=1)
        teacher = out.log_probs.detach().float().exp() if self.target == "model" else None
        mask = batch.position_mask
        total = log_probs.new_zeros(())
        count = log_probs.new_zeros(())
        for i in range(1, min(k, m - 1) + 1):
            head = log_probs[:, :, : m - i, i - 1]  # [B, N, M - i]: states t for targets t + i
            valid = mask[:, i:] & mask[:, :-i]
            if teacher is None:
                target = batch.exposed[:, i:]
                picked = head.gather(1, target.unsqueeze(1)).squeeze(1)
            else:
                q = teacher[:, :, i:]
                # 0 * log 0 (masked candidates) counts as 0, not NaN.
                picked = torch.where(q > 0, q * head, torch.zeros_like(head)).sum(1)
            # Replaced, not multiplied: -inf at a padded pair must reach neither sum nor grad.
            picked = torch.where(valid, picked, torch.zeros_like(picked))
            total = total - picked.sum()
            count = count + valid.sum()
        return total / count.clamp_min(1.0)
