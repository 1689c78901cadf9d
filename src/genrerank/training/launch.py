"""``--nproc N``: start the same command as N data-parallel processes under ``torchrun``.

``genrerank train ... --nproc 2`` is a shorthand for
``torchrun --standalone --nproc_per_node 2 -m genrerank train ...``: torchrun (PyTorch's own
launcher) sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` for each process, and the command,
seeing them, joins the process group (:func:`genrerank.utils.distributed.init_from_env`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` minus ``option VALUE`` / ``option=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``genrerank ARGS`` in ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "genrerank", *args]


def relaunch(nproc: int, argv: Sequence[str] | None = None) -> int:
    """Run this command (``sys.argv`` without ``--nproc``) under torchrun; its exit status."""
    args = without_option(list(sys.argv[1:] if argv is None else argv), "--nproc")
    return subprocess.call(torchrun_command(nproc, args))
