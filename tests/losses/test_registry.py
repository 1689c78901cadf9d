"""Loss registry, build_loss and the weighted composite objective."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.data.dataset import Batch
from genrerank.losses import (
    LOSSES,
    CompositeLoss,
    LikelihoodLoss,
    Loss,
    ModelOutput,
    build_loss,
    build_objective,
    register_loss,
)
from tests.losses._helpers import log_probs_from_logits, make_batch, output

P = torch.tensor([[0.5, 0.25], [0.25, 0.25], [0.25, 0.5]])
NLL = (-math.log(0.5) - math.log(0.25)) / 2  # likelihood of exposed (0, 1)
# Two identical position embeddings: contrastive position term = margin.
TABLE = torch.tensor([[1.0, 0.0], [1.0, 0.0]])


def fixture() -> tuple[ModelOutput, Batch]:
    batch = make_batch([3], [[0, 1]], {"click": [[1.0, 0.0]]})
    logits = P.log().clone().requires_grad_(True)
    return output(log_probs_from_logits([logits], batch), position_repr=TABLE), batch


def test_all_losses_registered_and_buildable() -> None:
    assert {"likelihood", "unlikelihood", "contrastive", "click_bce", "list_length"} <= set(LOSSES)
    for name, cls in LOSSES.items():
        loss = build_loss(name)
        assert isinstance(loss, cls) and isinstance(loss, Loss)
        assert loss.name == name
    assert build_loss("contrastive", margin=0.2, item=False).margin == 0.2


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'nope'") as info:
        build_loss("nope")
    for name in LOSSES:
        assert name in str(info.value)


def test_unknown_param_is_named() -> None:
    with pytest.raises(TypeError, match="tua"):
        build_loss("unlikelihood", tua=0.8)
    with pytest.raises(TypeError, match="margin"):
        build_objective([{"name": "likelihood", "margin": 1.0}])


def test_composite_sums_weighted_terms_and_reports_components() -> None:
    out, batch = fixture()
    objective = build_objective(
        [
            {"name": "unlikelihood", "tau": 0.8},  # R = 1 >= 0.8: likelihood terms
            {"name": "contrastive", "weight": 0.1, "margin": 0.5, "item": False},
        ]
    )
    assert isinstance(objective, CompositeLoss)
    total, components = objective(out, batch)
    assert set(components) == {"unlikelihood", "contrastive"}
    assert components["unlikelihood"].item() == pytest.approx(NLL, rel=1e-6)
    assert components["contrastive"].item() == pytest.approx(0.5, rel=1e-6)  # unweighted
    assert total.item() == pytest.approx(NLL + 0.1 * 0.5, rel=1e-6)
    assert not any(c.requires_grad for c in components.values())
    total.backward()


def test_single_dict_spec_duplicates_and_zero_weight() -> None:
    out, batch = fixture()
    single = build_objective({"name": "likelihood", "weight": 2.0})
    total, components = single(out, batch)
    assert list(components) == ["likelihood"]
    assert total.item() == pytest.approx(2 * NLL, rel=1e-6)

    twice = build_objective(
        [{"name": "likelihood"}, {"name": "likelihood", "weight": 0.0}]  # 2nd: monitor only
    )
    total, components = twice(out, batch)
    assert list(twice.keys()) == ["likelihood", "likelihood_2"]
    assert components["likelihood_2"].item() == pytest.approx(NLL, rel=1e-6)
    assert total.item() == pytest.approx(NLL, rel=1e-6)
    assert isinstance(twice["likelihood"], LikelihoodLoss)


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match="name"):
        build_objective([{"weight": 1.0}])
    with pytest.raises(ValueError, match="weight"):
        build_objective([{"name": "likelihood", "weight": -1.0}])
    with pytest.raises(TypeError, match="weight"):
        build_objective([{"name": "likelihood", "weight": "1"}])
    with pytest.raises(ValueError):
        build_objective([])


def test_set_param_sets_tau_later() -> None:
    out, batch = fixture()
    objective = build_objective([{"name": "unlikelihood"}, {"name": "likelihood"}])
    with pytest.raises(ValueError, match="tau"):
        objective(out, batch)
    assert objective.set_param("tau", 2.0) == ["unlikelihood"]
    total, components = objective(out, batch)
    # R = 1 < 2: unlikelihood terms -log(1 - 0.5) - log(1 - 0.25), / 2
    ul = -(math.log(0.5) + math.log(0.75)) / 2
    assert components["unlikelihood"].item() == pytest.approx(ul, rel=1e-5)
    assert total.item() == pytest.approx(ul + NLL, rel=1e-5)


def test_register_custom_loss() -> None:
    @register_loss("_test_mean_log_prob")
    class MeanLogProb(Loss):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
            return self.scale * out.log_probs.mean()

    try:
        assert LOSSES["_test_mean_log_prob"] is MeanLogProb
        assert build_loss("_test_mean_log_prob", scale=2.0).scale == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_loss("_test_mean_log_prob")(type("Other", (Loss,), {}))
        with pytest.raises(TypeError):
            register_loss("_test_not_a_loss")(int)  # type: ignore[arg-type]
    finally:
        LOSSES.pop("_test_mean_log_prob", None)


def test_resolve_loss_config_fills_what_the_data_set_decides() -> None:
    from genrerank.data.schema import FeatureSpec
    from genrerank.losses import resolve_loss_config
    from tests.conftest import purchase_spec, tiny_spec

    cfg = [{"name": "gain_bce"}, {"name": "click_bce", "weight": 0.5},
           {"name": "unlikelihood", "weights": {"purchase": 1.0}}, {"name": "likelihood"}]
    assert resolve_loss_config(cfg, purchase_spec()) == [
        {"name": "gain_bce", "weights": {"purchase": 2.0, "dwell": 0.0}},
        {"name": "click_bce", "weight": 0.5, "signal": "purchase"},
        {"name": "unlikelihood", "weights": {"purchase": 1.0}},  # given: kept
        {"name": "likelihood"},
    ]
    assert cfg[0] == {"name": "gain_bce"}  # the input is not changed
    assert resolve_loss_config({"name": "gain_bce"}, tiny_spec()) == [
        {"name": "gain_bce", "weights": {"click": 1.0, "like": 1.5}}]
    build_objective(resolve_loss_config(cfg, purchase_spec()))
    with pytest.raises(ValueError, match=r"loss 'click_bce': signal 'click' is not in the data "
                                         r"set, which has purchase \(binary, gain 2\)"):
        resolve_loss_config([{"name": "click_bce", "signal": "click"}], purchase_spec())
    unweighted = FeatureSpec(**{**purchase_spec().to_dict(), "gain_weights": {}})
    with pytest.raises(ValueError, match=r"loss 'gain_bce' needs a signal with a gain weight "
                                         r"above 0 .* purchase \(binary, gain 0\)"):
        resolve_loss_config([{"name": "gain_bce"}], unweighted)
