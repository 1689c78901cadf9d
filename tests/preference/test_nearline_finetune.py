"""The near-line job and fine-tuning end to end on a tiny simulated data set: the pairs file is
what the pair rule promises, the job is seeded and refuses to clobber, DPO and PPO write complete
runs, and the command line reports misuse in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.data.dataset import RerankDataset
from genrerank.data.pairs import PairRule, read_pairs
from genrerank.data.simulator import simulate_to_dir
from genrerank.experiment import train_run
from genrerank.preference.finetune import finetune_run
from genrerank.preference.nearline import run_nearline
from genrerank.training import load_model

TINY = ("train.epochs=1", "model.dim=16", "train.num_threads=1")
PROPOSALS = {"samples": 3, "beams": 2, "mmr": 1}
DELTA = 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pref")
    data = simulate_to_dir("kuaishou", 300, 3, root / "data", progress=False)
    out = {"root": root, "data": data}
    for name in ("autoregressive", "evaluator"):
        train_run(name, data, root / name, overrides=TINY)
        out[name] = root / name
    out["pairs"] = root / "pairs.parquet"
    run_nearline(out["autoregressive"], out["evaluator"], data, out["pairs"],
                 rule=PairRule(delta=DELTA), seed=1, max_requests=40, show_progress=False,
                 **PROPOSALS)
    return out


@pytest.fixture(scope="module")
def nar_run(runs: dict[str, Path]) -> Path:
    """A tiny trained nar4rec run (a matrix model: no step-by-step sampling)."""
    out = runs["root"] / "nar"
    train_run("nar4rec", runs["data"], out, overrides=TINY)
    return out


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_nearline_writes_pairs_the_rule_allows(runs: dict[str, Path]) -> None:
    table, meta = read_pairs(runs["pairs"])
    assert meta["reward_source"] == "evaluator"
    assert meta["rule"]["delta"] == DELTA and meta["seed"] == 1
    assert set(table.column("split").to_pylist()) == {"train", "valid"}
    assert table.num_rows == 40 + 30  # 40 train requests at most, all 30 valid ones
    datasets = {s: RerankDataset(runs["data"], split=s) for s in ("train", "valid")}
    index = {s: {rid: i for i, rid in enumerate(d.request_ids)} for s, d in datasets.items()}
    n_pairs = 0
    for row in table.to_pylist():
        request = datasets[row["split"]][index[row["split"]][row["request_id"]]]
        n, m = len(request["upstream_score"]), len(request["exposed"])
        assert len(row["lists"]) == len(row["reward"]) == len(row["generators"])
        assert len(row["reward_engagement"]) == len(row["lists"])
        for lst in row["lists"]:
            assert len(lst) == m and len(set(lst)) == m
            assert all(0 <= i < n for i in lst)
        for w, lo in row["pairs"]:
            n_pairs += 1
            assert w != lo and row["lists"][w] != row["lists"][lo]
            assert row["reward"][w] - row["reward"][lo] > DELTA
            assert sum(a != b for a, b in zip(row["lists"][w], row["lists"][lo],
                                              strict=True)) >= 2
        assert len(row["pairs"]) <= PairRule().max_pairs
    assert n_pairs > 0


def test_nearline_is_seeded_and_refuses_to_clobber(runs: dict[str, Path]) -> None:
    again = runs["root"] / "again.parquet"
    summary = run_nearline(runs["autoregressive"], runs["evaluator"], runs["data"], again,
                           rule=PairRule(delta=DELTA), seed=1, max_requests=40,
                           show_progress=False, **PROPOSALS)
    assert summary["requests"] == 70 and summary["pairs"] > 0
    first, second = read_pairs(runs["pairs"])[0], read_pairs(again)[0]
    assert first.equals(second)
    content = again.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        run_nearline(runs["autoregressive"], runs["evaluator"], runs["data"], again,
                     seed=2, max_requests=5, show_progress=False, **PROPOSALS)
    assert again.read_bytes() == content
    with pytest.raises(ValueError, match="test is never paired"):
        run_nearline(runs["autoregressive"], runs["evaluator"], runs["data"],
                     runs["root"] / "t.parquet", splits=("test",), show_progress=False)
    with pytest.raises(ValueError, match="evaluator"):  # generator and evaluator swapped
        run_nearline(runs["evaluator"], runs["autoregressive"], runs["data"],
                     runs["root"] / "s.parquet", show_progress=False)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_dpo_writes_a_complete_run(runs: dict[str, Path]) -> None:
    out = runs["root"] / "dpo"
    best = finetune_run(runs["autoregressive"], runs["data"], out, "dpo", pairs=runs["pairs"],
                        overrides=("train.epochs=1", "train.num_threads=1"))
    assert np.isfinite(best["reward"]) and np.isfinite(best["kl_ref"])
    config = json.loads((out / "run_config.json").read_text())
    assert config["finetune"]["method"] == "dpo"
    assert config["finetune"]["pairs"] == str(runs["pairs"])
    assert config["finetune"]["evaluator"] == str(runs["evaluator"])
    assert config["model"]["name"] == "autoregressive" and config["model"]["dropout"] == 0.0
    model, _ = load_model(out, "best")
    assert model.name == "autoregressive"
    rows = _metrics(out)
    assert rows and all(r["epoch"] == 1 for r in rows)
    last = rows[-1]
    for key in ("valid/reward", "valid/kl_ref", "valid/loss/dpo/margin",
                "valid/loss/dpo/accuracy", "train/loss/dpo/margin"):
        assert key in last and np.isfinite(last[key]), key


def test_finetune_ppo_writes_a_complete_run(runs: dict[str, Path]) -> None:
    out = runs["root"] / "ppo"
    finetune_run(runs["autoregressive"], runs["data"], out, "ppo", evaluator=runs["evaluator"],
                 overrides=("train.epochs=1", "train.batch_size=64", "loss.0.group_size=2",
                            "train.num_threads=1"))
    config = json.loads((out / "run_config.json").read_text())
    assert config["finetune"]["method"] == "ppo" and config["finetune"]["pairs"] is None
    assert config["finetune"]["reward_source"] == "evaluator"
    assert load_model(out, "best")[0].name == "autoregressive"
    last = _metrics(out)[-1]
    for key in ("valid/reward", "valid/kl_ref", "train/loss/ppo/kl_ref",
                "train/loss/ppo/clip_fraction"):
        assert key in last and np.isfinite(last[key]), key


def test_finetune_misuse_gives_one_line_errors(runs: dict[str, Path], nar_run: Path) -> None:
    root = runs["root"]
    code, text = cli("finetune", "--init", runs["autoregressive"], "--method", "dpo",
                     "--data", runs["data"], "--out", root / "nopairs")
    assert code == 1 and "--pairs" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    code, text = cli("finetune", "--init", runs["autoregressive"], "--method", "ppo",
                     "--data", runs["data"], "--out", root / "noev")
    assert code == 1 and "--evaluator" in text and len(text.strip().splitlines()) == 1
    code, text = cli("finetune", "--init", nar_run, "--method", "ppo", "--data",
                     runs["data"], "--out", root / "narppo", "--evaluator", runs["evaluator"],
                     "--set", "train.epochs=1", "--set", "loss.0.group_size=2")
    assert code == 1, text
    # Refused before training starts: one line, and no run folder.
    assert len(text.strip().splitlines()) == 1, text
    assert "nar4rec" in text and "autoregressive" in text
    assert not (root / "narppo").exists()


def test_cli_nearline_and_finetune_print_their_summaries(runs: dict[str, Path]) -> None:
    root = runs["root"]
    pairs = root / "cli.parquet"
    args = ["nearline", "--generator", runs["autoregressive"], "--evaluator",
            runs["evaluator"], "--data", runs["data"], "--out", pairs, "--samples", "2",
            "--beams", "1", "--mmr", "1", "--max-requests", "20", "--delta", "0.05"]
    code, text = cli(*args)
    assert code == 0, text
    assert "40 requests" in text and "pairs" in text and str(pairs) in text
    code, text = cli(*args)
    assert code == 1 and "--overwrite" in text
    code, text = cli("nearline", "--generator", runs["autoregressive"], "--evaluator",
                     runs["evaluator"], "--data", runs["data"], "--out", root / "x.parquet",
                     "--set", "train.lr=1")
    assert code != 0 and "reward.*" in text
    out = root / "cli_dpo"
    code, text = cli("finetune", "--init", runs["autoregressive"], "--method", "dpo",
                     "--data", runs["data"], "--out", out, "--pairs", pairs,
                     "--set", "train.epochs=1", "--set", "train.num_threads=1")
    assert code == 0, text
    assert "best (valid):" in text and "reward " in text and "kl_ref " in text
    assert f"run saved in {out}" in text


def test_nar4rec_gets_nearline_lists_and_dpo_on_its_factorised_probability(
        runs: dict[str, Path], nar_run: Path) -> None:
    root = runs["root"]
    nar = nar_run
    pairs = root / "nar_pairs.parquet"
    summary = run_nearline(nar, runs["evaluator"], runs["data"], pairs,
                           rule=PairRule(delta=DELTA), seed=2, max_requests=30,
                           show_progress=False, **PROPOSALS)
    assert summary["pairs"] > 0
    generators = {g for row in read_pairs(pairs)[0].column("generators").to_pylist()
                  for g in row}
    assert {"nar4rec (sample)", "nar4rec (greedy)", "upstream"} <= generators
    out = root / "nar_dpo"
    finetune_run(nar, runs["data"], out, "dpo", pairs=pairs,
                 overrides=("train.epochs=1", "train.num_threads=1"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["valid/kl_ref"]) and r["valid/kl_ref"] >= -1e-6 for r in records)
    assert load_model(out, "best")[0].name == "nar4rec"


def test_ppo_on_simulated_feedback_is_labelled_an_online_stand_in(
        runs: dict[str, Path]) -> None:
    out = runs["root"] / "ppo_feedback"
    finetune_run(runs["autoregressive"], runs["data"], out, "ppo",
                 reward_source="simulated_feedback",
                 overrides=("train.epochs=1", "train.batch_size=64", "loss.0.group_size=2",
                            "train.num_threads=1"))
    config = json.loads((out / "run_config.json").read_text())
    assert config["finetune"]["reward_source"] == "simulated_feedback"
    assert config["finetune"]["online_stand_in"] is True
    with pytest.raises(ValueError, match="simulated_feedback' is for ppo"):
        finetune_run(runs["autoregressive"], runs["data"], runs["root"] / "x", "dpo",
                     pairs=runs["pairs"], reward_source="simulated_feedback")


def test_a_teacher_runs_own_list_is_proposed_for_every_request(runs: dict[str, Path]) -> None:
    """``--teacher``: the structured model's beam list is among every request's lists, first,
    labelled as the teacher's, and it is also the reward model; the summary says which proposer
    won each request."""
    from genrerank.evaluation.offline import predict

    root = runs["root"]
    teacher = root / "structured"
    train_run("structured", runs["data"], teacher, overrides=TINY)
    pairs = root / "teacher_pairs.parquet"
    summary = run_nearline(runs["autoregressive"], teacher, runs["data"], pairs,
                           rule=PairRule(delta=DELTA), seed=3, max_requests=25,
                           splits=("train",), teachers=(teacher,), show_progress=False,
                           **PROPOSALS)
    table, meta = read_pairs(pairs)
    assert meta["proposals"]["teachers"] == [str(teacher)]
    label = "structured (beam, own list)"
    assert meta["proposals"]["generators"][0] == label
    train = RerankDataset(runs["data"], split="train")
    model, _ = load_model(teacher, "best")
    own = predict(model, train, "beam", {}, rows=range(25)).lists
    for i, row in enumerate(table.to_pylist()):
        assert row["generators"][0] == label
        m = len(row["lists"][0])
        assert row["lists"][0] == own[i, :m].tolist() and (own[i, m:] < 0).all()
    # Under its own reward the teacher's beam list is at least as good as any sampled list.
    assert abs(sum(summary["winner_share"].values()) - 1) < 1e-9
    assert summary["winner_share"][label] > 0.5
