"""The stream stage's fan-out: a thread-safe hub hands batches of events to per-subscriber streams.

Publishing happens on whatever thread has the events -- an XLA callback thread, the solver's
worker thread, the caller's thread -- and never blocks: each subscriber gets one non-blocking
hand-off per batch into its own event loop (``call_soon_threadsafe`` on asyncio, ``run_sync_soon``
on trio). Inside that loop the batch goes into the subscriber's own anyio memory object stream
under the subscriber's policy:

* ``"lossless"``: nothing is ever dropped. The stream holds up to ``LOSSLESS_WINDOW`` decoded
  events; a backlog beyond that waits as raw numpy batches (about 8 bytes a number).
* ``"latest"``: at most one Iteration waits; a newer one replaces it and ``skipped`` counts the
  replaced ones. FitStarted and the terminal event are never dropped.

Receive clones of one memory stream would *distribute* items between receivers, which is why every
subscriber has a stream of its own.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any, Literal

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..events import TERMINAL, Event, EventBatch, Iteration, iterations_from_rows

Policy = Literal["lossless", "latest"]
LOSSLESS_WINDOW = 1024  # decoded events a lossless stream holds; the rest wait as raw batches
POLICIES: tuple[str, ...] = ("lossless", "latest")


class Batch(EventBatch):
    """Events of one fit published together (an :class:`~nlsq_stream.events.EventBatch`):
    ``events``, then the Iteration events of ``rows`` (built on first use, once, whichever
    thread asks first), then ``tail``."""

    __slots__ = ()


def rows_to_iterations(fit_id: str, rows: Any, t: float) -> list[Iteration]:
    """Decode record rows ``[iteration, nfev, cost, reduction, step_norm, optimality, *params]``
    (``events.iterations_from_rows``: in bulk, a short fit's whole watch budget being a fraction
    of a millisecond)."""
    return iterations_from_rows(fit_id, rows, t)


def _scheduler(token: anyio.lowlevel.EventLoopToken) -> Callable[..., None]:
    native: Any = token.native_token
    if hasattr(native, "call_soon_threadsafe"):  # asyncio loop
        return native.call_soon_threadsafe
    if hasattr(native, "run_sync_soon"):  # trio token
        return native.run_sync_soon
    raise RuntimeError(f"unsupported event loop token {native!r}")


class Subscription:
    """One subscriber: its own memory object stream in its own event loop, under its policy.

    Create it inside the event loop that will receive (it captures that loop's token), or pass
    that loop's ``schedule``. Iterate it
    with ``async for``; it ends after the terminal event of a fit it follows (``fit_id`` given), or
    when closed.
    """

    def __init__(
        self,
        fit_id: str | None = None,
        policy: Policy = "lossless",
        schedule: Callable[..., None] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}")
        self.fit_id = fit_id
        self.policy = policy
        self.skipped = 0
        self.received = 0
        # ``schedule`` (a loop's ``call_soon_threadsafe``) lets another thread create it for a
        # loop it knows; by default the current loop receives.
        self._schedule = schedule or _scheduler(anyio.lowlevel.current_token())
        # A lossless subscriber that falls behind keeps its backlog as undecoded batches (compact
        # numpy rows), decoding the next one only when the stream has room.
        size = LOSSLESS_WINDOW if policy == "lossless" else 1
        self._send: MemoryObjectSendStream[Event]
        self._recv: MemoryObjectReceiveStream[Event]
        self._send, self._recv = anyio.create_memory_object_stream[Event](size)
        self._side: collections.deque[Event] = collections.deque()
        self._pending: collections.deque[Batch] = collections.deque()
        self._ended = False  # the terminal event went into the stream (or we closed)
        self._dead = False  # the consumer's loop is gone
        self._hub: Hub | None = None

    # -- producer side (any thread) ------------------------------------------------------------
    def offer(self, batch: Batch) -> None:
        if self._dead or self._ended:
            return
        try:
            self._schedule(self._deliver, batch)
        except RuntimeError:  # the consumer's loop is closed
            self._dead = True

    # -- consumer side (its event loop) --------------------------------------------------------
    def _deliver(self, batch: Batch) -> None:
        if self._ended:
            return
        if self.policy == "lossless":
            self._pending.append(batch)
            self._refill()
            return
        for ev in batch.events():
            if self.policy == "latest" and isinstance(ev, Iteration):
                if self._side and isinstance(self._side[-1], Iteration):
                    self._side[-1] = ev
                    self.skipped += 1
                    continue
            self._side.append(ev)
        self._refill()

    def _refill(self) -> None:
        while not self._ended:
            if not self._side:
                if not self._pending:
                    return
                self._side.extend(self._pending.popleft().events())
                continue
            ev = self._side[0]
            try:
                self._send.send_nowait(ev)
            except anyio.WouldBlock:
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._ended = True
                self._side.clear()
                self._pending.clear()
                return
            self._side.popleft()
            # The subscribed fit's own terminal event ends the stream (a batch's per-fit
            # FitFinished events, "<batch_id>/<i>", do not).
            if self.fit_id is not None and isinstance(ev, TERMINAL) and ev.fit_id == self.fit_id:
                self._ended = True
                self._send.close()
                if self._hub is not None:  # a finished fit needs no routing any more
                    self._hub.unsubscribe(self)

    async def receive(self) -> Event:
        return self._received(await self._recv.receive())

    def receive_nowait(self) -> Event:
        return self._received(self._recv.receive_nowait())

    def _received(self, ev: Event) -> Event:
        # Under "latest" an Iteration that waited in the stream is stale if a newer one waits
        # beside it: hand out the newer one instead, so at most one Iteration ever waits. Not
        # while the stream still buffers an event: a receiver that was already waiting got ``ev``
        # handed over directly, so the buffered event is newer than ``ev`` but older than the
        # side's, and swapping would hand the side's out before it (seen: iterations 2, 1).
        if self.policy == "latest" and isinstance(ev, Iteration):
            if (
                self._side
                and isinstance(self._side[0], Iteration)
                and self._recv.statistics().current_buffer_used == 0
            ):
                ev = self._side.popleft()
                self.skipped += 1
        self.received += 1
        self._refill()
        return ev

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving; pending events are discarded. Idempotent."""
        self._ended = True
        self._side.clear()
        self._pending.clear()
        self._send.close()
        self._recv.close()


class Hub:
    """Routes published batches to the subscriptions that follow their fit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: tuple[Subscription, ...] = ()

    def subscribe(self, sub: Subscription) -> Subscription:
        with self._lock:
            self._subs = (*self._subs, sub)
        sub._hub = self
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def has_subscribers(self, fit_id: str) -> bool:
        if not self._subs:  # the usual case, asked after every chunk of an inline fit
            return False
        return any(s.fit_id is None or s.fit_id == fit_id for s in self._subs)

    def publish(self, batch: Batch) -> None:
        """Hand ``batch`` to every matching subscriber. Thread-safe; never blocks."""
        for sub in self._subs:  # a snapshot: the tuple is replaced, never mutated
            if sub.fit_id is None or sub.fit_id == batch.fit_id:
                sub.offer(batch)


HUB = Hub()
