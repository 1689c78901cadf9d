"""The command line end to end, in-process (click's runner)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from genrerank.cli import main


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_simulate_then_stats(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    code, text = run("simulate", "--preset", "avito", "--requests", "300", "--seed", "1",
                     "--out", str(out))
    assert code == 0, text
    code, text = run("data", "stats", str(out))
    assert code == 0, text
    assert "requests: 300 (train 240, valid 30, test 30)" in text
    assert "list length (m): min 5, mean 5.00, max 5" in text
    assert "like: absent" in text


def test_simulate_refuses_to_clobber_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert run("simulate", "--preset", "avito", "--requests", "100", "--out", str(out))[0] == 0
    code, text = run("simulate", "--preset", "avito", "--requests", "100", "--out", str(out))
    assert code == 1 and "--overwrite" in text
    code, text = run("simulate", "--preset", "nope", "--requests", "100", "--out",
                     str(tmp_path / "x"))
    assert code == 1 and "avito" in text and "Traceback" not in text


def test_convert_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    src = tmp_path / "mind"
    src.mkdir()
    (src / "news.tsv").write_text("N1\tnews\tsub\tt\ta\tu\t[]\t[]\n")
    (src / "behaviors.tsv").write_text("1\tU1\tnot a time\t\tN1-1\n")
    code, text = run("data", "convert", "--format", "mind", "--input", str(src),
                     "--out", str(tmp_path / "out"))
    assert code == 1, text
    assert "behaviors.tsv" in text and "line 1" in text and "time" in text
    assert not (tmp_path / "out").exists()
    code, text = run("data", "convert", "--format", "parquet-of-doom", "--input", str(src),
                     "--out", str(tmp_path / "out"))
    assert code == 1 and "mind" in text


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    code, text = run("demo", "--requests", "600", "--epochs", "1", "--out", str(tmp_path / "demo"))
    assert code == 0, text
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    names = [row["policy"] for row in results["online"]]
    assert names[0].startswith("logging") and names[-1].startswith("oracle: upper bound")
    by_name = {row["policy"]: row for row in results["online"]}
    assert by_name[names[0]]["headroom_captured"] == 0.0
    assert abs(by_name[names[-1]]["headroom_captured"] - 1.0) < 1e-9
    assert "| policy" in text
    assert {"pointwise (greedy)", "nar4rec (contrastive)", "structured (beam)"} <= set(names)


def _package_registry_names() -> dict[str, set[str]]:
    """Names registered by the package alone, read in a fresh interpreter."""
    import json
    import subprocess
    import sys

    code = ("import json\nfrom genrerank.models import MODELS\n"
            "from genrerank.decoding import DECODERS\nfrom genrerank.data.loaders import LOADERS\n"
            "from genrerank.data.simulator import PRESETS\n"
            "print(json.dumps({'--model': sorted(MODELS), '--decoder': sorted(DECODERS), "
            "'--format': sorted(LOADERS), '--preset': sorted(PRESETS)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {k: set(v) for k, v in json.loads(out.stdout).items()}


def test_help_texts_list_every_registered_name() -> None:
    from genrerank.data.loaders import LOADERS
    from genrerank.data.simulator import PRESETS
    from genrerank.decoding import DECODERS
    from genrerank.models import MODELS

    commands = [(("train",), "--model", MODELS), (("evaluate",), "--decoder", DECODERS),
                (("data", "convert"), "--format", LOADERS), (("simulate",), "--preset", PRESETS),
                (("demo",), "--preset", PRESETS)]
    if "rerank" in main.commands:
        commands.append((("rerank",), "--decoder", DECODERS))
    # Test modules register stand-in models (tests/training); the help lists the package's.
    registered = _package_registry_names()
    commands = [(cmd, opt, [n for n in reg if n in registered[opt]]) for cmd, opt, reg in commands]
    for command, option, registry in commands:
        code, text = run(*command, "--help")
        assert code == 0, text
        # The option's help, wrapped over lines: from the option to the next one.
        shown = " ".join(text.split(option, 1)[1].split("\n  --", 1)[0].split())
        missing = [name for name in registry if name not in re.findall(r"[\w-]+", shown)]
        assert not missing, (command, option, missing, shown)
