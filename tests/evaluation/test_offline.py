"""Offline metrics read the data set's gain weights and click signal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from genrerank.evaluation.offline import collect_predictions, offline_metrics
from tests.conftest import purchase_spec


def _one_request(spec=None):
    """Candidates 0, 1, 2; the logs showed 0 then 1 (0 was bought, dwell 30 s and 5 s); the
    model's list is 1, 0."""
    acc = {
        "request_index": [np.array([0])], "lists": [np.array([[1, 0]])],
        "candidate_scores": [np.array([[2.0, 3.0, 1.0]])],
        "candidate_mask": [np.ones((1, 3), bool)], "exposed": [np.array([[0, 1]])],
        "position_mask": [np.ones((1, 2), bool)], "click_prob": [np.array([[0.7, 0.2]])],
    }
    labels = {"purchase": [np.array([[1.0, 0.0]])], "dwell": [np.array([[30.0, 5.0]])]}
    return collect_predictions(acc, labels, spec)


def test_list_gain_uses_the_spec_gain_weights() -> None:
    preds = _one_request(purchase_spec())
    metrics = offline_metrics(preds, (2,))
    # The bought item sits at position 1 of the model's list: 2 / log2(1 + 2); dwell weighs 0.
    assert metrics["list_gain"] == pytest.approx(2.0 / math.log2(3))
    assert metrics["clicks@2"] == 1.0 and metrics["recall@2"] == 1.0  # purchase as the click
    assert metrics["logloss"] == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2)
    # Without the spec: the library defaults, which weigh neither signal; no click signal.
    bare = offline_metrics(_one_request(), (2,))
    assert bare["list_gain"] == 0.0 and "clicks@2" not in bare and "auc" not in bare
