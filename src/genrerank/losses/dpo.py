"""Direct preference optimisation (Rafailov et al.) on pairs of lists.

    L = -log sigmoid(beta [ (log pi(y_w|x) - log pi_ref(y_w|x))
                          - (log pi(y_l|x) - log pi_ref(y_l|x)) ])

pi is the generator being tuned, pi_ref a frozen copy of the checkpoint it started from, y_w / y_l
the winning and losing lists of a request (:mod:`genrerank.data.pairs`). log pi(y|x) is the
list log-probability of :func:`~genrerank.losses.base.list_log_probs`: exact for the
autoregressive model, factorised over positions for NAR4Rec. The reference's log-probabilities
are data: computed once, under no gradient, before training (``PreferenceBatch.ref_log_prob``),
so the reference can never be trained.

``nll_weight`` adds the winner's mean per-position negative log-likelihood (TRL's ``rpo_alpha``):
re-ranked lists of one request share most items, and plain DPO then tends to lower both lists'
probabilities ("likelihood displacement"); the term keeps the winner likely.

Reported (``last_stats``, logged to TensorBoard as ``loss/dpo/<name>``): ``margin`` (the implicit
reward margin, beta times the bracket), ``accuracy`` (share of pairs with a positive margin),
``chosen_log_prob`` / ``rejected_log_prob`` (policy) and their change from the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genrerank.data.dataset import Batch
from genrerank.losses.base import Loss, ModelOutput, list_log_probs, register_loss


@register_loss("dpo")
class DPOLoss(Loss):
    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0) -> None:
        super().__init__()
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"loss 'dpo': beta must be > 0, got {beta}")
        if not (math.isfinite(nll_weight) and nll_weight >= 0):
            raise ValueError(f"loss 'dpo': nll_weight must be >= 0, got {nll_weight}")
        self.beta = float(beta)
        self.nll_weight = float(nll_weight)
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        pairs = getattr(batch, "pairs", 0)
        ref = getattr(batch, "ref_log_prob", None)
        if not pairs or ref is None:
            raise ValueError("loss 'dpo' reads preference pairs (genrerank finetune --method "
                             "dpo --pairs FILE); this batch has none")
        logp = list_log_probs(out.log_probs, batch)
        chosen, rejected = logp[:pairs], logp[pairs:]
        chosen_ref, rejected_ref = ref[:pairs], ref[pairs:]
        margin = self.beta * ((chosen - chosen_ref) - (rejected - rejected_ref))
        loss = -F.logsigmoid(margin).mean()
        stats = {
            "preference": loss.detach(),
            "margin": margin.detach().mean(),
            "accuracy": (margin.detach() > 0).float().mean(),
            "chosen_log_prob": chosen.detach().mean(),
            "rejected_log_prob": rejected.detach().mean(),
            "chosen_minus_ref": (chosen - chosen_ref).detach().mean(),
            "rejected_minus_ref": (rejected - rejected_ref).detach().mean(),
        }
        if self.nll_weight > 0:
            length = batch.position_mask[:pairs].sum(1).clamp_min(1)
            nll = (-chosen / length).mean()
            stats["winner_nll"] = nll.detach()
            loss = loss + self.nll_weight * nll
        self.last_stats = stats
        return loss
