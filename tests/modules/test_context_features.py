"""Request context features in every model: they reach the scores of their own request only,
and a spec (or config) without them builds exactly the model built before they existed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.data.schema import FeatureSpec, table_from_rows, write_dataset
from genrerank.models.base import RerankModel, build_model
from genrerank.modules.features import FeatureConfig, FeatureEmbedding
from tests.conftest import tiny_rows, tiny_spec
from tests.data.test_context_dataset import CONTEXT, write_context_dataset
from tests.serving._runs import SMALL_CONFIGS

MODELS = ("pointwise", "nar4rec", "autoregressive", "prm", "evaluator")
#: FeatureEmbedding's state_dict keys for tiny_spec before context features existed: checkpoints
#: of such models must keep loading.
NO_CONTEXT_KEYS = [
    "context.bias", "context.weight", "item_cat.0.weight", "item_dense.bias", "item_dense.weight",
    "item_mean", "item_std", "norm.bias", "norm.weight", "user_cat.0.weight", "user_dense.bias",
    "user_dense.weight", "user_mean", "user_std",
]
#: Lists for the evaluator, one set per request of the batch (every request has >= 2 items).
LISTS = torch.tensor([[[0, 1], [1, 0], [1, -1]]] * 3)


@pytest.fixture(scope="module")
def context_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_context_dataset(tmp_path_factory.mktemp("ctx") / "d")


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "d"
    return write_dataset(out, table_from_rows(tiny_rows(), tiny_spec()), tiny_spec())


def _model(name: str, spec: FeatureSpec, data: Path, seed: int = 0, **features: Any
           ) -> RerankModel:
    torch.manual_seed(seed)
    model = build_model(name, spec, {**SMALL_CONFIGS[name], "features": features})
    model.fit_statistics(RerankDataset(data))  # all splits: non-trivial statistics
    return model.eval()


def _batch(data: Path) -> Batch:
    ds = RerankDataset(data)
    return collate([ds[i] for i in range(len(ds))])


@torch.no_grad()
def _scores(model: RerankModel, batch: Batch) -> torch.Tensor:
    """[B, ...] per-request outputs: list scores (evaluator) or log-probabilities and click
    logits (generators; the autoregressive model's are teacher-forced on the logged list)."""
    if model.kind == "evaluator":
        return model.score_lists(batch, LISTS)
    out = model(batch)
    return torch.cat([out.log_probs.flatten(1), out.click_logits.flatten(1)], dim=1)


@pytest.mark.parametrize("name", MODELS)
def test_a_requests_context_changes_its_scores_and_only_its(name: str, context_data: Path
                                                            ) -> None:
    model = _model(name, RerankDataset(context_data).spec, context_data)
    batch = _batch(context_data)
    before = _scores(model, batch)
    assert torch.isfinite(before[before != -torch.inf]).all()
    for field, value in (("context_cat", 0), ("context_dense", 42.0)):
        changed = getattr(batch, field).clone()
        assert changed[1, 0] != value
        changed[1, 0] = value
        after = _scores(model, dataclasses.replace(batch, **{field: changed}))
        assert not torch.equal(after[1], before[1]), field
        assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2]), field


@pytest.mark.parametrize("name", MODELS)
def test_a_spec_without_context_builds_the_same_model(name: str, plain_data: Path,
                                                      context_data: Path) -> None:
    spec = RerankDataset(plain_data).spec  # written: list lengths filled in, as in training
    plain = _model(name, spec, plain_data)
    off = _model(name, spec, plain_data, context=False)
    keys = sorted(plain.state_dict())
    assert keys == sorted(off.state_dict())
    assert [k[len("features."):] for k in keys if k.startswith("features.")] == NO_CONTEXT_KEYS
    assert not [k for k in keys if k.startswith("context_")]  # the evaluator's context_norm
    batch = _batch(plain_data)
    out = _scores(plain, batch)
    assert torch.equal(out, _scores(off, batch))
    # Context features switched off: the model of the same seed without them, bit for bit.
    ignoring = _model(name, RerankDataset(context_data).spec, context_data, context=False)
    assert sorted(ignoring.state_dict()) == keys
    for (k, a), b in zip(plain.state_dict().items(), ignoring.state_dict().values(), strict=True):
        if "mean" not in k and "std" not in k and "running" not in k:  # fitted on other data
            assert torch.equal(a, b), k
    ctx_batch = _batch(context_data)
    ignoring.load_state_dict(plain.state_dict())
    assert torch.equal(_scores(ignoring, ctx_batch), _scores(plain, ctx_batch))
    # ... and it ignores the context it is given.
    other = dataclasses.replace(ctx_batch, context_cat=ctx_batch.context_cat.flip(0),
                                context_dense=ctx_batch.context_dense + 5.0)
    assert torch.equal(_scores(ignoring, other), _scores(ignoring, ctx_batch))


def test_context_embeddings_are_separate_tables_and_statistics_come_from_training(
        context_data: Path) -> None:
    spec = RerankDataset(context_data).spec
    emb = FeatureEmbedding(spec, 8)
    keys = set(emb.state_dict())
    assert {"context_cat.0.weight", "context_dense.weight", "context_dense.bias",
            "context_mean", "context_std"} <= keys
    assert emb.context_cat[0].weight.shape == (3, 8)  # vocabulary of "device"
    assert emb.context_cat[0] is not emb.user_cat[0]
    emb.fit_statistics(RerankDataset(context_data, "train"))  # one request: query length 3.0
    assert emb.context_mean.tolist() == [3.0] and emb.context_std.tolist() == [pytest.approx(1e-3)]
    emb.fit_statistics(RerankDataset(context_data))
    lengths = np.array([d for _, d in CONTEXT])
    assert emb.context_mean.item() == pytest.approx(lengths.mean())
    assert emb.context_std.item() == pytest.approx(lengths.std())
    # Standardised before projecting: the mean query length adds only the projection's bias.
    batch = _batch(context_data)
    at_mean = dataclasses.replace(batch, context_dense=torch.full((3, 1), lengths.mean(),
                                                                  dtype=torch.float32))
    zero_cat = dataclasses.replace(at_mean, context_cat=torch.zeros(3, 1, dtype=torch.long))
    without = FeatureEmbedding(spec, 8, config={"context": False})
    without.load_state_dict({k: v for k, v in emb.state_dict().items()
                             if not k.startswith("context_")})
    expected = without.user_vector(zero_cat) + emb.context_cat[0].weight[0] \
        + emb.context_dense.bias
    torch.testing.assert_close(emb.user_vector(zero_cat), expected, rtol=0, atol=1e-5)


def test_the_context_switch_is_a_boolean() -> None:
    assert FeatureConfig().context is True
    assert FeatureConfig.from_dict({"context": False}).context is False
    with pytest.raises(ValueError, match="true or false"):
        FeatureConfig.from_dict({"context": "no"})
