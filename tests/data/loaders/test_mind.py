"""MIND loader on a hand-written fixture (official layout) and, when present, the real subset."""

from __future__ import annotations

import calendar
import math
import time

import numpy as np
import pytest

from genrerank.data.loaders import LOADERS, convert, load, loader_options
from genrerank.data.schema import DataValidationError, read_dataset
from tests.data.loaders.conftest import FIXTURES, edit_line, real_data, rows_by_id, shown

MIND = FIXTURES / "mind"


def utc(y, mo, d, h, mi, s) -> int:
    return calendar.timegm((y, mo, d, h, mi, s))


@pytest.fixture(scope="module")
def mind_rows(tmp_path_factory):
    out = convert("mind", MIND, tmp_path_factory.mktemp("mind") / "ds")
    return rows_by_id(out)


def test_registry_and_unknown_format():
    assert {"mind", "ebnerd", "avito", "kuairand"} <= set(LOADERS)
    with pytest.raises(ValueError, match="unknown format 'nope'; known formats: avito, ebnerd"):
        load("nope", MIND)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\].*max_candidates"):
        load("mind", MIND, bogus=1)
    assert loader_options("mind")["max_candidates"] is None


def test_spec(tmp_path):
    _, spec = read_dataset(convert("mind", MIND, tmp_path / "ds"))
    assert spec.source == "mind"
    assert spec.labels == ["click"]
    # news.tsv: categories finance, lifestyle, news, sports; six subcategories (+ 0 = unknown).
    assert [(c.name, c.vocab_size) for c in spec.item_categorical] == [
        ("category", 5),
        ("subcategory", 7),
    ]
    assert spec.item_dense == ["log_history_popularity"]
    assert spec.user_dense == ["log_history_length"] and spec.user_categorical == []
    assert (spec.n_categories, spec.n_creators) == (5, 1)
    assert (spec.max_candidates, spec.max_list_length) == (5, 5)


def test_requests_and_split(mind_rows):
    assert len(mind_rows) == 12
    # 12 requests in time order: 10 train, 1 valid, 1 test (80/10/10, rounded).
    assert [mind_rows[str(i)]["split"] for i in range(1, 13)] == ["train"] * 10 + [
        "valid",
        "test",
    ]
    assert mind_rows["1"]["time"] == utc(2019, 11, 11, 9, 5, 58)
    assert mind_rows["4"]["time"] == utc(2019, 11, 12, 13, 2, 3)  # 1:02:03 PM
    assert mind_rows["12"]["time"] == utc(2019, 11, 15, 23, 59, 59)
    assert mind_rows["4"]["user_id"] == "U1"


def test_request_2(mind_rows):
    r = mind_rows["2"]  # U2, history "N1 N2", impressions "N7-0 N1-1 N8-0 N4-0"
    assert shown(r) == ["N7", "N1", "N8", "N4"]
    assert r["label_click"] == [0.0, 1.0, 0.0, 0.0]
    assert sorted(r["item_id"]) == ["N1", "N4", "N7", "N8"]
    # Candidates come by upstream score: N1 is in 5 users' histories, the others in none.
    assert r["item_id"][0] == "N1"
    assert r["upstream_score"][0] == pytest.approx(math.log1p(5))
    assert r["upstream_score"][1:] == [0.0, 0.0, 0.0]
    cats = dict(zip(r["item_id"], r["item_cat"], strict=True))
    assert cats == {"N1": [3, 6], "N8": [4, 1], "N7": [0, 0], "N4": [0, 0]}
    assert dict(zip(r["item_id"], r["category"], strict=True)) == {
        "N1": 3,
        "N8": 4,
        "N7": 0,
        "N4": 0,
    }
    assert r["creator"] == [0, 0, 0, 0]
    cold = dict(zip(r["item_id"], r["is_cold_start"], strict=True))
    assert cold == {"N1": False, "N7": True, "N8": True, "N4": True}
    # Popularities of history items are N1 5, N2 3, N3 3, N5 2: only N1 is in the head.
    assert dict(zip(r["item_id"], r["is_long_tail"], strict=True))["N1"] is False
    assert r["user_dense"] == [pytest.approx(math.log1p(2))]


def test_request_5(mind_rows):
    r = mind_rows["5"]  # U4, "N12-0 N13-1 N2-1"
    assert shown(r) == ["N12", "N13", "N2"]
    assert r["label_click"] == [0.0, 1.0, 1.0]
    assert r["item_id"][0] == "N2"  # the only one with history popularity (3)
    feats = dict(zip(r["item_id"], r["item_cat"], strict=True))
    assert feats == {"N2": [4, 3], "N13": [1, 2], "N12": [0, 0]}
    assert dict(zip(r["item_id"], r["item_dense"], strict=True))["N2"] == [
        pytest.approx(math.log1p(3))
    ]
    assert dict(zip(r["item_id"], r["is_long_tail"], strict=True)) == {
        "N2": True,
        "N13": True,
        "N12": True,
    }


def test_empty_and_repeating_history(mind_rows):
    assert mind_rows["3"]["user_dense"] == [0.0]  # empty history
    assert mind_rows["8"]["user_dense"] == [pytest.approx(math.log1p(3))]  # "N2 N1 N2"
    assert shown(mind_rows["11"]) == ["N28", "N29", "N30", "N1"]
    assert mind_rows["11"]["label_click"] == [0.0, 0.0, 1.0, 0.0]


def test_candidates_sorted_by_score_and_deterministic(tmp_path, mind_rows):
    for r in mind_rows.values():
        s = r["upstream_score"]
        assert s == sorted(s, reverse=True)
    again = rows_by_id(convert("mind", MIND, tmp_path / "again"))
    assert again == mind_rows


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("line", "edit", "message"),
    [
        (4, lambda s: s.rsplit("\t", 1)[0], r"line 4: expected 5 tab-separated fields .* got 4"),
        (
            3,
            lambda s: s.replace("11/11/2019 11:30:27 AM", "2019-11-11 11:30:27"),
            r"line 3, field 'time': '2019-11-11 11:30:27' is not a time",
        ),
        (3, lambda s: s.replace("N9-1", "N9-2"), r"line 3, field 'impressions': token 'N9-2'"),
        (3, lambda s: s.replace("N9-1", "N9"), r"line 3, field 'impressions': token 'N9'"),
        (
            1,
            lambda s: s.replace("N6-0", "N4-1"),
            r"line 1, field 'impressions': duplicate item 'N4'",
        ),
        (6, lambda s: s.rsplit("\t", 1)[0] + "\t", r"line 6, field 'impressions': empty value"),
        (
            6,
            lambda s: s.rsplit("\t", 1)[0] + "\t ",
            r"line 6, field 'impressions': empty impression",
        ),
        (7, lambda s: s.replace("7\t", "2\t", 1), r"line 7, field 'impression_id': '2' repeats"),
        (9, lambda s: s.replace("U7\t", "\t"), r"line 9, field 'user_id': empty value"),
    ],
)
def test_malformed_behaviors(fixture_copy, line, edit, message):
    folder = fixture_copy("mind")
    edit_line(folder / "behaviors.tsv", line, edit)
    with pytest.raises(DataValidationError, match=message) as info:
        load("mind", folder)
    assert "behaviors.tsv" in str(info.value)


def test_malformed_news(fixture_copy):
    folder = fixture_copy("mind")
    edit_line(folder / "news.tsv", 2, lambda s: s.replace("\t", " ", 1))
    with pytest.raises(DataValidationError, match=r"news.tsv: line 2: expected 8 tab-separated"):
        load("mind", folder)


def test_max_candidates(fixture_copy):
    with pytest.raises(DataValidationError, match=r"line 6, field 'impressions': 5 items, more"):
        load("mind", MIND, max_candidates=4)
    table, spec = load("mind", MIND, max_candidates=5)
    assert spec.max_candidates == 5 and table.num_rows == 12


@pytest.mark.parametrize("missing", ["behaviors.tsv", "news.tsv"])
def test_missing_file(fixture_copy, missing):
    folder = fixture_copy("mind")
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"expected file '{missing}'"):
        load("mind", folder)
    with pytest.raises(FileNotFoundError, match="input folder not found"):
        load("mind", folder / "nope")


def test_failed_conversion_writes_nothing(fixture_copy, tmp_path):
    bad = fixture_copy("mind")
    edit_line(bad / "behaviors.tsv", 5, lambda s: s.replace("N13-1", "N13-x"))
    out = tmp_path / "out"
    with pytest.raises(DataValidationError):
        convert("mind", bad, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    # A good earlier conversion survives a failed overwrite untouched.
    convert("mind", MIND, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataValidationError):
        convert("mind", bad, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(FileExistsError):
        convert("mind", MIND, out)
    convert("mind", MIND, out, overwrite=True)


# --------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_real_mind_subset(tmp_path):
    folder = real_data("mind_small_subset")
    start = time.perf_counter()
    out = convert("mind", folder, tmp_path / "mind")
    elapsed = time.perf_counter() - start
    table, spec = read_dataset(out, validate=True)
    n = table["item_id"].combine_chunks().value_lengths().to_numpy()
    clicks = np.concatenate([np.asarray(c) for c in table["label_click"].to_pylist()])
    # Numbers documented in ../shared/data/README.md.
    assert table.num_rows == 5000
    assert int(clicks.sum()) == 7542
    assert len(set(table["user_id"].to_pylist())) == 4637
    assert (n.min(), n.max()) == (2, 283)
    assert round(float(n.mean()), 1) == 37.9
    assert spec.labels == ["click"]
    assert elapsed < 10, f"conversion took {elapsed:.1f} s"


def test_crlf_and_trailing_blank_line(fixture_copy):
    folder = fixture_copy("mind")
    path = folder / "behaviors.tsv"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    table, _ = load("mind", folder)
    assert table.num_rows == 12
    assert sorted(table["item_id"][0].as_py()) == ["N4", "N5", "N6"]


def test_convert_caps_candidates_per_request(tmp_path):
    """Every format is capped at convert time (defect: one 200,000-item impression converted and
    then asked training for gigabytes); the fixture's largest impressions hold 5 items."""
    out = tmp_path / "capped"
    with pytest.raises(DataValidationError,
                       match=r"request_id '\d+' has 5 candidates, more than max_candidates=4 "
                             r"\(\d+ such requests\)"):
        convert("mind", MIND, out, candidate_cap=4)
    assert not out.exists()
    full = read_dataset(convert("mind", MIND, tmp_path / "full"))[0]
    n_full = np.array([len(ids) for ids in full.column("item_id").to_pylist()])
    table, spec = read_dataset(convert("mind", MIND, out, candidate_cap=4, drop_oversized=True))
    n = np.array([len(ids) for ids in table.column("item_id").to_pylist()])
    assert n.max() <= 4 and len(n) == int((n_full <= 4).sum()) < len(n_full)
    assert spec.extra["dropped_oversized_requests"] == int((n_full > 4).sum())


def test_cli_convert_reports_oversized_requests(tmp_path):
    from click.testing import CliRunner

    from genrerank.cli import main

    out = tmp_path / "capped"
    args = ["data", "convert", "--format", "mind", "--input", str(MIND), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--max-candidates", "4"])
    assert result.exit_code == 1 and "--drop-oversized" in result.output
    assert "Traceback" not in result.output and not out.exists()
    result = CliRunner().invoke(main, [*args, "--max-candidates", "4", "--drop-oversized"])
    assert result.exit_code == 0, result.output
    assert "dropped" in result.output and "more than 4 candidates" in result.output
