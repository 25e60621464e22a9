"""``nlsq-stream bench``: ratios measured side by side in one process.

Everything compared runs in the same process, interleaved in a shuffled order round by round, after
a warm-up, and the figures are medians, so that a noisy machine slows both sides of a ratio alike.

* ``solver``: ``y = a exp(-b x) + c`` from ``p0 = [1, 1, 0]`` against ``scipy.optimize.curve_fit``.
* ``emit``: the cost of watching a fit (``verbose=2`` into a console sink writing to
  ``os.devnull``, against ``verbose=0``), and how late a live ``fit_stream`` consumer sees each
  iteration.
* ``stop``: how long ``stream.stop()`` takes to end a running fit.

Latency and stop use a fit that runs as long as asked: ``y = x a^4`` fitted to zeros. Its Jacobian
vanishes at the solution, so Gauss-Newton converges only linearly (``a`` shrinks by a quarter per
iteration) and with ``gtol`` off the fit runs to ``max_nfev``; the number of points sets the time
per iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, Literal

import numpy as np

SIZES = (1_000, 100_000, 1_000_000)
P0 = (1.0, 1.0, 0.0)
TRUE = (2.5, 1.3, 0.5)
SEED = 1234
LATENCY_TARGET_S = 0.1
WARM_UP_S = 1.0  # solver and emit benchmarks: warm-up before timing, per size (``warm_up``)


@dataclasses.dataclass
class BenchOptions:
    """Command-line options of ``nlsq-stream bench``."""

    quick: bool = False
    repeats: int | None = None  # overrides every tuned repeat count
    sizes: tuple[int, ...] | None = None  # solver and emit sizes
    out: IO[str] = dataclasses.field(default_factory=lambda: sys.stdout)

    def reps(self, full: int, quick: int) -> int:
        if self.repeats is not None:
            return self.repeats
        return quick if self.quick else full

    def problem_sizes(self) -> tuple[int, ...]:
        return self.sizes if self.sizes is not None else SIZES


# -- helpers ---------------------------------------------------------------------------------------


def exp_model() -> Callable[..., Any]:
    """A new ``a exp(-b x) + c`` function object each call: its first fit always compiles."""
    import jax.numpy as jnp

    def model(x: Any, a: Any, b: Any, c: Any) -> Any:
        return a * jnp.exp(-b * x) + c

    return model


def exp_model_np(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """The same model in numpy, for scipy."""
    return a * np.exp(-b * x) + c


def exp_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``x = linspace(0, 5, n)`` and noisy exponential-decay data, float64, fixed seed."""
    x = np.linspace(0.0, 5.0, n)
    rng = np.random.default_rng(SEED)
    a, b, c = TRUE
    return x, a * np.exp(-b * x) + c + 0.05 * rng.standard_normal(n)


def slow_model(x: Any, a: Any) -> Any:
    """``x a^4``: fitted to zeros, each Gauss-Newton step only takes ``a`` to ``3a/4``."""
    return x * a**4


def slow_kwargs(iterations: int) -> dict[str, Any]:
    """curve_fit options that make ``slow_model`` run exactly ``iterations`` iterations."""
    return dict(p0=[1.0], method="trf", ftol=1e-15, xtol=1e-15, gtol=None, max_nfev=iterations + 1)


def slow_data(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(0.5, 1.5, m), np.zeros(m)


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@contextlib.contextmanager
def count_compiles() -> Iterator[list[float]]:
    """Collect the durations of XLA backend compilations that happen inside the block."""
    import jax

    seen: list[float] = []

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if "backend_compile" in event:
            seen.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def warm_up(fns: Sequence[Callable[[], Any]], seconds: float = WARM_UP_S) -> None:
    """Call every function in turn, at least once, until ``seconds`` have passed.

    A second, not one call each: in a fresh process our 1e3 fits ran ~10 % slower for up to a
    second after the first calls (one process in six measured 1.02, then 0.90, against scipy's
    lm), and the benchmarks time 1e3 first.
    """
    deadline = time.perf_counter() + seconds
    while True:
        for fn in fns:
            fn()
        if time.perf_counter() > deadline:
            return


def interleaved(
    fns: Sequence[Callable[[], Any]], rounds: int, settle: float = 0.0, shuffle: bool = True
) -> list[list[float]]:
    """Time each function ``rounds`` times, all of them every round.

    The order is a new (seeded) random one every round, or with ``shuffle=False`` alternately
    forwards and backwards (A B, B A, ...). With ``settle``, every call longer than 5 ms is
    followed by an untimed pause of that many seconds: OpenBLAS (under scipy) leaves its worker
    threads spinning for a while after a call, and on a small machine they would slow whichever
    function runs next.
    """
    rng = random.Random(0)
    k = len(fns)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = rng.sample(range(k), k) if shuffle else list(range(k))[:: 1 if r % 2 == 0 else -1]
        for i in order:
            t = _timed(fns[i])
            times[i].append(t)
            if settle and t > 0.005:
                time.sleep(settle)
    return times


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def _size(n: int) -> str:
    e = math.log10(n)
    return f"1e{int(e)}" if e.is_integer() else str(n)


def _say(opts: BenchOptions, line: str = "") -> None:
    print(line, file=opts.out, flush=True)


# -- solver ----------------------------------------------------------------------------------------


def _solver_size(n: int, reps: Callable[[int], int], scipy_fit: Any) -> dict[str, Any]:
    """First-call and warm medians at one size: ours lm and trf, then scipy's lm and trf.

    Each method is timed interleaved with its counterpart (ours lm with scipy's lm, ours trf with
    scipy's trf), not all four in one rotation. What runs just before a call changes its time: a
    1e3 fit of ours right after ~1 ms of other work (scipy's trf at 1e3) takes ~15 % longer
    than back to back, most likely because XLA's worker thread, which runs the program, has
    parked (``_gap_sensitivity`` measures it: 0.22-0.24 ms back to back, 0.26-0.27 ms after 1 ms
    of busy Python, 0.34-0.36 ms after a 1 ms sleep). At 1e3 the four-way rotation is run as
    well and printed beside it (``rotation4``).
    """
    from . import curve_fit

    x, y = exp_data(n)
    model = exp_model()  # a fresh function: this really is the first call for it
    with count_compiles() as compiles:
        first = _timed(lambda: curve_fit(model, x, y, p0=P0))
    first_trf = _timed(lambda: curve_fit(model, x, y, p0=P0, method="trf"))
    ours_lm: Callable[[], Any] = lambda: curve_fit(model, x, y, p0=P0)
    ours_trf: Callable[[], Any] = lambda: curve_fit(model, x, y, p0=P0, method="trf")
    lm_pair, trf_pair = [ours_lm], [ours_trf]
    if scipy_fit is not None:
        lm_pair.append(lambda: scipy_fit(exp_model_np, x, y, p0=P0, method="lm"))
        trf_pair.append(lambda: scipy_fit(exp_model_np, x, y, p0=P0, method="trf"))
    warm_up(lm_pair + trf_pair)
    r = reps(n)
    lm_times = interleaved(lm_pair, r, settle=0.25)
    lm = [statistics.median(t) for t in lm_times]
    trf = [statistics.median(t) for t in interleaved(trf_pair, r, settle=0.25)]
    row: dict[str, Any] = dict(
        first=first, first_trf=first_trf, compiles=len(compiles), lm=lm[0], trf=trf[0], reps=r
    )
    if scipy_fit is not None:
        row.update(
            scipy_lm=lm[1], scipy_trf=trf[1], lm_interval=ratio_interval(lm_times[1], lm_times[0])
        )
        if n == 1_000:
            four = [lm_pair[0], trf_pair[0], lm_pair[1], trf_pair[1]]
            med = [statistics.median(t) for t in interleaved(four, r, settle=0.25)]
            row["rotation4"] = med
    return row


def _gap_sensitivity(rounds: int) -> list[tuple[str, float]]:
    """Warm 1e3 fits (ours lm) in a loop with nothing, 1 ms of busy Python, or a 1 ms sleep
    between them: the median of each loop; only the fits are timed. Loops, not interleaving: a
    sleep slows the next few fits, not only the next one."""
    from . import curve_fit

    x, y = exp_data(1_000)
    model = exp_model()

    def busy(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    before: list[tuple[str, Callable[[], Any]]] = [
        ("", lambda: None),
        ("after 1 ms busy", lambda: busy(1e-3)),
        ("after a 1 ms sleep", lambda: time.sleep(1e-3)),
    ]
    for _ in range(20):
        curve_fit(model, x, y, p0=P0)
    times: list[list[float]] = [[] for _ in before]
    for i, (_, pause) in enumerate(before):
        for _ in range(rounds):
            pause()
            times[i].append(_timed(lambda: curve_fit(model, x, y, p0=P0)))
    return [(label, statistics.median(t)) for (label, _), t in zip(before, times, strict=True)]


def bench_solver(opts: BenchOptions) -> None:
    """Our curve_fit (first call and warm, lm and trf) against scipy's lm and trf."""
    try:
        from scipy.optimize import curve_fit as scipy_fit
    except ImportError:
        scipy_fit = None
    _say(opts, "== solver: y = a*exp(-b*x) + c, x = linspace(0, 5, n), p0 = [1, 1, 0], float64")
    if scipy_fit is None:
        _say(
            opts,
            "   scipy is not installed (it is a test extra: pip install 'nlsq_stream[test]'); "
            "the scipy columns and ratios are skipped",
        )
    _say(opts, "   ms; 'first' = first call for that shape (compile included); the others are")
    _say(opts, "   warm medians, each of ours interleaved with scipy's same method")
    head = f"   {'n':>8} {'first lm':>9} {'first trf':>9} {'ours lm':>9} {'ours trf':>9}"
    if scipy_fit is not None:
        head += f" {'scipy lm':>9} {'scipy trf':>9}"
    _say(opts, head + f" {'reps':>5}")

    def reps(n: int) -> int:
        # 1e3: a pair of fits takes ~0.6 ms, so 101 rounds lasted ~0.1 s, short enough for one
        # burst of another tenant's work to shift a whole run (ours, which needs XLA's worker
        # thread as well as the caller's, more than scipy's); 401 rounds take ~0.3 s.
        return opts.reps(*{1_000: (401, 15), 100_000: (15, 7)}.get(n, (7, 3)))

    summary: dict[int, dict[str, Any]] = {}
    for n in opts.problem_sizes():
        row = summary[n] = _solver_size(n, reps, scipy_fit)
        line = f"   {_size(n):>8}" + "".join(
            f" {_ms(row[k]):>9}" for k in ("first", "first_trf", "lm", "trf")
        )
        if scipy_fit is not None:
            line += f" {_ms(row['scipy_lm']):>9} {_ms(row['scipy_trf']):>9}"
        line += f" {row['reps']:>5}"
        if row["compiles"] == 0:
            line += "  (warning: the first call compiled nothing)"
        _say(opts, line)
    if scipy_fit is not None:
        for n, row in summary.items():
            if "rotation4" in row:
                med = row["rotation4"]
                _say(
                    opts,
                    f"   rotation4 (all four interleaved) at n={_size(n)}: "
                    + " ".join(_ms(t) for t in med)
                    + f"; ours lm / scipy lm {med[0] / med[2]:.2f}",
                )
        for n, row in summary.items():
            fastest = min(row["scipy_lm"], row["scipy_trf"])
            _say(
                opts,
                f"   ratio scipy_fastest/ours_warm at n={_size(n)}: {fastest / row['lm']:.2f}x "
                f"(ours lm, the default), {fastest / row['trf']:.2f}x (ours trf)",
            )
    _say(opts, "   targets:")
    if 1_000_000 in summary and scipy_fit is not None:
        row = summary[1_000_000]
        ratio = min(row["scipy_lm"], row["scipy_trf"]) / row["lm"]
        _say(
            opts,
            f"   n=1e6: ours warm >= 2x faster than scipy's fastest: {ratio:.2f}x  "
            f"{_verdict(ratio >= 2.0)}",
        )
    if 1_000 in summary:
        row = summary[1_000]
        if scipy_fit is not None:
            lo, hi = row["lm_interval"]
            _say(
                opts,
                f"   n=1e3: ours warm no slower than scipy lm: {_ms(row['lm'])} ms vs "
                f"{_ms(row['scipy_lm'])} ms, ours/scipy {row['lm'] / row['scipy_lm']:.3f} "
                f"({lo:.3f}-{hi:.3f})  {_verdict(row['lm'] <= row['scipy_lm'])}",
            )
        _say(
            opts,
            f"   n=1e3: first call <= 0.6 s: {row['first']:.2f} s  {_verdict(row['first'] <= 0.6)}",
        )
    if 1_000 in summary:
        gaps = _gap_sensitivity(opts.reps(201, 41))
        _say(
            opts,
            "   n=1e3, ours lm with other work between fits (likely XLA's worker parking):\n"
            "   back to back" + ", ".join(f"{label} {_ms(t)}" for label, t in gaps) + " ms",
        )
    if not ({1_000, 1_000_000} & summary.keys()):
        _say(opts, "   (the targets are at n=1e3 and n=1e6; neither was run)")


# -- emit ------------------------------------------------------------------------------------------


def _floor_fit(model: Any, x: np.ndarray, y: np.ndarray, devnull: IO[str], watched: bool) -> Any:
    """A fit cut down to what watching it cannot avoid: the same validation and one program (the
    silent one, or the watched one as a single chunk); with ``watched`` also the events and the
    console table, formatted and written in the caller. No result object, channel, hub, thread
    or event loop: the difference of a watched and an unwatched call is the least that this
    emitter and this table add, whatever carries the events."""
    import jax

    from . import _engine
    from ._curve_fit import prepare_curve_fit
    from ._emitter import K_TRIALS_MAX, Emitter
    from ._hub import rows_to_iterations
    from ._least_squares import DEVICE_PUT_BYTES, _data_bytes
    from .events import FitFinished
    from .sinks import ConsoleSink

    prep = prepare_curve_fit(model, x, y, p0=P0)
    heap = _engine.heap_limit(prep.problem, prep.x0, prep.data, prep.n_residuals)
    emitter = Emitter(2) if watched else None
    config = _engine.Config(**prep.config_kw, fun_jac=False, emitter=emitter, heap=heap)
    data = jax.device_put(prep.data) if _data_bytes(prep.data) > DEVICE_PUT_BYTES else prep.data
    n = prep.x0.size
    vectors = np.stack([prep.x0, prep.lb, prep.ub, prep.x_scale])
    scalars = np.array([*prep.tols, prep.f_scale, prep.max_nfev], prep.x0.dtype)
    if not watched:
        out = _engine.solve(prep.problem, config, vectors, scalars, data)
        return _engine.unpack(_engine.fetch(out.packed), n)
    k = np.int32(K_TRIALS_MAX)
    _, packed = _engine.first_chunk(prep.problem, config, vectors, scalars, data, k)
    v, rows, _, _ = _engine.unpack_chunk(_engine.fetch(packed), n)
    if v["status"] == _engine.RUNNING:
        raise RuntimeError("the benchmark's fit did not end within one chunk")
    summary = {key: v[key] for key in ("x", "cost", "nfev", "optimality")}
    events = [
        prep.started_event("bench"),
        *rows_to_iterations("bench", rows, time.time()),
        FitFinished("bench", summary, time.time()),
    ]
    sink = ConsoleSink(file=devnull)
    devnull.write("\n".join(line for ev in events for line in sink.format(ev)) + "\n")
    devnull.flush()
    return v


def _emit_size(n: int, reps: int, devnull: IO[str]) -> tuple[list[float], ...]:
    """Alternated warm timings at one size: curve_fit with verbose=0 against curve_fit with
    verbose=2, and (in rounds of their own) ``_floor_fit`` unwatched against watched."""
    from . import curve_fit
    from .sinks import ConsoleSink

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


def ratio_interval(
    base: Sequence[float], other: Sequence[float], level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """A bootstrap interval of ``median(other) / median(base)``, resampling the (base, other)
    pairs together: how finely one run resolves the ratio on this machine.

    >>> ratio_interval([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    (2.0, 2.0)
    """
    a, b = np.asarray(base), np.asarray(other)
    idx = np.random.default_rng(SEED).integers(0, a.size, (resamples, a.size))
    ratios = np.median(b[idx], axis=1) / np.median(a[idx], axis=1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


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
    _say(opts, "   down to its program, watched (one chunk, its events and the table formatted and")
    _say(opts, "   written in the caller) against silent; the rest of 'added' is the pipeline's.")
    _say(opts, "   Targets use 'ratio', with its 95 % bootstrap interval (pairs resampled):")
    if 1_000 in results:
        added = results[1_000][1]
        _say(opts, f"   n=1e3: added < 0.5 ms: {added * 1e3:+.3f} ms  {_verdict(added < 5e-4)}")
    for n, limit in ((100_000, 1.02), (1_000_000, 1.01)):
        if n in results:
            ratio = results[n][0]
            lo, hi = intervals[n]
            _say(
                opts,
                f"   n={_size(n)}: ratio <= {limit}: {ratio:.3f}x ({lo:.3f}-{hi:.3f})  "
                f"{_verdict(ratio <= limit)}",
            )


_SLOW_COST: list[float] = []  # (points, seconds per iteration) of the slow fit at two sizes


def _slow_residual(a: Any, x: Any) -> Any:
    return slow_model(x, a[0])


def slow_points(seconds_per_iteration: float) -> int:
    """How many points make one iteration of the slow fit take about this long.

    Measured once per process at two sizes and interpolated as a power law (the time per point
    grows once the data outgrow the caches).
    """
    from . import least_squares

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
    import anyio

    from . import fit_stream
    from .events import Iteration

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
    import anyio

    from . import fit_stream

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
    import anyio

    from . import fit_stream
    from .events import FitFinished, Iteration

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
    import anyio

    from . import fit_stream

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
        import anyio

        from .events import FitFinished, Iteration

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
    import anyio

    from . import fit_stream
    from .events import FitFinished

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
    import anyio

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


def run_bench(which: str, opts: BenchOptions) -> int:
    """Run one benchmark (or ``all``) and print its report; returns the exit code."""
    import jax
    import jax.numpy as jnp

    t0 = time.perf_counter()
    jnp.zeros(1).block_until_ready()  # start the backend: not part of any first call
    dev = jax.devices()[0]
    _say(
        opts,
        f"nlsq-stream bench {which}{' --quick' if opts.quick else ''}: jax {jax.__version__} on "
        f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} CPUs, float64 "
        f"{'on' if jnp.zeros(1).dtype == jnp.float64 else 'OFF'}",
    )
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    _say(opts, f"   (backend start-up {_ms(time.perf_counter() - t0)} ms, not counted below{load})")
    if which in ("solver", "all"):
        bench_solver(opts)
    if which in ("emit", "all"):
        bench_emit_overhead(opts)
        bench_emit_latency(opts)
    if which in ("stop", "all"):
        bench_stop(opts)
    if which in ("slow", "all"):
        bench_slow_consumer(opts)
    load = f" (load average {os.getloadavg()[0]:.2f})" if hasattr(os, "getloadavg") else ""
    _say(opts, f"done in {time.perf_counter() - t0:.1f} s{load}")
    return 0
