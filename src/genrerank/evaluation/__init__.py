"""Evaluation of re-rankers: online under the simulator's oracle, offline on logs."""

from genrerank.evaluation.online import OnlineReport, evaluate_online, headroom_captured

__all__ = ["OnlineReport", "evaluate_online", "headroom_captured"]
