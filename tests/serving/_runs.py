"""Small untrained runs for the serving tests: parity and serving do not need a trained model,
only a checkpoint folder the library can load (weights are seeded, so tests are repeatable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from genrerank.data.schema import FeatureSpec
from genrerank.models.base import build_model
from genrerank.training.checkpoint import save_checkpoint

#: Small but complete configurations: every layer type is present.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "nar4rec": {"dim": 16, "heads": 2, "encoder_layers": 1, "decoder_layers": 1},
    "pointwise": {"dim": 16, "hidden": 16},
    "prm": {"dim": 16, "heads": 2, "layers": 1},
    "evaluator": {"dim": 16, "heads": 2, "layers": 1},
    "autoregressive": {"dim": 16, "n_heads": 4, "n_kv_heads": 2, "encoder_layers": 1,
                       "decoder_layers": 2},
}

DECODERS: dict[str, dict[str, Any]] = {
    "nar4rec": {"name": "contrastive", "alpha": 0.05},
    "autoregressive": {"name": "beam", "beam_width": 3, "k": 1},
}


def make_run(run_dir: Path, model_name: str, spec: FeatureSpec, seed: int = 0,
             decode: dict[str, Any] | None = None, **config: Any) -> Path:
    """A run folder (best/ checkpoint + run_config.json) of a seeded, untrained model;
    ``config`` adds to its small model config (e.g. ``features={...}``)."""
    torch.manual_seed(seed)
    config = {**SMALL_CONFIGS[model_name], **config}
    model = build_model(model_name, spec, config)
    if model_name == "evaluator":  # non-trivial running statistics, as after training
        for norm in (model.item_norm, model.user_norm):
            if norm is not None:
                norm.running_mean.uniform_(-1.0, 1.0)
                norm.running_var.uniform_(0.5, 2.0)
    if getattr(model, "list_context", None) is not None:  # zero at init: make it matter
        with torch.no_grad():
            model.list_context.pair.normal_(0.0, 1.0)
            model.list_context.decay_logit.fill_(0.4)
    item_id = getattr(getattr(model, "features", None), "item_id", None)
    if item_id is not None:  # zero at init too
        with torch.no_grad():
            item_id.weight.normal_(0.0, 1.0)
    features = getattr(model, "features", None)
    for cross in getattr(features, "category_cross", None) or ():  # zero at init too
        with torch.no_grad():
            cross.weight.normal_(0.0, 1.0)
    if features is not None and features.config.min_count:  # as if fitted: odd values unseen
        for name, known in features.named_buffers():
            if name.startswith("item_cat_known_"):
                known[1::2] = False
    model.eval()
    save_checkpoint(run_dir / "best", model, {"epoch": 0, "step": 0})
    decode = decode or DECODERS.get(model_name, {"name": "greedy"})
    (run_dir / "run_config.json").write_text(json.dumps({
        "model": {"name": model_name, **config}, "decode": decode}))
    return run_dir
