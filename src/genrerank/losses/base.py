"""Loss base class, the loss registry, the ``ModelOutput`` every list generator returns, and
the list utility R used by the unlikelihood loss.

Shapes: B = requests, N = max candidates, M = max exposed list length, D = hidden size.
Losses read ``batch.position_mask`` / ``batch.candidate_mask`` and never the padded zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec
from genrerank.data.signals import describe_signals, gain_weights
from genrerank.metrics.ranking import DEFAULT_GAIN_WEIGHTS

__all__ = [
    "DEFAULT_TAU_QUANTILE",
    "LOSSES",
    "ListScoreOutput",
    "Loss",
    "ModelOutput",
    "exposed_log_probs",
    "list_log_probs",
    "list_utility",
    "register_loss",
    "utility_threshold",
]

#: Default quantile of the training-split list utility R used as the unlikelihood threshold tau:
#: the median, so about half of the logged lists are "good" (see :func:`utility_threshold`).
DEFAULT_TAU_QUANTILE: float = 0.5


@dataclass
class ModelOutput:
    """What every list-generating model returns from ``forward(batch)``.

    Attributes:
        log_probs: ``[B, N, M]`` log-softmax over CANDIDATES in each position column:
            ``log_probs[b, i, j] = log p(candidate i fills position j)``. Padded candidates
            must have zero probability (``-inf`` or very negative); padded position columns
            are arbitrary and ignored by every loss.
        item_repr: ``[B, N, D]`` encoded candidates (item contrastive term, contrastive
            decoding), or None.
        position_repr: ``[M', D]`` shared position embeddings or ``[B, M, D]`` encoded
            positions, or None.
        click_logits: ``[B, N, M]`` logit that candidate i is clicked if shown at position j,
            or None.
        length_logits: ``[B, L_max + 1]`` list-length classifier; class L = length L, or None.
        logits: ``[B, N, M]`` the raw scores whose column-wise softmax gives ``log_probs``
            (position effects may be added per column: the softmax ignores them), for losses
            that read a score as a value rather than a probability (``gain_bce``), or None.
        mtp_logits: ``[B, N, M, K]`` multi-token prediction heads (:mod:`genrerank.models.mtp`):
            ``[b, :, t, i - 1]`` = head i's masked scores, at the state of position t, for the
            item at position t + i (the ``mtp`` loss), or None.
    """

    log_probs: torch.Tensor
    item_repr: torch.Tensor | None = None
    position_repr: torch.Tensor | None = None
    click_logits: torch.Tensor | None = None
    length_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mtp_logits: torch.Tensor | None = None


@dataclass
class ListScoreOutput:
    """What a list evaluator (a model of ``kind = "evaluator"``) returns from ``forward``.

    Attributes:
        signal_logits: signal name -> ``[B, M]`` logit that the item at position j of each list
            gets that signal (e.g. is clicked), given the items above it. Entries at empty or
            padded positions are arbitrary (finite) and ignored by every loss and score.
    """

    signal_logits: dict[str, torch.Tensor]


class Loss(nn.Module):
    """A training objective term: ``forward(out, batch)`` returns a scalar tensor.

    Subclasses are registered by name with :func:`register_loss`; their constructor keyword
    arguments are the configuration parameters accepted by ``build_loss``.
    """

    #: Registry name, set by :func:`register_loss`.
    name: ClassVar[str] = ""

    def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def resolve_params(cls, params: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
        """The configuration ``params`` with what the data set decides filled in where the
        config leaves it out (gain weights, the click signal: :mod:`genrerank.data.signals`);
        a one-line ValueError when the data set lacks a signal the loss needs. Default: as is."""
        return params

    @classmethod
    def _resolve_gain_weights(cls, params: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
        """For losses reading the list gain: ``weights`` default to the data set's gain weights,
        and at least one signal of the data set must weigh above 0."""
        if params.get("weights") is None:
            params = {**params, "weights": gain_weights(spec)}
        if not any(float(params["weights"].get(s, 0.0)) > 0 for s in spec.labels):
            raise ValueError(
                f"loss {cls.name!r} needs a signal with a gain weight above 0 (set "
                f"gain_weights in the feature spec or the loss's weights) but the data set has "
                f"{describe_signals(spec)}"
            )
        return params

    @staticmethod
    def require(out: ModelOutput, field: str, loss_name: str) -> torch.Tensor:
        """``getattr(out, field)``, with a clear error when the model does not produce it."""
        value = getattr(out, field)
        if value is None:
            raise ValueError(f"loss {loss_name!r} needs ModelOutput.{field}; the model gave None")
        return value


#: Loss name -> class; filled by :func:`register_loss`.
LOSSES: dict[str, type[Loss]] = {}

LossT = TypeVar("LossT", bound=type[Loss])


def register_loss(name: str) -> Callable[[LossT], LossT]:
    """Class decorator: make a :class:`Loss` subclass buildable as ``build_loss(name, ...)``."""

    def decorate(cls: LossT) -> LossT:
        if not (isinstance(cls, type) and issubclass(cls, Loss)):
            raise TypeError(f"register_loss({name!r}) decorates Loss subclasses, got {cls!r}")
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"loss name {name!r} is already registered to {LOSSES[name]!r}")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return decorate


def exposed_log_probs(log_probs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[B, M]`` log p^[exposed_j, j] (the one-hot target entries); 0 at padded positions.

    Padded positions are replaced, not multiplied by the mask, so garbage there (NaN, +inf)
    reaches neither the value nor the gradient.
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [B, N, M], got shape {tuple(log_probs.shape)}")
    b, _, m = log_probs.shape
    if batch.exposed.shape != (b, m):
        raise ValueError(
            f"batch.exposed has shape {tuple(batch.exposed.shape)}, log_probs implies {(b, m)}"
        )
    picked = log_probs.float().gather(1, batch.exposed.unsqueeze(1)).squeeze(1)
    return torch.where(batch.position_mask, picked, torch.zeros_like(picked))


def list_log_probs(log_probs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[B]`` log-probability of each row's list (``batch.exposed`` at ``position_mask``):
    the sum of its teacher-forced position terms. For an autoregressive model that is the exact
    sequence log-probability log pi(y | x); for NAR4Rec the factorised one, sum_j log p_j(y_j)
    (its positions are modelled independently). Padded positions add 0."""
    return exposed_log_probs(log_probs, batch).sum(1)


def valid_count(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries as a float tensor, at least 1 (an all-padding batch gives 0 loss)."""
    return mask.sum().clamp_min(1).to(torch.float32)


def list_utility(
    batch: Batch,
    weights: Mapping[str, float] = DEFAULT_GAIN_WEIGHTS,
    discount: bool = True,
) -> torch.Tensor:
    """List gain R ``[B]`` of the logged lists, in torch (same formula as ``metrics.list_gain``).

    R = sum over valid positions j (0-based) of ``sum_s weights[s] * labels[s][:, j]``, times
    ``1 / log2(j + 2)`` when ``discount``. ``weights`` default to the library's for the built-in
    signals; training passes the data set's (:func:`genrerank.data.signals.gain_weights`).
    Signals in ``batch.labels`` without a weight (e.g. watch_time) are ignored; weights for
    signals the source lacks contribute nothing. Rows without a valid position get R = 0. No
    gradient flows (labels are data).
    """
    mask = batch.position_mask
    m = mask.shape[1]
    gain = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for signal, values in batch.labels.items():
        if signal in weights:
            clean = torch.where(mask, values.float(), torch.zeros((), device=mask.device))
            gain = gain + float(weights[signal]) * clean
    if discount:
        positions = torch.arange(m, dtype=torch.float32, device=mask.device)
        gain = gain / torch.log2(positions + 2.0)
    return gain.sum(dim=1)


def utility_threshold(
    utilities: torch.Tensor | np.ndarray | Sequence[float],
    quantile: float = DEFAULT_TAU_QUANTILE,
    *,
    above_minimum: bool = True,
) -> float:
    """Unlikelihood threshold tau: the ``quantile`` of R over the TRAINING split.

    Called once by the trainer with ``list_utility`` of every training request; lists with
    R >= tau count as good (likelihood), the rest as bad (unlikelihood). NaN entries (pure
    padding rows of ``metrics.list_gain``) are dropped. The quantile is linearly
    interpolated (numpy's default).

    R usually has a large atom at its minimum (lists without any feedback, R = 0). When the
    quantile lands on that minimum, no list would fall below tau and the unlikelihood term
    would silently never fire; with ``above_minimum`` (default) tau then moves up to the
    smallest R above the minimum, so exactly the minimum-R lists count as bad. If all R are
    equal, tau = that value (every list good: pure likelihood).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    if isinstance(utilities, torch.Tensor):
        utilities = utilities.detach().cpu().double().numpy()
    r = np.asarray(utilities, dtype=np.float64).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0:
        raise ValueError("utility_threshold needs at least one non-NaN utility")
    if not np.isfinite(r).all():
        raise ValueError("utilities must be finite")
    tau = float(np.quantile(r, quantile))
    lowest = float(r.min())
    if above_minimum and tau <= lowest:
        above = r[r > lowest]
        if above.size:
            tau = float(above.min())
    return tau
