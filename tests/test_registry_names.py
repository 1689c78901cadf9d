"""The light name lists the command line shows equal the registries they stand for."""

from __future__ import annotations

import subprocess
import sys

from genrerank.registry_names import DECODER_NAMES, MODEL_NAMES


def _registry(module: str, name: str) -> tuple[str, ...]:
    """A registry as the package alone fills it (test modules register stand-in models), read
    in a fresh interpreter."""
    code = f"from {module} import {name}\nprint(' '.join(sorted({name})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return tuple(out.stdout.split())


def test_model_names_equal_the_model_registry() -> None:
    assert _registry("genrerank.models", "MODELS") == MODEL_NAMES


def test_decoder_names_equal_the_decoder_registry() -> None:
    assert _registry("genrerank.decoding", "DECODERS") == DECODER_NAMES


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
