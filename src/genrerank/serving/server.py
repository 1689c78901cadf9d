"""Running the HTTP app (:func:`genrerank.serving.app.create_app`) under uvicorn, hardened.

What uvicorn does not do by itself, and this module adds:

- **Request head read timeout.** uvicorn's h11 protocol arms no timer before the first
  request of a connection, nor while a request head arrives byte by byte, so slow-header
  connections are held open indefinitely. :class:`TimedH11Protocol` (a subclass of uvicorn's
  ``H11Protocol``) closes a connection whose request head is not complete ``header_timeout_s``
  after the connection was accepted (first request) or after its first byte arrived (later
  requests on a kept-alive connection; before that byte, uvicorn's keep-alive timeout
  applies). A connection that sent part of a head gets a ``408`` first; one that sent nothing
  is just closed.
- **Request body read timeout**, as a backstop: the app answers ``408`` when a body does not
  arrive within ``body_timeout_s`` of its head (see :mod:`genrerank.serving.app`); the
  protocol closes the connection one second later if the body is still incomplete (an
  endpoint that answered without reading its body). A kept-alive connection left idle with no
  uvicorn keep-alive timer armed (after a request body uvicorn discarded) gets one of ours.
- Requests the protocol answers itself (``400`` malformed HTTP, ``408`` slow head) are counted
  in the app's /metrics (endpoint ``unparsed``); uvicorn never shows them to the app.
- **Drain on SIGTERM** (:class:`DrainingServer`): readiness goes ``503`` at once and every
  response closes its connection, while the server keeps accepting and serving for
  ``drain_s`` seconds (load balancers see the failing readiness and stop sending); then it
  stops listening, lets the requests in flight finish (at most ``shutdown_timeout_s``) and
  exits with code 0. A second SIGTERM, or SIGINT (Ctrl-C), skips the rest of the drain phase
  (in-flight requests still finish); uvicorn's usual behaviour.
- **Binding before announcing**: :func:`bind_socket` binds the port (and fails with one line
  naming it if it is busy) before the model loads; :func:`run_server` starts listening on it
  and only then reports the address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from genrerank.serving.app import start_draining

logger = logging.getLogger("genrerank.serving")

DEFAULT_HEADER_TIMEOUT_S = 5.0
DEFAULT_DRAIN_S = 5.0
#: The protocol's body backstop fires this long after the app's 408 would have.
BODY_BACKSTOP_GRACE_S = 1.0
KEEP_ALIVE_S = 5  # uvicorn's default idle keep-alive timeout


def _head_timeout_response(header_timeout_s: float) -> bytes:
    body = (b'{"error": "request timeout", "detail": "the request head was not received within '
            + f'{header_timeout_s:g} s"}}'.encode())
    head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n".encode() + b"connection: close\r\n\r\n")
    return head + body


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with request head and body read timeouts (see the module doc).

    Configured through class attributes: use :func:`timed_protocol` to make a subclass.
    """

    header_timeout_s: ClassVar[float] = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: ClassVar[float] = 10.0
    # In a tuple: a plain function as a class attribute would become a bound method.
    status_hook: ClassVar[tuple[Callable[[int], None], ...]] = ()

    _read_timer: asyncio.TimerHandle | None
    _timer_for: str | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_timer = None
        self._timer_for = None
        super().connection_made(transport)
        self._arm("head", self.header_timeout_s)  # a client that never sends a byte

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()  # the next (pipelined) request may be buffered already

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        super().send_400_response(msg)
        self._count(400)

    # -- timers

    def _watch(self) -> None:
        """(Re)arm or disarm the read timer from h11's view of the client's side."""
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.conn.trailing_data[0]:
                # Bytes of a head are buffered: the head must complete in time. The timer is
                # not re-armed by later bytes, so trickling one byte at a time does not help.
                if self._timer_for != "head":
                    self._arm("head", self.header_timeout_s)
            elif self.cycle is None:
                pass  # no request yet: the head timer armed on connection keeps running
            elif self.timeout_keep_alive_task is not None:
                self._disarm()  # idle between requests: uvicorn's keep-alive timer is in charge
            elif self._timer_for != "idle":
                # Idle, and uvicorn armed no keep-alive timer (it cancels it on any byte, and
                # does not re-arm it after a request body it discarded): arm our own.
                self._arm("idle", self.timeout_keep_alive)
        elif state is h11.SEND_BODY:
            if self._timer_for != "body":
                self._arm("body", self.body_timeout_s + BODY_BACKSTOP_GRACE_S)
        else:
            self._disarm()

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._timer_for = what
        self._read_timer = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = None
        self._timer_for = None

    def _expired(self, what: str) -> None:
        self._read_timer = None
        self._timer_for = None
        if self.transport.is_closing():
            return
        if what == "head" and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            # Part of a request arrived: say why the connection ends (RFC 9110, 408).
            self.transport.write(_head_timeout_response(self.header_timeout_s))
            self._count(408)
            logger.info("request head not received within %g s; closed", self.header_timeout_s)
        elif what == "body":
            logger.info("request body not received within %g s; closed",
                        self.body_timeout_s + BODY_BACKSTOP_GRACE_S)
        self.transport.close()

    def _count(self, status: int) -> None:
        for hook in self.status_hook:
            try:
                hook(status)
            except Exception:  # metrics must never break the protocol
                logger.exception("counting a %d failed", status)


def timed_protocol(header_timeout_s: float, body_timeout_s: float,
                   on_status: Callable[[int], None] | None = None) -> type[TimedH11Protocol]:
    """A :class:`TimedH11Protocol` subclass with these timeouts, for ``uvicorn.Config(http=)``.

    ``on_status(status)`` is called for each request the protocol answers itself.
    """
    if header_timeout_s <= 0 or body_timeout_s <= 0:
        raise ValueError("header_timeout_s and body_timeout_s must be > 0")
    attrs: dict[str, Any] = {
        "header_timeout_s": float(header_timeout_s),
        "body_timeout_s": float(body_timeout_s),
        "status_hook": (on_status,) if on_status is not None else (),
    }
    return type("TimedH11Protocol", (TimedH11Protocol,), attrs)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase on the first SIGTERM (see the module doc)."""

    def __init__(self, config: uvicorn.Config, drain_s: float,
                 on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain_s = drain_s
        self.on_drain = on_drain
        self.drain_until: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        # Not recorded in _captured_signals: uvicorn would re-raise it after a clean shutdown
        # and the process would die of it instead of exiting 0.
        if self.drain_until is None and not self.should_exit and self.drain_s > 0:
            self.drain_until = time.monotonic() + self.drain_s
            self.on_drain()  # a flag write only: this runs in a signal handler
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self.should_exit:
            if not self._drain_logged:  # logged here, not in the signal handler (locks)
                self._drain_logged = True
                logger.warning("SIGTERM: draining for %g s (/readyz answers 503), then "
                               "stopping", self.drain_s)
            if time.monotonic() >= self.drain_until:
                self.should_exit = True
        return await super().on_tick(counter)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, not listening yet (nobody can connect while the
    model loads). A busy port or a bad host is a ValueError naming it, in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # IPv4 first when a name has both (``localhost``): what clients of 127.0.0.1 expect.
        family, kind, proto, _, address = next(
            (info for info in infos if info[0] == socket.AF_INET), infos[0])
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        # As uvicorn does: a restart may reuse the port of connections still in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _log_to_stderr(level: str) -> None:
    """The service's own log lines (genrerank.serving) at ``level``, like uvicorn's."""
    service_logger = logging.getLogger("genrerank.serving")
    service_logger.setLevel(level.upper())
    if not service_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        service_logger.addHandler(handler)
        service_logger.propagate = False


def run_server(
    app: FastAPI,
    sock: socket.socket,
    *,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    drain_s: float = DEFAULT_DRAIN_S,
    shutdown_timeout_s: float | None = None,
    backlog: int = 2048,
    log_level: str = "warning",
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    """Serve ``app`` on the bound ``sock`` until SIGTERM (after a drain phase) or SIGINT.

    ``header_timeout_s`` bounds the arrival of a request head; the body timeout is the app's
    (``create_app(body_timeout_s=)``), with a protocol-level backstop. ``shutdown_timeout_s``
    bounds the wait for requests in flight once the server stops listening (default: the
    app's model timeout + body timeout + 5 s, after which they are cancelled).
    ``on_listening(host, port)`` is called once the socket listens, before serving.
    """
    if drain_s < 0:
        raise ValueError(f"drain_s must be >= 0, got {drain_s}")
    limits = getattr(app.state, "limits", {})
    body_timeout_s = float(limits.get("body_timeout_s", 10.0))
    if shutdown_timeout_s is None:
        shutdown_timeout_s = float(limits.get("timeout_s", 1.0)) + body_timeout_s + 5.0
    protocol = timed_protocol(header_timeout_s, body_timeout_s,
                              getattr(app.state, "record_unparsed", None))
    host, port = sock.getsockname()[:2]
    try:
        sock.listen(backlog)  # two servers bound at once: the second fails here
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        lifespan="on",
        log_level=log_level,
        access_log=False,
        backlog=backlog,
        timeout_keep_alive=KEEP_ALIVE_S,
        # uvicorn types it int; asyncio.wait_for takes any number of seconds.
        timeout_graceful_shutdown=math.ceil(shutdown_timeout_s),
    )
    _log_to_stderr(log_level)
    server = DrainingServer(config, drain_s, lambda: start_draining(app))
    if on_listening is not None:
        on_listening(host, port)
    # SIGINT is re-raised by uvicorn after its graceful shutdown: not an error.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
