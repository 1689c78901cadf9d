"""Checkpoints: safetensors + JSON only, atomic replace, exact round trips, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import genrerank.training as training_pkg
from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.training import CheckpointError, Trainer, load_model, save_checkpoint
from genrerank.training import checkpoint as ckpt
from tests.training import (
    TINY_MODEL,
    TinyObjective,
    any_tensor_differs,
    assert_same_tensors,
    make_model,
    small_config,
    weights,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[RerankDataset, RerankDataset]:
    path = simulate_to_dir("avito", 400, 0, tmp_path_factory.mktemp("sim") / "d", progress=False)
    return RerankDataset(path, split="train"), RerankDataset(path, split="valid")


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run (read-only for the tests using it)."""
    train, valid = data
    out = tmp_path_factory.mktemp("run") / "run"
    model = make_model(train.spec)
    Trainer(
        model,
        TinyObjective(),
        train,
        valid,
        small_config(epochs=2),
        out,
        loss_config=[{"name": "nll"}],
    ).fit()
    return out


@pytest.fixture
def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, free to damage."""
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def outputs(model: torch.nn.Module, dataset: RerankDataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(collate([dataset[i] for i in range(len(dataset))])).log_probs


# --------------------------------------------------------------------------- layout


def test_layout_is_safetensors_and_json_only(run_dir):
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    checkpoints = {f for f in files if not f.startswith("tensorboard/")}
    assert checkpoints == {
        "best/checkpoint.json",
        "best/model.safetensors",
        "last/checkpoint.json",
        "last/model.safetensors",
        "last/optimizer.safetensors",
        "metrics.jsonl",
    }
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".pickle", ".bin")) for f in files)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_no_pickle_in_the_training_code():
    for path in Path(training_pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        for banned in ("torch.save", "torch.load", "import pickle", "weights_only"):
            assert banned not in text, f"{path.name} uses {banned}"


def test_checkpoint_json_holds_everything_to_rebuild_and_resume(run_dir, data):
    train, _ = data
    meta = json.loads((run_dir / "last" / "checkpoint.json").read_text())
    assert meta["model_name"] == TINY_MODEL
    assert meta["model_config"] == {"dim": 16, "dropout": 0.2}
    assert meta["feature_spec"] == train.spec.to_dict()
    assert meta["train_config"] == small_config(epochs=2).to_dict()
    assert meta["loss_config"] == [{"name": "nll"}]
    assert meta["epoch"] == 2 and meta["step"] > 0
    assert meta["best_metric"]["name"] == "loss" and meta["best_metric"]["mode"] == "min"
    assert set(meta["rng"]) >= {"python", "numpy", "torch"}
    assert meta["trainer_state"]["bad_evals"] >= 0
    groups = meta["optimizer"]["param_groups"]
    # nanoGPT-style groups: matrices/embeddings decayed, biases not.
    assert [g["params"] for g in groups] == [[0, 1, 2], [3, 4]]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert groups[0]["betas"] == [0.9, 0.999]
    opt = weights(run_dir / "last" / "optimizer.safetensors")
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(opt)
    best = json.loads((run_dir / "best" / "checkpoint.json").read_text())
    assert "optimizer" not in best and "rng" not in best


# --------------------------------------------------------------------------- round trips


def test_load_model_round_trip_gives_identical_outputs(run_dir, data):
    _, valid = data
    for which in ("best", "last"):
        model, meta = load_model(run_dir, which)
        assert not model.training and meta["model_name"] == TINY_MODEL
        again, _ = load_model(run_dir / which)  # a checkpoint folder works too
        assert torch.equal(outputs(model, valid), outputs(again, valid))
        assert_same_tensors(
            dict(model.state_dict()), weights(run_dir / which / "model.safetensors")
        )
    # Same outputs as the trained model object itself (which fit() left at best/).
    model, _ = load_model(run_dir)
    fresh = make_model(valid.spec, seed=5)
    fresh.load_state_dict(weights(run_dir / "best" / "model.safetensors"))
    assert torch.equal(outputs(model, valid), outputs(fresh, valid))


def test_optimizer_state_round_trip_continues_identically(data):
    train, _ = data
    batch = collate([train[i] for i in range(16)])
    objective = TinyObjective()

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            objective(model(batch), batch)[0].backward()
            opt.step()

    torch.manual_seed(0)
    model = make_model(train.spec, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    steps(model, opt, 3)
    tensors, meta = ckpt.flatten_optimizer_state(opt.state_dict())
    json.dumps(meta)  # the non-tensor part is plain JSON

    clone = make_model(train.spec, dropout=0.0)
    clone.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(clone.parameters(), lr=0.5)
    opt2.load_state_dict(ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(meta))))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 0.01
    steps(model, opt, 2)
    steps(clone, opt2, 2)
    assert_same_tensors(dict(model.state_dict()), dict(clone.state_dict()))


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = json.loads(json.dumps(ckpt.rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


# --------------------------------------------------------------------------- atomic writes


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_failure_while_writing_keeps_previous_checkpoint(data, tmp_path, monkeypatch):
    train, _ = data
    target = tmp_path / "last"
    old = make_model(train.spec, seed=1)
    save_checkpoint(target, old, {"step": 1})
    new = make_model(train.spec, seed=2)
    assert any_tensor_differs(_state(old), _state(new))

    def crash(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 10)  # half a file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, new, {"step": 2})
    monkeypatch.undo()

    model, meta = load_model(target)
    assert meta["step"] == 1
    assert_same_tensors(_state(model), _state(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # temp folder cleaned up


def test_failure_during_the_swap_puts_the_old_checkpoint_back(data, tmp_path, monkeypatch):
    train, _ = data
    target = tmp_path / "last"
    old = make_model(train.spec, seed=1)
    save_checkpoint(target, old, {"step": 1})
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder has stepped aside; moving the new one in fails
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(target, make_model(train.spec, seed=2), {"step": 2})
    monkeypatch.undo()
    model, meta = load_model(target)
    assert meta["step"] == 1 and not any_tensor_differs(_state(model), _state(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_crash_between_renames_is_recovered_on_read_and_write(data, tmp_path):
    train, _ = data
    target = tmp_path / "last"
    old = make_model(train.spec, seed=1)
    save_checkpoint(target, old, {"step": 1})
    # What a kill -9 between the two renames leaves behind.
    os.replace(target, tmp_path / ".last.old-12345")
    model, meta = load_model(tmp_path, "last")
    assert meta["step"] == 1 and not any_tensor_differs(_state(model), _state(old))

    os.replace(target, tmp_path / ".last.old-12345")
    save_checkpoint(target, make_model(train.spec, seed=2), {"step": 2})
    assert ckpt.read_meta(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_trainer_crash_mid_checkpoint_leaves_last_loadable(data, copy_run, monkeypatch):
    train, valid = data
    before = weights(copy_run / "last" / "model.safetensors")
    monkeypatch.setattr(ckpt.json, "dumps", _raise_on_checkpoint_dumps(ckpt.json.dumps))
    trainer = Trainer(
        make_model(train.spec),
        TinyObjective(),
        train,
        valid,
        small_config(epochs=3),
        copy_run,
    )
    with pytest.raises(RuntimeError, match="killed"):
        trainer.fit(resume=True)
    monkeypatch.undo()
    model, meta = load_model(copy_run, "last")
    assert meta["epoch"] == 2
    assert_same_tensors(dict(model.state_dict()), before)


def _raise_on_checkpoint_dumps(real):
    def dumps(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == ckpt.FORMAT:
            raise RuntimeError("killed while writing checkpoint.json")
        return real(obj, *args, **kwargs)

    return dumps


# --------------------------------------------------------------------------- clear errors


def test_missing_weights_file_is_named(copy_run):
    (copy_run / "best" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"best/model\.safetensors"):
        load_model(copy_run)
    with pytest.raises(FileNotFoundError, match=r"nowhere/best/checkpoint\.json"):
        load_model(copy_run / "nowhere")


def test_corrupted_weights_file_is_named(copy_run):
    path = copy_run / "best" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"best/model\.safetensors.*damaged"):
        load_model(copy_run)


def test_mismatched_tensors_are_named(copy_run):
    meta_path = copy_run / "best" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["dim"] = 8
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*shape mismatch.*dense"):
        load_model(copy_run)

    from safetensors.torch import save_file

    path = copy_run / "last" / "model.safetensors"
    tensors = weights(path)
    tensors["extra.weight"] = torch.zeros(2)
    del tensors["head.bias"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"missing tensors \['head.bias'\].*extra.weight"):
        load_model(copy_run, "last")


def test_bad_checkpoint_json_is_named(copy_run):
    (copy_run / "best" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"best/checkpoint\.json.*not valid JSON"):
        load_model(copy_run)
    (copy_run / "last" / "checkpoint.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a genrerank checkpoint"):
        load_model(copy_run, "last")


# --------------------------------------------------------------------------- stale temp folders


def test_remove_stale_temps_removes_only_its_own_temp_folders(data, tmp_path):
    train, _ = data
    save_checkpoint(tmp_path / "last", make_model(train.spec), {"step": 1})
    stale = [tmp_path / ".last.tmp-k1ll3d", tmp_path / ".best.tmp-abc_12"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\x00" * 10)  # half-written, as on a kill
    # Look-alikes that are not its temp folders, and a moved-aside checkpoint _recover needs.
    keep_dirs = [".last.old-4242", ".other.tmp-1", "last.tmp-1", ".lastx.tmp-1", "notes"]
    for name in keep_dirs:
        (tmp_path / name).mkdir()
    (tmp_path / ".best.tmp-file").write_text("a file, not a folder")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    (tmp_path / ".last.tmp-link").symlink_to(elsewhere)

    assert ckpt.remove_stale_temps(tmp_path) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*keep_dirs, ".best.tmp-file", ".last.tmp-link", "elsewhere", "last"])
    assert (elsewhere / "precious").read_text() == "x"
    assert ckpt.read_meta(tmp_path / "last")["step"] == 1
    assert ckpt.remove_stale_temps(tmp_path) == []


def test_a_resumed_trainer_cleans_the_temp_folders_a_killed_one_left(data, copy_run):
    train, valid = data
    stale = copy_run / ".last.tmp-dead01"
    stale.mkdir()
    (stale / "checkpoint.json").write_text("{")
    aside = copy_run / ".best.old-999"  # not a temp folder: left alone
    aside.mkdir()
    Trainer(make_model(train.spec), TinyObjective(), train, valid, small_config(epochs=3),
            copy_run).fit(resume=True)
    assert not stale.exists() and aside.is_dir()
    assert ckpt.read_meta(copy_run / "last")["epoch"] == 3
