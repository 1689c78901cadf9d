"""``genrerank data import`` and the synthetic example log."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pacsv
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.data.importer import import_table
from genrerank.data.importer.example import EXAMPLE_MAPPING, write_example_csv
from genrerank.data.schema import FeatureSpec, read_dataset


def test_cli_import(tmp_path, files):
    out = tmp_path / "ds"
    result = CliRunner().invoke(main, [
        "data", "import", "--input", str(files["long.csv"]), "--mapping",
        str(files["mapping.toml"]), "--out", str(out), "--candidates", str(files["cand.csv"]),
    ])
    assert result.exit_code == 0, result.output
    assert "read 7 rows and 3 candidate rows" in result.output
    assert "4 requests (train 2 / valid 1 / test 1)" in result.output
    assert f"wrote {out}" in result.output
    assert (out / "import_report.json").exists() and (out / "vocabularies.json").exists()
    assert read_dataset(out)[0].num_rows == 4

    # An existing folder needs --overwrite; a bad file is one line and exit code 1.
    again = CliRunner().invoke(main, ["data", "import", "--input", str(files["long.csv"]),
                                      "--mapping", str(files["mapping.toml"]), "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    bad = tmp_path / "bad.txt"
    bad.write_text(files["long.csv"].read_text().replace(",0.7,0,", ",0.7,7,"))
    result = CliRunner().invoke(main, [
        "data", "import", "--input", str(bad), "--mapping", str(files["mapping.toml"]),
        "--out", str(tmp_path / "x"), "--format", "csv",
    ])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "bad.txt: line 4, column 'clk'" in lines[0]
    assert not (tmp_path / "x").exists()


def test_cli_max_candidates(tmp_path, files):
    out = tmp_path / "ds"
    args = ["data", "import", "--input", str(files["long.csv"]), "--mapping",
            str(files["mapping.toml"]), "--out", str(out), "--candidates", str(files["cand.csv"]),
            "--max-candidates", "3"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "request_id 'r1' has 4 candidates" in refused.output
    result = CliRunner().invoke(main, [*args, "--drop-oversized"])
    assert result.exit_code == 0, result.output
    assert "dropped 1 oversized request(s)" in result.output
    report = json.loads((out / "import_report.json").read_text())
    assert report["requests"] == 3 and report["splits"]["train"] == 1


def test_example_log_imports_and_is_learnable(tmp_path):
    csv = write_example_csv(tmp_path / "example.csv", 400, seed=3)
    head = csv.read_text().splitlines()[0].replace('"', "").split(",")
    assert head == ["request_id", "ts", "user", "item", "pos", "clicked", "dwell_s", "item_cat",
                    "item_price", "item_tags", "query", "device"]
    raw = pacsv.read_csv(csv)
    assert raw.num_rows == 4000
    toml = tmp_path / "example.toml"
    toml.write_text(EXAMPLE_MAPPING)
    out = import_table(csv, toml, tmp_path / "ds")
    table, spec = read_dataset(out)
    assert table.num_rows == 400
    assert spec.labels == ["click", "dwell"]
    assert [c.name for c in spec.context_categorical] == ["query", "device"]
    assert "item_ctr" in spec.item_dense and "price" in spec.item_dense
    # Clicks fall with position and with price, as the generator intends.
    pos = raw.column("pos").to_numpy()
    clicked = raw.column("clicked").to_numpy()
    top, bottom = clicked[pos <= 3].mean(), clicked[pos >= 8].mean()
    assert top > bottom + 0.03, (top, bottom)
    price = raw.column("item_price").to_numpy()
    assert np.corrcoef(np.log(price), clicked)[0, 1] < 0
    dwell = raw.column("dwell_s").to_numpy()
    assert (dwell[clicked == 0] == 0).all() and (dwell[clicked == 1] > 0).all()
    # Same seed, same file.
    again = write_example_csv(tmp_path / "again.csv", 400, seed=3)
    assert again.read_bytes() == csv.read_bytes()


def test_cli_import_reuses_an_earlier_import_vocabularies(tmp_path):
    """New logs imported for a model trained on an earlier import keep its encodings."""
    from genrerank.data.importer.example import EXAMPLE_MAPPING, write_example_csv

    mapping = tmp_path / "mapping.toml"
    mapping.write_text(EXAMPLE_MAPPING)
    first = write_example_csv(tmp_path / "week1.csv", 300, seed=1)
    second = write_example_csv(tmp_path / "week2.csv", 300, seed=2)
    args = ["data", "import", "--mapping", str(mapping)]
    assert CliRunner().invoke(main, [*args, "--input", str(first), "--out",
                                     str(tmp_path / "w1")]).exit_code == 0
    vocab = tmp_path / "w1" / "vocabularies.json"
    result = CliRunner().invoke(main, [*args, "--input", str(second), "--out", str(tmp_path / "w2"),
                                       "--vocabularies", str(vocab)])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "w2" / "vocabularies.json").read_text())
    for key, values in json.loads(vocab.read_text()).items():
        assert again[key] == values, key
    specs = [FeatureSpec.load(tmp_path / w / "feature_spec.json") for w in ("w1", "w2")]
    for attr in ("item_categorical", "item_dense", "context_categorical", "context_dense"):
        assert getattr(specs[0], attr) == getattr(specs[1], attr), attr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, [*args, "--input", str(second), "--out", str(tmp_path / "w3"),
                                       "--vocabularies", str(bad)])
    assert result.exit_code == 1 and "not a readable vocabularies.json" in result.output
