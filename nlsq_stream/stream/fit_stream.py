"""``FitStream``: a fit watched from async code, read with ``async for``; and ``subscribe``.

A fit watched from async code runs its solver in a worker thread. The consumer reads its own
memory object stream (``async for event in stream``), and sinks run in the shared sink loop
(:class:`~.runner.SinkRunner`), each reading its own stream, so neither a slow consumer nor a
slow sink can slow the solver or each other. The public ``fit_stream`` and
``least_squares_stream`` (in ``faces``) validate the arguments and return a :class:`FitStream`.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from .._exceptions import FitError, SinkError
from .._result import OptimizeResult
from ..events import TERMINAL, Event, FitFailed
from ..solver.fit import PreparedFit
from .hub import HUB, Batch, Policy, Subscription, _scheduler
from .pipeline import (
    Display,
    HubChannel,
    describe,
    execute,
    hub_channel,
    new_fit_id,
    publish_terminal,
    started_event,
    with_display,
)
from .runner import SinkRunner


class Job(Protocol):
    """What a :class:`FitStream` runs: one fit (:class:`FitJob`) or a batch (``batch.BatchJob``)."""

    verbose: int

    def started(self, fit_id: str) -> Event: ...

    def run(self, channel: HubChannel) -> Any: ...

    def publish_end(self, fit_id: str, result: Any, error: BaseException | None) -> None: ...


class FitJob:
    """One fit: its start event, its watched run, its terminal event."""

    def __init__(self, prep: PreparedFit) -> None:
        self.prep = prep
        self.verbose = prep.verbose

    def started(self, fit_id: str) -> Event:
        return started_event(self.prep, fit_id)

    def run(self, channel: HubChannel) -> OptimizeResult:
        return execute(self.prep, self.prep.verbose or 2, channel)

    def publish_end(self, fit_id: str, result: Any, error: BaseException | None) -> None:
        publish_terminal(fit_id, result, error)


class _Worker:
    """The running side of a :class:`FitStream`: its solver thread, channel and sinks.

    The thread refers to this object only, never to the stream, so a stream that its consumer
    dropped (a plain ``async for`` left by a cancellation) can be garbage-collected, and its
    finalizer stops the fit.
    """

    def __init__(self, job: Job, fit_id: str, sinks: Sequence[Any]) -> None:
        self.job = job
        self.fit_id = fit_id
        self.sinks = sinks
        self.channel = hub_channel(fit_id)
        self.result: Any = None
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
        HUB.publish(Batch(self.fit_id, [self.job.started(self.fit_id)]))
        self.thread = threading.Thread(
            target=self.run, args=(schedule,), name=f"nlsq_stream-{self.fit_id}", daemon=True
        )
        self.thread.start()

    def run(self, schedule: Callable[..., None]) -> None:
        res = None
        try:
            res = self.job.run(self.channel)
            self.result = res
        except BaseException as e:
            self.error = e
        finally:
            self.job.publish_end(self.fit_id, res, self.error)
            # Sinks finish on their own after the terminal event; closing their loop here means
            # nothing waits for the consumer (who may have broken out of a plain ``async for``).
            if self.runner is not None:
                self.runner.wait()
                self.runner.__exit__(None, None, None)
                if isinstance(res, OptimizeResult):
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

    A sink that raises is detached (the fit and the other sinks go on) and listed in
    ``sink_errors``; when the stream closes (the ``async with`` block ends, or ``async for``
    passes the terminal event) each failure is also issued as a :class:`SinkError` warning, as
    ``curve_fit(..., sinks=[...])`` does, in the consumer's task, so the caller's warning filters
    (``pytest.warns``, ``warnings.catch_warnings``) apply. A stream dropped without being closed
    issues none.
    """

    def __init__(
        self,
        prep: PreparedFit | Job,
        policy: Policy,
        sinks: Sequence[Any],
        display: Display | None = None,
        fit_id: str | None = None,
    ) -> None:
        job = FitJob(prep) if isinstance(prep, PreparedFit) else prep
        self.fit_id = fit_id or new_fit_id()
        self._policy = policy
        self._worker = _Worker(job, self.fit_id, with_display(sinks, job.verbose, display))
        self._started = False
        self._closed = False
        self._terminal_seen = False
        self._sub: Subscription | None = None

    @property
    def result(self) -> Any:
        """The :class:`OptimizeResult` once the fit finished (a ``BatchResult`` for a batch;
        None before, or if it failed)."""
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
        self._warn_sink_errors()

    def _warn_sink_errors(self) -> None:
        """One SinkError warning per failure, pointing at the consumer's ``async with`` or ``async
        for`` (this frame, ``_close``, then ``__aexit__`` or ``__anext__``, then the caller)."""
        for failure in self.sink_errors:
            warnings.warn(failure, SinkError, stacklevel=4)

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
        if isinstance(ev, TERMINAL) and ev.fit_id == self.fit_id:
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
