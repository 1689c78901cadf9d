"""Helpers for tests against a real server process on loopback: start (and always stop) it,
raw-socket exchanges, and /metrics samples."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90.0  # a loaded 2-core machine can take a while to import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return (f"server stdout:\n{self.out.read_text(errors='replace')}\n"
                f"server stderr:\n{self.err.read_text(errors='replace')}")

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=10.0).text

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}\n{self.log()}")
            try:
                response = httpx.get(f"{self.base}/readyz", timeout=2.0)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.1)
        pytest.fail(f"/readyz not 200 after {READY_TIMEOUT_S} s ({last})\n{self.log()}")


@contextlib.contextmanager
def server_process(args: Sequence[str], tmp_path: Path, port: int) -> Iterator[ServerProc]:
    """``args`` (a command line) as a ready server on ``port``; stopped (SIGINT, then kill) at
    the end if the test did not stop it."""
    out, err = tmp_path / f"stdout-{port}.txt", tmp_path / f"stderr-{port}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with out.open("wb") as out_f, err.open("wb") as err_f:
        proc = subprocess.Popen(list(args), stdout=out_f, stderr=err_f, cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL)
    server = ServerProc(proc, port, out, err)
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def fake_server_args(port: int, *extra: str) -> list[str]:
    """The fake-service server (tests/serving/_fake_server.py) on ``port``."""
    return [sys.executable, "-m", "tests.serving._fake_server", "--port", str(port), *extra]


def metric(text: str, sample: str) -> float:
    """The value of one Prometheus sample line (``name{labels}``); 0 when absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for_metric(server: ServerProc, sample: str, value: float,
                    timeout_s: float = 20.0) -> str:
    """Poll /metrics until ``sample`` equals ``value``; the last text (fails on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = server.metrics()
        if metric(text, sample) == value:
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"{sample} is {metric(text, sample)}, not {value}, after {timeout_s} s"
                        f"\n{text}")
        time.sleep(0.05)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection (True) or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def http_bytes(method: str, path: str, body: bytes = b"", *, length: int | None = None,
               close: bool = False) -> bytes:
    """A raw HTTP/1.1 request; ``length`` overrides the Content-Length header."""
    length = len(body) if length is None else length
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {length}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])
