"""Gain weights and the click signal of a data set, whatever its signals are called."""

from __future__ import annotations

import pytest

from genrerank.data.schema import FeatureSpec
from genrerank.data.signals import click_signal, gain_weights, require_click_signal
from tests.conftest import purchase_spec, tiny_spec


def test_gain_weights_spec_then_library_defaults_then_zero() -> None:
    assert gain_weights(tiny_spec()) == {"click": 1.0, "like": 1.5}
    assert gain_weights(purchase_spec()) == {"purchase": 2.0, "dwell": 0.0}
    spec = FeatureSpec(source="x", labels=["click", "like", "watch_time", "share"],
                       label_kinds={"share": "binary"}, gain_weights={"like": 3.0})
    assert gain_weights(spec) == {"click": 1.0, "like": 3.0, "watch_time": 0.0, "share": 0.0}


def test_click_signal_is_click_else_the_most_valuable_binary_signal() -> None:
    assert click_signal(tiny_spec()) == "click"
    assert click_signal(purchase_spec()) == "purchase"
    spec = FeatureSpec(source="x", labels=["cart", "purchase", "dwell"],
                       label_kinds={"cart": "binary", "purchase": "binary",
                                    "dwell": "nonnegative"},
                       gain_weights={"cart": 0.5, "purchase": 2.0, "dwell": 9.0})
    assert click_signal(spec) == "purchase"  # dwell weighs more but is not binary
    dwell_only = FeatureSpec(source="x", labels=["dwell", "cart"],
                             label_kinds={"dwell": "nonnegative", "cart": "binary"},
                             gain_weights={"dwell": 1.0})
    assert click_signal(dwell_only) is None  # cart has no gain weight
    with pytest.raises(ValueError, match=r"^loss 'click_bce' needs a click signal .* has dwell "
                                         r"\(nonnegative, gain 1\), cart \(binary, gain 0\)$"):
        require_click_signal(dwell_only, "loss 'click_bce'")
