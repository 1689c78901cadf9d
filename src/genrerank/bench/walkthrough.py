"""The README's "Your own logs" walk-through, run literally: the test suite runs it to prove the
README works, ``genrerank bench import`` runs it to time each step.

The walk-through is the fenced ``bash`` block that follows the line
``<!-- walkthrough: your own logs -->`` in README.md. It runs in a fresh folder under ``bash``
with ``set -e`` (a failing step stops it); a time stamp before each command gives each
command's wall time. One substitution is made: the port ``8000`` becomes a free port, so that a
busy port on the machine cannot fail the run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = "<!-- walkthrough: your own logs -->"
README = Path(__file__).resolve().parents[3] / "README.md"
_TRACE = "+@@"  # prefix of the time-stamp lines written to stderr before each command


@dataclass
class Step:
    command: str
    seconds: float


@dataclass
class WalkthroughResult:
    steps: list[Step]
    stdout: str
    output: str  # stdout, then stderr (with the trace)
    returncode: int


def readme_walkthrough(readme: Path = README) -> str:
    """The commands of the walk-through block (the README is the single source)."""
    text = readme.read_text()
    at = text.find(MARKER)
    if at < 0:
        raise ValueError(f"{readme}: no line {MARKER!r} before the walk-through block")
    match = re.search(r"```bash\n(.*?)```", text[at:], flags=re.S)
    if match is None:
        raise ValueError(f"{readme}: no ```bash block after {MARKER!r}")
    return match.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_walkthrough(work_dir: Path, script: str | None = None,
                    timeout_s: float = 900.0) -> WalkthroughResult:
    """Run the walk-through in ``work_dir`` with this interpreter's ``genrerank`` on the PATH.

    Before each command an ``echo`` writes a time stamp to stderr (the commands themselves run
    unchanged); a step's time is the gap to the next stamp, so a command sent to
    the background takes no time and the wait for it falls to the command that waits."""
    script = readme_walkthrough() if script is None else script
    script = script.replace("8000", str(free_port()))
    commands, lines = [], []
    continued = False
    for line in script.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not continued:
            lines.append(f'echo "{_TRACE}$EPOCHREALTIME {len(commands)}" >&2')
            commands.append(line.strip())
        lines.append(line)
        continued = line.rstrip().endswith("\\")
    lines.append(f'echo "{_TRACE}$EPOCHREALTIME end" >&2')
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The server is started in the background by the script; kill it whatever happens.
    wrapped = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(lines)
    proc = subprocess.run(["bash", "-c", wrapped], cwd=work_dir, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    stamps = [float(line[len(_TRACE):].split()[0]) for line in proc.stderr.splitlines()
              if line.startswith(_TRACE)]
    steps = [Step(commands[i], round(stamps[i + 1] - stamps[i], 3))
             for i in range(min(len(commands), len(stamps) - 1))]
    return WalkthroughResult(steps, proc.stdout, proc.stdout + proc.stderr, proc.returncode)
