"""The light name lists the command line shows equal the registries they stand for."""

from __future__ import annotations

import subprocess
import sys

from genrerank.registry_names import DECODER_NAMES, MODEL_NAMES


def test_model_names_equal_the_model_registry() -> None:
    from genrerank.models import MODELS

    assert tuple(sorted(MODELS)) == MODEL_NAMES


def test_decoder_names_equal_the_decoder_registry() -> None:
    from genrerank.decoding import DECODERS

    assert tuple(sorted(DECODERS)) == DECODER_NAMES


def test_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom click.testing import CliRunner\nfrom genrerank.cli import main\n"
            "for cmd in ('train', 'evaluate', 'rerank'):\n"
            "    if cmd not in main.commands: continue\n"
            "    result = CliRunner().invoke(main, [cmd, '--help'])\n"
            "    assert result.exit_code == 0, result.output\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
