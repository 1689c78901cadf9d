"""Which feedback signals of a data set count for what: gain weights and the click signal.

A data set may carry any named signal (``spec.labels``, kinds in ``spec.label_kinds``). Two
choices follow from its spec, and every metric, loss and model makes them here:

- **gain weights** (list gain, NDCG gains, ``gain_bce``, the unlikelihood utility, the list
  evaluator): ``spec.gain_weights[s]`` where set, else the library default for the built-in
  names (click 1.0, like 1.5, long_view 0.8; :data:`DEFAULT_GAIN_WEIGHTS`), else 0: a signal
  nobody weighted is carried along but adds nothing to the gain (watch_time included);
- the **click signal** (click heads, AUC / GAUC / LogLoss, Recall@k, clicks@k, position
  propensities): ``click`` when the data set has it, else its binary signal with the largest
  gain weight above 0 (``purchase`` in a purchases-and-dwell log). A data set with neither has no
  click signal; what needs one then fails naming the signals the data set has.
"""

from __future__ import annotations

from genrerank.data.schema import FeatureSpec
from genrerank.metrics.ranking import DEFAULT_GAIN_WEIGHTS

__all__ = ["DEFAULT_GAIN_WEIGHTS", "click_signal", "describe_signals", "gain_weights",
           "require_click_signal"]


def gain_weights(spec: FeatureSpec) -> dict[str, float]:
    """Gain weight of every signal of the data set, in ``spec.labels`` order (0 = no gain)."""
    return {s: float(spec.gain_weights.get(s, DEFAULT_GAIN_WEIGHTS.get(s, 0.0)))
            for s in spec.labels}


def click_signal(spec: FeatureSpec) -> str | None:
    """``click`` if the data set has it, else its binary signal with the largest positive gain
    weight (the first in ``spec.labels`` on a tie), else None."""
    if "click" in spec.labels:
        return "click"
    weights = gain_weights(spec)
    binary = [s for s in spec.labels if spec.label_kind(s) == "binary" and weights[s] > 0]
    return max(binary, key=lambda s: weights[s]) if binary else None


def describe_signals(spec: FeatureSpec) -> str:
    """``purchase (binary, gain 2), dwell (nonnegative, gain 0)``: for error messages."""
    weights = gain_weights(spec)
    shown = [f"{s} ({spec.label_kind(s)}, gain {weights[s]:g})" for s in spec.labels]
    return ", ".join(shown) if shown else "no signal"


def require_click_signal(spec: FeatureSpec, what: str) -> str:
    """:func:`click_signal`, or a one-line ValueError saying what ``what`` needs and what the
    data set has."""
    signal = click_signal(spec)
    if signal is None:
        raise ValueError(
            f"{what} needs a click signal ('click', or a binary signal with a gain weight "
            f"above 0 in gain_weights) but the data set has {describe_signals(spec)}"
        )
    return signal
