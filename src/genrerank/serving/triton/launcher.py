"""A real ``tritonserver`` process on a CPU machine, for the tests and the serving benchmark.

The binary comes from the ``nvidia-pytriton`` wheel (Triton 2.51: core, gRPC / HTTP front
ends, the Python backend; no ONNX Runtime backend). That wheel pins ``numpy<2``, which the rest
of genrerank does not accept, so it is not a package dependency: ``make`` installs it with
``--no-deps`` into ``.venv/pytriton`` (see the Makefile), where :func:`find_tritonserver` looks
(or ``$GENRERANK_TRITONSERVER``, the path of a ``tritonserver`` binary).

**Why the Python backend failed here before, and the fix.** The backend runs each model in a
stub process (``triton_python_backend_stub``) that embeds the *system* libpython (Debian's
3.11.2), while the virtualenv's interpreter is another build (pyenv 3.11.7). Started from the
virtualenv, the stub's embedded interpreter finds the virtualenv's ``python3`` on ``PATH`` and
takes the standard library (and ``lib-dynload`` extension modules) of 3.11.7 with the 3.11.2
runtime: checked, its ``sys.path`` then lists ``/root/.pyenv/versions/3.11.7/lib/python3.11``.
:func:`stub_environment` sets ``PYTHONHOME`` to the prefix of the libpython the stub really
links (read with ``ldd``), so the stub runs its own standard library, and names the
virtualenv's site-packages (numpy,
onnxruntime: extension modules built for the 3.11 ABI, which patch releases keep) in
``GENRERANK_STUB_SITE``, which the model's ``model.py`` adds to ``sys.path`` (the stub ignores
``PYTHONPATH``). The stub's bundled CUDA runtime is found through ``LD_LIBRARY_PATH`` (the
wheel's ``nvidia_pytriton.libs``), as pytriton itself does.

:class:`TritonProcess` copies the Python backend with the stub of this interpreter's Python
version into a private backend folder (pytriton's layout), starts ``tritonserver`` on free
ports with gRPC only, and waits until the server and every model are ready. Anything that
prevents a start raises :class:`TritonUnavailable` with one line saying why (tests skip on it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["TritonProcess", "TritonUnavailable", "find_tritonserver", "stub_environment"]

#: Where ``make`` installs the nvidia-pytriton wheel (``--no-deps --target``).
PYTRITON_TARGET = "pytriton"


class TritonUnavailable(RuntimeError):
    """tritonserver cannot run here (missing binary, stub cannot load, start failed)."""


def _dist_dir(binary: Path) -> Path:
    return binary.resolve().parent.parent  # .../tritonserver/bin/tritonserver


def find_tritonserver() -> Path:
    """The ``tritonserver`` binary: ``$GENRERANK_TRITONSERVER``, else the nvidia-pytriton
    wheel in ``<venv>/pytriton`` or on ``sys.path``."""
    env = os.environ.get("GENRERANK_TRITONSERVER")
    if env:
        path = Path(env)
        if not path.is_file():
            raise TritonUnavailable(f"GENRERANK_TRITONSERVER={env}: no such file")
        return path
    roots = [Path(sys.prefix) / PYTRITON_TARGET, *map(Path, sys.path)]
    for root in roots:
        candidate = root / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        if candidate.is_file():
            return candidate
    raise TritonUnavailable(
        f"no tritonserver binary: install it with `make` (nvidia-pytriton --no-deps into "
        f"{Path(sys.prefix) / PYTRITON_TARGET}) or set GENRERANK_TRITONSERVER")


def _stub(binary: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = _dist_dir(binary) / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonUnavailable(f"{stub}: no Python-backend stub for Python {version}")
    return stub


def _libs_dir(binary: Path) -> Path:
    # The wheel's bundled shared libraries (auditwheel): <site>/nvidia_pytriton.libs.
    return _dist_dir(binary).parent.parent / "nvidia_pytriton.libs"


def stub_environment(binary: Path) -> dict[str, str]:
    """Environment variables that let the Python-backend stub start (see the module
    docstring); raises :class:`TritonUnavailable` when its libpython is missing."""
    stub = _stub(binary)
    libs = _libs_dir(binary)
    env = {"LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    try:
        out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, timeout=30,
                             env={**os.environ, **env}).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TritonUnavailable(f"cannot inspect {stub} with ldd: {exc}") from None
    missing = re.findall(r"^\s*(\S+) => not found", out, re.M)
    if missing:
        raise TritonUnavailable(f"{stub.name} needs {', '.join(missing)}, not installed "
                                "(e.g. apt-get install libpython3.11)")
    match = re.search(r"(libpython\d+\.\d+\S*\.so\S*) => (\S+)", out)
    if not match:
        raise TritonUnavailable(f"{stub}: links no libpython (ldd: {out.strip()[:200]})")
    libpython = Path(match.group(2)).resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    home = next((p for p in libpython.parents if (p / "lib" / version / "os.py").is_file()),
                None)
    if home is None:
        raise TritonUnavailable(f"{libpython}: no standard library ({version}/os.py) found "
                                "above it; install the matching libpython stdlib package")
    env["PYTHONHOME"] = str(home)
    sites = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env["GENRERANK_STUB_SITE"] = os.pathsep.join(sites)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TritonProcess:
    """``with TritonProcess(repo) as triton: triton.url`` -- a tritonserver serving ``repo``
    on a free gRPC port, ready when the block starts, stopped (SIGTERM, then SIGKILL) after."""

    def __init__(self, repo: str | Path, *, start_timeout_s: float = 60.0,
                 grpc_port: int | None = None, log_path: str | Path | None = None) -> None:
        self.repo = Path(repo)
        self.start_timeout_s = start_timeout_s
        self.grpc_port = grpc_port
        self.log_path = Path(log_path) if log_path else None
        self._own_log = log_path is None  # then kept in the private folder, removed by stop()
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _backends(self, binary: Path) -> Path:
        """A private backend folder: the Python backend with this interpreter's stub (the
        wheel keeps one stub per Python version beside it)."""
        assert self._tmp is not None
        src = _dist_dir(binary) / "backends" / "python"
        dst = self._tmp / "backends" / "python"
        dst.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(src / name, dst / name)
        shutil.copy2(_stub(binary), dst / "triton_python_backend_stub")
        return dst.parent

    def start(self) -> TritonProcess:
        binary = find_tritonserver()
        env = {**os.environ, **stub_environment(binary)}
        self._tmp = Path(tempfile.mkdtemp(prefix="genrerank-triton-"))
        backends = self._backends(binary)
        self.grpc_port = self.grpc_port or free_port()
        cmd = [str(binary), f"--model-repository={self.repo}",
               f"--backend-directory={backends}", f"--grpc-port={self.grpc_port}",
               "--allow-http=false", "--allow-metrics=false", "--allow-gpu-metrics=false",
               # The configs are complete; auto-complete would start every stub twice.
               "--disable-auto-complete-config", "--exit-timeout-secs=5", "--log-verbose=0"]
        if self._own_log:
            self.log_path = self._tmp / "tritonserver.log"
        log_path = self.log_path
        assert log_path is not None
        self._log = open(log_path, "wb")  # noqa: SIM115 -- closed in stop()
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        except OSError as exc:
            self.stop()
            raise TritonUnavailable(f"cannot start {binary}: {exc}") from None
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self, lines: int = 6) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        # Errors only, without what every CPU start logs (no GPU driver, no NVML / DCGM).
        noise = ("NVML", "DCGM", "CudaDriverHelper", "pinned memory", "CUDA driver")
        keep = [ln for ln in text.splitlines()
                if ("error" in ln.lower() or "failed" in ln.lower())
                and not any(x in ln for x in noise)]
        return " | ".join(keep[-lines:])

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise TritonUnavailable(f"tritonserver exited with {self.proc.returncode} "
                                            f"while starting: {self._log_tail()}")
                try:
                    if client.is_server_ready(client_timeout=2.0):
                        return
                except InferenceServerException:
                    pass
                if time.monotonic() > deadline:
                    raise TritonUnavailable(f"tritonserver not ready after "
                                            f"{self.start_timeout_s:g} s: {self._log_tail()}")
                time.sleep(0.2)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Its own session: the signal reaches the stubs it started too.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            if self._own_log:
                self.log_path = None

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
