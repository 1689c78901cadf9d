"""offline_metrics' position-debiased keys, and position_propensities on a RerankDataset."""

from __future__ import annotations

import numpy as np
import pytest

from genrerank.data.dataset import RerankDataset
from genrerank.data.schema import table_from_rows
from genrerank.evaluation.offline import Predictions, offline_metrics, position_propensities
from genrerank.metrics import fit_position_propensities
from tests.conftest import tiny_rows, tiny_spec

THETA = np.array([1.0, 0.5, 0.25])

# offline_metrics on `predictions()` before the debiased metrics existed.
OLD_VALUES = {
    "auc": 1.0,
    "gauc": 1.0,
    "logloss": 0.33409252285437496,
    "ndcg@1": 0.2,
    "recall@1": 0.25,
    "ndcg@3": 0.7270557757812564,
    "recall@3": 1.0,
    "list_gain": 1.6041270687500506,
}


def predictions() -> Predictions:
    """Two requests and a padding row; as in tests/metrics/test_debiased.two_requests."""
    return Predictions(
        request_index=np.array([0, 1, 2]),
        lists=np.array([[1, 0, 3], [1, 0, -1], [-1, -1, -1]]),
        candidate_scores=np.array(
            [[1e6 - 1, 1e6, 0.3, 1e6 - 2], [1e6 - 1, 1e6, -np.inf, -np.inf], [0.0] * 4]
        ),
        candidate_mask=np.array([[True] * 4, [True, True, False, False], [False] * 4]),
        exposed=np.array([[2, 0, 1], [0, 1, 0], [0, 0, 0]]),
        position_mask=np.array([[True] * 3, [True, True, False], [False] * 3]),
        click_prob=np.array([[0.2, 0.6, 0.7], [0.8, 0.3, 0.5], [0.5] * 3]),
        labels={
            "click": np.array([[0.0, 1, 1], [1, 0, 0], [0] * 3]),
            "like": np.array([[0.0, 1, 0], [0, 0, 0], [0] * 3]),
        },
    )


def test_offline_metrics_new_keys_old_values_unchanged() -> None:
    plain = offline_metrics(predictions(), (1, 3))
    debiased = offline_metrics(predictions(), (1, 3), propensities=THETA)
    assert set(plain) == set(OLD_VALUES) | {"clicks@1", "clicks@3"}
    assert set(debiased) == set(plain) | {
        "ips_clicks@1", "ips_clicks@3", "ips_clicks_ratio@1", "ips_clicks_ratio@3"
    }
    for key, value in OLD_VALUES.items():
        assert plain[key] == pytest.approx(value, rel=1e-12), key
        assert debiased[key] == plain[key], key
    # By hand (see tests/metrics/test_debiased.py): per request clicks@1 [1, 0],
    # clicks@3 [2, 1]; ips@1 [4, 0], ips@3 [5, 0.5]; logged-order ips@1 0 + 1, @3 2 + 1.
    assert plain["clicks@1"] == 0.5
    assert plain["clicks@3"] == 1.5
    assert debiased["clicks@3"] == plain["clicks@3"]
    assert debiased["ips_clicks@1"] == pytest.approx(2.0)
    assert debiased["ips_clicks@3"] == pytest.approx(2.75)
    assert debiased["ips_clicks_ratio@1"] == pytest.approx(4.0)
    assert debiased["ips_clicks_ratio@3"] == pytest.approx(5.5 / 3)


def test_logged_order_has_ratio_one() -> None:
    p = predictions()
    p.lists = np.where(p.position_mask, p.exposed, -1)
    m = offline_metrics(p, (1, 2, 3), propensities=THETA)
    for k in (2, 3):
        assert m[f"ips_clicks_ratio@{k}"] == 1.0
        assert m[f"ips_clicks@{k}"] == m[f"clicks@{k}"]


def pbm_rows(n_requests: int, seed: int) -> list[dict]:
    """Requests in the tiny format: 6 of 12 items shown, clicks from a known PBM."""
    rng = np.random.default_rng(seed)
    theta = np.array([1.0, 0.7, 0.5, 0.4, 0.3, 0.25])
    gamma = rng.uniform(0.1, 0.9, 12)
    template = tiny_rows()[0]
    rows = []
    for r in range(n_requests):
        items = rng.permutation(12)[:8]
        exposed = rng.permutation(8)[:6]
        clicks = rng.random(6) < theta * gamma[items[exposed]]
        n = len(items)
        row = dict(template)
        row.update(
            request_id=f"r{r}", time=r, split="train" if r % 5 else "test",
            item_id=[f"i{i}" for i in items],
            item_cat=[[1]] * n, item_dense=[[0.0]] * n, upstream_score=[0.0] * n,
            category=[1] * n, creator=[1] * n, is_cold_start=[False] * n,
            is_long_tail=[False] * n, exposed=exposed.tolist(),
            label_click=clicks.astype(float).tolist(), label_like=[0.0] * 6,
        )
        rows.append(row)
    return rows


def test_position_propensities_reads_the_train_split() -> None:
    rows = pbm_rows(600, seed=0)
    ds = RerankDataset((table_from_rows(rows, tiny_spec()), tiny_spec()))
    theta = position_propensities(ds)
    # The same fit by hand from the rows of the train split.
    train = [r for r in rows if r["split"] == "train"]
    pos = np.concatenate([np.arange(len(r["exposed"])) for r in train])
    clicks = np.concatenate([r["label_click"] for r in train])
    keys = np.concatenate([np.array(r["item_id"])[r["exposed"]] for r in train])
    np.testing.assert_array_equal(theta, fit_position_propensities(pos, clicks, keys, 6))
    assert theta[0] == 1.0
    assert np.all(np.diff(theta[:4]) < 0)  # clearly decreasing over the first positions
    # A data set built from the train split alone gives the same theta.
    only_train = RerankDataset((table_from_rows(rows, tiny_spec()), tiny_spec()), split="train")
    np.testing.assert_array_equal(position_propensities(only_train), theta)
    # All splits differ (more data), per-impression keys fall back to the CTR with a warning.
    assert not np.array_equal(position_propensities(ds, split=None), theta)
    with pytest.warns(UserWarning, match="click-through rate"):
        ctr = position_propensities(ds, item_key=None)
    np.testing.assert_array_equal(
        ctr, fit_position_propensities(pos, clicks, np.arange(len(pos)), 6, method="ctr")
    )


def test_position_propensities_on_the_tiny_fixture(tiny_dataset) -> None:
    ds = RerankDataset(tiny_dataset)
    # Only item "a" repeats, always at position 1: EM is not identified -> CTR per position:
    # position 0: c, d, h with 1 click; 1: a, a, f with 1; 2: e with 1.
    with pytest.warns(UserWarning):
        theta = position_propensities(ds, split=None)
    np.testing.assert_allclose(theta, [1.0, 1.0, 3.0])
    with pytest.raises(ValueError, match="no observations"):
        position_propensities(RerankDataset(tiny_dataset, split="valid"), split="test")
