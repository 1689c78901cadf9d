"""train -> evaluate, end to end on a tiny simulated data set, for every model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.data.simulator import simulate_to_dir

TINY = ("train.epochs=1", "train.progress=false", "train.batch_size=64")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_to_dir("kuaishou", 300, 0, tmp_path_factory.mktemp("d") / "sim",
                           progress=False)


@pytest.mark.parametrize(("model", "dims"), [
    ("nar4rec", ("model.dim=16", "model.heads=2")),
    ("pointwise", ("model.dim=16", "model.hidden=16")),
    ("prm", ("model.dim=16", "model.heads=2")),
    ("autoregressive", ("model.dim=16", "model.n_heads=2", "model.n_kv_heads=1")),
])
def test_train_then_evaluate_cli(sim: Path, tmp_path: Path, model: str, dims) -> None:
    run = tmp_path / "run"
    sets = [a for s in (*TINY, *dims) for a in ("--set", s)]
    result = CliRunner().invoke(main, ["train", "--model", model, "--data", str(sim),
                                       "--out", str(run), *sets])
    assert result.exit_code == 0, result.output
    assert (run / "best" / "model.safetensors").exists()
    assert json.loads((run / "run_config.json").read_text())["model"]["name"] == model
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--data", str(sim),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["split"] == "test" and report["requests"] == 30
    offline = report["offline"]
    for key in ("auc", "gauc", "logloss", "ndcg@6", "recall@6", "ndcg@12", "recall@12",
                "list_gain"):
        assert math.isfinite(offline[key]), key
    online = report["online"]
    assert online["upper_bound_expected_gain"] >= online["expected_gain"] - 1e-9
    assert online["category_entropy"] >= 0


def test_config_model_mismatch_and_bad_override(sim: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"model": {"name": "prm"}}')
    result = CliRunner().invoke(main, ["train", "--model", "nar4rec", "--data", str(sim),
                                       "--out", str(tmp_path / "r"), "--config", str(cfg)])
    assert result.exit_code == 1 and "model.name is 'prm'" in result.output
    result = CliRunner().invoke(main, ["train", "--model", "nar4rec", "--data", str(sim),
                                       "--out", str(tmp_path / "r"), "--set", "trian.lr=1"])
    assert result.exit_code == 1 and "trian" in result.output


def test_evaluate_with_each_decoder(sim: Path, tmp_path: Path) -> None:
    from genrerank.experiment import evaluate_run, train_run

    run = tmp_path / "run"
    train_run("nar4rec", sim, run, overrides=(*TINY, "model.dim=16", "model.heads=2"))
    gains = {}
    for decoder in ("greedy", "contrastive", "beam", "sample", "hungarian"):
        report = evaluate_run(run, sim, decoder=decoder)
        assert report["decoder"]["name"] == decoder
        gains[decoder] = report["online"]["expected_gain"]
    assert all(math.isfinite(g) for g in gains.values())


def test_auto_alpha_is_selected_on_validation_only(sim: Path, tmp_path: Path, monkeypatch) -> None:
    import genrerank.experiment as experiment

    seen: list[set[str]] = []
    real = experiment.validation_score

    def spy(model, dataset, *args, **kwargs):
        seen.append(set(dataset.table.column("split").to_pylist()))
        return real(model, dataset, *args, **kwargs)

    monkeypatch.setattr(experiment, "validation_score", spy)
    run = tmp_path / "run"
    experiment.train_run("nar4rec", sim, run, overrides=(*TINY, "model.dim=16", "model.heads=2"))
    assert len(seen) == len(experiment.ALPHA_GRID) and all(s == {"valid"} for s in seen)
    decode = json.loads((run / "run_config.json").read_text())["decode"]
    assert decode["alpha"] in experiment.ALPHA_GRID
    assert decode["selection"]["split"] == "valid"
    assert experiment.run_decoding(run) == {"name": "contrastive", "alpha": decode["alpha"]}
