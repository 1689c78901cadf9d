"""Train a model on a data set folder and evaluate a run: what ``genrerank train`` and
``genrerank evaluate`` do, usable from Python in the same few lines.

The test split is touched only by :func:`evaluate_model`; training sees train and valid only.

A finished run folder always holds ``best/``, ``last/``, ``metrics.jsonl``, ``tensorboard/`` and
``run_config.json``; the last is written when everything else is done (it records the decoder
chosen on the validation split) and removed when a train starts changing the run, so a run
without it is incomplete (killed, failed or still training). One whose train failed also holds
``FAILED`` (:data:`~genrerank.training.trainer.FAILED_FILE`, the error). Evaluate, export and
serve refuse both (:func:`check_run`) rather than guess a decoder.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrerank.constraints import ConstraintSet, constraints_from_config
from genrerank.data.dataset import RerankDataset
from genrerank.data.schema import FeatureSpec
from genrerank.data.simulator import Simulator
from genrerank.evaluation.offline import (
    Predictions,
    offline_metrics,
    position_propensities,
    predict,
    predict_gathered,
)
from genrerank.evaluation.online import evaluate_online
from genrerank.losses import build_objective, resolve_loss_config
from genrerank.models import build_model
from genrerank.training import TrainConfig, Trainer, load_model, load_run_config, seed_everything
from genrerank.training.runs import RUN_CONFIG, check_run
from genrerank.training.trainer import mark_failed
from genrerank.utils import distributed
from genrerank.utils.io import atomic_write_json

CONFIG_DIR = Path(__file__).parent / "configs"
#: Contrastive decoding trades probability against similarity, whose scales differ by model and
#: data, so ``alpha: "auto"`` picks alpha on the validation split from this grid.
ALPHA_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6)
#: The satiation decoder's same-category penalty (log-probability units), ``penalty: "auto"``.
#: Up to 3: on avito (clicks only, n = m = 5) the pointwise baseline chose the old top, 1.5.
PENALTY_GRID = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
#: Decoder options that ``"auto"`` resolves on the validation split, and their grids.
AUTO_GRIDS: dict[str, tuple[float, ...]] = {"alpha": ALPHA_GRID, "penalty": PENALTY_GRID}


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
    streaming: bool = False,
) -> dict[str, Any]:
    """Train ``model_name`` on the train split, selecting on valid; returns the best metrics.

    ``streaming``: read the training split by row groups
    (:class:`~genrerank.data.streaming.StreamingRerankDataset`, bounded memory, for data larger
    than memory); feature statistics, loss calibration and the decoder choice's propensities then
    come from its leading sample (``statistics_sample``). The validation split is held in memory.
    """
    cfg = resolve_config(model_name, config_path, overrides)
    train_cfg = TrainConfig.from_dict(cfg["train"])
    # Under torchrun: join the process group (every rank trains a share of each batch).
    ctx = distributed.init_from_env(train_cfg.device)
    seed_everything(train_cfg.seed)  # before the model is built: initial weights are seeded too
    train_data: Any
    if streaming:
        from genrerank.data.streaming import StreamingRerankDataset

        train_data = StreamingRerankDataset(data_dir, "train", seed=train_cfg.seed)
        if train_data.num_requests == 0:
            raise ValueError(f"{data_dir}: needs requests in both the train and valid splits")
        train = train_data.statistics_sample()
    else:
        train = train_data = RerankDataset(data_dir, split="train")
    valid = RerankDataset(data_dir, split="valid")
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(f"{data_dir}: needs requests in both the train and valid splits")
    if ctx.is_main:
        warn_unlabelled(train)
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "name"}
    # The data set's gain weights and click signal fill what the loss config leaves out (and are
    # recorded in run_config.json); a loss needing a signal the data lacks fails here.
    cfg["loss"] = resolve_loss_config(cfg["loss"], train.spec)
    model = build_model(model_name, train.spec, model_cfg)
    objective = build_objective(cfg["loss"])
    # One scorer for model selection and the decoding choice: the oracle's world (or the
    # propensities) is built once. Evaluators write no lists and need none.
    scorer = validate_fn = None
    if getattr(model, "kind", "generator") == "generator":
        scorer = ListScorer(valid, train)
        validate_fn = scorer.validate_fn()
    trainer = Trainer(model, objective, train_data, valid, train_cfg, out_dir, validate_fn,
                      loss_config=cfg["loss"], overwrite=overwrite or resume)
    run_config = Path(out_dir) / RUN_CONFIG
    # Once training is under way best/ changes: the run is incomplete until the decoder is
    # chosen for the new best/ (a stale run_config.json would pair it with the old choice).
    best = trainer.fit(resume=resume, on_start=lambda: run_config.unlink(missing_ok=True))
    try:
        # Every rank decodes a share of the validation split; rank 0 writes the choice.
        cfg["decode"] = select_decoding(model, valid, cfg["decode"], train, scorer=scorer)
        if ctx.is_main:
            atomic_write_json(run_config, {**cfg, "data": str(data_dir),
                                           **({"streaming": True} if streaming else {})})
        distributed.barrier()  # the run is complete for every rank once run_config is there
    except BaseException as exc:  # the checkpoints stay (--resume redoes the choice)
        if ctx.is_main:
            mark_failed(out_dir, exc, "choosing the decoder")
        raise
    return best


def warn_unlabelled(train: RerankDataset, share: float = 0.5) -> float:
    """Warn when most training lists carry no positive label: list-level losses (unlikelihood)
    then call most logged lists bad, and item-level credit has little to learn from."""
    if not train.spec.labels:
        return 0.0
    offsets = train._exposed.offsets
    positive = np.zeros(len(offsets) - 1, dtype=bool)
    for ragged in train._labels.values():
        hits = np.add.reduceat(ragged.values > 0, offsets[:-1]) if ragged.values.size else 0
        positive |= np.asarray(hits > 0) & (np.diff(offsets) > 0)
    empty = float(1.0 - positive.mean()) if positive.size else 0.0
    if empty > share:
        warnings.warn(
            f"{empty:.0%} of the training lists have no positive label: a list-level loss "
            "(unlikelihood) calls all of them bad lists and pushes the model away from their "
            "placements; item-level credit (gain_bce) learns from the positive items alone",
            stacklevel=2,
        )
    return empty


class ListScorer:
    """The list metric models are selected on, on the VALIDATION split: the decoded lists'
    exact expected gain under the oracle for simulator data; on real logs the position-debiased
    expected clicks of the lists' top k (``ips_clicks@k``, propensities fitted on the training
    split), or their logged-label gain when no propensities can be fitted."""

    def __init__(self, valid: RerankDataset, train: RerankDataset | None = None) -> None:
        self.valid = valid
        self.sim = self.state = self.propensities = None
        if "simulator" in valid.spec.extra:
            from genrerank.data.simulator import request_index

            self.sim = Simulator.from_spec(valid.spec)
            self.state = self.sim.requests(request_index(valid.request_ids))
        elif train is not None:
            self.propensities = fit_propensities(train)
        self.k = top_k_cutoffs(valid)[0]

    @property
    def metric(self) -> str:
        if self.sim is not None:
            return "expected_gain"
        return f"ips_clicks@{self.k}" if self.propensities is not None else "list_gain"

    def __call__(self, model: torch.nn.Module, decoder: str, params: dict[str, Any]) -> float:
        # Under torchrun every process decodes a share and all hold the gathered lists.
        preds = predict_gathered(model, self.valid, decoder, params)
        if self.sim is not None:
            lists = preds.lists
            gains = self.sim.expected_gain(self.state, np.maximum(lists, 0), lists >= 0)
            return float(gains.mean())
        metrics = offline_metrics(preds, (self.k,), propensities=self.propensities)
        return float(metrics[self.metric])

    def validate_fn(self) -> Any:
        """For the trainer: ``list_score`` of greedy lists after each evaluation."""

        def fn(model: torch.nn.Module, loader: Any) -> dict[str, float]:
            return {"list_score": self(model, "greedy", {})}

        return fn


def decoder_candidates(model: torch.nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """The decoders ``"name": "auto"`` chooses from."""
    if getattr(model, "stepwise", False):
        return [("greedy", {}), ("beam", {"beam_width": 4, "k": 1})]
    # Contrastive decoding penalises similarity to the items already chosen in the model's own
    # representation space; the satiation decoder in category space (a fixed similarity kernel);
    # the context decoder applies the category-transition table the model learned, alone or with
    # a same-category penalty on top (the table cannot learn satiation from logged lists).
    learned = []
    if getattr(model, "list_context", None) is not None:
        learned = [("context", {}), *[("context", {"penalty": p}) for p in PENALTY_GRID if p > 0]]
    return [("greedy", {}), *[("contrastive", {"alpha": a}) for a in ALPHA_GRID if a > 0],
            *[("satiation", {"penalty": p}) for p in PENALTY_GRID if p > 0], *learned,
            ("hungarian", {})]


def select_decoding(
    model: torch.nn.Module, valid: RerankDataset, decode_cfg: dict[str, Any],
    train: RerankDataset | None = None, *, scorer: ListScorer | None = None,
) -> dict[str, Any]:
    """Resolve ``"auto"`` decoding choices on the validation split (never on test): the
    decoder itself (``"name": "auto"``) or contrastive decoding's ``alpha``."""
    decode_cfg = dict(decode_cfg or {"name": "greedy"})
    decode_cfg.pop("selection", None)
    # Default constraints (decode.constraints) hold for every candidate decoder and stay in
    # the chosen config.
    constraints = decode_cfg.pop("constraints", None)
    kept = {} if constraints is None else {"constraints": constraints}
    auto = [k for k, v in decode_cfg.items() if v == "auto" and k in AUTO_GRIDS]
    if decode_cfg.get("name") == "auto":
        candidates = [(name, {**params, **kept}) for name, params in decoder_candidates(model)]
    elif len(auto) == 1:
        key = auto[0]
        base = {k: v for k, v in decode_cfg.items() if k not in ("name", key)} | kept
        candidates = [(decode_cfg["name"], {**base, key: v}) for v in AUTO_GRIDS[key]]
    elif auto:
        raise ValueError(f"decode: only one option can be 'auto', got {auto}")
    else:
        return {**decode_cfg, **kept}
    scorer = scorer or ListScorer(valid, train)
    scores = [(name, params, scorer(model, name, params)) for name, params in candidates]
    # Ties: the earlier (simpler) candidate.
    name, params, _ = max(scores, key=lambda c: (c[2], -scores.index(c)))
    return {"name": name, **params, "selection": {
        "split": "valid", "metric": scorer.metric,
        "scores": {_label(n, {k: x for k, x in p.items() if k != "constraints"}): v
                   for n, p, v in scores}}}


def _label(name: str, params: dict[str, Any]) -> str:
    return name if not params else f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})"


def _check_compatible(model_spec: FeatureSpec, data_spec: FeatureSpec) -> None:
    """A model can only read data whose features it was built for."""
    for attr in ("user_categorical", "item_categorical", "user_dense", "item_dense",
                 "context_categorical", "context_dense"):
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
    propensities: np.ndarray | None = None,
    constraints: ConstraintSet | None = None,
) -> dict[str, Any]:
    """Offline metrics on the logs (position-debiased ones too when ``propensities``, fitted on
    the training split, are given); online ones under the oracle for simulator data. With
    ``constraints`` (or a ``constraints`` entry of ``decoder_params``) every list is decoded
    under them and ``constraint_violations`` counts the lists that break them (0)."""
    params = dict(decoder_params or {})
    if constraints is None:
        constraints = constraints_from_config(params)
    params.pop("constraints", None)
    preds = predict(model, dataset, decoder, params, constraints=constraints)
    result: dict[str, Any] = {
        "requests": len(dataset),
        "decoder": {"name": decoder, **params},
        # What the click metrics (AUC, recall@k, clicks@k) read: not always a click.
        "click_signal": preds.click_signal if preds.click_signal in preds.labels else None,
        "offline": offline_metrics(preds, top_k_cutoffs(dataset), propensities=propensities),
    }
    if constraints is not None:
        result["constraints"] = constraints.to_dict()
        result["constraint_violations"] = preds.constraint_violations
    if "simulator" in dataset.spec.extra:
        result["online"] = online_metrics(dataset, preds, name, beam_width)
    return result


def online_metrics(
    dataset: RerankDataset, preds: Predictions, name: str, beam_width: int = 16
) -> dict[str, Any]:
    """Oracle report of ``preds``' lists, with the logging policy, the upper bound and the
    learnable ceilings (:meth:`Simulator.learnable_ceilings`) as references."""
    from genrerank.data.simulator import request_index
    from genrerank.evaluation.online import headroom_captured

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
    for key, gains in sim.learnable_ceilings(state, beam_width).items():
        out[f"learnable_{key}_expected_gain"] = float(gains.mean())
        out[f"learnable_{key}_headroom"] = headroom_captured(
            float(gains.mean()), reports[1].expected_gain, float(upper.mean()))
    return out


def train_propensities(data_dir: str | Path, dataset: RerankDataset) -> np.ndarray | None:
    """Position propensities for the debiased offline metrics, fitted on the TRAINING split of
    real logs (None for simulator data, which has the oracle, or when they cannot be fitted)."""
    if "simulator" in dataset.spec.extra:
        return None
    return fit_propensities(RerankDataset(data_dir, split="train"))


def fit_propensities(train: RerankDataset) -> np.ndarray | None:
    """PBM propensities of a training split, or None when they cannot be fitted (e.g. no click
    at position 0); the fit's own warnings are for interactive use, not for every run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return position_propensities(train)
    except (ValueError, KeyError):
        return None


def run_decoding(run_dir: str | Path) -> dict[str, Any]:
    """The decoding strategy a run was trained for (``auto`` choices already resolved); refuses
    an incomplete or failed run (:func:`check_run`) instead of falling back to greedy."""
    path = check_run(run_dir) / RUN_CONFIG
    try:
        run_cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(run_cfg, dict):
        raise ValueError(f"{path}: not a run config (a JSON object)")
    decode_cfg = dict(run_cfg.get("decode") or {"name": "greedy"})
    decode_cfg.pop("selection", None)
    return decode_cfg


def load_run_for_decoding(
    run_dir: str | Path, decoder: str | None = None,
    decoder_params: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, meta, decode config)`` of a finished run's best checkpoint: the run's own
    decoder, or ``decoder`` (its parameters start empty then), updated with ``decoder_params``.
    What ``evaluate`` and ``rerank`` decode with; an incomplete or failed run is refused."""
    decode_cfg = run_decoding(run_dir)  # first: a failed or unfinished run is refused
    model, meta = load_model(run_dir, "best")
    if decoder is not None and decoder != decode_cfg.get("name"):
        decode_cfg = {"name": decoder}
    decode_cfg.update(decoder_params or {})
    if decode_cfg.get("alpha") == "auto":
        raise ValueError("decoder alpha 'auto' is resolved at training time; pass a number")
    return model, meta, decode_cfg


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path,
    out_file: str | Path | None = None,
    decoder: str | None = None,
    decoder_params: dict[str, Any] | None = None,
    split: str = "test",
    constraints: ConstraintSet | None = None,
    list_ceiling: bool = False,
) -> dict[str, Any]:
    """Evaluate a run's selected (best) model on ``split`` of ``data_dir``, under
    ``constraints`` when given (else the run's own ``decode.constraints``, if any).
    ``list_ceiling`` (simulated data, generators only) adds the list ceiling on the model's
    own appeal (:mod:`genrerank.evaluation.ceilings`; calibrated on the valid split)."""
    run_dir = Path(run_dir)
    model, meta, decode_cfg = load_run_for_decoding(run_dir, decoder, decoder_params)
    dataset = RerankDataset(data_dir, split=split)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: the {split!r} split is empty")
    _check_compatible(model.spec, dataset.spec)
    if getattr(model, "kind", "generator") == "evaluator" and constraints is not None:
        raise ValueError(f"run {run_dir} is a list evaluator: it writes no lists to constrain")
    if list_ceiling and ("simulator" not in dataset.spec.extra
                         or getattr(model, "kind", "generator") == "evaluator"):
        raise ValueError("the list ceiling needs a generator run and simulated data (the true "
                         "user model)")
    if getattr(model, "kind", "generator") == "evaluator":  # scores lists, writes none
        from genrerank.evaluation.list_scoring import evaluate_list_scorer

        evaluated = evaluate_list_scorer(model, dataset)
    else:
        name = decode_cfg.pop("name")
        evaluated = evaluate_model(model, dataset, name, decode_cfg,
                                   name=str(meta.get("model_name")),
                                   propensities=train_propensities(data_dir, dataset),
                                   constraints=constraints)
    result = {
        "run": str(run_dir),
        "model": meta.get("model_name"),
        "data": str(data_dir),
        "split": split,
        "selected_epoch": (meta.get("best_metric") or {}).get("epoch"),
        **evaluated,
    }
    if list_ceiling:
        from genrerank.evaluation.ceilings import list_ceiling as ceiling

        result["list_ceiling"] = ceiling(model, RerankDataset(data_dir, split="valid"), dataset)
    if out_file is not None:
        atomic_write_json(out_file, result)
    return result
