"""Every registered model: shapes, probabilities, and padding that changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.models import MODELS, build_model
from tests.models._requests import shrink_request

# Only the library's own models: test modules register toy models into the same registry.
BUILTIN_MODELS = sorted(
    name for name, cls in MODELS.items()
    if cls.__module__.startswith("genrerank.") and cls.kind == "generator"
)


def small(name: str) -> dict:
    """A tiny config for any registered model (models without a width take none)."""
    fields = MODELS[name].Config.__dataclass_fields__
    return {"dim": 16} if "dim" in fields else {}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    out = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 64, 0, out, progress=False)
    return RerankDataset(out)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_outputs_are_distributions_over_real_candidates(name: str, data: RerankDataset) -> None:
    torch.manual_seed(0)
    model = build_model(name, data.spec, small(name)).eval()
    short = shrink_request(data[0], 20)
    batch = collate([short, data[1]])
    out = model(batch)
    assert out.log_probs.shape == (2, 60, 6)
    probs = out.log_probs.exp()
    assert torch.allclose(probs.sum(1), torch.ones(2, 6), atol=1e-5)
    assert probs[0, 20:].abs().max() == 0  # padded candidates can never be chosen
    assert out.click_logits is not None and out.click_logits.shape == (2, 60, 6)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_padding_changes_nothing(name: str, data: RerankDataset) -> None:
    torch.manual_seed(0)
    model = build_model(name, data.spec, small(name)).eval()
    short = shrink_request(data[2], 25)
    alone = model(collate([short]))
    padded = model(collate([short, data[3]]))  # pads request 0 to n = 60, m = 6
    m = alone.log_probs.shape[2]
    torch.testing.assert_close(padded.log_probs[0, :25, :m], alone.log_probs[0, :, :m],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.click_logits[0, :25, :m], alone.click_logits[0, :, :m],
                               atol=1e-5, rtol=1e-5)


def test_build_model_names_bad_input(data: RerankDataset) -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'.*nar4rec"):
        build_model("nope", data.spec)
    with pytest.raises(ValueError, match="unknown option.*'width'"):
        build_model("nar4rec", data.spec, {"width": 3})
    with pytest.raises(ValueError, match="divisible"):
        build_model("nar4rec", data.spec, {"dim": 10, "heads": 4})


def test_models_learn_from_gradients(data: RerankDataset, tmp_path: Path) -> None:
    batch = collate([data[i] for i in range(8)])
    for name in BUILTIN_MODELS:
        torch.manual_seed(0)
        model = build_model(name, data.spec, small(name))
        out = model(batch)
        # The list term and the click head: `logging` learns only its click calibration.
        loss = -out.log_probs.gather(1, batch.exposed.unsqueeze(1)).mean()
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
            out.click_logits.gather(1, batch.exposed.unsqueeze(1)).squeeze(1),
            batch.labels["click"])
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name


def test_logging_model_is_the_upstream_order(data: RerankDataset) -> None:
    from genrerank.decoding.greedy import greedy
    from genrerank.models.heuristics import upstream_order

    batch = collate([data[i] for i in range(6)])
    out = build_model("logging", data.spec).eval()(batch)
    lists = greedy(out.log_probs, batch.candidate_mask, 6)
    expected = upstream_order(batch.upstream_score.numpy(), batch.candidate_mask.numpy(), 6)
    assert lists.tolist() == expected.tolist()


def test_list_length_head_sets_the_length_when_the_request_does_not() -> None:
    from genrerank.data.schema import CategoricalFeature, FeatureSpec
    from genrerank.losses import ModelOutput
    from genrerank.models import build_model
    from genrerank.models.base import predicted_lengths
    from tests.losses._helpers import make_batch as loss_batch

    spec = FeatureSpec(source="t", user_dense=["a"],
                       item_categorical=[CategoricalFeature("category", 3)],
                       item_dense=["d"], max_list_length=4, n_categories=3)
    model = build_model("nar4rec", spec, {"dim": 8, "heads": 2}).eval()
    batch = loss_batch([5, 2], [[0, 1], [1]])
    with torch.no_grad():
        model.length_head.weight.zero_()
        model.length_head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0]))  # length 3
    lists = model.generate(batch, None, "greedy")
    # Length 3 where 5 candidates allow it; the second request has only 2 candidates.
    assert (lists >= 0).sum(1).tolist() == [3, 2]
    out = ModelOutput(log_probs=torch.zeros(2, 5, 4), length_logits=torch.tensor(
        [[9.0, 0, 0, 0, 0], [0, 0, 0, 0, 9.0]]))
    assert predicted_lengths(out, batch).tolist() == [1, 2]  # at least 1, at most n
    with pytest.raises(ValueError, match="no list-length head"):
        predicted_lengths(ModelOutput(log_probs=torch.zeros(2, 5, 4)), batch)


def test_nar4rec_list_context_shifts_only_the_teacher_forced_slot_scores(
    data: RerankDataset,
) -> None:
    """The learned table enters the raw slot scores (what gain_bce fits, given the logged items
    above each slot) and the ``context`` decoder; the distributions stay context-free."""
    torch.manual_seed(0)
    model = build_model("nar4rec", data.spec, small("nar4rec")).eval()
    batch = collate([data[i] for i in range(4)])
    plain = model(batch)
    with torch.no_grad():
        model.list_context.pair.normal_()
    shifted = model(batch)
    torch.testing.assert_close(shifted.log_probs, plain.log_probs)
    want = plain.logits + model.list_context.teacher_forced(batch.category, batch.exposed,
                                                           batch.position_mask)
    torch.testing.assert_close(shifted.logits, want)
    lists = model.generate(batch, 6, "context")
    assert lists.shape == (4, 6) and (lists >= 0).all()
    assert all(len(set(row.tolist())) == 6 for row in lists)


def test_the_context_decoder_needs_a_learned_table(data: RerankDataset) -> None:
    model = build_model("nar4rec", data.spec, {**small("nar4rec"), "list_context": False})
    with pytest.raises(ValueError, match="list context"):
        model.generate(collate([data[0]]), 6, "context")
