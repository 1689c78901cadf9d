"""``genrerank finetune``: tune a trained generator against a frozen copy of itself.

- ``--method dpo --pairs PAIRS``: DPO on near-line preference pairs (:mod:`.nearline`,
  :mod:`genrerank.losses.dpo`). The reference's log-probabilities of every pair are computed
  once, before training, under no gradient.
- ``--method ppo --evaluator RUN``: group-normalised PPO on lists the policy samples and the
  evaluator scores (:mod:`genrerank.losses.policy_gradient`); stepwise (autoregressive) models.

Both start from ``INIT/best`` (same architecture; ``model`` options the run config sets, by
default ``dropout = 0`` so policy and reference are the same function at the start), keep the
feature statistics of the pre-training, and run on the shared trainer: validation on held-out
requests (``reward`` = the evaluator's list reward of the policy's decoded lists, selected on;
``kl_ref`` = KL to the reference), TensorBoard, safetensors checkpoints, ``--resume``. The run
keeps the init run's decoder and records where it came from in ``run_config.json``.

Layered config: ``configs/finetune/<method>.json`` < ``--config`` < ``--set``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from genrerank.data.dataset import RerankDataset
from genrerank.data.pairs import PairDataset, read_pairs
from genrerank.experiment import CONFIG_DIR, _check_compatible
from genrerank.losses import build_objective
from genrerank.losses.base import list_log_probs
from genrerank.losses.policy_gradient import PolicyGradientLoss
from genrerank.models import build_model
from genrerank.preference.report import PolicyReport
from genrerank.rewards import (
    DEFAULT_REWARD,
    EvaluatorSignals,
    ListReward,
    SignalSource,
    SimulatedFeedback,
    require_training_source,
)
from genrerank.training import TrainConfig, Trainer, load_model, load_run_config, seed_everything
from genrerank.training.checkpoint import (
    MODEL_FILE,
    load_tensors_into,
    read_meta,
    resolve_checkpoint,
)
from genrerank.training.runs import RUN_CONFIG, check_run
from genrerank.training.trainer import mark_failed
from genrerank.utils import distributed
from genrerank.utils.io import atomic_write_json

METHODS = ("dpo", "ppo")
#: The loss term each method must have.
METHOD_LOSS = {"dpo": "dpo", "ppo": "ppo"}


def finetune_config(method: str, config_path: str | Path | None = None,
                    overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"finetune: unknown method {method!r}; choose from {list(METHODS)}")
    cfg = load_run_config(config_path, overrides, base=CONFIG_DIR / "finetune" / f"{method}.json")
    names = [t.get("name") for t in cfg["loss"]]
    if METHOD_LOSS[method] not in names:
        raise ValueError(f"finetune --method {method}: the loss must include a "
                         f"{METHOD_LOSS[method]!r} term, got {names}")
    return cfg


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def reference_log_probs(reference: torch.nn.Module, pairs: PairDataset,
                        batch_size: int = 256) -> np.ndarray:
    """``[P, 2]`` (winner, loser) list log-probabilities under the frozen reference."""
    out = []
    for batch in DataLoader(pairs, batch_size=batch_size, shuffle=False,
                            collate_fn=pairs.collate_fn):
        logp = list_log_probs(reference(batch).log_probs, batch)
        out.append(torch.stack([logp[: batch.pairs], logp[batch.pairs:]], 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def _init_model(init: Path, model_options: dict[str, Any]) -> tuple[torch.nn.Module, dict]:
    """The init run's best weights in a model built with ``model_options`` applied (options the
    model does not have, such as dropout for a model without it, are skipped)."""
    from genrerank.data.schema import FeatureSpec

    ckpt = resolve_checkpoint(init, "best")
    meta = read_meta(ckpt)
    config = dict(meta.get("model_config") or {})
    config.update({k: v for k, v in model_options.items() if k in config})
    model = build_model(meta["model_name"], FeatureSpec.from_dict(meta["feature_spec"]), config)
    load_tensors_into(model, ckpt / MODEL_FILE)
    return model, {"name": meta["model_name"], **config}


def finetune_run(
    init_run: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    method: str,
    *,
    pairs: str | Path | None = None,
    evaluator: str | Path | None = None,
    config_path: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    resume: bool = False,
    overwrite: bool = False,
    reward_source: str = "evaluator",
) -> dict[str, Any]:
    """Fine-tune ``init_run`` (see the module docstring); returns the best validation metrics.

    ``reward_source="simulated_feedback"`` (ppo, simulator data): the reward of sampled lists
    and of the validation lists is one draw of the simulated users' feedback
    (:class:`~genrerank.rewards.SimulatedFeedback`), an online-learning stand-in; the run
    config records it."""
    cfg = finetune_config(method, config_path, overrides)
    init = check_run(init_run)
    init_cfg = json.loads((init / RUN_CONFIG).read_text())
    train_cfg = TrainConfig.from_dict(cfg["train"])
    # Under torchrun: join the process group (every rank trains a share of each batch; the
    # validation report is computed whole on every rank, so no request counts twice).
    ctx = distributed.init_from_env(train_cfg.device)
    seed_everything(train_cfg.seed)
    model, model_cfg = _init_model(init, cfg.get("model") or {})
    reference = frozen(load_model(init, "best")[0])
    train_requests = RerankDataset(data_dir, split="train")
    valid_requests = RerankDataset(data_dir, split="valid")
    if len(train_requests) == 0 or len(valid_requests) == 0:
        raise ValueError(f"{data_dir}: needs requests in both the train and valid splits")
    _check_compatible(model.spec, train_requests.spec)

    pairs_meta: dict[str, Any] = {}
    if method == "dpo":
        if pairs is None:
            raise ValueError("finetune --method dpo needs --pairs (write them with "
                             "`genrerank nearline`)")
        table, pairs_meta = read_pairs(pairs)
        train_data: Any = PairDataset(train_requests, table, "train")
        valid_data: Any = PairDataset(valid_requests, table, "valid")
        for split, ds in (("train", train_data), ("valid", valid_data)):
            if len(ds) == 0:
                raise ValueError(f"{pairs}: no {split} pairs (nearline --split train,valid; a "
                                 "smaller --delta gives more pairs)")
            ds.set_reference_log_probs(reference_log_probs(reference, ds))
        evaluator = evaluator or pairs_meta.get("evaluator_run")
    else:
        if pairs is not None:
            raise ValueError("finetune --method ppo samples its own lists; --pairs is for dpo")
        if not hasattr(model, "draw"):
            raise ValueError(f"finetune --method ppo samples lists step by step: autoregressive "
                             f"runs only, {init} is a {model_cfg['name']!r} run (use dpo)")
        train_data, valid_data = train_requests, valid_requests
    reward_cfg = cfg.get("reward") or pairs_meta.get("reward") or DEFAULT_REWARD
    reward = ListReward.from_config(reward_cfg, train_requests.spec)
    source: SignalSource
    if reward_source == "simulated_feedback":
        if method != "ppo":
            raise ValueError("finetune: reward source 'simulated_feedback' is for ppo (it "
                             "samples feedback for the lists the policy draws)")
        source = SimulatedFeedback(RerankDataset(data_dir), seed=train_cfg.seed)
    elif reward_source == "evaluator":
        if evaluator is None:
            raise ValueError(f"finetune --method {method} needs --evaluator (the reward model)")
        evaluator_model = frozen(load_model(check_run(evaluator), "best")[0])
        if not getattr(evaluator_model, "scores_lists", False):
            raise ValueError(f"{evaluator}: not a run that scores lists (the list evaluator "
                             "or the structured model)")
        source = EvaluatorSignals(evaluator_model)
    else:
        raise ValueError(f"finetune: unknown reward source {reward_source!r}; choose "
                         "'evaluator' or 'simulated_feedback'")
    require_training_source(source, "finetune")

    objective = build_objective(cfg["loss"])
    for term in objective.losses.values():
        if isinstance(term, PolicyGradientLoss):
            term.attach(reference,
                        lambda batch, lists: reward(batch, lists, source).total)
    decode = dict(init_cfg.get("decode") or {"name": "greedy"})
    report = PolicyReport(valid_requests, reward, source, reference, decode)
    trainer = Trainer(model, objective, train_data, valid_data, train_cfg, out_dir,
                      lambda m, loader: report(m), loss_config=cfg["loss"],
                      overwrite=overwrite or resume, fit_statistics=False)
    run_config = Path(out_dir) / RUN_CONFIG
    best = trainer.fit(resume=resume, on_start=lambda: run_config.unlink(missing_ok=True))
    try:
        if not ctx.is_main:
            return best
        atomic_write_json(run_config, {
            "model": model_cfg, "train": cfg["train"], "loss": cfg["loss"], "decode": decode,
            "reward": reward.to_config(), "data": str(data_dir),
            "finetune": {"method": method, "init": str(init_run),
                         "pairs": None if pairs is None else str(pairs),
                         "evaluator": None if evaluator is None else str(evaluator),
                         "reward_source": source.name,
                         "online_stand_in": bool(getattr(source, "online_stand_in", False))}})
    except BaseException as exc:
        mark_failed(out_dir, exc, "writing the run config")
        raise
    return best
