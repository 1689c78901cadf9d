"""Whether a run folder holds a finished run: every reader of a run (evaluate, export, serve,
the generator-evaluator pipeline) checks it first, so an unfinished or failed run is refused in
one line instead of being decoded with a guessed decoder."""

from __future__ import annotations

from pathlib import Path

from genrerank.training.checkpoint import META_FILE
from genrerank.training.trainer import FAILED_FILE

#: Written last by ``train``, with the decoder selected on validation.
RUN_CONFIG = "run_config.json"


class IncompleteRunError(ValueError):
    """A run that ``train`` did not finish (failed, killed or still running): its selected
    decoder is unknown, so it is neither evaluated nor exported nor served."""


def check_run(run_dir: str | Path) -> Path:
    """The run folder of ``run_dir`` (a run, or its ``best/`` / ``last/`` checkpoint), refused
    with :class:`IncompleteRunError` when its train failed or did not finish."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found")
    run = run_dir.parent if (run_dir / META_FILE).is_file() else run_dir
    failed = run / FAILED_FILE
    if failed.is_file():
        lines = failed.read_text(errors="replace").strip().splitlines() or ["(no reason recorded)"]
        raise IncompleteRunError(f"run {run} failed ({lines[0]}); fix the cause and re-run "
                                 "train, or --resume from its last checkpoint")
    if not (run / RUN_CONFIG).is_file():
        raise IncompleteRunError(f"run {run} is incomplete: {RUN_CONFIG} missing (train writes "
                                 "it last, with the selected decoder); re-run train or --resume")
    return run
