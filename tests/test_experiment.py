"""train -> evaluate, end to end on a tiny simulated data set, for every model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
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
    result = CliRunner().invoke(main, ["train", "--model", "nar4rec", "--data",
                                       str(tmp_path / "no-data"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "no-data" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # no run folder written


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

    seen: list[tuple[set[str], str, dict]] = []
    real = experiment.ListScorer.__call__

    def spy(self, model, decoder, params):
        seen.append((set(self.valid.table.column("split").to_pylist()), decoder, dict(params)))
        return real(self, model, decoder, params)

    monkeypatch.setattr(experiment.ListScorer, "__call__", spy)
    run = tmp_path / "run"
    experiment.train_run("nar4rec", sim, run, overrides=(
        *TINY, "model.dim=16", "model.heads=2",
        'decode={"name": "contrastive", "alpha": "auto"}'))
    # Every list score (model selection during training, then the alpha grid) is on valid.
    assert all(splits == {"valid"} for splits, _, _ in seen)
    alphas = [p["alpha"] for _, d, p in seen if d == "contrastive"]
    assert alphas == list(experiment.ALPHA_GRID)
    decode = json.loads((run / "run_config.json").read_text())["decode"]
    assert decode["alpha"] in experiment.ALPHA_GRID
    assert decode["selection"]["split"] == "valid"
    assert experiment.run_decoding(run) == {"name": "contrastive", "alpha": decode["alpha"]}


def test_auto_decoder_is_chosen_on_validation(sim: Path, tmp_path: Path) -> None:
    import genrerank.experiment as experiment

    run = tmp_path / "run"
    experiment.train_run("pointwise", sim, run, overrides=(
        *TINY, "model.dim=16", "model.hidden=16", 'decode={"name": "auto"}'))
    decode = json.loads((run / "run_config.json").read_text())["decode"]
    labels = [experiment._label(n, p) for n, p in experiment.decoder_candidates(None)]
    assert decode["selection"]["split"] == "valid"
    assert decode["selection"]["metric"] == "expected_gain"
    assert list(decode["selection"]["scores"]) == labels
    best = max(decode["selection"]["scores"].values())
    chosen = experiment._label(decode["name"], {k: v for k, v in decode.items()
                                                if k not in ("name", "selection")})
    assert decode["selection"]["scores"][chosen] == best
    # The satiation penalty resolves like alpha does.
    run2 = tmp_path / "run2"
    experiment.train_run("pointwise", sim, run2, overrides=(
        *TINY, "model.dim=16", "model.hidden=16",
        'decode={"name": "satiation", "penalty": "auto"}'))
    decode2 = experiment.run_decoding(run2)
    assert decode2["name"] == "satiation" and decode2["penalty"] in experiment.PENALTY_GRID


def test_models_are_selected_on_the_validation_list_score(sim: Path, tmp_path: Path) -> None:
    from genrerank.experiment import train_run

    run = tmp_path / "run"
    train_run("pointwise", sim, run, overrides=(
        "train.epochs=2", "train.progress=false", "train.batch_size=64", "model.dim=16",
        "model.hidden=16"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("valid/list_score" in r for r in records)
    best = [r for r in records if r["is_best"]][-1]
    assert best["valid/list_score"] == max(r["valid/list_score"] for r in records)


def test_warning_when_most_lists_have_no_positive_label(sim: Path) -> None:
    from genrerank.data.dataset import RerankDataset
    from genrerank.experiment import warn_unlabelled

    train = RerankDataset(sim, split="train")
    offsets = train._exposed.offsets
    expected = float(np.mean([
        not any((train._labels[s].values[offsets[i]:offsets[i + 1]] > 0).any()
                for s in train._labels) for i in range(len(train))]))
    with pytest.warns(UserWarning, match="no positive label"):
        assert warn_unlabelled(train, share=0.0) == pytest.approx(expected)


# --------------------------------------------------------------------------- incomplete runs

NAR = (*TINY, "model.dim=16", "model.heads=2")


def test_a_run_without_run_config_is_refused_not_decoded_greedily(sim: Path,
                                                                  tmp_path: Path) -> None:
    from genrerank.data.dataset import RerankDataset
    from genrerank.experiment import evaluate_run, run_decoding
    from genrerank.serving.runtime import load_reranker
    from genrerank.training.runs import IncompleteRunError
    from tests.serving._runs import make_run

    run = make_run(tmp_path / "run", "nar4rec", RerankDataset(sim, "test").spec,
                   decode={"name": "contrastive", "alpha": 0.2})
    # A checkpoint folder stands for its run.
    assert run_decoding(run / "best") == {"name": "contrastive", "alpha": 0.2}
    (run / "run_config.json").unlink()  # what a kill before the end of train leaves
    message = (f"run {run} is incomplete: run_config.json missing (train writes it last, with "
               "the selected decoder); re-run train or --resume")
    for target in (run, run / "best"):
        with pytest.raises(IncompleteRunError, match=re.escape(message)):
            run_decoding(target)
        with pytest.raises(IncompleteRunError, match=re.escape(message)):
            evaluate_run(target, sim)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_reranker(run_dir=run)  # genrerank serve --run
    result = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--data", str(sim)])
    assert result.exit_code == 1 and result.output == f"Error: {message}\n"
    with pytest.raises(FileNotFoundError, match=f"run folder {tmp_path / 'nope'} not found"):
        run_decoding(tmp_path / "nope")


def test_a_train_failing_in_its_first_epoch_leaves_no_run_folder(sim: Path,
                                                                  tmp_path: Path) -> None:
    run = tmp_path / "runs" / "run"
    sets = [a for s in (*NAR, "train.select_metric=ndcg") for a in ("--set", s)]
    result = CliRunner().invoke(main, ["train", "--model", "nar4rec", "--data", str(sim),
                                       "--out", str(run), *sets])
    assert result.exit_code == 1
    assert "selection metric 'ndcg' is not among the validation metrics" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_leaves_the_folder_marked_failed(sim: Path, tmp_path: Path) -> None:
    from genrerank.experiment import evaluate_run, train_run
    from genrerank.training.runs import IncompleteRunError

    run = tmp_path / "run"
    train_run("nar4rec", sim, run, overrides=NAR)
    with pytest.raises(ValueError, match="'ndcg'"):
        train_run("nar4rec", sim, run, overrides=(*NAR, "train.select_metric=ndcg"),
                  overwrite=True)
    # The folder the user pointed at stays; the old run in it is gone (overwrite), and so is its
    # run_config.json: it must not describe the new, failed attempt.
    assert sorted(p.name for p in run.iterdir()) == ["FAILED"]
    failed = (run / "FAILED").read_text()
    assert re.match(r"train failed while training \(at epoch 1, step \d+\): ValueError: "
                    r"selection metric 'ndcg' is not among the validation metrics", failed)
    with pytest.raises(IncompleteRunError, match=re.escape(f"run {run} failed ({failed.strip()})")):
        evaluate_run(run, sim)


def test_a_failure_choosing_the_decoder_marks_the_run_and_resume_completes_it(
    sim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import genrerank.experiment as experiment
    from genrerank.training.runs import IncompleteRunError

    run = tmp_path / "run"
    real = experiment.select_decoding

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "select_decoding", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiment.train_run("nar4rec", sim, run, overrides=NAR)
    assert (run / "FAILED").read_text() == (
        "train failed while choosing the decoder: KeyboardInterrupt: interrupted\n")
    assert (run / "best").is_dir() and not (run / "run_config.json").exists()
    with pytest.raises(IncompleteRunError, match="choosing the decoder"):
        experiment.run_decoding(run)

    monkeypatch.setattr(experiment, "select_decoding", real)
    experiment.train_run("nar4rec", sim, run, overrides=NAR, resume=True)
    assert not (run / "FAILED").exists()
    # nar4rec's packaged decoder is "auto": the resumed train made the choice the failed one
    # could not.
    decode = json.loads((run / "run_config.json").read_text())["decode"]
    assert decode["selection"]["split"] == "valid"
    assert experiment.run_decoding(run)["name"] == decode["name"] != "auto"


def test_run_config_is_absent_while_a_resumed_run_trains(
    sim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import genrerank.experiment as experiment

    run = tmp_path / "run"
    experiment.train_run("pointwise", sim, run, overrides=(*TINY, "model.dim=16",
                                                           "model.hidden=16"))
    assert (run / "run_config.json").is_file()
    seen: list[bool] = []
    real = experiment.ListScorer.__call__

    def spy(self, model, decoder, params):
        seen.append((run / "run_config.json").exists())
        return real(self, model, decoder, params)

    monkeypatch.setattr(experiment.ListScorer, "__call__", spy)
    # One more epoch: best/ may change, so the old decoder choice must not stand meanwhile.
    experiment.train_run("pointwise", sim, run, overrides=(
        *TINY, "model.dim=16", "model.hidden=16", "train.epochs=2"), resume=True)
    assert seen and not any(seen)
    assert (run / "run_config.json").is_file()


def test_pointwise_trains_and_evaluates_on_purchases_and_dwell(purchase_dataset: Path,
                                                               tmp_path: Path) -> None:
    """Signals of any name: the spec's gain weights reach the loss and the metrics, and the
    click metrics read the most valuable binary signal."""
    from genrerank.experiment import evaluate_run, train_run

    run = tmp_path / "run"
    train_run("pointwise", purchase_dataset, run,
              overrides=(*TINY, "model.dim=16", "model.hidden=16"))
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["loss"] == [{"name": "gain_bce", "weights": {"purchase": 2.0, "dwell": 0.0}}]
    report = evaluate_run(run, purchase_dataset)
    assert report["click_signal"] == "purchase" and report["requests"] == 1
    for key in ("auc", "gauc", "logloss", "ndcg@3", "recall@3", "clicks@3", "list_gain"):
        assert math.isfinite(report["offline"][key]), key


def test_a_click_loss_without_a_click_signal_fails_in_one_line(tmp_path: Path) -> None:
    from genrerank.data.schema import FeatureSpec, table_from_rows, write_dataset
    from tests.conftest import purchase_rows, purchase_spec

    spec = FeatureSpec(**{**purchase_spec().to_dict(), "labels": ["dwell"],
                          "gain_weights": {"dwell": 1.0}})
    rows = purchase_rows()
    for row in rows:
        del row["label_purchase"]
    data = write_dataset(tmp_path / "dwell", table_from_rows(rows, spec), spec)
    result = CliRunner().invoke(main, ["train", "--model", "nar4rec", "--data", str(data),
                                       "--out", str(tmp_path / "run"), "--set", "train.epochs=1"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: loss 'click_bce' needs a click signal ('click', or a binary signal with a gain "
        "weight above 0 in gain_weights) but the data set has dwell (nonnegative, gain 1)")
    assert not (tmp_path / "run").exists()
