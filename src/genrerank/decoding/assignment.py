"""Optimal assignment: the list maximising ``sum_t log p(y_t | t)`` with distinct items."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from genrerank.decoding import prepare_inputs, register_decoder


@register_decoder("hungarian")
@torch.no_grad()
def hungarian(
    log_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    list_length: int | torch.Tensor,
) -> torch.Tensor:
    """Hungarian algorithm per request on the real-candidates x first-``L_b``-positions block.

    Returns LongTensor ``[B, m]``. The optimum over all lists of ``L_b`` distinct real items, so
    its total log-prob bounds every other decoder's. Loops over requests (scipy, CPU).
    """
    lp, mask, lengths, m = prepare_inputs(log_probs, candidate_mask, list_length)
    b = lp.shape[0]
    out = np.full((b, m), -1, dtype=np.int64)
    # float64: the solver's dual potentials lose small differences in float32.
    lp_np = lp.cpu().numpy().astype(np.float64)
    mask_np = mask.cpu().numpy()
    lengths_np = lengths.cpu().numpy()
    for r in range(b):
        length = int(lengths_np[r])
        if length == 0:
            continue
        real = np.flatnonzero(mask_np[r])
        rows, cols = linear_sum_assignment(lp_np[r, real, :length], maximize=True)
        out[r, cols] = real[rows]
    return torch.from_numpy(out).to(lp.device)
