"""``bench emit`` (latency), ``bench stop`` and ``bench slow``: a live consumer's view of a fit."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

import anyio
import numpy as np

from ..events import FitFinished, Iteration
from ..faces.streaming import fit_stream
from ..faces.sync import least_squares
from .common import (
    LATENCY_TARGET_S,
    BenchOptions,
    _ms,
    _say,
    _timed,
    _verdict,
    slow_data,
    slow_kwargs,
    slow_model,
)

_SLOW_COST: list[float] = []  # (points, seconds per iteration) of the slow fit at two sizes


def _slow_residual(a: Any, x: Any) -> Any:
    return slow_model(x, a[0])


def slow_points(seconds_per_iteration: float) -> int:
    """How many points make one iteration of the slow fit take about this long.

    Measured once per process at two sizes and interpolated as a power law (the time per point
    grows once the data outgrow the caches).
    """

    if not _SLOW_COST:
        iters = 10
        kw = slow_kwargs(iters)
        del kw["p0"]
        for m in (200_000, 2_000_000):
            x, _ = slow_data(m)

            def fit(x: np.ndarray = x) -> Any:
                return least_squares(_slow_residual, [1.0], args=(x,), **kw)

            fit()  # compile
            _SLOW_COST.extend((m, min(_timed(fit) for _ in range(2)) / iters))
    m1, t1, m2, t2 = _SLOW_COST
    slope = math.log(t2 / t1) / math.log(m2 / m1) if t2 > t1 > 0 else 1.0
    points = m1 * (seconds_per_iteration / t1) ** (1.0 / slope)
    digits = 10 ** max(int(math.log10(points)) - 1, 0)
    return min(max(round(points / digits) * digits, 100), 20_000_000)


async def _consume(stream: Any, on_event: Callable[[Any, float], None] | None = None) -> list[Any]:
    """Receive every event of ``stream`` as ``(event, time received)`` pairs."""
    out: list[Any] = []
    async with stream:
        async for ev in stream:
            now = time.time()
            out.append((ev, now))
            if on_event is not None:
                on_event(ev, now)
    return out


def _iteration_time(its: list[tuple[Any, float]]) -> float:
    """Seconds per iteration from the hub's receive times of the first and last batches."""
    first, last = its[0][0], its[-1][0]
    span = last.iteration - first.iteration
    return (last.time - first.time) / span if span > 0 and last.time > first.time else math.nan


def _latency_run(
    x: np.ndarray, y: np.ndarray, iters: int
) -> tuple[list[float], list[float], float, int]:
    """One streamed fit: per-event (hub, end) latencies, time per iteration, batch count."""

    events = anyio.run(_consume, fit_stream(slow_model, x, y, **slow_kwargs(iters)))
    its = [(ev, t) for ev, t in events if isinstance(ev, Iteration)]
    t_iter = _iteration_time(its)
    batches: dict[float, list[tuple[Any, float]]] = {}
    for ev, t in its:  # the events of one batch share the hub's receive time
        batches.setdefault(ev.time, []).append((ev, t))
    hub: list[float] = []
    end: list[float] = []
    for batch in batches.values():
        last = batch[-1][0].iteration
        for ev, t in batch:
            hub.append(t - ev.time)
            later = (last - ev.iteration) * t_iter if math.isfinite(t_iter) else 0.0
            end.append(t - (ev.time - later))
    return hub, end, t_iter, len(batches)


def bench_emit_latency(opts: BenchOptions) -> None:
    """How late a fit_stream consumer in an asyncio loop sees each Iteration event."""

    _say(opts, "== emit: live consumer latency (fit_stream in an anyio/asyncio loop)")
    _say(opts, "   fit: y = x*a^4 to zeros, method='trf', one Iteration event per iteration")
    _say(opts, "   hub: receive - event.time (when the host got the batch); end: receive - the")
    _say(
        opts, "   iteration's estimated end (event.time less the iterations after it in its batch)"
    )
    _say(
        opts,
        f"   {'target':>7} {'points':>9} {'ms/iter':>8} {'iters':>6} {'batches':>8} "
        f"{'hub med':>8} {'hub max':>8} {'end med':>8} {'end max':>8}",
    )
    worst = 0.0
    for target, full_iters, quick_iters in ((0.001, 200, 120), (0.010, 60, 30), (0.040, 25, 12)):
        iters = quick_iters if opts.quick else full_iters
        m = slow_points(target)
        x, y = slow_data(m)
        anyio.run(_consume, fit_stream(slow_model, x, y, **slow_kwargs(3)))  # compile
        runs = [_latency_run(x, y, iters) for _ in range(opts.reps(2, 1))]
        hub = [v for r in runs for v in r[0]]
        end = [v for r in runs for v in r[1]]
        per_iter = statistics.median(r[2] for r in runs)
        worst = max(worst, max(end))
        _say(
            opts,
            f"   {target * 1e3:>5.0f}ms {m:>9} {per_iter * 1e3:>8.2f} {iters:>6} "
            f"{sum(r[3] for r in runs):>8} {_ms(statistics.median(hub)):>8} {_ms(max(hub)):>8} "
            f"{_ms(statistics.median(end)):>8} {_ms(max(end)):>8}",
        )
    _say(
        opts,
        f"   target: latency (end max) <= {LATENCY_TARGET_S * 1e3:.0f} ms: "
        f"{worst * 1e3:.1f} ms  {_verdict(worst <= LATENCY_TARGET_S)}",
    )


# -- stop ------------------------------------------------------------------------------------------


def _stop_once(x: np.ndarray, y: np.ndarray, after: int) -> tuple[float, float, bool] | None:
    """One long fit stopped after ``after`` iterations: (latency, time per iteration, stopped)."""

    stream = fit_stream(slow_model, x, y, **slow_kwargs(250))
    stop_at: list[float] = []

    def on_event(ev: Any, now: float) -> None:
        if isinstance(ev, Iteration) and ev.iteration >= after and not stop_at:
            stop_at.append(time.time())
            stream.stop()

    events = anyio.run(_consume, stream, on_event)
    its = [(ev, t) for ev, t in events if isinstance(ev, Iteration) and ev.iteration <= after]
    fin = [(ev, t) for ev, t in events if isinstance(ev, FitFinished)]
    if not stop_at or not fin:
        return None
    return fin[0][1] - stop_at[0], _iteration_time(its), fin[0][0].stopped


def bench_stop(opts: BenchOptions) -> None:
    """Time from ``stream.stop()`` to the FitFinished event, less one iteration."""

    after = 20
    _say(
        opts, f"== stop: stream.stop() after {after} iterations of a long fit (y = x*a^4 to zeros)"
    )
    _say(opts, "   latency = FitFinished received - stop() called; 'net' subtracts one iteration")
    _say(
        opts,
        f"   {'target':>7} {'points':>9} {'ms/iter':>8} {'runs':>5} {'latency med':>12} "
        f"{'max':>8} {'net max':>8} {'stopped':>8}",
    )
    worst = -math.inf
    for target in (0.003, 0.020):
        m = slow_points(target)
        x, y = slow_data(m)
        anyio.run(_consume, fit_stream(slow_model, x, y, **slow_kwargs(3)))  # compile
        runs = [r for r in (_stop_once(x, y, after) for _ in range(opts.reps(5, 2))) if r]
        if not runs:
            _say(opts, f"   {target * 1e3:>5.0f}ms {m:>9}  the fit ended before stop() was called")
            continue
        lat = [r[0] for r in runs]
        timed = [r[1] for r in runs if not math.isnan(r[1])]  # nan: iterations in one batch
        per_iter = statistics.median(timed) if timed else math.nan
        # Less one iteration; where no run could time its iterations, nothing is subtracted.
        one = [per_iter if math.isnan(r[1]) else r[1] for r in runs]
        net = max(r[0] - (0.0 if math.isnan(t) else t) for r, t in zip(runs, one, strict=True))
        worst = max(worst, net)
        _say(
            opts,
            f"   {target * 1e3:>5.0f}ms {m:>9} {per_iter * 1e3:>8.2f} {len(runs):>5} "
            f"{_ms(statistics.median(lat)):>12} {_ms(max(lat)):>8} {_ms(net):>8} "
            f"{'yes' if all(r[2] for r in runs) else 'NO':>8}",
        )
    if worst > -math.inf:
        _say(
            opts,
            f"   target: stop latency less one iteration <= {LATENCY_TARGET_S * 1e3:.0f} ms: "
            f"{worst * 1e3:.1f} ms  {_verdict(worst <= LATENCY_TARGET_S)}",
        )


# -- slow consumers --------------------------------------------------------------------------------

SLOW_CONSUMER_S = 0.05  # each slow subscriber awaits this long per event
SLOW_CONSUMER_LIMIT = 1.05


class _SlowSink:
    """A sink that awaits ``SLOW_CONSUMER_S`` per event and counts what it saw."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.iterations: list[int] = []
        self.terminal = 0

    async def send(self, event: Any) -> None:
        if isinstance(event, Iteration):
            self.iterations.append(event.iteration)
        elif isinstance(event, FitFinished):
            self.terminal += 1
        await anyio.sleep(SLOW_CONSUMER_S)


async def _timed_stream(
    x: np.ndarray, y: np.ndarray, iters: int, slow: str | None
) -> tuple[float, Any, list[_SlowSink]]:
    """One streamed fit; returns (fit time, the stream, its slow sinks).

    The fit time runs from entering the stream to the solver's FitFinished (its publish time), so
    it measures the solver, not how long the slow watchers take to catch up. ``slow``: None (one
    fast consumer), ``"latest"`` (the consumer itself awaits 50 ms per event on a latest stream,
    and so does a latest sink) or ``"lossless"`` (a lossless sink awaiting 50 ms per event).
    """

    sinks = [] if slow is None else [_SlowSink(slow)]
    policy: Literal["latest", "lossless"] = "latest" if slow == "latest" else "lossless"
    stream = fit_stream(slow_model, x, y, policy=policy, sinks=sinks, **slow_kwargs(iters))
    t0 = time.time()
    finished = math.nan
    async with stream:
        async for ev in stream:
            if isinstance(ev, FitFinished):
                finished = ev.time
            if slow == "latest":
                await anyio.sleep(SLOW_CONSUMER_S)
    return finished - t0, stream, sinks


def bench_slow_consumer(opts: BenchOptions) -> None:
    """Warm fit time with subscribers that await 50 ms per event over that with a fast one."""

    iters = 60 if opts.quick else 120
    target = 0.004  # seconds per iteration: a fit of a few hundred ms, far faster than 50 ms/event
    m = slow_points(target)
    x, y = slow_data(m)
    _say(
        opts,
        f"== slow consumers: subscribers awaiting {SLOW_CONSUMER_S * 1e3:.0f} ms per event, "
        f"fit_stream of {iters} iterations ({m} points, ~{target * 1e3:.0f} ms/iteration)",
    )
    _say(opts, "   fit time = entering the stream -> the solver's FitFinished; runs alternated")
    anyio.run(_timed_stream, x, y, 3, None)  # compile
    reps = opts.reps(7, 3)
    fast: list[float] = []
    slow: list[float] = []
    skipped: list[int] = []
    for _ in range(reps):
        fast.append(anyio.run(_timed_stream, x, y, iters, None)[0])
        t, stream, _ = anyio.run(_timed_stream, x, y, iters, "latest")
        slow.append(t)
        skipped.append(stream.skipped)
    t_lossless, stream, (sink,) = anyio.run(_timed_stream, x, y, iters, "lossless")
    complete = sink.iterations == list(range(stream.result.nit + 1)) and sink.terminal == 1
    ratio = statistics.median(slow) / statistics.median(fast)
    _say(opts, f"   {'consumer':<34} {'fit ms (median)':>16} {'runs':>5}")
    _say(opts, f"   {'one fast consumer':<34} {_ms(statistics.median(fast)):>16} {reps:>5}")
    _say(
        opts,
        f"   {'latest consumer + latest sink, slow':<34} {_ms(statistics.median(slow)):>16} "
        f"{reps:>5}   consumer skipped {min(skipped)}-{max(skipped)} of {iters + 1} iterations",
    )
    _say(
        opts,
        f"   {'lossless sink, slow':<34} {_ms(t_lossless):>16} {1:>5}   received "
        f"{len(sink.iterations)} of {stream.result.nit + 1} iterations "
        f"{'(all, in order)' if complete else '(NOT all)'}",
    )
    _say(
        opts,
        f"   target: slow / fast <= {SLOW_CONSUMER_LIMIT}: {ratio:.3f}x  "
        f"{_verdict(ratio <= SLOW_CONSUMER_LIMIT and complete and min(skipped) > 0)}",
    )


# -- entry -----------------------------------------------------------------------------------------
