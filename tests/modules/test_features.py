"""The shared feature module: standardisation, within-request context, affinity, padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from genrerank.data.dataset import Batch
from genrerank.data.schema import CategoricalFeature, FeatureSpec
from genrerank.modules.features import (
    FeatureConfig,
    FeatureEmbedding,
    category_history_columns,
    request_context,
)

SPEC = FeatureSpec(
    source="test",
    user_categorical=[CategoricalFeature("segment", 3)],
    user_dense=["activity", "hist_cat_1", "hist_cat_2"],
    item_categorical=[CategoricalFeature("category", 4)],
    item_dense=["duration"],
    n_categories=4,
)


def batch(b: int = 2, n: int = 5, pad_from: int | None = None) -> Batch:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(b, n, dtype=torch.bool)
    if pad_from is not None:
        mask[:, pad_from:] = False
    category = torch.randint(1, 4, (b, n), generator=g)
    return Batch(
        request_index=torch.arange(b), user_cat=torch.randint(0, 3, (b, 1), generator=g),
        user_dense=torch.rand(b, 3, generator=g) * 10,
        context_cat=torch.zeros(b, 0, dtype=torch.long), context_dense=torch.zeros(b, 0),
        item_cat=category.unsqueeze(-1),
        item_dense=torch.randn(b, n, 1, generator=g) * 100 + 50,
        upstream_score=torch.randn(b, n, generator=g), category=category,
        creator=torch.zeros(b, n, dtype=torch.long),
        is_cold_start=torch.zeros(b, n, dtype=torch.bool),
        is_long_tail=torch.zeros(b, n, dtype=torch.bool), candidate_mask=mask,
        exposed=torch.zeros(b, 1, dtype=torch.long), position_mask=torch.ones(b, 1, dtype=bool),
        labels={}, item_hash=torch.randint(0, 2**31 - 1, (b, n), generator=g),
    )


def test_request_context_hand_computed_and_padding_ignored() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    ctx = request_context(scores, mask)
    z = (torch.tensor([3.0, 1.0, 2.0]) - 2.0) / torch.tensor([3.0, 1.0, 2.0]).std(unbiased=False)
    torch.testing.assert_close(ctx[0, :3, 0], z, atol=1e-5, rtol=0)
    # ranks 0, 2, 1 (the padded 99 never outranks a real candidate); padding is zero.
    torch.testing.assert_close(ctx[0, :3, 1], torch.log1p(torch.tensor([0.0, 2.0, 1.0])))
    assert ctx[0, 3].abs().sum() == 0
    # Ties share a rank (two candidates above the third: log(1 + 2)).
    tied = request_context(torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool))
    assert tied[0, 0, 1] == tied[0, 1, 1] == 0 and tied[0, 2, 1] == pytest.approx(1.0986, 1e-4)


def test_history_columns_and_affinity_gather() -> None:
    torch.testing.assert_close(category_history_columns(SPEC), torch.tensor([-1, 1, 2, -1]))
    emb = FeatureEmbedding(SPEC, 8)
    b = batch()
    aff = emb._affinity(b)
    for r in range(2):
        for i in range(5):
            c = int(b.category[r, i])
            expected = float(b.user_dense[r, c]) if c in (1, 2) else 0.0
            assert aff[r, i, 0].item() == pytest.approx(expected)
            assert aff[r, i, 1].item() == float(c in (1, 2))


def test_standardisation_uses_training_statistics() -> None:
    class Train:  # the two flat arrays fit_statistics reads from a RerankDataset
        _item_dense = type("R", (), {"values": torch.tensor([[1.0], [3.0]]).numpy()})
        _per_candidate = {"upstream_score": type("R", (), {"values": torch.tensor(
            [0.0, 4.0]).numpy()})}
        _user_dense = type("R", (), {"values": torch.tensor([[0.0, 1, 1], [2, 1, 1]]).numpy()})

        def __len__(self) -> int:
            return 2

    emb = FeatureEmbedding(SPEC, 8)
    emb.fit_statistics(Train())
    torch.testing.assert_close(emb.item_mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(emb.item_std, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(emb.user_mean, torch.tensor([1.0, 1.0, 1.0]))
    # A constant feature is centred, not divided by ~0.
    assert emb.user_std[1] >= 1e-3
    off = FeatureEmbedding(SPEC, 8, config={"standardize": False})
    off.fit_statistics(Train())
    torch.testing.assert_close(off.item_std, torch.ones(2))


@pytest.mark.parametrize("options", [{}, {"interaction": True},
                                     {"request_context": False, "affinity": False},
                                     {"item_id_buckets": 16}, {"category_cross": True},
                                     {"min_count": 2}])
def test_padding_changes_no_real_token(options: dict) -> None:
    torch.manual_seed(0)
    emb = FeatureEmbedding(SPEC, 8, config=options).eval()
    if emb.item_id is not None:
        torch.nn.init.normal_(emb.item_id.weight)  # trained, not the all-zero start
    for cross in emb.category_cross or ():
        torch.nn.init.normal_(cross.weight)
    small = batch(n=5)
    padded = batch(n=5, pad_from=3)
    # The same first 3 candidates, then 2 padded slots holding junk.
    cut = dataclasses.replace(
        small, **{f: getattr(small, f)[:, :3] for f in
                  ("item_cat", "item_dense", "upstream_score", "category", "creator",
                   "is_cold_start", "is_long_tail", "candidate_mask", "item_hash")})
    padded.item_hash[:, 3:] = 12345
    padded.item_dense[:, 3:] = 1e6
    padded.upstream_score[:, 3:] = 1e6
    tokens_cut, _ = emb(cut)
    tokens_pad, _ = emb(padded)
    torch.testing.assert_close(tokens_pad[:, :3], tokens_cut, atol=1e-5, rtol=1e-5)
    assert tokens_pad[:, 3:].abs().sum() == 0


def test_feature_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        FeatureConfig.from_dict({"standardise": True})
    with pytest.raises(ValueError, match="true or false"):
        FeatureConfig.from_dict({"affinity": 1})
    for key in ("item_id_buckets", "min_count"):
        for bad in (-1, 2.5, True, "64"):
            with pytest.raises(ValueError, match=f"{key} must be an integer"):
                FeatureConfig.from_dict({key: bad})
    with pytest.raises(ValueError, match="true or false"):
        FeatureConfig.from_dict({"category_cross": "yes"})
    # No history columns: the affinity part is simply absent.
    plain = dataclasses.replace(SPEC, user_dense=["activity"])
    assert FeatureEmbedding(plain, 8).affinity is None


def test_item_id_embedding_starts_neutral_then_separates_items() -> None:
    """Zero at initialisation (features alone decide), then one step on a loss that wants two
    candidates with identical features apart moves exactly their own rows; the bucket is the hash
    modulo the bucket count, and a model with item ids refuses a batch without hashes."""
    torch.manual_seed(0)
    plain = FeatureEmbedding(SPEC, 8).eval()
    with_ids = FeatureEmbedding(SPEC, 8, config={"item_id_buckets": 16}).eval()
    with_ids.load_state_dict(plain.state_dict(), strict=False)
    b = batch(n=5)
    torch.testing.assert_close(with_ids(b)[0], plain(b)[0])

    b.item_cat[:, 1] = b.item_cat[:, 0]
    b.item_dense[:, 1] = b.item_dense[:, 0]
    b.item_hash[:, 0], b.item_hash[:, 1] = 16 * 7 + 3, 5  # buckets 3 and 5
    static = with_ids.item_static(b.item_cat, b.item_dense, b.item_hash)
    assert torch.equal(static[:, 0], static[:, 1])
    (static[:, 0].sum() - static[:, 1].sum()).backward()
    grad = with_ids.item_id.weight.grad
    moved = grad.abs().sum(1).nonzero().flatten().tolist()
    assert 3 in moved and 5 in moved
    assert torch.all(grad[3].sign() == -grad[5].sign())
    with pytest.raises(ValueError, match="item_hash"):
        with_ids.item_static(b.item_cat, b.item_dense)


def test_category_cross_starts_neutral_and_indexes_user_value_by_category() -> None:
    """Zero at initialisation; row ``segment * n_categories + category`` is the one a candidate
    reads, so two users of different segments see the same category differently."""
    torch.manual_seed(0)
    plain = FeatureEmbedding(SPEC, 8).eval()
    crossed = FeatureEmbedding(SPEC, 8, config={"category_cross": True}).eval()
    crossed.load_state_dict(plain.state_dict(), strict=False)
    b = batch()
    torch.testing.assert_close(crossed(b)[0], plain(b)[0])
    table = crossed.category_cross[0]
    assert table.num_embeddings == 3 * 4
    b.user_cat[:, 0] = torch.tensor([1, 2])
    b.category[:] = 3
    tokens, _ = crossed(b)
    tokens.sum().backward()
    moved = table.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert moved == [1 * 4 + 3, 2 * 4 + 3]


def test_min_count_maps_rarely_shown_item_values_to_unknown() -> None:
    """Counts are exposures in the training split: category 2 shown three times keeps its
    embedding, category 3 shown once (and never-shown 1) share the unknown row 0."""
    import numpy as np

    class Ragged:
        def __init__(self, offsets: list[int], values: np.ndarray) -> None:
            self.offsets, self.values = np.array(offsets), values

    class Train:  # the flat arrays fit_statistics reads from a RerankDataset
        # Two requests of 3 candidates with categories [2, 3, 1] and [2, 2, 1].
        _item_cat = Ragged([0, 3, 6], np.array([[2], [3], [1], [2], [2], [1]]))
        _exposed = Ragged([0, 2, 4], np.array([0, 1, 0, 1]))  # shows 2, 3 then 2, 2
        _item_dense = Ragged([0, 3, 6], np.zeros((6, 1), dtype=np.float32))
        _per_candidate = {"upstream_score": Ragged([0, 3, 6], np.zeros(6, dtype=np.float32))}
        _user_dense = Ragged([0, 3, 6], np.zeros((2, 3), dtype=np.float32))

        def __len__(self) -> int:
            return 2

    emb = FeatureEmbedding(SPEC, 8, config={"min_count": 2})
    assert bool(emb.item_cat_known_0.all())  # identity until fitted
    emb.fit_statistics(Train())
    assert emb.item_cat_known_0.tolist() == [False, False, True, False]
    values = torch.tensor([[0, 1, 2, 3]])
    assert emb._known_item_value(values, 0).tolist() == [[0, 0, 2, 0]]
    # The rule is saved with the weights.
    assert "item_cat_known_0" in emb.state_dict()
