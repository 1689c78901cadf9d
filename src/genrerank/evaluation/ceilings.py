"""How much list-awareness can add to what one model knows about appeal (simulated data only).

The learnable ceilings (:meth:`Simulator.learnable_ceilings`) assume perfect knowledge of each
user's taste and each item's quality. This asks a narrower question about one trained model:

1. Its appeal estimate: the click logit of every candidate at position 0
   (``ModelOutput.click_logits[..., 0]``).
2. An affine map onto the true appeal scale, fitted by least squares on the VALID split against
   the simulator's true appeal (two numbers; an oracle diagnostic, never visible to the model).
3. On the evaluated split: beam search under the TRUE list model (satiation, complementarity,
   scroll, position bias) on the mapped estimate (:meth:`Simulator.list_ceiling`), scored under
   the true state.

That list is the best any list-aware decoder could serve with this model's knowledge of appeal.
Its distance to the model's own sort is the list-level value there is to learn; its distance to
the learnable ceilings is appeal the model has not learned (or the features do not reveal).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.simulator import RequestState, Simulator, request_index
from genrerank.evaluation.online import headroom_captured

#: Appeal given to padded candidates: never chosen by the beam.
_PAD_APPEAL = -30.0


@torch.inference_mode()
def model_appeal(model: torch.nn.Module, dataset: RerankDataset,
                 batch_size: int = 256) -> np.ndarray:
    """``[R, N]`` click logit of every candidate at position 0 (NaN at padding)."""
    model.eval()
    parts = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        logits = model(batch).click_logits[..., 0].float()
        parts.append(torch.where(batch.candidate_mask, logits, float("nan")).numpy())
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])),
                                  constant_values=np.nan) for p in parts])


def _state(dataset: RerankDataset) -> tuple[Simulator, RequestState]:
    if "simulator" not in dataset.spec.extra:
        raise ValueError("list ceiling: needs simulated data (the true user model)")
    sim = Simulator.from_spec(dataset.spec)
    return sim, sim.requests(request_index(dataset.request_ids))


def fit_calibration(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` of the least-squares line truth ~ estimate over real candidates."""
    real = np.isfinite(estimate)
    if real.sum() < 2 or np.ptp(estimate[real]) == 0:
        raise ValueError("list ceiling: the appeal estimate is constant; nothing to calibrate")
    slope, intercept = np.polyfit(estimate[real], truth[:, : estimate.shape[1]][real], 1)
    return float(slope), float(intercept)


def list_ceiling(
    model: torch.nn.Module, valid: RerankDataset, test: RerankDataset, beam_width: int = 16,
) -> dict[str, Any]:
    """The list ceiling on ``model``'s appeal (module docstring), reported on ``test``.

    Returns the true expected gain and headroom of (a) sorting by the model's appeal and (b) the
    beam under the true list model on it, with the calibration and the correlation of the
    estimate with the true appeal on ``test``.
    """
    _, valid_state = _state(valid)
    slope, intercept = fit_calibration(model_appeal(model, valid), valid_state.appeal)
    sim, state = _state(test)
    raw = model_appeal(model, test)
    n = state.appeal.shape[1]
    if raw.shape[1] < n:
        raw = np.pad(raw, ((0, 0), (0, n - raw.shape[1])), constant_values=np.nan)
    real = np.isfinite(raw)
    estimate = np.where(real, slope * np.nan_to_num(raw) + intercept, _PAD_APPEAL)
    m = sim.config.list_length
    logged = test.logged_lists()
    logging_gain = float(sim.expected_gain(state, np.maximum(logged, 0), logged >= 0).mean())
    _, upper = sim.upper_bound(state, beam_width=beam_width)
    upper_gain = float(upper.mean())
    # The model's own order (the raw logits: a negative calibration slope must not flip it).
    sort = np.argsort(-np.where(real, raw, -np.inf), axis=1, kind="stable")[:, :m]
    sort_gain = float(sim.expected_gain(state, sort).mean())
    beam = sim.list_ceiling(state, estimate, beam_width=beam_width)
    beam_gain = float(beam.mean())
    return {
        "requests": len(test),
        "calibration": {"slope": slope, "intercept": intercept, "fitted_on": "valid"},
        "appeal_correlation": float(np.corrcoef(raw[real], state.appeal[real])[0, 1]),
        "sort_expected_gain": sort_gain,
        "sort_headroom": headroom_captured(sort_gain, logging_gain, upper_gain),
        "beam_expected_gain": beam_gain,
        "beam_expected_gain_se": float(beam.std(ddof=1) / np.sqrt(len(beam))),
        "beam_headroom": headroom_captured(beam_gain, logging_gain, upper_gain),
        "logging_expected_gain": logging_gain,
        "upper_bound_expected_gain": upper_gain,
        "beam_width": beam_width,
    }
