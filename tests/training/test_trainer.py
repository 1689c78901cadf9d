"""The shared trainer: learning, early stopping, selection, reproducibility, resume, logs,
run config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from genrerank.data.dataset import RerankDataset
from genrerank.data.simulator import simulate_to_dir
from genrerank.training import TrainConfig, Trainer, load_run_config
from genrerank.training.config import parse_value
from tests.training import (
    TinyObjective,
    any_tensor_differs,
    assert_same_tensors,
    make_model,
    small_config,
    weights,
)


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_to_dir("avito", 400, 0, tmp_path_factory.mktemp("sim") / "d", progress=False)


@pytest.fixture(scope="module")
def data(sim_path: Path) -> tuple[RerankDataset, RerankDataset]:
    return RerankDataset(sim_path, split="train"), RerankDataset(sim_path, split="valid")


def make_trainer(data, out: Path, config: TrainConfig, model_seed: int = 0, **kwargs) -> Trainer:
    train, valid = data
    model = make_model(train.spec, seed=model_seed)
    return Trainer(model, TinyObjective(), train, valid, config, out, **kwargs)


def read_history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar, across all event files of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class Scripted:
    """A validate_fn returning a scripted metric sequence and recording the weights it saw."""

    def __init__(self, values: list[float], name: str = "score") -> None:
        self.values, self.name, self.seen = list(values), name, []

    def __call__(self, model, loader) -> dict[str, float]:
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {self.name: self.values[len(self.seen) - 1]}


# --------------------------------------------------------------------------- training


def test_loss_decreases_on_train(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run", small_config(epochs=4))
    result = trainer.fit()
    history = read_history(tmp_path / "run")
    assert len(history) == 4
    train_losses = [h["train/loss"] for h in history]
    assert train_losses[-1] < train_losses[0]
    assert history[-1]["valid/loss"] < history[0]["valid/loss"]
    assert result["step"] == history[result["epoch"] - 1]["step"]
    assert trainer.stop_reason == "max_epochs"


def test_early_stopping_triggers_with_patience(data, tmp_path):
    scripted = Scripted([0.1, 0.3, 0.2, 0.25, 0.9, 0.95])
    config = small_config(epochs=6, patience=2, select_metric="score", select_mode="max")
    trainer = make_trainer(data, tmp_path / "run", config, validate_fn=scripted)
    result = trainer.fit()
    assert len(scripted.seen) == 4  # epochs 3 and 4 did not beat epoch 2: stop after epoch 4
    assert trainer.stop_reason == "early_stopping"
    assert result["epoch"] == 2 and result["score"] == 0.3
    assert [h["is_best"] for h in read_history(tmp_path / "run")] == [True, True, False, False]


def test_selection_keeps_best_validation_epoch(data, tmp_path):
    scripted = Scripted([0.5, 0.2, 0.4, 0.3])
    config = small_config(epochs=4, select_metric="score", select_mode="min")
    out = tmp_path / "run"
    trainer = make_trainer(data, out, config, validate_fn=scripted)
    result = trainer.fit()
    assert result["epoch"] == 2 and result["step"] == 2 * trainer.steps_per_epoch
    assert_same_tensors(weights(out / "best" / "model.safetensors"), scripted.seen[1])
    assert_same_tensors(weights(out / "last" / "model.safetensors"), scripted.seen[3])
    assert any_tensor_differs(scripted.seen[1], scripted.seen[3])
    # fit() leaves the selected weights in the model.
    assert_same_tensors(dict(trainer.model.state_dict()), scripted.seen[1])
    meta = json.loads((out / "best" / "checkpoint.json").read_text())
    assert meta["epoch"] == 2 and meta["best_metric"]["value"] == 0.2


def test_unknown_selection_metric_is_named(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run", small_config(epochs=1, select_metric="ndcg"))
    with pytest.raises(ValueError, match="'ndcg'.*loss"):
        trainer.fit()


def test_same_seed_same_weights_different_seed_different(data, tmp_path):
    def final(seed: int, name: str) -> dict[str, torch.Tensor]:
        trainer = make_trainer(data, tmp_path / name, small_config(epochs=2, seed=seed))
        trainer.fit()
        return weights(tmp_path / name / "last" / "model.safetensors")

    first, again, other = final(0, "a"), final(0, "b"), final(1, "c")
    assert_same_tensors(first, again)
    assert any_tensor_differs(first, other)


def test_resume_equals_uninterrupted(data, tmp_path):
    # Warm-up, weight decay, clipping and dropout all in play.
    base = {"warmup_steps": 5, "lr": 0.02}
    straight = make_trainer(data, tmp_path / "straight", small_config(epochs=4, **base))
    straight.fit()

    first = make_trainer(data, tmp_path / "split", small_config(epochs=2, **base))
    first.fit()
    # A differently initialised model: everything must come from last/.
    second = make_trainer(data, tmp_path / "split", small_config(epochs=4, **base), model_seed=7)
    second.fit(resume=True)

    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(
            weights(tmp_path / "straight" / "last" / name),
            weights(tmp_path / "split" / "last" / name),
        )

    def without_time(out: Path) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "time"} for h in read_history(out)]

    assert without_time(tmp_path / "straight") == without_time(tmp_path / "split")
    for tag in ("train/loss", "train/lr", "valid/loss"):
        assert scalars(tmp_path / "split", tag) == scalars(tmp_path / "straight", tag)
    last = json.loads((tmp_path / "split" / "last" / "checkpoint.json").read_text())
    assert last["epoch"] == 4 and last["step"] == 4 * second.steps_per_epoch


def test_resume_after_crash_mid_epoch(data, tmp_path):
    config = small_config(epochs=2, eval_every=4, lr_schedule="cosine", warmup_steps=2)
    straight = make_trainer(data, tmp_path / "straight", config)
    straight.fit()

    calls = []

    def crash_on_third(model, loader):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies during the 3rd evaluation (step 12)
        return {}

    crashed = make_trainer(data, tmp_path / "crash", config, validate_fn=crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    meta = json.loads((tmp_path / "crash" / "last" / "checkpoint.json").read_text())
    assert meta["step"] == 8 and meta["trainer_state"]["epoch_step"] == 8

    resumed = make_trainer(data, tmp_path / "crash", config, model_seed=3)
    resumed.fit(resume=True)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(
            weights(tmp_path / "straight" / "last" / name),
            weights(tmp_path / "crash" / "last" / name),
        )
    steps = [h["step"] for h in read_history(tmp_path / "crash")]
    assert steps == [h["step"] for h in read_history(tmp_path / "straight")]
    assert steps == [4, 8, 12, 16, 20]  # 10 steps an epoch; the end of training is validated
    # TensorBoard: the crashed run's steps 9-12 are purged, so each step appears once.
    for tag in ("train/loss", "valid/loss"):
        assert scalars(tmp_path / "crash", tag) == scalars(tmp_path / "straight", tag)


def test_step_evaluation_also_validates_the_end_of_training(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run", small_config(epochs=1, eval_every=3))
    trainer.fit()
    history = read_history(tmp_path / "run")
    assert [h["step"] for h in history] == [3, 6, 9, 10]
    assert [h["epoch"] for h in history] == [0.3, 0.6, 0.9, 1]


def test_resume_restores_patience_and_best(data, tmp_path):
    out = tmp_path / "run"
    config = small_config(epochs=3, patience=2, select_metric="score", select_mode="max")
    make_trainer(data, out, config, validate_fn=Scripted([0.5, 0.4, 0.3])).fit()
    # One more evaluation without improvement: the restored counter (2 -> would stop) plus a
    # larger patience lets exactly one more epoch run, then stops.
    config = small_config(epochs=10, patience=3, select_metric="score", select_mode="max")
    scripted = Scripted([0.45, 0.9])
    trainer = make_trainer(data, out, config, validate_fn=scripted)
    result = trainer.fit(resume=True)
    assert len(scripted.seen) == 1 and trainer.stop_reason == "early_stopping"
    assert result["epoch"] == 1 and result["score"] == 0.5


def test_resume_needs_a_checkpoint_and_fresh_needs_an_empty_dir(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="last"):
        make_trainer(data, tmp_path / "none", small_config(epochs=1)).fit(resume=True)
    make_trainer(data, tmp_path / "run", small_config(epochs=1)).fit()
    with pytest.raises(FileExistsError, match="resume"):
        make_trainer(data, tmp_path / "run", small_config(epochs=1)).fit()
    make_trainer(data, tmp_path / "run", small_config(epochs=1), overwrite=True).fit()
    assert len(read_history(tmp_path / "run")) == 1


# --------------------------------------------------------------------------- damaged history


@pytest.mark.parametrize("tail", ['{"epoch": 3, "step": 30, "lr": 0.0', "\x00" * 64])
def test_resume_drops_a_cut_short_last_metrics_line_with_a_warning(data, tmp_path, tail):
    out = tmp_path / "run"
    make_trainer(data, out, small_config(epochs=2)).fit()
    path = out / "metrics.jsonl"
    with path.open("a") as fh:
        fh.write(tail)  # no newline: the write of line 3 was cut off
    trainer = make_trainer(data, out, small_config(epochs=3))
    with pytest.warns(UserWarning, match=re.escape(
            f"{path}, line 3: cut short or not valid JSON (a write interrupted by a crash or a "
            "full disk); dropped it")):
        trainer.fit(resume=True)
    assert [h["epoch"] for h in read_history(out)] == [1, 2, 3]
    assert not (out / "FAILED").exists()


def test_resume_refuses_a_damaged_metrics_line_before_the_last(data, tmp_path):
    out = tmp_path / "run"
    make_trainer(data, out, small_config(epochs=2)).fit()
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines()
    damaged = f"{lines[0]}\n{lines[1][:20]}\n{lines[1]}\n"
    path.write_text(damaged)
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: not valid JSON (")):
        make_trainer(data, out, small_config(epochs=3)).fit(resume=True)
    assert path.read_text() == damaged  # left for the user to look at
    assert json.loads((out / "last" / "checkpoint.json").read_text())["epoch"] == 2


# --------------------------------------------------------------------------- failed runs


class Boom:
    """A validate_fn that fails on evaluation ``at`` (1-based), with ``exc``."""

    def __init__(self, at: int, exc: BaseException | None = None) -> None:
        self.at, self.calls = at, 0
        self.exc = exc or RuntimeError("bad batch")

    def __call__(self, model, loader) -> dict[str, float]:
        self.calls += 1
        if self.calls == self.at:
            raise self.exc
        return {}


@pytest.mark.parametrize("exc", [RuntimeError("bad batch"), KeyboardInterrupt()])
def test_a_fit_failing_before_its_first_checkpoint_removes_the_folders_it_made(
    data, tmp_path, exc
):
    out = tmp_path / "runs" / "new" / "run"
    started = []
    trainer = make_trainer(data, out, small_config(epochs=2), validate_fn=Boom(1, exc))
    with pytest.raises(type(exc)):
        trainer.fit(on_start=lambda: started.append(out.is_dir()))
    assert started == [True]  # the folder existed, then was removed again
    assert list(tmp_path.iterdir()) == []  # runs/new/ made by the fit go too


def test_a_fit_failing_in_a_folder_it_did_not_make_keeps_it_marked_failed(data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    trainer = make_trainer(data, out, small_config(epochs=2), validate_fn=Boom(1))
    with pytest.raises(RuntimeError, match="bad batch"):
        trainer.fit()
    assert sorted(p.name for p in out.iterdir()) == ["FAILED", "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's"
    steps = trainer.steps_per_epoch
    assert (out / "FAILED").read_text() == (
        f"train failed while training (at epoch 1, step {steps}): RuntimeError: bad batch\n")
    # A later train in the same folder starts clean: the marker goes once it has begun.
    make_trainer(data, out, small_config(epochs=1)).fit()
    assert not (out / "FAILED").exists() and (out / "best").is_dir()


def test_a_fit_failing_after_a_checkpoint_keeps_the_run_for_resume(data, tmp_path):
    out = tmp_path / "run"
    config = small_config(epochs=3)
    straight = make_trainer(data, tmp_path / "straight", config)
    straight.fit()
    with pytest.raises(RuntimeError, match="bad batch"):
        make_trainer(data, out, config, validate_fn=Boom(2)).fit()
    assert {"last", "best", "metrics.jsonl", "tensorboard", "FAILED"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "last" / "checkpoint.json").read_text())["epoch"] == 1
    assert "(at epoch 2, step" in (out / "FAILED").read_text()
    make_trainer(data, out, config, model_seed=5).fit(resume=True)
    assert not (out / "FAILED").exists()
    assert_same_tensors(weights(tmp_path / "straight" / "last" / "model.safetensors"),
                        weights(out / "last" / "model.safetensors"))


def test_refused_starts_change_nothing(data, tmp_path):
    out = tmp_path / "run"
    make_trainer(data, out, small_config(epochs=1)).fit()
    before = sorted(p.name for p in out.iterdir())
    called = []
    with pytest.raises(FileExistsError):  # a run is there and overwrite was not given
        make_trainer(data, out, small_config(epochs=1)).fit(on_start=lambda: called.append(1))
    assert sorted(p.name for p in out.iterdir()) == before and called == []
    with pytest.raises(FileNotFoundError):
        make_trainer(data, tmp_path / "none", small_config(epochs=1)).fit(resume=True)
    assert not (tmp_path / "none").exists()


def test_tensorboard_and_metrics_files(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    trainer = make_trainer(data, out, small_config(epochs=2))
    trainer.fit()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss/nll", "train/loss/top1_prob", "train/lr"} <= tags
    assert {"valid/loss", "valid/loss/nll"} <= tags
    assert len(acc.Scalars("train/loss")) == 2 * trainer.steps_per_epoch
    assert len(acc.Scalars("valid/loss")) == 2
    history = read_history(out)
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"step", "lr", "train/loss", "train/loss/nll", "valid/loss", "is_best"} <= set(
        history[0]
    )


def test_test_split_is_never_read(data, sim_path, tmp_path):
    train, valid = data
    trainer = make_trainer(data, tmp_path / "run", small_config(epochs=1))
    seen: set[int] = set()
    trainer.model.register_forward_pre_hook(
        lambda module, args: seen.update(args[0].request_index.tolist())
    )
    trainer.fit()
    test_rows = set(RerankDataset(sim_path, split="test").rows.tolist())
    assert test_rows and not seen & test_rows
    assert seen == set(train.rows.tolist()) | set(valid.rows.tolist())


def test_unlikelihood_tau_is_calibrated_on_train(data, tmp_path):
    losses = pytest.importorskip("genrerank.losses")
    objective = losses.build_objective([{"name": "likelihood"}, {"name": "unlikelihood"}])
    train, valid = data
    model = make_model(train.spec)
    trainer = Trainer(
        model,
        objective,
        train,
        valid,
        small_config(epochs=1),
        tmp_path / "run",
        loss_config=[{"name": "likelihood"}, {"name": "unlikelihood"}],
    )
    trainer.fit()
    tau = objective["unlikelihood"].tau
    assert tau is not None
    meta = json.loads((tmp_path / "run" / "last" / "checkpoint.json").read_text())
    assert meta["loss_calibration"] == {"unlikelihood": {"tau": tau}}
    assert meta["loss_config"][1] == {"name": "unlikelihood"}
    assert {"loss/likelihood", "loss/unlikelihood"} <= set(meta["metrics"])


# --------------------------------------------------------------------------- run config


def test_run_config_defaults():
    config = load_run_config(None, [])
    assert config == {"model": {}, "train": TrainConfig().to_dict(), "loss": [], "decode": {}}
    assert TrainConfig.from_dict(config["train"]) == TrainConfig()


def test_run_config_base_layer_sits_under_the_user_file(tmp_path):
    base = tmp_path / "base.json"
    base.write_text('{"model": {"name": "m", "dim": 8}, "loss": [{"name": "a"}], '
                    '"decode": {"name": "greedy"}}')
    user = tmp_path / "user.json"
    user.write_text('{"model": {"dim": 16}, "loss": [{"name": "b"}]}')
    config = load_run_config(user, ["decode.alpha=0.5"], base=base)
    assert config["model"] == {"name": "m", "dim": 16}
    assert config["loss"] == [{"name": "b"}]
    assert config["decode"] == {"name": "greedy", "alpha": 0.5}


def test_run_config_layers_json_and_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps(
            {
                "model": {"name": "nar4rec", "dim": 32},
                "train": {"lr": 0.005, "epochs": 7},
                "loss": [{"name": "unlikelihood", "tau": 1.0}],
            }
        )
    )
    config = load_run_config(
        path,
        [
            "train.lr=0.001",
            "model.dim=64",
            "loss.0.tau=0.5",
            "loss.1.name=contrastive",
            "loss.1.weight=0.1",
            "train.progress=false",
            "train.grad_clip=none",
            "model.layers=[1, 2]",
            "model.kind=nar",
        ],
    )
    assert config["model"] == {"name": "nar4rec", "dim": 64, "layers": [1, 2], "kind": "nar"}
    assert config["train"]["lr"] == 0.001 and config["train"]["epochs"] == 7
    assert config["train"]["progress"] is False and config["train"]["grad_clip"] is None
    assert config["train"]["batch_size"] == TrainConfig().batch_size  # default kept
    assert config["loss"] == [
        {"name": "unlikelihood", "tau": 0.5},
        {"name": "contrastive", "weight": 0.1},
    ]
    train = TrainConfig.from_dict(config["train"])
    assert isinstance(train.lr, float) and train.epochs == 7


def test_run_config_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nname = "nar4rec"\ndim = 16\n\n[train]\nbatch_size = 8\nlr = 1\n\n'
        '[[loss]]\nname = "likelihood"\n\n[[loss]]\nname = "contrastive"\nweight = 0.2\n'
    )
    config = load_run_config(path, ["train.epochs=2"])
    assert config["model"] == {"name": "nar4rec", "dim": 16}
    assert config["train"]["batch_size"] == 8 and config["train"]["epochs"] == 2
    assert config["loss"] == [{"name": "likelihood"}, {"name": "contrastive", "weight": 0.2}]
    assert TrainConfig.from_dict(config["train"]).lr == 1.0


def test_type_aware_values():
    assert parse_value("3", 1.0) == 3.0 and isinstance(parse_value("3", 1.0), float)
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5
    assert parse_value("yes", False) is True and parse_value("true") is True
    assert parse_value("007", "x") == "007"  # a string option keeps the text as is
    assert parse_value("0.05", "auto") == 0.05  # decode.alpha: "auto" or a number
    assert parse_value("beam", "greedy") == "beam" and parse_value("true", "x") == "true"
    assert parse_value("[1, 2]") == [1, 2] and parse_value("hello") == "hello"
    with pytest.raises(ValueError, match="integer"):
        parse_value("abc", 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=0.1"], "unknown top-level section 'optim'"),
        (["lr=0.1"], "unknown top-level section 'lr'"),
        (["train.lr"], "expected key=value"),
        (["train.epochs=abc"], "train.epochs=abc.*integer"),
        (["train.epochs=2.5"], "train.epochs: expected int"),
        (["train.learning_rate=0.1"], "unknown option.*learning_rate"),
        (["loss.3.tau=0.5"], "index 3 out of range"),
        (["train.select_mode=best"], "select_mode"),
        (["train..lr=1"], "empty key"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, overrides)


def test_bad_config_files_are_named(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {}, "optimizer": {"lr": 1}}))
    with pytest.raises(ValueError, match="unknown top-level section.*optimizer"):
        load_run_config(path, [])
    path.write_text(json.dumps({"loss": {"name": "likelihood"}}))
    with pytest.raises(ValueError, match="'loss' must be a list"):
        load_run_config(path, [])
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model: {}\n")
    with pytest.raises(ValueError, match=r"\.json or \.toml"):
        load_run_config(yaml, [])
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_run_config(tmp_path / "missing.toml", [])
