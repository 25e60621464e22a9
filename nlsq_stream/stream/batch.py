"""A batch of fits watched: aggregated events from the batched solver's chunks to the hub.

The batched solver (``solver.batch``) returns to the host between chunks anyway, to compact the
running fits; that is where a :class:`BatchJob` makes its :class:`~nlsq_stream.events.BatchProgress`
event, from numbers the host already holds (counts, the latest cost of each fit), at most one
per ``interval`` seconds, so watching a batch costs one small event per interval, never one per
fit. Per-fit :class:`~nlsq_stream.events.FitFinished` events come only when asked for. A stop
request (``stop_fit(batch_id)``, ``stream.stop()``, Ctrl-C) is seen between chunks: every fit
still running ends with status -2 and its best parameters so far.

``run_batch_sync`` is what ``curve_fit_batch(..., verbose=2)`` and ``sinks=[...]`` use; a
:class:`~nlsq_stream.stream.fit_stream.FitStream` runs the same job for ``fit_stream_batch``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._result import BatchResult, OptimizeResult
from ..events import (
    QUANTILES,
    BatchFinished,
    BatchProgress,
    BatchStarted,
    Event,
    FitFailed,
    FitFinished,
)
from ..solver import batch as solver_batch
from ..solver.curve_fit_batch import PreparedBatch
from .emitter import Channel
from .hub import Batch
from .pipeline import (
    Display,
    HubChannel,
    InlineChannel,
    _ctrl_c_stops,
    _live,
    close_watch,
    describe,
    hub_channel,
    is_inline,
    model_name,
    publish_end,
    warn_sink_errors,
    with_display,
)
from .runner import SinkRunner

PROGRESS_INTERVAL = 0.1  # seconds: at most this many BatchProgress events a second, plus the last


def new_batch_id() -> str:
    return "batch-" + uuid.uuid4().hex[:12]


class BatchJob:
    """One batch: its start event, its run (progress on the hub), its end events."""

    def __init__(
        self,
        prep: PreparedBatch,
        trials: int = solver_batch.DEFAULT_TRIALS,
        batch_size: int = solver_batch.DEFAULT_BATCH_SIZE,
        per_fit_events: bool = False,
        interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.prep = prep
        self.verbose = prep.verbose
        self.trials = trials
        self.batch_size = batch_size
        self.per_fit_events = per_fit_events
        self.interval = interval
        self._t0 = time.time()
        self._last_emit = 0.0
        self._last: tuple[solver_batch.Progress, float] | None = None  # not published yet

    def started(self, batch_id: str) -> Event:
        self._t0 = time.time()
        b = self.prep.batch
        return BatchStarted(
            batch_id,
            n_fits=b.n_fits,
            method=b.config.method,
            n_params=int(b.vectors.shape[2]),
            n_points=int(np.shape(b.data[1])[1]),
            param_names=self.prep.param_names,
            time=self._t0,
            model=model_name(b.problem),
        )

    def run(self, channel: Channel) -> BatchResult:
        """Run the batch; publish progress when ``channel`` is a hub channel (a watched batch):
        to the hub, or straight to the sinks for an ``InlineChannel``."""
        watched = channel if isinstance(channel, HubChannel) else None

        def on_chunk(p: solver_batch.Progress) -> None:
            if watched is not None:
                self._progress(watched, p)

        out = solver_batch.run(
            self.prep.batch, self.trials, self.batch_size, channel.stop_requested, on_chunk
        )
        return self.prep.result(out)

    def _progress(self, channel: HubChannel, p: solver_batch.Progress) -> None:
        """Publish where the batch stands, at most once per ``interval``; otherwise keep a copy
        of it for the end (the quantiles are computed only for what is published)."""
        now = time.time()
        snapshot = dataclasses.replace(p, costs=p.costs.copy())
        if now - self._last_emit >= self.interval and p.n_running:
            self._last_emit = now
            self._last = None
            batch_id = channel.fit_id
            channel.publish(Batch(batch_id, [self._event(batch_id, snapshot, now)]))
        else:
            self._last = (snapshot, now)  # the last one always goes out, with the end

    def _event(self, batch_id: str, p: solver_batch.Progress, now: float) -> BatchProgress:
        costs = p.costs[np.isfinite(p.costs)]
        q = np.quantile(costs, QUANTILES) if costs.size else np.full(len(QUANTILES), np.nan)
        return BatchProgress(
            batch_id,
            iteration=p.chunk,
            n_fits=p.n_fits,
            n_running=p.n_running,
            n_converged=p.n_converged,
            n_failed=p.n_failed,
            cost_quantiles=q,
            nfev=p.nfev,
            elapsed=now - self._t0,
            time=now,
        )

    def publish_end(self, batch_id: str, result: Any, error: BaseException | None) -> None:
        tail: list[Event] = [] if self._last is None else [self._event(batch_id, *self._last)]
        now = time.time()
        if isinstance(result, BatchResult) and error is None:
            if self.per_fit_events:
                tail.extend(_fit_events(batch_id, result, now))
            counts = {str(k): v for k, v in result.counts().items()}
            tail.append(BatchFinished(batch_id, len(result), counts, now - self._t0, now))
        else:
            tail.append(FitFailed(batch_id, type(error).__name__, describe(error), now))
        publish_end(batch_id, tail)


def _fit_events(batch_id: str, result: BatchResult, now: float) -> list[Event]:
    """One FitFinished per fit (``fit_id`` ``"<batch_id>/<i>"``): only when asked for."""
    events: list[Event] = []
    for i in range(len(result)):
        status = int(result.status[i])
        summary = OptimizeResult(
            x=result.popt[i],
            cost=float(result.cost[i]),
            nfev=int(result.nfev[i]),
            nit=int(result.nit[i]),
            status=status,
            message=result.message(i),
            success=status > 0,
        )
        events.append(FitFinished(f"{batch_id}/{i}", summary, now))
    return events


def run_batch_sync(
    job: BatchJob, sinks: Sequence[Any] = (), display: Display | None = None
) -> BatchResult:
    """The sync face of a batch: silent when not watched; else, when every sink can run in the
    caller's thread (console, JSON lines, logging), an ``InlineChannel`` hands them the events
    between chunks, with no thread or event loop; else the events go through the hub to the
    sinks in the shared sink loop. The call returns once the sinks have every event."""
    if not sinks and not job.verbose:
        return job.run(Channel())
    batch_id = new_batch_id()
    watchers = with_display(sinks, job.verbose, display)
    runners: list[SinkRunner] = []
    if all(is_inline(s) for s in watchers):
        channel: HubChannel = _live(InlineChannel(batch_id, watchers))
    else:
        channel = hub_channel(batch_id)
        runners.append(SinkRunner(watchers, batch_id))
        runners[0].__enter__()
    res: BatchResult | None = None
    error: BaseException | None = None
    try:
        channel.publish(Batch(batch_id, [job.started(batch_id)]))
        try:
            with _ctrl_c_stops(channel):
                res = job.run(channel)
        except BaseException as e:
            error = e
        job.publish_end(batch_id, res, error)
        for runner in runners:
            runner.wait()
    finally:
        close_watch(channel, runners)
    warn_sink_errors(channel, runners)
    if error is not None:
        raise error
    if channel.keyboard_interrupt is not None:
        raise channel.keyboard_interrupt
    assert res is not None
    return res
