"""Presets, config validation and the fitted KuaiRand marginals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genrerank.data.simulator import (
    ACTIVITY_LEVELS,
    GAIN_WEIGHTS,
    PRESETS,
    SimulatorConfig,
    World,
    get_preset,
    load_marginals,
)


def test_presets_shapes_and_labels():
    avito = get_preset("avito")
    assert (avito.n_candidates, avito.list_length, avito.labels) == (5, 5, ("click",))
    kuai = get_preset("kuaishou")
    assert (kuai.n_candidates, kuai.list_length) == (60, 6)
    assert set(kuai.labels) == {"click", "like", "long_view", "watch_time"}
    large = get_preset("large")
    assert (large.n_candidates, large.list_length) == (500, 50)
    # Avito's position bias is steep, Kuaishou's mild.
    assert avito.examination_power > 3 * kuai.examination_power
    assert set(PRESETS) == {"avito", "kuaishou", "large"}


def test_gain_weights():
    assert GAIN_WEIGHTS == {"click": 1.0, "like": 1.5, "long_view": 0.8}
    assert get_preset("avito").gain_weights == {"click": 1.0}
    assert get_preset("kuaishou").gain_weights == GAIN_WEIGHTS


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="avito.*kuaishou.*large"):
        get_preset("youtube")


def test_overrides_and_unknown_fields():
    cfg = get_preset("kuaishou", n_candidates=30, logging_temperature=0.5)
    assert cfg.n_candidates == 30 and cfg.logging_temperature == 0.5
    assert get_preset("kuaishou").n_candidates == 60  # presets are not mutated
    with pytest.raises(ValueError, match="unknown SimulatorConfig field"):
        get_preset("kuaishou", n_candidate=30)


@pytest.mark.parametrize(
    "bad",
    [
        {"list_length": 70},
        {"labels": ("like",)},
        {"labels": ("click", "dwell")},
        {"n_categories": 40},
        {"upstream_corr": 0.0},
        {"logging_temperature": -1.0},
    ],
)
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError):
        get_preset("kuaishou", **bad)


def test_config_json_round_trip():
    cfg = get_preset("avito", logging_temperature=2.0)
    back = SimulatorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown SimulatorConfig field"):
        SimulatorConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_marginals_file_is_numbers_only():
    marg = load_marginals()
    tag = marg["primary_tag"]
    assert len(tag["tags"]) == 30
    assert abs(sum(tag["shares"]) + tag["other_share"] - 1.0) < 1e-3
    assert len(tag["log_duration_mean"]) == 31
    assert marg["videos_per_creator"]["zeta_exponent_mle"] > 1
    assert marg["user_activity"]["levels"] == list(ACTIVITY_LEVELS)
    assert np.all(np.diff(marg["duration_s"]["quantiles"]) >= 0)


def test_world_follows_fitted_marginals():
    cfg = get_preset("kuaishou", n_items=20_000, n_users=10_000)
    world = World(cfg, seed=3)
    marg = load_marginals()
    fitted_median = marg["duration_s"]["quantiles"][marg["quantile_probs"].index(0.5)]
    assert abs(np.median(world.item_duration) / fitted_median - 1) < 0.35
    share = np.bincount(world.user_activity, minlength=5) / cfg.n_users
    assert np.abs(share - marg["user_activity"]["shares"]).max() < 0.02
    cat_share = np.bincount(world.item_category, minlength=cfg.n_categories + 1)[1:] / cfg.n_items
    assert np.abs(cat_share - world.category_share[1:]).max() < 0.03
    assert world.item_category.min() >= 1 and world.item_creator.min() >= 1
    # Some complementary pairs come from KuaiRand's tag co-occurrence (e.g. tags 12 and 62).
    tags = world.category_tags
    named = {frozenset((tags[a - 1], tags[b - 1])) for a, b in world.complementary_pairs}
    assert frozenset(("12", "62")) in named
    assert len(world.complementary_pairs) == cfg.n_complementary_pairs
    assert np.allclose(world.complementarity, world.complementarity.T)
