"""Sinks at work: each sink reads its own subscriber stream, in one shared background event loop.

:class:`SinkRunner` subscribes each sink of a fit to the hub and runs it as a task of the shared
sink loop (``_SinkLoop``, an asyncio loop in a daemon thread that ends when idle), so neither a
slow consumer nor a slow sink can slow the solver or each other. A sink that raises is detached
and its error kept; the others go on. Both faces use it: the sync face waits for the runner to
drain, the async face (``fit_stream``) lets it finish on its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from ..events import Event
from .hub import HUB, Policy, Subscription

MAX_SINK_BATCH = 1024  # events handed to a sink at once: bounds the memory of one write


def sink_name(sink: Any) -> str:
    """How errors name a sink: a function by its name, an object by its class."""
    return str(getattr(sink, "__name__", None) or type(sink).__name__)


def detached_message(name: str, e: BaseException) -> str:
    """The error kept for a sink that raised ``e`` and was detached."""
    return (
        f"sink {name} raised {type(e).__name__}: {e}; it was detached "
        f"({''.join(traceback.format_exception_only(e)).strip()})"
    )


class _SinkAdapter:
    """Presents any accepted sink as ``send_batch(events)`` plus ``aclose()``."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.policy: Policy = getattr(sink, "policy", "lossless")
        self.name = sink_name(sink)
        self.started = False  # its task took its first step
        # An inline sink with no async method (``write_batch`` and ``close`` only) runs here too.
        self.inline_only = not (
            callable(sink) or hasattr(sink, "send") or hasattr(sink, "send_batch")
        )

    async def send_batch(self, events: list[Event]) -> None:
        sink = self.sink
        if hasattr(sink, "send_batch"):
            await sink.send_batch(events)
            return
        if self.inline_only:
            sink.write_batch(events)
            return
        send = sink.send if hasattr(sink, "send") else sink
        for ev in events:
            out = send(ev)
            if inspect.isawaitable(out):
                await out

    async def aclose(self) -> None:
        close = getattr(self.sink, "close" if self.inline_only else "aclose", None)
        if close is not None:
            out = close()
            if inspect.isawaitable(out):
                await out


def _take(sub: Subscription, most: int) -> tuple[list[Event], bool]:
    """Up to ``most`` events that ``sub`` has ready, without waiting; and whether it ended."""
    out: list[Event] = []
    while len(out) < most:
        try:
            out.append(sub.receive_nowait())
        except anyio.WouldBlock:
            return out, False
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return out, True
    return out, False


class _SinkLoop:
    """The background asyncio loop where sinks run, shared by all fits and started on demand.

    Starting a thread and an event loop costs more than a small fit (0.57 ms here, against 13 µs
    to join the running loop), so the loop lives while fits use it and ends by itself ``IDLE_S``
    seconds after the last one released it: no thread outlives its fits by more than that (plus
    half of it, the idle check's period). One second covers a script that fits one problem after
    another, watching some: with 0.1 s, alternating watched and unwatched 1e6-point fits (~60 ms
    each) restarted the loop 5 times in 45 watched fits.
    """

    IDLE_S = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._users = 0
        self._idle_since = 0.0

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                started = threading.Event()
                box: list[asyncio.AbstractEventLoop] = []
                thread = threading.Thread(
                    target=self._main, args=(started, box), name="nlsq_stream-sinks", daemon=True
                )
                thread.start()
                started.wait()
                self._loop = box[0]
            self._users += 1
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._idle_since = time.monotonic()

    def _main(self, started: threading.Event, box: list[asyncio.AbstractEventLoop]) -> None:
        async def main() -> None:
            box.append(asyncio.get_running_loop())
            started.set()
            while True:
                await asyncio.sleep(self.IDLE_S / 2)
                with self._lock:
                    if self._users == 0 and time.monotonic() - self._idle_since >= self.IDLE_S:
                        self._loop = None  # the next fit starts a new loop
                        return

        asyncio.run(main())


SINK_LOOP = _SinkLoop()


class SinkRunner:
    """Runs sinks for one fit in the shared background event loop (:class:`_SinkLoop`).

    Use as a context manager around the fit: entering subscribes every sink before any event is
    published; ``wait()`` (or the ``on_done`` callback) tells when all of them have drained after
    the terminal event. A sink that raises is detached; its error lands in ``errors``.
    """

    def __init__(
        self,
        sinks: Sequence[Any],
        fit_id: str,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._adapters = [_SinkAdapter(s) for s in sinks]
        self._fit_id = fit_id
        self._on_done = on_done
        self._remaining = len(self._adapters)
        self._all_done = threading.Event()
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: list[tuple[_SinkAdapter, Subscription]] = []
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> SinkRunner:
        self._loop = SINK_LOOP.acquire()
        # Subscribed here, before any event is published. The sinks' tasks start with the first
        # delivery, in the same wake-up of the loop: a short fit's events then cost the loop one
        # wake-up, not two (every wake-up is Python work that competes with the fit's).
        subs = [
            HUB.subscribe(Subscription(self._fit_id, a.policy, self._schedule))
            for a in self._adapters
        ]
        self._pending = list(zip(self._adapters, subs, strict=True))
        if not self._adapters:
            self._finish_one()
        return self

    def _schedule(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the sinks' loop is closed")
        if self._pending:
            with self._start_lock:
                pending, self._pending = self._pending, []
            if pending:
                # A fresh context: the caller's (a trio task's, say) would tell anyio to use trio.
                loop.call_soon_threadsafe(
                    self._start_then, pending, fn, args, context=contextvars.Context()
                )
                return
        loop.call_soon_threadsafe(fn, *args)

    def _start_then(
        self,
        pending: list[tuple[_SinkAdapter, Subscription]],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        for adapter, sub in pending:
            self._start_task(adapter, sub)
        fn(*args)

    def _start_task(self, adapter: _SinkAdapter, sub: Subscription) -> None:
        task = asyncio.get_running_loop().create_task(
            self._drive(adapter, sub), context=contextvars.Context()
        )

        def done(task: asyncio.Task[None]) -> None:
            # Forget the task (nothing then ties this runner, its tasks and their coroutines in
            # a cycle that only the GC would free). Cancelled before its first step, the
            # coroutine's ``finally`` never ran: do its work here.
            self._tasks.remove(task)
            if adapter.started:
                return
            HUB.unsubscribe(sub)
            sub.close()
            self._finish_one()

        task.add_done_callback(done)
        self._tasks.append(task)

    async def _drive(self, adapter: _SinkAdapter, sub: Subscription) -> None:
        adapter.started = True
        try:
            ended = False
            while not ended:
                # What is already in the stream is taken without a trip through the event loop
                # (``receive`` first yields to it): the events a fit publishes at once reach the
                # sink in one step of this task, and the end of the stream is seen at once.
                batch, ended = _take(sub, MAX_SINK_BATCH)
                if not batch:
                    if ended:
                        break
                    try:
                        batch = [await sub.receive()]
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                    more, ended = _take(sub, MAX_SINK_BATCH - 1)
                    batch += more
                try:
                    await adapter.send_batch(batch)
                except Exception as e:
                    self.errors.append(detached_message(adapter.name, e))
                    break
                if len(batch) == MAX_SINK_BATCH:  # a backlog: let the other sinks have a turn
                    await anyio.lowlevel.checkpoint()
        finally:
            HUB.unsubscribe(sub)
            sub.close()
            try:
                await adapter.aclose()
            except Exception as e:
                self.errors.append(f"sink {adapter.name} failed to close: {type(e).__name__}: {e}")
            self._finish_one()

    def _finish_one(self) -> None:
        self._remaining -= 1
        if self._remaining <= 0:
            self._all_done.set()
            if self._on_done is not None:
                self._on_done()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every sink has drained (after the terminal event)."""
        return self._all_done.wait(timeout)

    def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is None:
            return
        with self._start_lock:
            never_started, self._pending = self._pending, []
        for _, sub in never_started:  # nothing was ever delivered to these
            HUB.unsubscribe(sub)
            self._finish_one()
        self._loop = None
        if not self._all_done.is_set():  # leaving early: detach the sinks, let them close
            loop.call_soon_threadsafe(self._cancel_all, context=contextvars.Context())
            self._all_done.wait()
        SINK_LOOP.release()
