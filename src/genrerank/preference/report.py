"""What a fine-tuned policy does on held-out requests, measured without the oracle: the list
reward of its decoded lists through the evaluator, and its KL divergence from the reference.

Used for validation (the trainer selects on ``reward``) and by the preference benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from genrerank.data.dataset import RerankDataset, collate, take_rows
from genrerank.evaluation.offline import decode_lists
from genrerank.losses.base import list_log_probs
from genrerank.rewards import ListReward, SignalSource

#: Samples per request of the sequence-level KL estimate (stepwise models).
KL_SAMPLES = 4


@torch.no_grad()
def kl_to_reference(model: torch.nn.Module, reference: torch.nn.Module, batch: Any,
                    seed: int = 0) -> torch.Tensor:
    """``[B]`` KL(pi || pi_ref) per request. Stepwise models: the Monte-Carlo estimate
    ``mean log pi(y) - log pi_ref(y)`` over :data:`KL_SAMPLES` lists drawn from pi. Matrix models
    (NAR4Rec): the exact KL of the factorised list distributions, the sum over the request's
    positions of the KL between the two position distributions."""
    lengths = batch.position_mask.sum(1)
    draw = getattr(model, "draw", None)
    if draw is not None:
        generator = torch.Generator().manual_seed(seed)
        lists, logp = draw(batch, lengths, KL_SAMPLES, generator=generator)
        b, k, m = lists.shape
        flat = lists.reshape(b * k, m)
        rows = torch.arange(b).repeat_interleave(k)
        rolled = take_rows(batch, rows, exposed=flat.clamp_min(0), position_mask=flat >= 0,
                           labels={})
        ref = list_log_probs(reference(rolled).log_probs, rolled).reshape(b, k)
        return (logp - ref).mean(1)
    p = model(batch).log_probs
    q = reference(batch).log_probs
    finite = torch.isfinite(p) & torch.isfinite(q)
    zero = torch.zeros((), device=p.device)
    per = (p.exp() * (torch.where(finite, p, zero) - torch.where(finite, q, zero)))
    per = per.masked_fill(~finite, 0.0).sum(1)  # [B, M]
    return torch.where(batch.position_mask, per, zero).sum(1)


class PolicyReport:
    """``reward`` (mean list reward of the policy's decoded lists, evaluator source),
    ``reward/<term>`` and ``kl_ref`` on the first ``max_requests`` requests of ``dataset``."""

    def __init__(self, dataset: RerankDataset, reward: ListReward, source: SignalSource,
                 reference: torch.nn.Module, decode: Mapping[str, Any],
                 max_requests: int | None = 2000, batch_size: int = 256) -> None:
        n = len(dataset) if max_requests is None else min(len(dataset), max_requests)
        self.dataset = Subset(dataset, range(n))
        self.reward, self.source, self.reference = reward, source, reference
        self.decode = {k: v for k, v in decode.items() if k not in ("selection",)}
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, loader: Any = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        params = dict(self.decode)
        name = params.pop("name", "greedy")
        totals: dict[str, list[np.ndarray]] = {}
        kls = []
        try:
            for index, batch in enumerate(DataLoader(self.dataset, batch_size=self.batch_size,
                                                     shuffle=False, collate_fn=collate)):
                lists = decode_lists(model, batch, name, params).clone()
                scored = self.reward(batch, lists.unsqueeze(1), self.source)
                totals.setdefault("reward", []).append(scored.total[:, 0].cpu().numpy())
                for term, value in scored.terms.items():
                    totals.setdefault(f"reward/{term}", []).append(value[:, 0].cpu().numpy())
                kls.append(kl_to_reference(model, self.reference, batch, seed=index).numpy())
        finally:
            model.train(was_training)
        out = {k: float(np.concatenate(v).mean()) for k, v in totals.items()}
        out["kl_ref"] = float(np.concatenate(kls).mean())
        return out
