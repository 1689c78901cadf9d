"""Where a list reward's feedback signals come from: the log, the evaluator, or the oracle.

Every source returns the UNCONDITIONAL expected value of each signal at each slot of each list
(0 at empty slots): logged labels are zero where the user never scrolled, the evaluator's
probabilities include reach, and the simulator's expectations include P(reach). Position
effects are therefore already inside the values, whichever source gave them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from genrerank.data.dataset import Batch

if TYPE_CHECKING:
    from genrerank.data.dataset import RerankDataset
    from genrerank.models.base import RerankModel

__all__ = [
    "EvaluatorSignals",
    "ListSignals",
    "LoggedSignals",
    "OracleSignals",
    "SignalSource",
    "require_training_source",
]


@dataclass(frozen=True)
class ListSignals:
    """Per-slot signal values of lists ``[B, K, m]``.

    Attributes:
        source: name of the :class:`SignalSource` that produced them.
        values: signal -> ``[B, K, m]`` float, the unconditional expected value of the signal
            at each slot (0 at empty slots).
        filled: ``[B, K, m]`` bool, the slots that hold an item (``lists >= 0``).
    """

    source: str
    values: dict[str, torch.Tensor]
    filled: torch.Tensor


def _check_lists(batch: Batch, lists: torch.Tensor, who: str) -> torch.Tensor:
    if lists.dim() != 3 or lists.shape[0] != batch.batch_size:
        raise ValueError(f"{who}: lists must be [B, K, m] with B = {batch.batch_size}, "
                         f"got {tuple(lists.shape)}")
    return lists.long()


class SignalSource:
    """Gives the per-slot feedback signals of lists. ``for_training`` says whether a model
    may learn from it: the simulator's oracle is ground truth and must only evaluate."""

    name: ClassVar[str]
    for_training: ClassVar[bool]

    def signals(self, batch: Batch, lists: torch.Tensor) -> ListSignals:
        raise NotImplementedError


class LoggedSignals(SignalSource):
    """The logged labels: they exist only for the lists that were actually shown."""

    name = "logged"
    for_training = True

    def signals(self, batch: Batch, lists: torch.Tensor) -> ListSignals:
        lists = _check_lists(batch, lists, "logged rewards")
        b, k, m = lists.shape
        device = lists.device
        logged = torch.where(batch.position_mask, batch.exposed, -1).to(device)
        width = logged.shape[1]
        # Compared over the width m of the lists: a prefix of the logged list keeps its labels
        # (a user's response at j never depends on the items below j).
        if width >= m:
            logged = logged[:, :m]
        else:
            logged = torch.cat([logged, logged.new_full((b, m - width), -1)], dim=1)
        filled = lists >= 0
        differs = (lists != logged.unsqueeze(1)).any(-1) & filled.any(-1)
        if differs.any():
            row, col = (int(i) for i in torch.nonzero(differs)[0])
            raise ValueError(
                "logged rewards exist only for the exposed lists (request "
                f"{int(batch.request_index[row])}, list {col}); score other lists with the "
                "evaluator")
        values = {}
        for s, label in batch.labels.items():
            label = label.to(device).float()
            if label.shape[1] >= m:
                label = label[:, :m]
            else:
                label = torch.cat([label, label.new_zeros(b, m - label.shape[1])], dim=1)
            values[s] = torch.where(filled, label.unsqueeze(1), 0.0)
        return ListSignals(self.name, values, filled)


class EvaluatorSignals(SignalSource):
    """The learned reward model: the evaluator's predicted probabilities per slot."""

    name = "evaluator"
    for_training = True

    def __init__(self, evaluator: RerankModel) -> None:
        if not getattr(evaluator, "scores_lists", False):
            raise ValueError("evaluator rewards need a model that scores lists (the list "
                             "evaluator or the structured model), got "
                             f"{getattr(evaluator, 'name', type(evaluator).__name__)!r}")
        self.evaluator = evaluator

    def signals(self, batch: Batch, lists: torch.Tensor) -> ListSignals:
        lists = _check_lists(batch, lists, "evaluator rewards")
        probs = self.evaluator.signal_probabilities(batch, lists)  # type: ignore[attr-defined]
        filled = (lists >= 0).to(batch.candidate_mask.device)
        return ListSignals(self.name, dict(probs), filled)


class OracleSignals(SignalSource):
    """Exact expectations under the simulator that generated the data set. Ground truth, so
    for evaluation only: a model trained on it would learn from what no log can show."""

    name = "oracle"
    for_training = False

    def __init__(self, dataset: RerankDataset) -> None:
        from genrerank.data.simulator import Simulator
        from genrerank.data.simulator.oracle import request_index

        if "simulator" not in dataset.spec.extra:
            raise ValueError(f"oracle rewards need simulator data; data set "
                             f"{dataset.spec.source!r} is not from the simulator")
        self.dataset = dataset
        self.simulator = Simulator.from_spec(dataset.spec)
        self._sim_index = request_index(dataset.request_ids)
        self._rows = np.asarray(dataset.rows, dtype=np.int64)
        self._order = np.argsort(self._rows, kind="stable")
        self.labels = list(dataset.spec.labels)

    def _positions(self, request_index: torch.Tensor) -> np.ndarray:
        """Dataset positions of the batch's requests (rows of the unfiltered table)."""
        wanted = request_index.cpu().numpy().astype(np.int64)
        sorted_rows = self._rows[self._order]
        at = np.clip(np.searchsorted(sorted_rows, wanted), 0, max(len(sorted_rows) - 1, 0))
        if not len(sorted_rows) or (sorted_rows[at] != wanted).any():
            missing = wanted[~np.isin(wanted, self._rows)]
            raise ValueError(f"oracle rewards: request row(s) {missing[:5].tolist()} are not in "
                             f"the data set {self.dataset.spec.source!r}")
        return self._order[at]

    def signals(self, batch: Batch, lists: torch.Tensor) -> ListSignals:
        lists = _check_lists(batch, lists, "oracle rewards")
        b, k, m = lists.shape
        device = lists.device
        filled = lists >= 0
        values = {s: torch.zeros(b, k, m, device=device) for s in self.labels}
        if b * k and m:
            state = self.simulator.requests(self._sim_index[self._positions(batch.request_index)])
            rep = state.take(np.repeat(np.arange(b), k))
            flat = lists.reshape(b * k, m).cpu().numpy()
            found = self._per_slot(rep, np.maximum(flat, 0), flat >= 0)
            for s in self.labels:
                if s in found:
                    v = torch.as_tensor(np.asarray(found[s], dtype=np.float32),
                                        device=device).reshape(b, k, m)
                    values[s] = torch.where(filled, v, 0.0)
        return ListSignals(self.name, values, filled)

    def _per_slot(self, state: Any, lists: np.ndarray, mask: np.ndarray
                  ) -> dict[str, np.ndarray]:
        """Signal -> ``[L, m]`` per slot of the flattened lists: the exact expectations."""
        return self.simulator.expected_signals(state, lists, mask)


class SimulatedFeedback(OracleSignals):
    """Feedback SAMPLED from the simulator's user model for the given lists: what showing them
    to real users would return, one noisy realisation per list. An online-learning stand-in
    (policy-gradient fine-tuning on live traffic), allowed to train, and labelled as such in
    every output (``online_stand_in``): it is not a reward any offline data set provides.
    Draws come from one seeded stream, so a run is reproducible."""

    name = "simulated_feedback"
    for_training = True
    online_stand_in = True

    def __init__(self, dataset: RerankDataset, seed: int = 0) -> None:
        super().__init__(dataset)
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 31_337]))

    def _per_slot(self, state: Any, lists: np.ndarray, mask: np.ndarray
                  ) -> dict[str, np.ndarray]:
        return self.simulator.sample_feedback(state, lists, self.rng, mask)


def require_training_source(source: SignalSource, purpose: str) -> None:
    """Fail unless ``source`` may train a model (the oracle never may)."""
    if not source.for_training:
        raise ValueError(f"{purpose}: the {source.name!r} reward is for evaluation only (the "
                         "simulator's oracle must never train a model); use the evaluator's")
