"""``bench batch`` (watching): what watching a batch costs, and how fast a stop ends it.

* Watching: ``curve_fit_batch`` silent against the same call with a console progress line
  (to ``os.devnull``) and a JSON-lines log, interleaved; target: at most 1 % more time.
* Stop: a batch that would run for seconds (``gtol`` off, ``ftol = xtol = 1e-15``) is stopped
  from ``fit_stream_batch`` after its first progress event; the time from ``stream.stop()`` to
  ``BatchFinished`` is compared with 100 ms plus one iteration of the batch (one chunk of one
  trial, timed on the same data).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from typing import Any

import anyio
import numpy as np

from ..events import BatchFinished, BatchProgress
from ..faces.batch import curve_fit_batch, fit_stream_batch
from ..sinks import ConsoleSink, JsonlSink
from ..solver import batch as solver_batch
from ..solver.curve_fit_batch import prepare_curve_fit_batch
from .common import BenchOptions, _say, _verdict, interleaved, ratio_interval, warm_up

WATCH_N = 10_000
WATCH_TARGET = 1.01
STOP_BUDGET_S = 0.1
LONG: dict[str, Any] = dict(ftol=1e-15, xtol=1e-15, gtol=None, max_nfev=100_000)


def bench_batch_watch(opts: BenchOptions, model: Any, data: Any) -> None:
    """Both lines, float64, at N = 1e4 (1e3 with --quick)."""
    x, y, _ = data(1_000 if opts.quick else WATCH_N)
    p0 = np.array([2.0, 0.0, 1.0, 0.0])
    _say(opts, f"-- watching and stopping a batch (float64, N={y.shape[0]:,})")
    with open(os.devnull, "w") as devnull, tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "batch.jsonl")

        def silent() -> Any:
            return curve_fit_batch(model, x, y, p0=p0)

        def watched() -> Any:
            sinks = [ConsoleSink(devnull), JsonlSink(log, mode="w")]
            return curve_fit_batch(model, x, y, p0=p0, sinks=sinks)

        warm_up([silent, watched], seconds=1.0)
        rounds = 5 if opts.quick else 15
        base, other = interleaved([silent, watched], rounds)
    ratio = statistics.median(other) / statistics.median(base)
    lo, hi = ratio_interval(base, other)
    _say(
        opts,
        f"   watching (progress line + JSONL) / silent: x{ratio:.3f} ({lo:.3f}-{hi:.3f}), "
        f"{statistics.median(base) * 1e3:.0f} ms silent, {rounds} pairs; target <= "
        f"{WATCH_TARGET}  {_verdict(ratio <= WATCH_TARGET)}",
    )
    _stop_line(opts, model, x, y, p0)


def _one_iteration_s(model: Any, x: np.ndarray, y: np.ndarray, p0: np.ndarray) -> float:
    """The median time of one chunk of one trial of the whole batch (after compiling)."""
    prep = prepare_curve_fit_batch(model, x, y, p0, **LONG)
    marks: list[float] = []
    stop_after = 8

    def on_chunk(p: solver_batch.Progress) -> None:
        marks.append(time.perf_counter())
        if len(marks) >= stop_after:
            flag.set()

    flag = threading.Event()
    solver_batch.run(prep.batch, trials=1, stop=flag, on_chunk=on_chunk)
    return float(np.median(np.diff(marks[1:])))


def _stop_line(
    opts: BenchOptions, model: Any, x: np.ndarray, y: np.ndarray, p0: np.ndarray
) -> None:
    iteration = _one_iteration_s(model, x, y, p0)
    anyio.run(_stop_once, model, x, y, p0)  # warm-up: every program a stop path runs is compiled
    latencies = [anyio.run(_stop_once, model, x, y, p0) for _ in range(3)]
    worst = max(latencies)
    budget = STOP_BUDGET_S + iteration
    _say(
        opts,
        f"   stop -> BatchFinished: {', '.join(f'{t * 1e3:.0f}' for t in latencies)} ms "
        f"(one iteration of the batch {iteration * 1e3:.0f} ms); target <= 100 ms + one "
        f"iteration = {budget * 1e3:.0f} ms  {_verdict(worst <= budget)}",
    )


async def _stop_once(model: Any, x: np.ndarray, y: np.ndarray, p0: np.ndarray) -> float:
    asked = 0.0
    async with fit_stream_batch(model, x, y, p0=p0, **LONG) as stream:
        async for ev in stream:
            if isinstance(ev, BatchProgress) and not asked:
                asked = time.perf_counter()
                stream.stop()
            elif isinstance(ev, BatchFinished):
                return time.perf_counter() - asked
    raise RuntimeError("the batch ended without BatchFinished")
