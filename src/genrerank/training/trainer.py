"""One plain-torch training loop shared by every re-ranker (in the spirit of nanoGPT).

The trainer sees the train and validation splits only; validation drives early stopping and the
choice of ``best/``, and the test split never reaches it. Runs are reproducible on CPU: the same
seed gives bit-identical weights, and ``fit(resume=True)`` after a stop continues exactly as if
training had never stopped, because

- the shuffle of epoch ``e`` is a pure function of ``(seed, e)`` (a seeded torch.Generator), so a
  resumed epoch just skips the batches it already did;
- the learning rate is a pure function of the step;
- model, optimizer, python/numpy/torch RNG states and the early-stopping counter are restored
  from ``last/``;
- validation runs with the RNG states saved and restored around it, so how often one validates
  never changes the training trajectory.

Data-parallel training (``torchrun``, or ``genrerank train --nproc N``): every rank holds the
model, trains on its share of each global batch (:class:`EpochSampler`; ``batch_size`` is per
rank) and DistributedDataParallel averages the gradients, so W ranks at batch b follow one
process at batch W * b (exactly when the loss is a mean over equally many positions per rank, as
with fixed-length lists). Validation is sharded without padding and summed over ranks (every
request counted once); rank 0 alone writes checkpoints, metrics, TensorBoard and progress, and
the run folder must be a path every rank sees. The checkpoints are plain single-process ones.

Outputs in ``out_dir``: ``last/`` and ``best/`` checkpoints (see :mod:`.checkpoint`),
``metrics.jsonl`` (one JSON line per evaluation) and ``tensorboard/`` event files.

A fit that fails (an exception, Ctrl-C) leaves no half-made run: before its first checkpoint it
removes the folder if it created it, or else what it wrote there, and marks the folder with
``FAILED`` (the error, one line); once a checkpoint exists the folder is kept for ``--resume``
and marked ``FAILED``. Starting or resuming removes a stale ``FAILED`` and the temporary
checkpoint folders a killed process left (:func:`.checkpoint.remove_stale_temps`). On resume a
cut-short last line of ``metrics.jsonl`` (disk full, power loss) is dropped with a warning; a
damaged line before it is an error naming the file and line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from genrerank.data.dataset import RerankDataset, collate
from genrerank.training.checkpoint import (
    CHECKPOINTS,
    MODEL_FILE,
    CheckpointError,
    load_checkpoint,
    load_tensors_into,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from genrerank.training.config import TrainConfig
from genrerank.utils import distributed
from genrerank.utils.distributed import rank_stream
from genrerank.utils.io import atomic_write_text
from genrerank.utils.progress import progress

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: Marks a run whose train failed; holds the error. Evaluate, export and serve refuse such runs.
FAILED_FILE = "FAILED"

ValidateFn = Callable[[nn.Module, DataLoader], dict[str, float]]

# Train-config fields that change the trajectory; resuming with other values gets a warning.
_TRAJECTORY_FIELDS = (
    "seed",
    "batch_size",
    "lr",
    "weight_decay",
    "grad_clip",
    "lr_schedule",
    "warmup_steps",
    "min_lr_ratio",
    "select_metric",
    "select_mode",
)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (call before building a model for reproducible init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without disturbing the python/numpy/torch random streams."""
    state = rng_state(cuda=torch.cuda.is_available())
    try:
        yield
    finally:
        set_rng_state(state)


def mark_failed(out_dir: str | Path, exc: BaseException, during: str) -> None:
    """Write ``out_dir/FAILED``: one line naming the error and what was being done. Never
    raises (the caller is handling ``exc`` already); a failure to write is logged."""
    reason = " ".join(str(exc).split()) or "interrupted"
    line = f"train failed while {during}: {type(exc).__name__}: {reason}"
    try:
        atomic_write_text(Path(out_dir) / FAILED_FILE, line + "\n")
    except OSError as err:
        logger.warning("could not write %s: %s", Path(out_dir) / FAILED_FILE, err)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s shuffle: independent streams for every (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


class EpochSampler(Sampler[int]):
    """A random permutation fixed by (seed, epoch), starting at position ``start``.

    Under data-parallel training (``world_size`` > 1) it yields rank ``rank``'s share of that
    permutation (:func:`~genrerank.utils.distributed.rank_stream`: padded like
    ``DistributedSampler``, and step k of W ranks at batch b covers step k of one process at
    batch W * b); ``start`` then counts this rank's items.
    """

    def __init__(
        self, n: int, seed: int, epoch: int, start: int = 0, *,
        rank: int = 0, world_size: int = 1, batch_size: int = 1,
    ) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=generator).tolist()
        stream = rank_stream(perm, self.rank, self.world_size, self.batch_size)
        return iter(stream[self.start :])

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size)
        return max(0, per_rank - self.start)


@dataclasses.dataclass
class TrainerState:
    """Counters saved in ``last/`` for an exact resume."""

    epoch: int = 0  # completed epochs
    epoch_step: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps in all
    best_value: float | None = None
    best_epoch: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early-stopping counter)
    last_eval_step: int = -1
    # Running train-loss sums since the last evaluation, for the metrics.jsonl record.
    train_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    train_count: int = 0


class Trainer:
    """Train ``model`` with ``objective`` on ``train_data``, selecting on ``valid_data``.

    ``objective(out, batch)`` must return ``(total_loss, {component: tensor})``. Validation
    metrics are ``loss`` and ``loss/<component>`` (batch-size weighted means of the objective)
    plus whatever ``validate_fn(model, valid_loader)`` returns (its keys win on a clash); the
    valid loader yields CPU batches in a fixed order.

    Two hooks serve the fine-tuning objectives (:mod:`genrerank.preference`) without a second
    loop: a data set may carry its own ``collate_fn`` (preference pairs batch a request's two
    lists), and an objective with ``prepare_batch(model, batch, seed)`` turns each batch into
    the one its loss reads before the forward pass (the policy-gradient loss samples lists from
    the current policy there; ``seed`` is a pure function of the step, so runs stay
    reproducible). ``fit_statistics=False`` keeps the feature statistics a fine-tuned model
    brings from its pre-training.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: nn.Module | Callable[..., Any],
        train_data: RerankDataset,
        valid_data: RerankDataset,
        config: TrainConfig,
        out_dir: str | Path,
        validate_fn: ValidateFn | None = None,
        *,
        loss_config: Sequence[dict[str, Any]] | dict[str, Any] | None = None,
        overwrite: bool = False,
        fit_statistics: bool = True,
    ) -> None:
        if len(train_data) == 0:
            raise ValueError("Trainer: the training split has no requests")
        if len(valid_data) == 0:
            raise ValueError("Trainer: the validation split has no requests")
        self.dist = distributed.context()
        if len(valid_data) < self.dist.world_size:
            raise ValueError(
                f"Trainer: {len(valid_data)} validation requests for {self.dist.world_size} "
                "processes; every process validates a share, so give it at least one each"
            )
        # A streaming data set (genrerank.data.streaming) shards itself and yields this rank's
        # share of every epoch; an in-memory one is sharded by EpochSampler.
        self.streaming = isinstance(train_data, IterableDataset)
        if self.streaming:
            train_data.set_shard(self.dist.rank, self.dist.world_size)
            per_rank = len(train_data)
        else:
            per_rank = math.ceil(len(train_data) / self.dist.world_size)
        self.model = model
        self.objective = objective
        self.train_data = train_data
        self.valid_data = valid_data
        self.config = config
        self.out_dir = Path(out_dir)
        self.validate_fn = validate_fn
        self.loss_config = loss_config if loss_config is not None else []
        self.overwrite = overwrite
        self.fit_statistics = fit_statistics
        self.steps_per_epoch = math.ceil(per_rank / config.batch_size)
        self.device = distributed.device_of(config.device, self.dist)
        self.history: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.state = TrainerState()
        self.calibration: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ public

    @property
    def last_dir(self) -> Path:
        return self.out_dir / "last"

    @property
    def best_dir(self) -> Path:
        return self.out_dir / "best"

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): warm-up, then the schedule."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.lr
        total = cfg.epochs * self.steps_per_epoch
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        low = cfg.lr * cfg.min_lr_ratio
        return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - low)

    def valid_loader(self) -> DataLoader:
        return DataLoader(
            self.valid_data,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            shuffle=False,
            collate_fn=_collate_of(self.valid_data),
            num_workers=0,
            generator=torch.Generator().manual_seed(0),  # keep the global RNG untouched
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation metrics of the current model (see the class docstring)."""
        was_training = self.model.training
        self.model.eval()
        if isinstance(self.objective, nn.Module):
            self.objective.eval()
        loader = self.valid_loader()
        sums: dict[str, float] = {}
        count = 0
        try:
            # Each process validates its own share of the requests (all of them in one
            # process); the sums then add up over processes: every request counted once.
            for index, batch in enumerate(self._valid_shard_loader(loader)):
                # Validation rollouts get seeds of their own, the same at every evaluation.
                seed = epoch_seed(self.config.seed, 2_000_000 + index)
                batch = self._prepare(batch.to(self.device), seed)
                total, components = self.objective(self.model(batch), batch)
                size = batch.batch_size
                count += size
                for key, value in _loss_values(total, components).items():
                    sums[key] = sums.get(key, 0.0) + value * size
            if self.dist.distributed:
                keys = sorted(sums)
                reduced = distributed.all_reduce_sum(
                    torch.tensor([float(count), *(sums[k] for k in keys)], dtype=torch.float64)
                ).tolist()
                count, sums = int(reduced[0]), dict(zip(keys, reduced[1:], strict=True))
            metrics = {k: v / count for k, v in sums.items()}
            if self.validate_fn is not None:
                # Called on every process: a list metric gathers the shards itself
                # (genrerank.evaluation.offline.predict_gathered).
                extra = self.validate_fn(self.model, loader)
                metrics.update({k: float(v) for k, v in extra.items()})
        finally:
            self.model.train(was_training)
            if isinstance(self.objective, nn.Module):
                self.objective.train(was_training)
        return metrics

    def fit(
        self, resume: bool = False, on_start: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Train until ``epochs`` or early stopping; returns the best validation metrics plus
        ``epoch`` and ``step`` of that evaluation. Leaves the model holding the best weights.

        ``resume=True`` continues from ``out_dir/last`` (model, optimizer, counters, best metric,
        patience counter, RNG states): stopping and resuming gives the same weights as never
        stopping. ``on_start`` is called once the run folder is claimed (fresh start or restore
        succeeded), before training changes it. On failure see the module docstring.
        """
        cfg = self.config
        torch.set_num_threads(self._threads())
        self.model.to(self.device)
        if isinstance(self.objective, nn.Module):
            self.objective.to(self.device)
        seed_everything(cfg.seed)
        optimizer = self._make_optimizer()
        self.history, self.stop_reason = [], None
        self.calibration = self._calibrate_objective()
        created = _missing_folders(self.out_dir)
        # Refusals here (no checkpoint to resume, a run already there) change nothing on disk.
        # Only rank 0 writes to the run folder; every rank reads the checkpoint it resumes.
        if resume:
            self.state = self._restore(optimizer)
        else:
            self._on_main(self._start_fresh)
            self.state = TrainerState()
        try:
            self._on_main(lambda: self._claim(resume, on_start))
            if not resume and self.fit_statistics:
                # Feature statistics come from the training split only; a resumed run has them
                # in its checkpoint already. Every rank fits the same (deterministic) values.
                fit_statistics = getattr(self.model, "fit_statistics", None)
                if fit_statistics is not None:
                    fit_statistics(self._in_memory_train())

            writer: Any = _NullWriter()
            if self.dist.is_main:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides events a crashed run logged after the checkpoint we resume
                # from (those at the checkpoint's own step were logged before it was written).
                writer = SummaryWriter(
                    str(self.out_dir / TENSORBOARD_DIR),
                    purge_step=self.state.step + 1 if resume else None,
                )
            try:
                self._loop(optimizer, writer)
            finally:
                writer.close()
        except BaseException as exc:
            if self.dist.is_main:
                self._abandon(exc, created)
            raise

        state = self.state
        if state.best_metrics is None:  # cannot happen: training always ends with an evaluation
            raise RuntimeError("training finished without a validation result")
        load_tensors_into(self.model, self.best_dir / MODEL_FILE)
        return {**state.best_metrics, "epoch": state.best_epoch, "step": state.best_step}

    def _claim(self, resume: bool, on_start: Callable[[], None] | None) -> None:
        """Rank 0 takes the run folder: stale markers and temporaries go, history is trimmed."""
        (self.out_dir / FAILED_FILE).unlink(missing_ok=True)
        for path in remove_stale_temps(self.out_dir):
            logger.info("removed %s, left by a killed checkpoint write", path)
        if on_start is not None:
            on_start()
        self._trim_history(self.state.step)

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only; an error there is raised on every rank (instead of the
        other ranks waiting for it at the next collective until the timeout)."""
        error: BaseException | None = None
        result = None
        if self.dist.is_main:
            try:
                result = fn()
            except Exception as exc:
                error = exc
        if self.dist.distributed:
            message = distributed.broadcast_object(
                None if error is None else f"{type(error).__name__}: {error}"
            )
            if error is None and message is not None:
                raise RuntimeError(f"rank 0 failed: {message}")
        if error is not None:
            raise error
        return result

    def _threads(self) -> int:
        """``num_threads``, shared out when several processes train on one machine (torchrun
        starts one per device or core slot; more threads than cores only slows them all)."""
        if not self.dist.distributed or self.device.type == "cuda":
            return self.config.num_threads
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        return max(1, min(self.config.num_threads, cores // self.dist.local_world_size))

    def _in_memory_train(self) -> Any:
        """The training requests as flat arrays, for statistics and loss calibration: all of
        them in memory, or a streaming data set's leading sample (``statistics_sample``)."""
        sample = getattr(self.train_data, "statistics_sample", None)
        return sample() if self.streaming and sample is not None else self.train_data

    # ------------------------------------------------------------------ loop

    def _loop(self, optimizer: torch.optim.Optimizer, writer: Any) -> None:
        cfg, state = self.config, self.state
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stop = cfg.patience > 0 and state.bad_evals >= cfg.patience
        if stop:
            self.stop_reason = "early_stopping"
        self.model.train()
        if isinstance(self.objective, nn.Module):
            self.objective.train()
        self._loss_module = self._wrap_for_training()
        while not stop and state.epoch < cfg.epochs:
            loader = self._train_loader(state.epoch, state.epoch_step * cfg.batch_size)
            # A bar on a terminal, plain lines with the time left in a log file (rank 0 only).
            bar = progress(
                loader,
                f"train epoch {state.epoch + 1}/{cfg.epochs}",
                "steps",
                enabled=cfg.progress and self.dist.is_main,
                total=self.steps_per_epoch,
                initial=state.epoch_step,
                leave=False,
            )
            for batch in bar:
                values = self._train_step(batch, optimizer, params, writer)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    stop = self._evaluate(optimizer, writer)
                    if stop:
                        break
            bar.close()
            if stop:
                break
            state.epoch += 1
            state.epoch_step = 0
            if not cfg.eval_every:
                stop = self._evaluate(optimizer, writer)
        if not stop:
            self.stop_reason = "max_epochs"
            # Step-based evaluation: the last steps still get validated (and checkpointed).
            if state.last_eval_step != state.step:
                self._evaluate(optimizer, writer)

    def _train_step(
        self,
        batch: Any,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        writer: Any,
    ) -> dict[str, float]:
        cfg, state = self.config, self.state
        lr = self.lr_at(state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = self._prepare(batch.to(self.device), epoch_seed(cfg.seed, 1_000_000 + state.step))
        total, components = self._loss_module(batch)
        values = _loss_values(total.detach(), {k: v.detach() for k, v in components.items()})
        if self.dist.distributed:
            # The logged losses are the mean over ranks; a non-finite loss on any rank stops
            # every rank here, before backward's gradient all-reduce could wait for it.
            keys = list(values)
            mean = distributed.all_reduce_sum(torch.tensor([values[k] for k in keys])) / (
                self.dist.world_size)
            values = dict(zip(keys, mean.tolist(), strict=True))
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"non-finite training loss {values['loss']} at epoch {state.epoch + 1}, "
                f"step {state.step + 1}"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = None
        if cfg.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        state.step += 1
        state.epoch_step += 1

        for key, value in values.items():
            writer.add_scalar(f"train/{key}", value, state.step)
            state.train_sums[key] = state.train_sums.get(key, 0.0) + value
        state.train_count += 1
        writer.add_scalar("train/lr", lr, state.step)
        if grad_norm is not None:
            writer.add_scalar("train/grad_norm", grad_norm, state.step)
        return values

    def _evaluate(self, optimizer: torch.optim.Optimizer, writer: Any) -> bool:
        """Validate, log, checkpoint; True when early stopping says stop."""
        cfg, state = self.config, self.state
        with preserved_rng():
            metrics = self.validate()
        if cfg.select_metric not in metrics:
            raise ValueError(
                f"selection metric {cfg.select_metric!r} is not among the validation metrics "
                f"{sorted(metrics)}"
            )
        value = float(metrics[cfg.select_metric])
        improved = math.isfinite(value) and (
            state.best_value is None
            or (value < state.best_value if cfg.select_mode == "min" else value > state.best_value)
        )
        epoch = self._epoch_position()
        if improved:
            state.best_value = value
            state.best_epoch = epoch
            state.best_step = state.step
            state.best_metrics = dict(metrics)
            state.bad_evals = 0
        else:
            state.bad_evals += 1
        state.last_eval_step = state.step

        record: dict[str, Any] = {
            "epoch": epoch,
            "step": state.step,
            "lr": self.lr_at(max(0, state.step - 1)),
            "time": time.time(),
        }
        if state.train_count:
            record.update(
                {f"train/{k}": v / state.train_count for k, v in state.train_sums.items()}
            )
        record.update({f"valid/{k}": v for k, v in metrics.items()})
        record["is_best"] = improved
        state.train_sums, state.train_count = {}, 0
        self.history.append(record)
        stop = cfg.patience > 0 and state.bad_evals >= cfg.patience
        # Every rank holds the same metrics (validation sums over ranks) and so takes the same
        # decisions; rank 0 alone writes, and the others wait until the checkpoint is there.
        self._on_main(lambda: self._write_evaluation(record, metrics, improved, optimizer,
                                                     writer))
        logger.info(
            "epoch %s step %d: %s=%.6g%s",
            epoch,
            state.step,
            cfg.select_metric,
            value,
            " (best)" if improved else "",
        )
        if stop:
            self.stop_reason = "early_stopping"
        return stop

    def _write_evaluation(
        self,
        record: dict[str, Any],
        metrics: dict[str, float],
        improved: bool,
        optimizer: torch.optim.Optimizer,
        writer: Any,
    ) -> None:
        # The history line goes first: a crash before the checkpoint below then only leaves a
        # line that the resumed run trims (lines past the checkpoint's step are dropped).
        with (self.out_dir / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(_finite_or_none(record)) + "\n")
        for key, val in metrics.items():
            writer.add_scalar(f"valid/{key}", val, self.state.step)
        writer.flush()
        meta = self._meta(metrics)
        if improved:
            save_checkpoint(self.best_dir, self.model, meta, objective=self._objective_module())
        meta["rng"] = rng_state(cuda=self.device.type == "cuda")
        save_checkpoint(
            self.last_dir,
            self.model,
            meta,
            optimizer=optimizer,
            objective=self._objective_module(),
        )

    def _train_loader(self, epoch: int, start: int) -> DataLoader:
        """Epoch ``epoch``'s batches for this rank, from its ``start``-th request on."""
        cfg = self.config
        # Creating a loader iterator draws a base seed from its generator, or else from the
        # global torch RNG, which would shift dropout after a mid-epoch resume.
        if self.streaming:
            self.train_data.set_epoch(epoch)
            self.train_data.set_start(start)
            return DataLoader(self.train_data, batch_size=cfg.batch_size,
                              collate_fn=_collate_of(self.train_data), num_workers=0,
                              generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
        return DataLoader(
            self.train_data,
            batch_size=cfg.batch_size,
            sampler=EpochSampler(
                len(self.train_data), cfg.seed, epoch, start, rank=self.dist.rank,
                world_size=self.dist.world_size, batch_size=cfg.batch_size,
            ),
            collate_fn=_collate_of(self.train_data),
            num_workers=0,
            generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)),
        )

    def _valid_shard_loader(self, loader: DataLoader) -> DataLoader:
        """``loader`` restricted to this rank's share of the validation requests."""
        if not self.dist.distributed:
            return loader
        return DataLoader(
            self.valid_data,
            batch_size=loader.batch_size,
            sampler=list(self.dist.shard(len(self.valid_data))),
            collate_fn=_collate_of(self.valid_data),
            num_workers=0,
        )

    def _wrap_for_training(self) -> nn.Module:
        """The model and objective as one module; under torchrun wrapped in
        DistributedDataParallel, whose backward averages the gradients over ranks (and whose
        construction copies rank 0's weights and buffers to every rank)."""
        module = _LossModule(self.model, self.objective)
        if not self.dist.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.type == "cuda"
        return DistributedDataParallel(
            module,
            device_ids=[self.device.index] if cuda else None,
            find_unused_parameters=self._has_unused_parameters(module),
        )

    def _has_unused_parameters(self, module: nn.Module) -> bool:
        """Whether some trainable parameter gets no gradient from the loss (a head another loss
        trains). DDP must then search the graph for them every step (slower), or else it
        waits for their gradients forever; one probe step on a validation batch tells, with
        the random streams and the gradients left as they were."""
        batch = next(iter(self._valid_shard_loader(self.valid_loader())))
        with preserved_rng():
            batch = self._prepare(batch.to(self.device), epoch_seed(self.config.seed, 3_000_000))
            total, _ = module(batch)
            total.backward()
        unused = sum(1 for p in module.parameters() if p.requires_grad and p.grad is None)
        module.zero_grad(set_to_none=True)
        return bool(distributed.all_reduce_sum(torch.tensor([float(unused)]))[0] > 0)

    # ------------------------------------------------------------------ helpers

    def _prepare(self, batch: Any, seed: int) -> Any:
        """The objective's ``prepare_batch`` hook (see the class docstring), if it has one."""
        prepare = getattr(self.objective, "prepare_batch", None)
        return batch if prepare is None else prepare(self.model, batch, seed)

    def _calibrate_objective(self) -> dict[str, dict[str, float]]:
        """Set ``tau`` of loss terms that left it None, from the TRAINING split's utility R."""
        terms = getattr(self.objective, "losses", None)
        items = list(terms.items()) if terms is not None else [("objective", self.objective)]
        pending = [(k, t) for k, t in items if hasattr(t, "tau") and t.tau is None]
        if not pending:
            return {}
        from genrerank.losses.base import list_utility, utility_threshold

        loader = DataLoader(
            self._in_memory_train(),
            batch_size=1024,
            shuffle=False,
            collate_fn=collate,
            num_workers=0,
            generator=torch.Generator().manual_seed(0),  # keep the global RNG untouched
        )
        done: dict[str, dict[str, float]] = {}
        for key, term in pending:
            kwargs = {}
            if hasattr(term, "weights"):
                kwargs["weights"] = term.weights
            if hasattr(term, "discount"):
                kwargs["discount"] = term.discount
            utilities = torch.cat([list_utility(batch, **kwargs) for batch in loader])
            term.tau = utility_threshold(utilities, self.config.tau_quantile)
            done[key] = {"tau": float(term.tau)}
            logger.info("loss term %s: tau = %.6g from the training split", key, term.tau)
        return done

    def _epoch_position(self) -> int | float:
        e = self.state.epoch + self.state.epoch_step / self.steps_per_epoch
        return int(e) if float(e).is_integer() else round(e, 4)

    def _objective_module(self) -> nn.Module | None:
        return self.objective if isinstance(self.objective, nn.Module) else None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        objective = self._objective_module()
        if objective is not None:
            params += [p for p in objective.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Trainer: the model has no trainable parameters")
        # As in nanoGPT: decay matrices and embeddings, not biases and norm gains.
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            g
            for g in (
                {"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            )
            if g["params"]
        ]
        return torch.optim.AdamW(groups, lr=self.config.lr)

    def _meta(self, metrics: dict[str, float]) -> dict[str, Any]:
        state, cfg = self.state, self.config
        return {
            "train_config": cfg.to_dict(),
            "loss_config": _json_copy(self.loss_config),
            "loss_calibration": self.calibration,
            "epoch": self._epoch_position(),
            "step": state.step,
            "metrics": _finite_or_none(metrics),
            "best_metric": {
                "name": cfg.select_metric,
                "mode": cfg.select_mode,
                "value": state.best_value,
                "epoch": state.best_epoch,
                "step": state.best_step,
            },
            "trainer_state": dataclasses.asdict(state),
        }

    def _has_checkpoint(self) -> bool:
        """Any checkpoint in the run folder, including one moved aside by a crashed replace."""
        out = self.out_dir
        return any((out / name).exists() or any(out.glob(f".{name}.old-*"))
                   for name in CHECKPOINTS)

    def _abandon(self, exc: BaseException, created: list[Path]) -> None:
        """Clean up after a failed fit (see the module docstring); never raises."""
        out = self.out_dir
        # The epoch as metrics.jsonl counts it: epochs completed, fractional mid-epoch.
        during = f"training (at epoch {self._epoch_position()}, step {self.state.step})"
        try:
            if self._has_checkpoint():  # resumable: keep everything
                mark_failed(out, exc, during)
                return
            if created:  # nothing worth keeping, in folders this fit made
                shutil.rmtree(out, ignore_errors=True)
                for parent in created[1:]:  # innermost first; only while empty
                    with contextlib.suppress(OSError):
                        parent.rmdir()
                return
            # The user's folder: remove only this fit's files, and say why the run is not there.
            (out / METRICS_FILE).unlink(missing_ok=True)
            shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
            mark_failed(out, exc, during)
        except OSError as err:
            logger.warning("could not clean up the failed run in %s: %s", out, err)

    def _start_fresh(self) -> None:
        out = self.out_dir
        existing = [p for p in (self.last_dir, self.best_dir) if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{out} already holds a run ({', '.join(p.name for p in existing)}/); "
                "resume it or pass overwrite=True to start over"
            )
        for path in (self.last_dir, self.best_dir, out / TENSORBOARD_DIR):
            shutil.rmtree(path, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text("")

    def _restore(self, optimizer: torch.optim.Optimizer) -> TrainerState:
        if not (self.last_dir / "checkpoint.json").is_file() and not any(
            self.out_dir.glob(".last.old-*")
        ):
            raise FileNotFoundError(f"cannot resume: no checkpoint in {self.last_dir}")
        meta = load_checkpoint(self.last_dir, self.model, optimizer, self._objective_module())
        name = getattr(self.model, "name", "") or type(self.model).__name__
        if meta.get("model_name") != name:
            raise CheckpointError(
                f"{self.last_dir}: checkpoint is of model {meta.get('model_name')!r}, not {name!r}"
            )
        saved = meta.get("train_config", {})
        now = self.config.to_dict()
        changed = [k for k in _TRAJECTORY_FIELDS if k in saved and saved[k] != now[k]]
        if changed:
            warnings.warn(
                f"resuming {self.out_dir} with changed train settings {changed}; the run will "
                "not match an uninterrupted one",
                stacklevel=3,
            )
        set_rng_state(meta["rng"])
        fields = {f.name for f in dataclasses.fields(TrainerState)}
        return TrainerState(**{k: v for k, v in meta["trainer_state"].items() if k in fields})

    def _trim_history(self, step: int) -> None:
        """Keep metrics.jsonl lines up to ``step`` (later ones belong to a crashed run). Only the
        last line can be cut short by a crash mid-append: it is dropped with a warning; a bad
        line before it means the file was damaged otherwise, an error naming file and line."""
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            path.write_text("")
            return
        # A crash can leave any bytes (NULs after a power loss): decode without failing.
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        kept = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:  # json.JSONDecodeError included
                if i == last:
                    warnings.warn(
                        f"{path}, line {i + 1}: cut short or not valid JSON (a write "
                        "interrupted by a crash or a full disk); dropped it",
                        stacklevel=3,
                    )
                    continue
                raise ValueError(
                    f"{path}, line {i + 1}: not valid JSON ({exc}); only the last line can be "
                    "cut short by a crash, so the file was damaged: fix or delete that line, "
                    "then resume"
                ) from None
            if record.get("step", 0) <= step:
                kept.append(line)
                self.history.append(record)
        path.write_text("".join(line + "\n" for line in kept))


class _LossModule(nn.Module):
    """``objective(model(batch), batch)`` as one module, so that DDP syncs the gradients of
    the model and of an objective with parameters alike."""

    def __init__(self, model: nn.Module, objective: Any) -> None:
        super().__init__()
        self.model = model
        if isinstance(objective, nn.Module):
            self.objective = objective
        else:
            self._objective_fn = objective

    def forward(self, batch: Any) -> Any:
        objective = self.objective if hasattr(self, "objective") else self._objective_fn
        return objective(self.model(batch), batch)


class _NullWriter:
    """The TensorBoard writer of ranks other than 0: they log nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _collate_of(dataset: Any) -> Callable[..., Any]:
    """The data set's own batching (``collate_fn``) or the padded request batch."""
    return getattr(dataset, "collate_fn", collate)


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first: what creating
    ``path`` would make (and so what a failed fit may remove again)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _loss_values(total: torch.Tensor, components: dict[str, torch.Tensor]) -> dict[str, float]:
    values = {"loss": float(total)}
    values.update({f"loss/{k}": float(v) for k, v in components.items()})
    return values


def _finite_or_none(data: dict[str, Any]) -> dict[str, Any]:
    # Strict JSON (jq, browsers) has no NaN/Infinity.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()
    }


def _json_copy(value: Any) -> Any:
    return json.loads(json.dumps(value))
