"""Stage four: subscriber streams and sinks; ``fit_stream``, the async face of a fit.

A fit watched from async code runs its solver in a worker thread. The consumer reads its own
memory object stream (``async for event in stream``), and sinks run in a background event loop
of their own (:class:`SinkRunner`), each reading its own stream, so neither a slow consumer nor a
slow sink can slow the solver or each other. The same ``SinkRunner`` serves the sync face.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from ._hub import HUB, Batch, Policy, Subscription, _scheduler
from ._pipeline import (
    FitError,
    PreparedFit,
    describe,
    execute,
    hub_channel,
    new_fit_id,
    publish_terminal,
    with_display,
)
from ._result import OptimizeResult
from .events import TERMINAL, Event, FitFailed

MAX_SINK_BATCH = 1024  # events handed to a sink at once: bounds the memory of one write


class _SinkAdapter:
    """Presents any accepted sink as ``send_batch(events)`` plus ``aclose()``."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.policy: Policy = getattr(sink, "policy", "lossless")
        self.name = getattr(sink, "__name__", None) or type(sink).__name__
        self.started = False  # its task took its first step

    async def send_batch(self, events: list[Event]) -> None:
        sink = self.sink
        if hasattr(sink, "send_batch"):
            await sink.send_batch(events)
            return
        send = sink.send if hasattr(sink, "send") else sink
        for ev in events:
            out = send(ev)
            if inspect.isawaitable(out):
                await out

    async def aclose(self) -> None:
        close = getattr(self.sink, "aclose", None)
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
                    self.errors.append(
                        f"sink {adapter.name} raised {type(e).__name__}: {e}; it was detached "
                        f"({''.join(traceback.format_exception_only(e)).strip()})"
                    )
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


class _Worker:
    """The running side of a :class:`FitStream`: its solver thread, channel and sinks.

    The thread refers to this object only, never to the stream, so a stream that its consumer
    dropped (a plain ``async for`` left by a cancellation) can be garbage-collected, and its
    finalizer stops the fit.
    """

    def __init__(self, prep: PreparedFit, fit_id: str, sinks: Sequence[Any]) -> None:
        self.prep = prep
        self.fit_id = fit_id
        self.sinks = sinks
        self.channel = hub_channel(fit_id)
        self.result: OptimizeResult | None = None
        self.error: BaseException | None = None
        self.runner: SinkRunner | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        schedule = _scheduler(anyio.lowlevel.current_token())
        self.done = anyio.Event()
        self.sinks_done = anyio.Event()
        if self.sinks:
            # Sinks run in the shared asyncio loop whatever the consumer runs: a trio loop cannot
            # host a second trio loop through anyio's blocking portal (it deadlocks, measured).
            sinks_done = self.sinks_done
            self.runner = SinkRunner(
                self.sinks, self.fit_id, on_done=lambda: _safe_schedule(schedule, sinks_done.set)
            )
            self.runner.__enter__()
        else:
            self.sinks_done.set()
        HUB.publish(Batch(self.fit_id, [self.prep.started_event(self.fit_id)]))
        self.thread = threading.Thread(
            target=self.run, args=(schedule,), name=f"nlsq_stream-{self.fit_id}", daemon=True
        )
        self.thread.start()

    def run(self, schedule: Callable[..., None]) -> None:
        res = None
        try:
            res = execute(self.prep, self.prep.verbose or 2, self.channel)
            self.result = res
        except BaseException as e:
            self.error = e
        finally:
            publish_terminal(self.fit_id, res, self.error)
            # Sinks finish on their own after the terminal event; closing their loop here means
            # nothing waits for the consumer (who may have broken out of a plain ``async for``).
            if self.runner is not None:
                self.runner.wait()
                self.runner.__exit__(None, None, None)
                if res is not None:
                    res["sink_errors"] = list(self.runner.errors)
            _safe_schedule(schedule, self.done.set)


def _abandoned(worker: _Worker, sub: Subscription | None) -> None:
    """The consumer dropped its stream without closing it: stop the fit, stop routing to it."""
    worker.channel.stop_requested.set()
    if sub is not None:
        HUB.unsubscribe(sub)


class FitStream:
    """A running (or ready) fit whose events you read with ``async for``.

    Use ``async with fit_stream(...) as stream: async for event in stream: ...`` (leaving the block
    early stops the fit), or plain ``async for event in fit_stream(...)`` (a loop left early by an
    exception or a cancellation stops the fit once the stream is dropped). After the terminal
    event ``stream.result`` holds the :class:`OptimizeResult`. If the fit raised, the terminal
    event is a :class:`FitFailed` and the iteration then raises :class:`FitError` from the
    original error.
    """

    def __init__(self, prep: PreparedFit, policy: Policy, sinks: Sequence[Any]) -> None:
        self.fit_id = new_fit_id()
        self._policy = policy
        self._worker = _Worker(prep, self.fit_id, with_display(sinks, prep.verbose))
        self._started = False
        self._closed = False
        self._terminal_seen = False
        self._sub: Subscription | None = None

    @property
    def result(self) -> OptimizeResult | None:
        """The :class:`OptimizeResult` once the fit finished (None before, or if it failed)."""
        return self._worker.result

    @property
    def error(self) -> BaseException | None:
        """The exception the fit raised, if it failed."""
        return self._worker.error

    @property
    def skipped(self) -> int:
        """Iteration events this consumer's ``latest`` stream replaced before reading them."""
        return self._sub.skipped if self._sub is not None else 0

    @property
    def sink_errors(self) -> list[str]:
        """One message per sink that raised and was detached (empty when none did)."""
        runner = self._worker.runner
        return list(runner.errors) if runner is not None else []

    def stop(self) -> None:
        """Ask the solver to stop; it ends with status -2 and the best parameters so far."""
        self._worker.channel.stop_requested.set()

    async def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._sub = HUB.subscribe(Subscription(self.fit_id, self._policy))
        self._finalizer = weakref.finalize(self, _abandoned, self._worker, self._sub)
        self._worker.start()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        worker = self._worker
        with anyio.CancelScope(shield=True):
            await worker.done.wait()
            assert worker.thread is not None
            worker.thread.join()
            await worker.sinks_done.wait()
            if self._sub is not None:
                HUB.unsubscribe(self._sub)
                self._sub.close()

    async def __aenter__(self) -> FitStream:
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._terminal_seen:
            self.stop()
        await self._close()

    def __aiter__(self) -> FitStream:
        return self

    async def __anext__(self) -> Event:
        await self._start()
        if self._terminal_seen:
            await self._close()
            if self.error is not None:
                raise FitError(f"the fit failed: {describe(self.error)}") from self.error
            raise StopAsyncIteration
        assert self._sub is not None
        try:
            ev = await self._sub.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            await self._close()
            raise StopAsyncIteration from None
        except BaseException:
            # Cancelled while waiting: stop the solver and clean up before propagating.
            self.stop()
            await self._close()
            raise
        if isinstance(ev, TERMINAL):
            self._terminal_seen = True
            if isinstance(ev, FitFailed):
                with anyio.CancelScope(shield=True):
                    await self._worker.done.wait()
        return ev


def _safe_schedule(schedule: Callable[..., None], fn: Callable[[], Any]) -> None:
    try:
        schedule(fn)
    except RuntimeError:  # the consumer's loop is already closed
        pass


def fit_stream(
    f: Callable[..., Any],
    xdata: Any,
    ydata: Any,
    p0: Any = None,
    *,
    policy: Policy = "lossless",
    sinks: Sequence[Any] | None = None,
    **curve_fit_kwargs: Any,
) -> FitStream:
    """Fit like :func:`curve_fit` and stream its events.

    Arguments are validated now (errors raise here, before any thread starts); the fit starts when
    the stream is entered or first iterated. ``policy`` is this consumer's buffer policy.

    >>> import anyio, jax.numpy as jnp, numpy as np
    >>> x = np.linspace(0, 4, 50)
    >>> async def main():
    ...     model = lambda x, a, b: a * jnp.exp(-b * x)
    ...     async with fit_stream(model, x, 3.0 * np.exp(-0.5 * x), p0=[1.0, 1.0]) as stream:
    ...         kinds = [type(event).__name__ async for event in stream]
    ...     return kinds[0], kinds[-1], np.round(stream.result.popt, 6).tolist()
    >>> anyio.run(main)
    ('FitStarted', 'FitFinished', [3.0, 0.5])
    """
    from ._curve_fit import prepare_curve_fit
    from ._hub import POLICIES
    from ._pipeline import check_sinks

    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}")
    sinks_v = check_sinks(sinks)
    prep = prepare_curve_fit(f, xdata, ydata, p0, **curve_fit_kwargs)
    return FitStream(prep, policy, sinks_v)


def least_squares_stream(
    fun: Callable[..., Any],
    x0: Any,
    *,
    policy: Policy = "lossless",
    sinks: Sequence[Any] | None = None,
    **least_squares_kwargs: Any,
) -> FitStream:
    """Solve like :func:`least_squares` and stream its events (see :func:`fit_stream`)."""
    from ._hub import POLICIES
    from ._least_squares import prepare_least_squares
    from ._pipeline import check_sinks

    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}")
    sinks_v = check_sinks(sinks)
    prep = prepare_least_squares(fun, x0, **least_squares_kwargs)
    return FitStream(prep, policy, sinks_v)


class subscribe:
    """Follow every event published on the hub (all fits, and the async logger) in this loop.

    >>> import anyio
    >>> from nlsq_stream.async_logger import log_iteration_async
    >>> async def watch():
    ...     async with subscribe("async_logger") as events:
    ...         log_iteration_async(7, 0.5, 0.01, verbose=2)   # publishes one Iteration
    ...         event = await events.receive()
    ...     return event.fit_id, event.iteration, event.cost
    >>> anyio.run(watch)
    ('async_logger', 7, 0.5)
    """

    def __init__(self, fit_id: str | None = None, policy: Policy = "lossless") -> None:
        self._fit_id = fit_id
        self._policy = policy
        self._sub: Subscription | None = None

    async def __aenter__(self) -> Subscription:
        self._sub = HUB.subscribe(Subscription(self._fit_id, self._policy))
        return self._sub

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            HUB.unsubscribe(self._sub)
            self._sub.close()
