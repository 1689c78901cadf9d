"""``genrerank rerank`` / ``evaluate`` with ``--constraints FILE`` (and a run's default)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.constraints import ConstraintSet, compile_constraints
from genrerank.data.dataset import RerankDataset
from genrerank.data.simulator import simulate_to_dir
from genrerank.evaluation.rerank import read_rerank_metadata
from tests.serving._runs import make_run

SET = {"quotas": [{"attribute": "category", "value": 1, "max": 1},
                  {"attribute": "long_tail", "max": 3, "within": 4}],
       "max_per_creator": 1, "spacing": [{"attribute": "category", "distance": 2}]}
TOML = """max_per_creator = 1
[[quotas]]
attribute = "category"
value = 1
max = 1
[[quotas]]
attribute = "long_tail"
max = 3
within = 4
[[spacing]]
attribute = "category"
distance = 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    sim = simulate_to_dir("kuaishou", 60, 4, root / "sim", progress=False)
    spec = RerankDataset(sim, "valid").spec
    (root / "c.json").write_text(json.dumps(SET))
    (root / "c.toml").write_text(TOML)
    return {
        "root": root, "sim": sim,
        "nar4rec": make_run(root / "nar4rec", "nar4rec", spec),
        "ar": make_run(root / "ar", "autoregressive", spec,
                       decode={"name": "beam", "beam_width": 3, "k": 1}),
        "default": make_run(root / "default", "pointwise", spec,
                            decode={"name": "greedy", "constraints": SET}),
    }


def _violations(sim: Path, table_path: Path) -> int:
    ds = RerankDataset(sim, "test")
    table = pq.read_table(table_path)
    cs = ConstraintSet.from_dict(SET)
    bad = 0
    for r, lst in enumerate(table.column("candidate_index").to_pylist()):
        item = ds[r]
        rc = compile_constraints(cs, category=item["category"], creator=item["creator"],
                                 is_cold_start=item["is_cold_start"],
                                 is_long_tail=item["is_long_tail"], item_ids=None,
                                 candidate_mask=None, list_length=len(item["exposed"]))
        bad += bool(rc.violations(lst))
    return bad


@pytest.mark.parametrize("run", ["nar4rec", "ar"])
def test_rerank_writes_lists_that_satisfy_the_file(setup: dict[str, Path], run: str) -> None:
    out = setup["root"] / f"{run}.parquet"
    result = CliRunner().invoke(main, ["rerank", "--run", str(setup[run]), "--data",
                                       str(setup["sim"]), "--out", str(out),
                                       "--constraints", str(setup["root"] / "c.json")])
    assert result.exit_code == 0, result.output
    meta = read_rerank_metadata(out)
    assert meta["constraints"] == SET and meta["constraint_violations"] == 0
    assert _violations(setup["sim"], out) == 0
    plain = setup["root"] / f"{run}-plain.parquet"
    CliRunner().invoke(main, ["rerank", "--run", str(setup[run]), "--data", str(setup["sim"]),
                              "--out", str(plain)])
    assert read_rerank_metadata(plain)["constraints"] is None
    assert _violations(setup["sim"], plain) > 0  # the constraints changed the lists


def test_evaluate_reports_zero_constraint_violations(setup: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["evaluate", "--run", str(setup["nar4rec"]), "--data",
                                       str(setup["sim"]), "--constraints",
                                       str(setup["root"] / "c.toml")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["constraint_violations"] == 0 and report["constraints"] == SET
    # A run's decode.constraints apply without the option.
    result = CliRunner().invoke(main, ["evaluate", "--run", str(setup["default"]), "--data",
                                       str(setup["sim"])])
    assert json.loads(result.output)["constraint_violations"] == 0


def test_bad_and_infeasible_files_are_one_line_errors(setup: dict[str, Path]) -> None:
    root = setup["root"]
    (root / "bad.json").write_text(json.dumps({"quotas": [{"attribute": "genre", "value": 1}]}))
    result = CliRunner().invoke(main, ["rerank", "--run", str(setup["nar4rec"]), "--data",
                                       str(setup["sim"]), "--out", str(root / "x.parquet"),
                                       "--constraints", str(root / "bad.json")])
    assert result.exit_code == 1
    assert "bad.json: quotas[0].attribute: must be one of" in result.output
    (root / "inf.json").write_text(json.dumps({"max_per_creator": 1, "spacing": [
        {"attribute": "creator", "distance": 2}], "quotas": [
        {"attribute": "long_tail", "min": 7}]}))
    result = CliRunner().invoke(main, ["evaluate", "--run", str(setup["nar4rec"]), "--data",
                                       str(setup["sim"]), "--constraints",
                                       str(root / "inf.json")])
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith("Error: infeasible constraints for request ") and "\n" not in line
    assert "quotas[0] (long_tail: min 7)" in line
    assert not (root / "x.parquet").exists()
    result = CliRunner().invoke(main, ["evaluate", "--pipeline", str(root / "p.json"), "--data",
                                       str(setup["sim"]), "--constraints",
                                       str(root / "c.json")])
    assert result.exit_code == 2 and "--constraints applies to --run" in result.output


def test_the_run_default_is_recorded_and_kept_by_decoder_selection(
        setup: dict[str, Path]) -> None:
    from genrerank.experiment import select_decoding

    class Stub:  # select_decoding without auto returns the config untouched
        stepwise = False

    cfg = select_decoding(Stub(), None, {"name": "greedy", "constraints": SET})  # type: ignore[arg-type]
    assert cfg == {"name": "greedy", "constraints": SET}
