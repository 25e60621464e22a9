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
from collections.abc import Callable, Sequence
from typing import Any, Literal

import anyio
import anyio.lowlevel
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..events import TERMINAL, Event, Iteration

Policy = Literal["lossless", "latest"]
LOSSLESS_WINDOW = 1024  # decoded events a lossless stream holds; the rest wait as raw batches
POLICIES: tuple[str, ...] = ("lossless", "latest")


class Batch:
    """Events of one fit published together; Iteration rows are decoded lazily, once."""

    __slots__ = ("_events", "_head", "_lock", "_rows", "_tail", "fit_id", "time")

    def __init__(
        self,
        fit_id: str,
        events: Sequence[Event] | None = None,
        rows: np.ndarray | None = None,
        time: float = 0.0,
        tail: Sequence[Event] = (),
    ) -> None:
        """``events``, then the Iteration events of ``rows`` (decoded on first use), then
        ``tail``: one hand-off for, say, a short fit's start, iterations and end."""
        self.fit_id = fit_id
        self._head = list(events) if events is not None else []
        self._tail = list(tail)
        self._rows = rows
        self._events: list[Event] | None = None if rows is not None else self._head + self._tail
        self.time = time
        self._lock = threading.Lock()

    def events(self) -> list[Event]:
        if self._events is None:
            with self._lock:
                if self._events is None:
                    its = rows_to_iterations(self.fit_id, self._rows, self.time)
                    self._events = self._head + its + self._tail
        return self._events


def rows_to_iterations(fit_id: str, rows: Any, t: float) -> list[Event]:
    """Decode record rows ``[iteration, nfev, cost, reduction, step_norm, optimality, *params]``.

    The host's per-event cost matters here (a short fit's whole watch budget is a fraction of a
    millisecond): the head columns become Python numbers in one ``tolist`` and every event's
    ``params`` is a row of one float64 copy of the parameter columns.
    """
    rows = np.asarray(rows)
    if rows.shape[0] == 0:
        return []
    heads = rows[:, :6].tolist()
    params = np.array(rows[:, 6:], dtype=np.float64)
    new = object.__new__
    out: list[Event] = []
    for (it, nfev, cost, red, step, opt), p in zip(heads, params, strict=True):
        ev = new(Iteration)
        # The frozen dataclass's own __init__ sets each field through object.__setattr__: the
        # same fields, set at once (checked against the dataclass in tests/test_hub.py).
        ev.__dict__.update(
            fit_id=fit_id,
            iteration=int(it),
            nfev=int(nfev),
            cost=cost,
            cost_reduction=None if it == 0 else red,
            step_norm=None if it == 0 else step,
            optimality=opt,
            params=p,
            time=t,
        )
        out.append(ev)
    return out


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
        return any(s.fit_id is None or s.fit_id == fit_id for s in self._subs)

    def publish(self, batch: Batch) -> None:
        """Hand ``batch`` to every matching subscriber. Thread-safe; never blocks."""
        for sub in self._subs:  # a snapshot: the tuple is replaced, never mutated
            if sub.fit_id is None or sub.fit_id == batch.fit_id:
                sub.offer(batch)


HUB = Hub()
