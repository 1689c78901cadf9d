"""Train a model on a data set folder and evaluate a run: what ``genrerank train`` and
``genrerank evaluate`` do, usable from Python in the same few lines.

The test split is touched only by :func:`evaluate_model`; training sees train and valid only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrerank.data.dataset import RerankDataset
from genrerank.data.schema import FeatureSpec
from genrerank.data.simulator import Simulator
from genrerank.evaluation.offline import Predictions, offline_metrics, predict
from genrerank.evaluation.online import evaluate_online
from genrerank.losses import build_objective
from genrerank.models import build_model
from genrerank.training import TrainConfig, Trainer, load_model, load_run_config, seed_everything
from genrerank.utils.io import atomic_write_json

CONFIG_DIR = Path(__file__).parent / "configs"
RUN_CONFIG = "run_config.json"
#: Contrastive decoding trades probability against similarity, whose scales differ by model and
#: data, so ``alpha: "auto"`` picks alpha on the validation split from this grid.
ALPHA_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6)


def model_defaults(model_name: str) -> Path | None:
    """The packaged default config of a model, if it has one."""
    path = CONFIG_DIR / f"{model_name}.json"
    return path if path.exists() else None


def resolve_config(
    model_name: str, config_path: str | Path | None = None, overrides: tuple[str, ...] = ()
) -> dict[str, Any]:
    cfg = load_run_config(config_path, overrides, base=model_defaults(model_name))
    named = cfg["model"].get("name", model_name)
    if named != model_name:
        raise ValueError(f"--model {model_name!r} but the config's model.name is {named!r}")
    cfg["model"]["name"] = model_name
    return cfg


def train_run(
    model_name: str,
    data_dir: str | Path,
    out_dir: str | Path,
    config_path: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``model_name`` on the train split, selecting on valid; returns the best metrics."""
    cfg = resolve_config(model_name, config_path, overrides)
    train_cfg = TrainConfig.from_dict(cfg["train"])
    seed_everything(train_cfg.seed)  # before the model is built: initial weights are seeded too
    train = RerankDataset(data_dir, split="train")
    valid = RerankDataset(data_dir, split="valid")
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(f"{data_dir}: needs requests in both the train and valid splits")
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "name"}
    model = build_model(model_name, train.spec, model_cfg)
    objective = build_objective(cfg["loss"])
    trainer = Trainer(model, objective, train, valid, train_cfg, out_dir,
                      loss_config=cfg["loss"], overwrite=overwrite or resume)
    best = trainer.fit(resume=resume)
    cfg["decode"] = select_decoding(model, valid, cfg["decode"])
    atomic_write_json(Path(out_dir) / RUN_CONFIG, {**cfg, "data": str(data_dir)})
    return best


def validation_score(model: torch.nn.Module, dataset: RerankDataset, decoder: str,
                     params: dict[str, Any]) -> float:
    """What decoding choices are selected on: the decoded lists' expected gain under the oracle
    for simulator data, otherwise their logged-label list gain. Cheap: no upper bound."""
    preds = predict(model, dataset, decoder, params)
    if "simulator" in dataset.spec.extra:
        from genrerank.data.simulator import request_index

        sim = Simulator.from_spec(dataset.spec)
        state = sim.requests(request_index(dataset.request_ids))
        lists = preds.lists
        return float(sim.expected_gain(state, np.maximum(lists, 0), lists >= 0).mean())
    return offline_metrics(preds, top_k_cutoffs(dataset))["list_gain"]


def select_decoding(
    model: torch.nn.Module, valid: RerankDataset, decode_cfg: dict[str, Any]
) -> dict[str, Any]:
    """Resolve ``"auto"`` decoding parameters on the validation split (never on test)."""
    decode_cfg = dict(decode_cfg or {"name": "greedy"})
    if decode_cfg.get("alpha") != "auto":
        return decode_cfg
    params = {k: v for k, v in decode_cfg.items() if k not in ("name", "alpha")}
    scores = {
        alpha: validation_score(model, valid, decode_cfg["name"], {**params, "alpha": alpha})
        for alpha in ALPHA_GRID
    }
    best = max(scores, key=lambda a: (scores[a], -a))  # ties: the smaller alpha
    return {**decode_cfg, "alpha": best,
            "selection": {"split": "valid", "scores": {str(a): v for a, v in scores.items()}}}


def _check_compatible(model_spec: FeatureSpec, data_spec: FeatureSpec) -> None:
    """A model can only read data whose features it was built for."""
    for attr in ("user_categorical", "item_categorical", "user_dense", "item_dense"):
        if getattr(model_spec, attr) != getattr(data_spec, attr):
            raise ValueError(
                f"the data set's {attr} differ from those the model was trained on; "
                "evaluate on data converted or simulated the same way"
            )


def top_k_cutoffs(dataset: RerankDataset) -> tuple[int, ...]:
    """k = the list length m (when fixed) and a larger k, as the NAR4Rec paper reports."""
    m = int(dataset.spec.max_list_length)
    lengths = {len(dataset._exposed[i]) for i in range(min(len(dataset), 1000))}
    if len(lengths) == 1 and m <= 50:
        return (m, max(10, 2 * m) if m > 5 else 10)
    return (5, 10)


def evaluate_model(
    model: torch.nn.Module,
    dataset: RerankDataset,
    decoder: str,
    decoder_params: dict[str, Any] | None = None,
    name: str = "model",
    beam_width: int = 16,
) -> dict[str, Any]:
    """Offline metrics on the logs; online ones under the oracle for simulator data."""
    preds = predict(model, dataset, decoder, decoder_params)
    result: dict[str, Any] = {
        "requests": len(dataset),
        "decoder": {"name": decoder, **(decoder_params or {})},
        "offline": offline_metrics(preds, top_k_cutoffs(dataset)),
    }
    if "simulator" in dataset.spec.extra:
        result["online"] = online_metrics(dataset, preds, name, beam_width)
    return result


def online_metrics(
    dataset: RerankDataset, preds: Predictions, name: str, beam_width: int = 16
) -> dict[str, Any]:
    from genrerank.data.simulator import request_index

    sim = Simulator.from_spec(dataset.spec)
    state = sim.requests(request_index(dataset.request_ids))
    logged = np.where(preds.position_mask, preds.exposed, -1)
    _, upper = sim.upper_bound(state, beam_width=beam_width)
    reports = evaluate_online(sim, state, {name: preds.lists, "logging policy": logged}, logged,
                              upper_bound_gains=upper)
    out = reports[0].to_dict()
    out["logging_expected_gain"] = reports[1].expected_gain
    out["upper_bound_expected_gain"] = float(upper.mean())
    out["upper_bound_beam_width"] = beam_width
    return out


def run_decoding(run_dir: str | Path) -> dict[str, Any]:
    """The decoding strategy a run was trained for (``auto`` choices already resolved)."""
    path = Path(run_dir) / RUN_CONFIG
    run_cfg = json.loads(path.read_text()) if path.exists() else {}
    decode_cfg = dict(run_cfg.get("decode") or {"name": "greedy"})
    decode_cfg.pop("selection", None)
    return decode_cfg


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path,
    out_file: str | Path | None = None,
    decoder: str | None = None,
    decoder_params: dict[str, Any] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Evaluate a run's selected (best) model on ``split`` of ``data_dir``."""
    run_dir = Path(run_dir)
    model, meta = load_model(run_dir, "best")
    decode_cfg = run_decoding(run_dir)
    if decoder is not None and decoder != decode_cfg.get("name"):
        decode_cfg = {"name": decoder}
    decode_cfg.update(decoder_params or {})
    if decode_cfg.get("alpha") == "auto":
        raise ValueError("decoder alpha 'auto' is resolved at training time; pass a number")
    dataset = RerankDataset(data_dir, split=split)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: the {split!r} split is empty")
    _check_compatible(model.spec, dataset.spec)
    if getattr(model, "kind", "generator") == "evaluator":  # scores lists, writes none
        from genrerank.evaluation.list_scoring import evaluate_list_scorer

        evaluated = evaluate_list_scorer(model, dataset)
    else:
        name = decode_cfg.pop("name")
        evaluated = evaluate_model(model, dataset, name, decode_cfg,
                                   name=str(meta.get("model_name")))
    result = {
        "run": str(run_dir),
        "model": meta.get("model_name"),
        "data": str(data_dir),
        "split": split,
        "selected_epoch": (meta.get("best_metric") or {}).get("epoch"),
        **evaluated,
    }
    if out_file is not None:
        atomic_write_json(out_file, result)
    return result
