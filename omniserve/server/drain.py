"""Graceful shutdown: stop admitting, let running requests finish, end what is left cleanly, exit 0.

uvicorn on its own closes the listening socket the moment SIGTERM arrives (a load balancer that has
not yet seen the pod go away gets connection refused), gives connections five seconds, then cancels
whatever still runs: a stream stops mid-way with neither an error event nor ``[DONE]``. After the
first SIGTERM or SIGINT this server instead goes through, ``t`` counted from the signal:

==================  ==================================================================================
``0``               new generation requests get 503 + Retry-After (``server_shutting_down``),
                    ``/health`` 503; the socket still accepts, and responses say
                    ``Connection: close`` so keep-alive clients come back through the balancer
``drain delay``     the listening socket closes; running requests go on
``+ drain timeout`` streams still running end with an OpenAI error event and ``data: [DONE]``,
                    non-streaming requests still running get the 503; then the engine stops, exit 0
==================  ==================================================================================

A second signal stops at once (uvicorn's behaviour, and the exit code then says it was forced). A
supervisor must allow more than ``drain delay + drain timeout`` (Kubernetes'
``terminationGracePeriodSeconds``; the chart checks it). No ``preStop`` hook is needed: the drain delay
does what ``preStop: sleep`` does, and works outside Kubernetes too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import time
from collections.abc import Awaitable
from types import FrameType
from typing import TypeVar

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omniserve.errors import QueueFull

log = logging.getLogger(__name__)

T = TypeVar("T")

#: After the drain timeout ended every stream, how long uvicorn still waits for their last events to be
#: written and their connections to close before it cancels what is left.
FLUSH_SECONDS = 5


class ServerDraining(QueueFull):
    """The server is shutting down: retry elsewhere. A ``QueueFull`` so the HTTP layer adds Retry-After,
    as for ``MediaBusy``; a 503 because this replica is going away, whatever the client did."""

    status_code = 503
    error_type = "server_error"
    default_code = "server_shutting_down"


class Drain:
    """One server's shutdown state, shared by the signal handler, the routes and every running request.

    Requests wrap each wait for the engine in ``bounded``; ``expire`` (at the end of the drain timeout)
    ends those waits with ``ServerDraining``, which a stream turns into its error event. Used from the
    event loop's thread only (the signal handler runs there too).
    """

    def __init__(self, delay: float, timeout: float) -> None:
        self.delay = delay
        self.timeout = timeout
        self.began: float | None = None  # time.monotonic() of the signal
        self._deadline: float | None = None  # the loop's clock once running requests are cut off
        self._waits: set[asyncio.Timeout] = set()

    @property
    def draining(self) -> bool:
        return self.began is not None

    def begin(self) -> None:
        """Stop admitting (idempotent); what runs goes on."""
        if self.began is None:
            self.began = time.monotonic()

    def delay_over(self) -> bool:
        return self.began is not None and time.monotonic() - self.began >= self.delay

    def check_admitting(self) -> None:
        """Raise ``ServerDraining`` once shutting down: new work goes to another replica."""
        if self.began is not None:
            raise ServerDraining("this server is shutting down; retry the request (on another replica)")

    def expire(self) -> None:
        """End every request still waiting on the engine, and every later wait, with ``ServerDraining``."""
        self._deadline = asyncio.get_running_loop().time()
        for wait in list(self._waits):
            wait.reschedule(self._deadline)

    async def bounded(self, step: Awaitable[T]) -> T:
        """``await step``, unless the drain timeout ends first: then ``ServerDraining``.

        Wraps one wait at a time (the next delta, not a whole stream), so the cancellation never lands
        while a stream's consumer is writing to the client, and costs nothing until the deadline.
        """
        scope = asyncio.timeout_at(self._deadline)
        try:
            async with scope:
                self._waits.add(scope)
                try:
                    return await step
                finally:
                    self._waits.discard(scope)
        except TimeoutError:
            if not scope.expired():
                raise  # the step's own timeout
            raise ServerDraining(
                f"this server shut down before the request finished (--drain-timeout {self.timeout:g} s); "
                "retry the request"
            ) from None


class CloseWhileDraining:
    """While draining, every response says ``Connection: close``: a keep-alive client's next request then
    opens a new connection, which the load balancer sends to another replica."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.draining:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above in place of its immediate shutdown on the first signal."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        # uvicorn's wait for open connections starts when the socket closes (after the delay): the drain
        # timeout, then a little for the streams cut off at its end to send their last events
        config.timeout_graceful_shutdown = math.ceil(drain.timeout) + FLUSH_SECONDS
        super().__init__(config)
        self.drain = drain
        self._signal = "shutdown"
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread, between two bytecodes of the loop): set state, nothing more."""
        if self.drain.draining:  # a second signal: stop now, and let the re-raised signal say so
            self._captured_signals.append(sig)
            self.should_exit = self.force_exit = True
            return
        self.drain.begin()  # not re-raised after shutdown: a drained exit is exit 0
        self._signal = signal.Signals(sig).name
        if not self.started:  # still loading: nothing to drain
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self._announced:
            self._announced = True
            log.info(
                "%s: refusing new requests; closing the socket in %g s, then up to %g s for running requests",
                self._signal,
                self.drain.delay,
                self.drain.timeout,
            )
        return await super().on_tick(counter) or self.drain.delay_over()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the socket (uvicorn), end what still runs at the drain timeout, then stop the app."""
        self.drain.begin()  # also when uvicorn stops for its own reasons
        asyncio.get_running_loop().call_later(self.drain.timeout, self.drain.expire)
        await super().shutdown(sockets)
