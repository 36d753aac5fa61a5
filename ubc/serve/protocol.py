"""The HTTP/1.1 connection of ``ubc-serve``: uvicorn's h11 protocol plus what a service open to
hostile clients needs and uvicorn does not do (issue 26).

- Header timeout: the request line and headers must arrive within ``header_timeout_s`` of
  the connection opening (or of the first byte of the next request on a kept-alive one),
  else the connection is closed. uvicorn only times out kept-alive connections left idle.
- Bounded drain after an early answer: when the answer (401, 413, 503, 408, ...) has gone out
  before the request's body came in, the rest of the body is read and discarded, at most
  ``DRAIN_BYTES`` for at most ``DRAIN_S`` seconds, then the connection is closed.
- Lingering close: a connection that is to close while the body is still coming is first
  half-closed (the answer, then FIN) and drained the same way, as nginx and Apache do:
  closing a socket with unread data sends a reset that destroys the answer in flight, so a
  client that sends its whole body before it reads (Python's urllib, many others) saw a
  connection error instead of 413 or 401.
The body timeout is the app's (``ubc.serve.upload.read_body``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

__all__ = ["GuardedH11Protocol", "DRAIN_BYTES", "DRAIN_S", "HEADER_TIMEOUT_S"]

log = logging.getLogger("ubc.serve")

DRAIN_BYTES = 64 * 1024 * 1024
"""Most body bytes read and discarded after an early answer."""
DRAIN_S = 5.0
"""Longest time spent reading and discarding the body after an early answer."""
HEADER_TIMEOUT_S = 10.0
"""Default time for the request line and headers to arrive."""


class _LingeringTransport:
    """The connection's transport, whose ``close`` half-closes and lets the protocol drain
    the body when one is still coming."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport, self._protocol = transport, protocol
        self.lingering = False

    def close(self) -> None:
        if self.lingering:
            return  # the drain's deadline or its byte cap closes it
        if self._transport.is_closing() or not self._protocol.body_coming():
            self._transport.close()
            return
        try:
            if self._transport.can_write_eof():
                self._transport.write_eof()  # after the answer still buffered
        except OSError:  # the client has gone already
            self._transport.close()
            return
        self.lingering = True
        self._protocol.start_drain()
        self._transport.resume_reading()  # flow control may have paused it

    def close_now(self) -> None:
        self._transport.close()

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a bounded drain after early answers and
    lingering close; pass ``functools.partial(GuardedH11Protocol, header_timeout_s=...)`` as
    uvicorn's ``http``."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *,
                 header_timeout_s: float = HEADER_TIMEOUT_S) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = header_timeout_s
        self._lingering: _LingeringTransport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._lingering = _LingeringTransport(cast(asyncio.Transport, transport), self)
        super().connection_made(cast(asyncio.Transport, self._lingering))
        self._watch_header()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._drain_timer is not None:  # an early answer went out: discard the body
            self._drain_left -= len(data)
            if self._drain_left < 0:
                self._close_now("drained the most it may of a body after an early answer")
                return
            if self._lingering is not None and self._lingering.lingering:
                return  # closing: h11 is done with this connection
        super().data_received(data)  # h11 itself discards a body after the answer
        if self._drain_timer is not None and not self.body_coming():
            self._drain_timer.cancel()  # the body ended: the kept-alive connection goes on
            self._drain_timer = None
        self._watch_header()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.body_coming() and not self.transport.is_closing():
            self.start_drain()

    def body_coming(self) -> bool:
        """The client is still sending the body of its request."""
        return self.conn.their_state is h11.SEND_BODY

    def start_drain(self) -> None:
        """Discard what comes of the body, within ``DRAIN_BYTES`` and ``DRAIN_S``."""
        if self._drain_timer is None:
            self._drain_left = DRAIN_BYTES
            self._drain_timer = self.loop.call_later(
                DRAIN_S, self._close_now, "spent the time to drain a body after an early "
                "answer")

    def _watch_header(self) -> None:
        """The header clock runs while a request's head is awaited on an open connection."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.header_timeout_s, self._close_now, "the request line and headers did "
                f"not arrive within {self.header_timeout_s:g} s")
        elif not waiting and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _stop_timers(self) -> None:
        for timer in (self._header_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._drain_timer = None

    def _close_now(self, why: str) -> None:
        self._stop_timers()
        log.debug("ubc-serve: closing a connection: %s", why)
        if self._lingering is not None:
            self._lingering.close_now()
