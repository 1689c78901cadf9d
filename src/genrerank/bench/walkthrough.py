"""The README's "Your own logs" walk-through, run literally: the test suite runs it to prove the
README works, ``genrerank bench import`` runs it to time each step.

The walk-through is the fenced ``bash`` block that follows the line
``<!-- walkthrough: your own logs -->`` in README.md. It runs in a fresh folder under ``bash``
with ``set -e`` (a failing step stops it) and ``set -x`` with a time stamp in the trace prefix,
so each command's wall time is the gap to the next trace line. One substitution is made: the
port ``8000`` becomes a free port, so that a busy port on the machine cannot fail the run.
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
_TRACE = "+@@"  # trace-line prefix (set -x), followed by the time stamp
_END = ": walkthrough-end"  # traced after the last command: its time stamp ends the last step


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
    """Run the walk-through in ``work_dir`` with this interpreter's ``genrerank`` on the PATH."""
    script = readme_walkthrough() if script is None else script
    script = script.replace("8000", str(free_port()))
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # PS4 is set inside the script: bash ignores it in the environment when run as root.
    # The server is started in the background by the script; kill it whatever happens.
    wrapped = (f"set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
               f"PS4='{_TRACE}${{EPOCHREALTIME}} '\nset -x\n{script}\n{_END}\n")
    proc = subprocess.run(["bash", "-c", wrapped], cwd=work_dir, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    return WalkthroughResult(_steps(proc.stderr), proc.stdout, proc.stdout + proc.stderr,
                             proc.returncode)


def _steps(trace: str) -> list[Step]:
    marks: list[tuple[float, str]] = []
    for line in trace.splitlines():
        if line.startswith(_TRACE):
            stamp, _, command = line[len(_TRACE):].partition(" ")
            try:
                marks.append((float(stamp), command))
            except ValueError:
                continue
    marks.sort(key=lambda mark: mark[0])  # a background command's trace may come late
    ends = [i for i, (_, cmd) in enumerate(marks) if cmd == _END]
    marks = marks[: ends[0] + 1] if ends else marks  # the exit trap's commands are not steps
    return [Step(cmd, round(marks[i + 1][0] - t, 3)) for i, (t, cmd) in enumerate(marks[:-1])]
