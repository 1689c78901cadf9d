"""A real server process around the fake service, for the tests that need one: the same
runner as ``genrerank serve`` (:func:`genrerank.serving.server.run_server`), without a model.

``python -m tests.serving._fake_server --port P [--gate FILE] [--delay-ms D] ...``. Every
model call takes ``--delay-ms``; a request with ``request_id`` ``"gated"`` waits in the model
until the file ``--gate`` exists (so a test can hold a request in flight, deterministically).
Prints ``listening on HOST:PORT`` once the socket listens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from genrerank.serving.app import create_app
from genrerank.serving.server import bind_socket, run_server
from genrerank.serving.types import RerankInput, RerankResult
from tests.serving.conftest import FakeService


class GatedService(FakeService):
    def __init__(self, gate: Path | None, delay_s: float) -> None:
        super().__init__()
        self.gate_file = gate
        self.delay_s = delay_s

    def rerank(self, request: RerankInput) -> RerankResult:
        if request.request_id == "gated" and self.gate_file is not None:
            deadline = time.monotonic() + 120.0  # never forever, whatever the test does
            while not self.gate_file.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().rerank(request)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gate", type=Path, default=None)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--header-timeout-s", type=float, default=5.0)
    parser.add_argument("--body-timeout-s", type=float, default=10.0)
    parser.add_argument("--drain-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    sock = bind_socket("127.0.0.1", args.port)
    app = create_app(GatedService(args.gate, args.delay_ms / 1000.0), timeout_s=args.timeout_s,
                     max_queue=args.max_queue, body_timeout_s=args.body_timeout_s)

    def announce(host: str, port: int) -> None:
        print(f"listening on {host}:{port}", flush=True)

    run_server(app, sock, header_timeout_s=args.header_timeout_s, drain_s=args.drain_s,
               log_level="info", on_listening=announce)
    sys.exit(0)


if __name__ == "__main__":
    main()
