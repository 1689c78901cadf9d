"""Training losses, allRank style: one module per loss, chosen by name from configuration.

    loss = build_loss("unlikelihood", tau=0.8)
    objective = build_objective(
        [{"name": "unlikelihood", "tau": 0.8}, {"name": "contrastive", "weight": 0.1}]
    )
    total, components = objective(model_output, batch)

Training first fills in what the data set decides (:func:`resolve_loss_config`: its gain weights,
its click signal) where the configuration leaves it out, so one config serves any signals.

Every loss is a :class:`Loss` (``forward(out: ModelOutput, batch: Batch) -> scalar``)
registered in :data:`LOSSES` by ``@register_loss("name")``; its constructor keyword arguments
are its configuration parameters.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from genrerank.data.dataset import Batch
from genrerank.data.schema import FeatureSpec

# Importing the loss modules runs their @register_loss decorators (fills LOSSES).
from genrerank.losses import (  # noqa: F401
    click,
    contrastive,
    dpo,
    gain,
    length,
    likelihood,
    mtp,
    policy_gradient,
    signals,
    skeleton,
    unlikelihood,
)
from genrerank.losses.base import (
    DEFAULT_TAU_QUANTILE,
    LOSSES,
    Loss,
    ModelOutput,
    list_utility,
    register_loss,
    utility_threshold,
)
from genrerank.losses.click import ClickBCELoss
from genrerank.losses.contrastive import ContrastiveLoss
from genrerank.losses.dpo import DPOLoss
from genrerank.losses.gain import GainBCELoss
from genrerank.losses.length import ListLengthLoss
from genrerank.losses.likelihood import LikelihoodLoss
from genrerank.losses.mtp import MTPLoss
from genrerank.losses.policy_gradient import PolicyGradientLoss
from genrerank.losses.unlikelihood import UnlikelihoodLoss

__all__ = [
    "DEFAULT_TAU_QUANTILE",
    "LOSSES",
    "ClickBCELoss",
    "CompositeLoss",
    "ContrastiveLoss",
    "DPOLoss",
    "GainBCELoss",
    "LikelihoodLoss",
    "ListLengthLoss",
    "Loss",
    "MTPLoss",
    "ModelOutput",
    "PolicyGradientLoss",
    "UnlikelihoodLoss",
    "build_loss",
    "build_objective",
    "list_utility",
    "register_loss",
    "resolve_loss_config",
    "utility_threshold",
]


def _accepted_params(cls: type[Loss]) -> tuple[list[str], bool]:
    """Constructor keyword names of ``cls`` and whether it takes ``**kwargs``."""
    names, var_kw = [], False
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:  # skip self
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(p.name)
    return names, var_kw


def build_loss(name: str, **params: Any) -> Loss:
    """Instantiate the loss registered as ``name`` with its configuration ``params``.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names).
        TypeError: a parameter the loss does not accept (the message names it).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    cls = LOSSES[name]
    accepted, var_kw = _accepted_params(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown and not var_kw:
        raise TypeError(f"loss {name!r} got unknown parameter(s) {unknown}; it accepts {accepted}")
    return cls(**params)


def resolve_loss_config(
    spec: Sequence[Mapping[str, Any]] | Mapping[str, Any], data_spec: FeatureSpec
) -> list[dict[str, Any]]:
    """The loss terms of a configuration (as :func:`build_objective` takes them) with what the
    data set decides filled in (``Loss.resolve_params``): gain weights from
    ``data_spec.gain_weights`` (else the library defaults for built-in signals, else 0), the
    click signal. A term that needs a signal the data set lacks raises a one-line ValueError
    naming the signals it has. Unknown loss names are left to :func:`build_objective`."""
    items = [spec] if isinstance(spec, Mapping) else list(spec)
    out = []
    for item in items:
        term = dict(item) if isinstance(item, Mapping) else item
        if isinstance(term, dict) and term.get("name") in LOSSES:
            term = LOSSES[term["name"]].resolve_params(term, data_spec)
        out.append(term)
    return out


class CompositeLoss(nn.Module):
    """Weighted sum of named loss terms.

    ``forward(out, batch)`` returns ``(total, components)``: ``total`` is the scalar
    ``sum_k weight_k * term_k`` to back-propagate; ``components`` maps each term's key to its
    UNWEIGHTED value, detached (for logging; ``.item()`` it when you log, so training steps
    do not sync). A term with weight 0 is computed without gradient and only reported. A term
    that leaves diagnostics in ``last_stats`` (the DPO margin, the PPO clip fraction) has them
    reported as ``<key>/<name>`` components.
    """

    def __init__(self, terms: Sequence[tuple[str, Loss, float]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CompositeLoss needs at least one term")
        self.losses = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for key, loss, weight in terms:
            if key in self.losses:
                raise ValueError(f"duplicate loss term key {key!r}")
            if not isinstance(loss, Loss):
                raise TypeError(f"term {key!r} is not a Loss: {loss!r}")
            weight = float(weight)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"term {key!r}: weight must be finite and >= 0, got {weight!r}")
            self.losses[key] = loss
            self.weights[key] = weight

    def __getitem__(self, key: str) -> Loss:
        return self.losses[key]  # type: ignore[return-value]

    def keys(self) -> Iterator[str]:
        return iter(self.losses.keys())

    def set_param(self, param: str, value: Any) -> list[str]:
        """Set attribute ``param`` on every term that has it (e.g. the trainer's
        ``set_param("tau", utility_threshold(...))``); returns the keys of the terms changed."""
        changed = []
        for key, loss in self.losses.items():
            if hasattr(loss, param):
                setattr(loss, param, value)
                changed.append(key)
        return changed

    def prepare_batch(self, model: nn.Module, batch: Batch, seed: int) -> Batch:
        """The trainer's hook (:class:`~genrerank.training.Trainer`): the one term that turns a
        batch into what it reads (the ``ppo`` term's rollouts) does so; others take it as is."""
        for loss in self.losses.values():
            prepare = getattr(loss, "prepare_batch", None)
            if prepare is not None:
                return prepare(model, batch, seed)
        return batch

    def forward(
        self, out: ModelOutput, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros((), device=batch.candidate_mask.device)  # any model output kind
        components: dict[str, torch.Tensor] = {}
        for key, loss in self.losses.items():
            weight = self.weights[key]
            if weight == 0.0:
                with torch.no_grad():
                    components[key] = loss(out, batch).detach()
            else:
                value = loss(out, batch)
                total = total + weight * value
                components[key] = value.detach()
            for name, stat in (getattr(loss, "last_stats", None) or {}).items():
                components[f"{key}/{name}"] = stat.detach()
        return total, components


def build_objective(spec: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> CompositeLoss:
    """Build a :class:`CompositeLoss` from configuration.

    ``spec`` is one term or a list of terms; a term is a mapping with ``name`` (registry
    name), optional ``weight`` (default 1.0) and the loss's own parameters, e.g.
    ``[{"name": "unlikelihood", "tau": 0.8}, {"name": "contrastive", "weight": 0.1,
    "margin": 0.5}]``. A term's component key is its name; repeated names get ``_2``, ``_3``...
    """
    items = [spec] if isinstance(spec, Mapping) else list(spec)
    terms: list[tuple[str, Loss, float]] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(items):
        if not isinstance(item, Mapping) or "name" not in item:
            raise ValueError(f"loss term {position} must be a mapping with a 'name', got {item!r}")
        params = dict(item)
        name = params.pop("name")
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TypeError(f"loss term {name!r}: weight must be a number, got {weight!r}")
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}_{seen[name]}"
        terms.append((key, build_loss(name, **params), float(weight)))
    return CompositeLoss(terms)
