"""``bench emit``: what watching a fit costs (``verbose=2`` against 0), and its floor."""

from __future__ import annotations

import os
import statistics
import time
from typing import IO, Any

import numpy as np

from .._result import OptimizeResult
from ..events import EventBatch, FitFinished
from ..faces.sync import curve_fit
from ..sinks import ConsoleSink
from ..solver import engine
from ..solver.curve_fit import prepare_curve_fit
from ..stream.emitter import K_TRIALS_MAX, Emitter
from ..stream.pipeline import started_event
from .common import (
    P0,
    BenchOptions,
    _ms,
    _say,
    _size,
    _verdict,
    exp_data,
    exp_model,
    interleaved,
    ratio_interval,
    warm_up,
)


def _floor_fit(model: Any, x: np.ndarray, y: np.ndarray, devnull: IO[str], watched: bool) -> Any:
    """A fit cut down to what watching it cannot avoid: the same validation and one program (the
    silent one, or the watched one as a single chunk); with ``watched`` also its start and end
    events and the console table, written in the caller as the inline path does: the start and
    the header while the device runs, the rows and the end once they are back (two
    ``ConsoleSink.write_batch`` calls). No result object or channel: the difference of a
    watched and an unwatched call is the least that this emitter and this table add, whatever
    carries the events."""
    prep = prepare_curve_fit(model, x, y, p0=P0)
    prep.config_kw["fun_jac"] = False
    config = prep.config(emitter=Emitter(2) if watched else None)
    vectors, scalars, data = prep.inputs()
    n = prep.x0.size
    if not watched:
        out = engine.solve(prep.problem, config, vectors, scalars, data)
        return engine.unpack(engine.fetch(out.packed), n)
    k = np.int32(K_TRIALS_MAX)
    _, packed = engine.first_chunk(prep.problem, config, vectors, scalars, data, k)
    # While the device runs: the start event and the table's header, as the inline path does.
    sink = ConsoleSink(file=devnull)
    sink.write_batch(EventBatch("bench", [started_event(prep, "bench")]))
    v, rows, _, _ = engine.unpack_chunk(engine.fetch(packed), n)
    if v["status"] == engine.RUNNING:
        raise RuntimeError("the benchmark's fit did not end within one chunk")
    summary = OptimizeResult({key: v[key] for key in ("x", "cost", "nfev", "optimality")})
    tail = [FitFinished("bench", summary, time.time())]
    sink.write_batch(EventBatch("bench", [], np.asarray(rows, np.float64), time.time(), tail))
    return v


def _emit_size(n: int, reps: int, devnull: IO[str]) -> tuple[list[float], ...]:
    """Alternated warm timings at one size: curve_fit with verbose=0 against curve_fit with
    verbose=2, and (in rounds of their own) ``_floor_fit`` unwatched against watched."""
    x, y = exp_data(n)
    model = exp_model()

    def quiet() -> Any:
        return curve_fit(model, x, y, p0=P0)

    def watched() -> Any:
        return curve_fit(model, x, y, p0=P0, verbose=2, sinks=[ConsoleSink(file=devnull)])

    def floor_quiet() -> Any:
        return _floor_fit(model, x, y, devnull, watched=False)

    def floor_watched() -> Any:
        return _floor_fit(model, x, y, devnull, watched=True)

    warm_up([quiet, watched, floor_quiet, floor_watched])  # compiles each, then warms up
    t0, t2 = interleaved([quiet, watched], reps, shuffle=False)
    f0, f2 = interleaved([floor_quiet, floor_watched], reps, shuffle=False)
    return t0, t2, f0, f2


def bench_emit_overhead(opts: BenchOptions) -> None:
    """Warm curve_fit time with verbose=2 (console sink to os.devnull) over verbose=0."""
    _say(
        opts, "== emit: warm curve_fit(verbose=2, ConsoleSink to os.devnull) / curve_fit(verbose=0)"
    )
    _say(opts, "   same exp decay, default method (lm), runs alternated; medians in ms")
    _say(
        opts,
        f"   {'n':>8} {'verbose=0':>10} {'verbose=2':>10} {'ratio':>7} {'added':>9} "
        f"{'paired':>7} {'floor':>9} {'reps':>5}",
    )
    results: dict[int, tuple[float, float]] = {}
    floors: dict[int, tuple[float, float]] = {}  # n: (floor, verbose=0 median)
    intervals: dict[int, tuple[float, float]] = {}
    with open(os.devnull, "w") as devnull:
        for n in opts.problem_sizes():
            # At 1e6 the run-to-run noise (+-2 ms here) is several times the 1 % target: 7 pairs
            # gave ratios from 0.91 to 1.07, 21 pairs from 0.95 to 1.12 (three runs, every
            # watched fit one chunk); 41 pairs cost ~5 s.
            reps = opts.reps(*{1_000: (200, 60), 100_000: (100, 8)}.get(n, (41, 3)))
            t0, t2, f0, f2 = _emit_size(n, reps, devnull)
            ratio = statistics.median(t2) / statistics.median(t0)
            added = statistics.median(b - a for a, b in zip(t0, t2, strict=True))
            floor = statistics.median(b - a for a, b in zip(f0, f2, strict=True))
            results[n] = (ratio, added)
            floors[n] = (floor, statistics.median(t0))
            intervals[n] = ratio_interval(t0, t2)
            _say(
                opts,
                f"   {_size(n):>8} {_ms(statistics.median(t0)):>10} "
                f"{_ms(statistics.median(t2)):>10} {ratio:>6.3f}x {added * 1e3:>+7.3f}ms "
                f"{1 + added / statistics.median(t0):>6.3f}x {floor * 1e3:>+7.3f}ms {reps:>5}",
            )
    _say(
        opts,
        "   'added' is the median of paired differences; 'paired' = 1 + added / verbose=0 is the",
    )
    _say(opts, "   ratio estimated from them (steadier under drifting load). 'floor' is the least")
    _say(opts, "   that watching can add with this emitter, whatever carries the events: a fit cut")
    _say(opts, "   down to its program, watched (one chunk; its start and the table's header")
    _say(opts, "   written while it runs, its rows and end after) against silent; the rest of")
    _say(opts, "   'added' is the channel's and the face's (curve_fit's sinks run inline here).")
    _say(opts, "   Targets use 'ratio', with its 95 % bootstrap interval (pairs resampled):")
    if 1_000 in results:
        added = results[1_000][1]
        _say(opts, f"   n=1e3: added < 0.3 ms: {added * 1e3:+.3f} ms  {_verdict(added < 3e-4)}")
    if 100_000 in results:
        ratio, (lo, hi) = results[100_000][0], intervals[100_000]
        ok = ratio <= 1.03 and hi <= 1.05
        _say(
            opts,
            f"   n=1e5: ratio <= 1.03, its interval's upper end <= 1.05: {ratio:.3f}x "
            f"({lo:.3f}-{hi:.3f})  {_verdict(ok)}",
        )
        floor, quiet = floors[100_000]
        budget = 0.03 * quiet
        _say(
            opts,
            f"   n=1e5: the floor {floor * 1e3:+.3f} ms against the target's budget "
            f"{budget * 1e3:+.3f} ms (3 % of verbose=0): the floor is "
            f"{floor / budget:.0%} of it",
        )
    if 1_000_000 in results:
        ratio, (lo, hi) = results[1_000_000][0], intervals[1_000_000]
        _say(
            opts,
            f"   n=1e6: within noise (the interval holds 1.00): {ratio:.3f}x ({lo:.3f}-{hi:.3f})  "
            f"{_verdict(lo <= 1.0 <= hi)}; ratio <= 1.01: {_verdict(ratio <= 1.01)}",
        )
