"""uvicorn's HTTP/1.1 protocol (h11) with a clock on clients that owe us bytes no handler is reading.

uvicorn times out only idle keep-alive connections, and any byte restarts that clock: a connection that
sends nothing, or its request headers one byte at a time, stays open for ever (slowloris). Here a
connection must deliver a request's complete headers within `read_timeout` seconds of its first byte
(or of being opened), and after an early answer (a 413 before the body was read) the rest of that
body within `read_timeout` too; otherwise it is closed, with one log line. While a handler reads a
body, the handler's own timeout applies (app.py answers 408). Imported only by `litllm serve`.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def h11_with_read_timeout(read_timeout: float) -> type:
    """The protocol class for `uvicorn.Config(http=...)`."""

    class TimedH11Protocol(H11Protocol):
        _clock = None  # the asyncio TimerHandle while the client owes us bytes

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._start_clock()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update_clock()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update_clock()

        def connection_lost(self, exc) -> None:
            self._stop_clock()
            super().connection_lost(exc)

        def _owes_bytes(self) -> bool:
            """Headers begun but not complete, or a body still coming after its answer was sent."""
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                return self.cycle is not None and self.cycle.response_complete
            return state is h11.IDLE and self.conn.trailing_data[0] != b""

        def _update_clock(self) -> None:
            if self._owes_bytes():
                if self._clock is None:
                    self._start_clock()
            else:
                self._stop_clock()

        def _start_clock(self) -> None:
            self._stop_clock()
            self._clock = self.loop.call_later(read_timeout, self._too_slow)

        def _stop_clock(self) -> None:
            if self._clock is not None:
                self._clock.cancel()
                self._clock = None

        def _too_slow(self) -> None:
            self._clock = None
            state = self.conn.their_state
            if self.transport.is_closing() or not (state is h11.IDLE or self._owes_bytes()):
                return
            what = "its request headers" if state is h11.IDLE else "the rest of its request body"
            prefix = "%s:%d - " % self.client if self.client else ""
            self.logger.info("%sclosed the connection: %s did not arrive within %g s", prefix, what, read_timeout)
            self.transport.close()

    return TimedH11Protocol
