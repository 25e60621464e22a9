"""``bench batch``: ``curve_fit_batch`` on many Gaussian peaks against fitting them one by one.

N spectra of 100 points on ``linspace(-5, 5, 100)``, each a peak ``a exp(-(x - mu)^2 / (2 s^2))
+ c`` with its own true values and noise level, all fitted from ``p0 = [2, 0, 1, 0]`` with the
default method (lm) and tolerances. Ours (``curve_fit_batch``) is compared side by side, in one
run, with

* a Python loop of ``scipy.optimize.curve_fit`` and a Python loop of our own ``curve_fit``, both
  timed on a sample of ``LOOP_SAMPLE`` fits (a loop's time grows linearly with N, so its rate in
  fits a second is measured once and applied to every N);
* optimistix's ``LevenbergMarquardt`` under ``jax.vmap`` (one compiled program for all N fits)
  on the same data, with ``rtol = atol`` = our ``ftol = xtol`` (1e-8, raised to the dtype's
  epsilon as ours are) and ``max_steps`` = our ``max_nfev`` (500). Optimistix is optional
  (``pip install 'nlsq_stream[bench]'``); without it its column is skipped.

Ours and optimistix run interleaved round by round after a warm-up; the figures are medians.
Each dtype (float64, float32) starts with a new model function, so its first call at the
smallest N compiles from scratch; at a larger N the first call compiles only the programs of the
new bucket sizes (``solver.batch``: a start program at the piece's size, resume programs at the
smaller buckets).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import resource
import statistics
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..faces.batch import curve_fit_batch
from ..faces.sync import curve_fit
from ..solver import batch as solver_batch
from ..solver.curve_fit_batch import prepare_curve_fit_batch
from .batch_watch import bench_batch_watch
from .common import (
    SEED,
    BenchOptions,
    _say,
    _size,
    _timed,
    _verdict,
    count_compiles,
    interleaved,
    ratio_interval,
    warm_up,
)

BATCH_SIZES = (100, 1_000, 10_000, 100_000)
QUICK_SIZES = (100, 1_000)
GAUSS_P0 = (2.0, 0.0, 1.0, 0.0)
POINTS = 100
LOOP_SAMPLE = 1_000  # fits timed in each Python loop (scipy's and ours)
LOOP_ROUNDS = 5  # the sample is timed in this many slices, interleaved with a batch of 1e3
OPTX_MAX_N = 10_000  # optimistix is not run above this N (its 1e5 run alone takes ~40 s here)
TARGET_N = 10_000
TARGET_VS_SCIPY = 30.0


def gauss_model() -> Callable[..., Any]:
    """A new Gaussian-peak function object each call: its first fit always compiles."""

    def peak(x: Any, a: Any, mu: Any, s: Any, c: Any) -> Any:
        return a * jnp.exp(-0.5 * ((x - mu) / s) ** 2) + c

    return peak


def gauss_np(x: np.ndarray, a: float, mu: float, s: float, c: float) -> np.ndarray:
    """The same model in numpy, for scipy and for checking costs."""
    return a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c


def gauss_data(n: int, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x`` (100,), ``y`` (n, 100) and the true parameters (n, 4): a in [1, 5], mu in
    [-1.5, 1.5], s in [0.5, 1.5], c in [-0.5, 0.5], noise sd in [0.01, 0.2]; fixed seed."""
    rng = np.random.default_rng(SEED)
    x = np.linspace(-5.0, 5.0, POINTS)
    true = np.stack(
        [
            rng.uniform(1.0, 5.0, n),
            rng.uniform(-1.5, 1.5, n),
            rng.uniform(0.5, 1.5, n),
            rng.uniform(-0.5, 0.5, n),
        ],
        axis=1,
    )
    noise = rng.uniform(0.01, 0.2, (n, 1)) * rng.standard_normal((n, POINTS))
    y = gauss_np(x, *(true.T[:, :, None])) + noise
    return x.astype(dtype), y.astype(dtype), true


def _cost(x: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Each fit's cost ``0.5 sum(r^2)`` at parameters ``p`` (n, 4), in float64."""
    r = gauss_np(x.astype(np.float64), *(p.astype(np.float64).T[:, :, None])) - y
    return 0.5 * np.sum(r * r, axis=1)


def _same_minimum(a: np.ndarray, b: np.ndarray, rel: float) -> float:
    """The fraction of fits whose two costs agree within ``rel`` (relative)."""
    with np.errstate(invalid="ignore"):
        ok = np.abs(a - b) <= rel * np.maximum(np.abs(a), np.abs(b)) + 1e-30
    return float(np.mean(ok))


def _tolerance(dtype: Any) -> float:
    return max(1e-8, float(np.finfo(dtype).eps))


@contextlib.contextmanager
def _x64(dtype: Any) -> Iterator[None]:
    """float32 optimistix runs with x64 off: with it on, its LM mixes float64 into a float32
    solve and lineax refuses (optimistix 0.1.0); float32 arithmetic is the same either way."""
    if np.dtype(dtype) == np.float32:
        with jax.enable_x64(False):
            yield
    else:
        yield


def optimistix_fit(dtype: Any) -> tuple[Callable[..., Any] | None, str]:
    """A jitted ``vmap`` of optimistix's LM over the rows of ``y`` (or None, and why not)."""
    try:
        import optimistix as optx
    except ImportError as e:
        return None, f"optimistix is not installed ({e}; pip install 'nlsq_stream[bench]')"
    tol = _tolerance(dtype)
    solver: Any = optx.LevenbergMarquardt(rtol=tol, atol=tol)
    model = gauss_model()
    max_steps = 100 * (len(GAUSS_P0) + 1)

    def residual(p: Any, args: Any) -> Any:
        x, y = args
        return model(x, *p) - y

    def one(y: Any, x: Any, p0: Any) -> Any:
        sol: Any = optx.least_squares(
            residual, solver, p0, args=(x, y), max_steps=max_steps, throw=False
        )
        return sol.value, sol.result == optx.RESULTS.successful

    program = jax.jit(jax.vmap(one, in_axes=(0, None, None)))

    def run(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with _x64(dtype):
            p0 = jnp.asarray(GAUSS_P0, dtype)
            value, ok = jax.block_until_ready(program(jnp.asarray(y), jnp.asarray(x), p0))
        return np.asarray(value), np.asarray(ok)

    return run, f"optimistix {getattr(optx, '__version__', '?')}"


def _reps(opts: BenchOptions, n: int) -> int:
    full, quick = {100: (21, 9), 1_000: (9, 5), 10_000: (2, 2)}.get(n, (1, 1))
    return opts.reps(full, quick)


def _ours_first(model: Any, x: np.ndarray, y: np.ndarray, p0: np.ndarray) -> dict[str, Any]:
    """The first call at this N, compiles included: what ``curve_fit_batch`` does (prepare, run,
    result), with the engine's output at hand to read the chunks and bucket sizes it ran at."""
    out: list[Any] = []

    def first() -> None:
        prep = prepare_curve_fit_batch(model, x, y, p0)
        run = solver_batch.run(prep.batch)
        out[:] = [run, prep.result(run)]

    with count_compiles() as compiles:
        seconds = _timed(first)
    run, res = out
    return dict(
        first=seconds, compiles=len(compiles), chunks=run.chunks, buckets=run.buckets, res=res
    )


def _batch_size_row(
    opts: BenchOptions, n: int, dtype: Any, model: Any, optx_run: Any
) -> dict[str, Any]:
    """One N: ours first and warm, optimistix first and warm (interleaved), and whether both
    reach the same minima."""
    x, y, _ = gauss_data(n, dtype)
    p0 = np.asarray(GAUSS_P0, dtype)
    row = _ours_first(model, x, y, p0)
    res = row.pop("res")
    row["success"] = float(np.mean(res.success))
    row["trials"] = float(np.mean(res.nfev)) - 1.0  # a trial is one evaluation after the first
    fns: list[Callable[[], Any]] = [lambda: curve_fit_batch(model, x, y, p0)]
    if optx_run is not None and n <= OPTX_MAX_N:
        got: list[Any] = []
        row["optx_first"] = _timed(lambda: got.extend(optx_run(x, y)))
        value, ok = got
        row["optx_success"] = float(np.mean(ok))
        rel = 1e-6 if np.dtype(dtype) == np.float64 else 1e-3
        row["optx_same"] = _same_minimum(_cost(x, y, value), _cost(x, y, res.popt), rel)
        fns.append(lambda: optx_run(x, y))
    r = _reps(opts, n)
    if row.get("optx_first", 0.0) > 10.0 and opts.repeats is None:
        r = 1  # float32 optimistix at 1e4 runs lanes to max_steps: ~25 s a call here
    if n <= 1_000:
        warm_up(fns)
    times = interleaved(fns, r, settle=0.05)
    row.update(reps=r, ours=statistics.median(times[0]), ours_times=times[0])
    if len(times) > 1:
        row.update(optx=statistics.median(times[1]), optx_times=times[1])
    return row


GROWTH_ROUNDS = (3, 2)  # rounds of the side-by-side growth timing (full, --quick)
GROWTH_WORK = 10_000  # fits per timed call of every N below it (N = 1e3: ten batches a call)


def _growth(opts: BenchOptions, model: Any, sizes: tuple[int, ...], dtype: Any) -> dict[int, float]:
    """Seconds a batch of each N >= 1e3 takes, timed side by side (interleaved rounds, after the
    table's calls compiled every program), so that the growth from one N to the next is a ratio
    measured in one stretch of time rather than two figures taken a minute apart. A call at an
    N below ``GROWTH_WORK`` runs that many fits' worth of batches, one after the other."""
    big = [n for n in sizes if n >= 1_000]
    if len(big) < 2:
        return {}
    p0 = np.asarray(GAUSS_P0, dtype)
    fns: list[Callable[[], Any]] = []
    repeats: list[int] = []
    for n in big:
        x, y, _ = gauss_data(n, dtype)
        k = max(1, GROWTH_WORK // n)

        def call(x: np.ndarray = x, y: np.ndarray = y, k: int = k) -> None:
            for _ in range(k):
                curve_fit_batch(model, x, y, p0)

        fns.append(call)
        repeats.append(k)
    times = interleaved(fns, opts.reps(*GROWTH_ROUNDS), settle=0.05)
    return {n: statistics.median(t) / k for n, t, k in zip(big, times, repeats, strict=True)}


def _lapack_per_trial(n: int, dtype: Any) -> tuple[float, float]:
    """Seconds per fit of the two LAPACK calls an lm trial of the batch makes, each timed alone
    on the batch's shapes (vmapped as the batch runs them): the thin QR of ``[J f]`` (100 x 5,
    ``engine.thin_r``) and the SVD of the scaled 4 x 4 factor (``engine._lm_step``)."""
    rng = np.random.default_rng(SEED)
    k = len(GAUSS_P0)
    with jax.enable_x64(np.dtype(dtype) == np.float64):
        at = jnp.asarray(rng.standard_normal((n, POINTS, k + 1)), dtype)
        r = jnp.asarray(np.triu(rng.standard_normal((n, k, k))), dtype)
        qr = jax.jit(jax.vmap(lambda a: jnp.linalg.qr(a, mode="r")))
        svd = jax.jit(jax.vmap(lambda a: jnp.linalg.svd(a, full_matrices=False)))
        fns = [lambda: jax.block_until_ready(qr(at)), lambda: jax.block_until_ready(svd(r))]
        warm_up(fns)
        times = interleaved(fns, 5, settle=0.05)
    return statistics.median(times[0]) / n, statistics.median(times[1]) / n


def _say_trial_budget(
    opts: BenchOptions, rows: dict[int, dict[str, Any]], loops: dict[str, Any], dtype: Any
) -> None:
    """A batch fit's time per trial at N=1e4, the LAPACK calls each trial makes, and what the
    30x target allows per trial. A batch must use the kernels a fit done alone uses (every fit
    matches its lone fit to rtol 1e-8, and a fit that ends on ftol ends wherever rounding takes
    it), so these calls bound the batch from below."""
    if TARGET_N not in rows or "scipy" not in loops:
        return
    row = rows[TARGET_N]
    trials = max(row["trials"], 1.0)
    per_trial = row["ours"] / TARGET_N / trials
    budget = 1.0 / (TARGET_VS_SCIPY * loops["scipy"]) / trials
    qr, svd = _lapack_per_trial(TARGET_N, dtype)
    _say(
        opts,
        f"   N={_size(TARGET_N)}: {per_trial * 1e6:.2f} us per fit and trial ({trials:.1f} "
        f"trials a fit); the trial's two LAPACK calls alone, at the batch's shapes: QR of "
        f"[J f] {qr * 1e6:.2f} us, SVD {svd * 1e6:.2f} us; {TARGET_VS_SCIPY:.0f}x the scipy "
        f"loop allows {budget * 1e6:.2f} us per trial ({(qr + svd) / budget:.1f}x less than "
        "those two calls)",
    )


def _loops(dtype: Any, model: Any, scipy_fit: Any) -> dict[str, Any]:
    """Fits a second of a Python loop of scipy's curve_fit and of ours, on ``LOOP_SAMPLE`` fits
    in ``LOOP_ROUNDS`` slices, interleaved with a batch of 1e3 (so all three share the noise);
    and on how many of the sample our batch reached scipy's minimum."""
    x, y, _ = gauss_data(LOOP_SAMPLE, dtype)
    p0 = np.asarray(GAUSS_P0, dtype)
    step = LOOP_SAMPLE // LOOP_ROUNDS
    where = {"scipy": 0, "ours": 0}
    scipy_popt = np.full((LOOP_SAMPLE, len(GAUSS_P0)), np.nan)

    def loop(name: str, fit: Callable[[np.ndarray], Any]) -> None:
        lo = where[name]
        for i in range(lo, lo + step):
            try:
                popt = fit(y[i])[0]
            except RuntimeError:  # did not converge: counted by the minima check below
                continue
            if name == "scipy":
                scipy_popt[i] = popt
        where[name] = (lo + step) % LOOP_SAMPLE

    x64 = x.astype(np.float64)
    fns: list[Callable[[], Any]] = [
        lambda: curve_fit_batch(model, x, y, p0),
        lambda: loop("ours", lambda yi: curve_fit(model, x, yi, p0=p0)),
    ]
    curve_fit(model, x, y[0], p0=p0)  # compile our single fit: not part of the loop's rate
    if scipy_fit is not None:
        fns.append(lambda: loop("scipy", lambda yi: scipy_fit(gauss_np, x64, yi, p0=GAUSS_P0)))
    times = interleaved(fns, LOOP_ROUNDS, settle=0.1)
    row: dict[str, Any] = {"loop": step / statistics.median(times[1])}
    if scipy_fit is not None:
        row["scipy"] = step / statistics.median(times[2])
        res = curve_fit_batch(model, x, y, p0)
        ours_cost, scipy_cost = _cost(x, y, res.popt), _cost(x, y, scipy_popt)
        row["scipy_same"] = _same_minimum(ours_cost, scipy_cost, 1e-6 if x.itemsize == 8 else 1e-3)
        row["scipy_worse"] = float(np.mean(~(scipy_cost <= ours_cost * (1 + 1e-3) + 1e-12)))
    return row


def _peak_rss_mib() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _fmt_rate(n: int, seconds: float | None) -> str:
    return "-" if seconds is None else f"{n / seconds:,.0f}"


def _say_table(opts: BenchOptions, rows: dict[int, dict[str, Any]], loops: dict[str, Any]) -> None:
    """The table: first call, programs, fits a second, and the ratios at every N."""
    _say(
        opts,
        f"   {'N':>6} {'first s':>8} {'compiles':>8} {'buckets':<26} {'ours fits/s':>12} "
        f"{'optx fits/s':>12} {'optx first s':>12} {'x scipy':>8} {'x loop':>7} "
        f"{'x optx (95%)':>19} {'reps':>4}",
    )
    for n, row in rows.items():
        buckets = ",".join(str(b) for b in sorted(set(row["buckets"]), reverse=True))
        rate = n / row["ours"]
        vs_optx = "-"
        if "optx" in row:
            lo, hi = ratio_interval(row["ours_times"], row["optx_times"])
            vs_optx = f"{row['optx'] / row['ours']:.2f} ({lo:.2f}-{hi:.2f})"
        vs_scipy = f"{rate / loops['scipy']:.1f}" if "scipy" in loops else "-"
        optx_first = f"{row['optx_first']:.2f}" if "optx_first" in row else "-"
        _say(
            opts,
            f"   {_size(n):>6} {row['first']:>8.2f} {row['compiles']:>8} {buckets:<26} "
            f"{rate:>12,.0f} {_fmt_rate(n, row.get('optx')):>12} {optx_first:>12} "
            f"{vs_scipy:>8} {rate / loops['loop']:>7.1f} {vs_optx:>19} {row['reps']:>4}",
        )
    for n, row in rows.items():
        line = f"   N={_size(n)}: ours {row['success']:.1%} success, {row['chunks']} chunks"
        if "optx_same" in row:
            line += (
                f"; optimistix {row['optx_success']:.1%} success, same minimum as ours on "
                f"{row['optx_same']:.1%}"
            )
        _say(opts, line)


def _say_targets(
    opts: BenchOptions,
    rows: dict[int, dict[str, Any]],
    loops: dict[str, Any],
    label: str,
    growth: dict[int, float],
) -> None:
    """Each target with its verdict (at N=1e4, and growth from 1e3 up)."""
    if TARGET_N in rows:
        row = rows[TARGET_N]
        rate = TARGET_N / row["ours"]
        if "scipy" in loops:
            ratio = rate / loops["scipy"]
            _say(
                opts,
                f"   target {label} N=1e4: >= {TARGET_VS_SCIPY:.0f}x the scipy loop: "
                f"{ratio:.1f}x  {_verdict(ratio >= TARGET_VS_SCIPY)}",
            )
        if "optx" in row:
            ratio = row["optx"] / row["ours"]
            _say(
                opts,
                f"   target {label} N=1e4: faster than optimistix under vmap: {ratio:.2f}x  "
                f"{_verdict(ratio > 1.0)}",
            )
    big = sorted(growth)
    if len(big) >= 2:
        lo, hi = big[0], big[-1]
        slope = math.log(growth[hi] / growth[lo]) / math.log(hi / lo)
        steps = ", ".join(
            f"{_size(a)}->{_size(b)} x{growth[b] / growth[a]:.1f}"
            for a, b in itertools.pairwise(big)
        )
        _say(
            opts,
            f"   target {label}: time grows no worse than linearly from {_size(lo)} to "
            f"{_size(hi)}, timed side by side: exponent {slope:.2f} (<= 1.05 passes; "
            f"{steps})  {_verdict(slope <= 1.05)}",
        )
    else:
        _say(opts, f"   target {label}: growth needs two sizes >= 1e3; not measured")


def _bench_dtype(opts: BenchOptions, dtype: Any, sizes: tuple[int, ...], scipy_fit: Any) -> None:
    """Loops, then every N, the table and the targets, for one dtype."""
    label = np.dtype(dtype).name
    model = gauss_model()
    optx_run, optx_note = optimistix_fit(dtype)
    _say(opts, f"-- {label} (ftol = xtol = gtol = {_tolerance(dtype):.3g}; {optx_note})")
    rows = {n: _batch_size_row(opts, n, dtype, model, optx_run) for n in sizes}
    loops = _loops(dtype, model, scipy_fit)
    line = f"   our curve_fit in a loop: {loops['loop']:,.0f} fits/s"
    if "scipy" in loops:
        line = (
            f"   scipy curve_fit in a loop: {loops['scipy']:,.0f} fits/s (float64 inside); "
            + line[3:]
            + f"; our batch on scipy's minimum for {loops['scipy_same']:.1%} of the sample "
            f"(scipy lower by > 1e-3 on {loops['scipy_worse']:.1%})"
        )
    _say(opts, line + f" [sample of {LOOP_SAMPLE} fits each]")
    _say_table(opts, rows, loops)
    if optx_run is not None and any(n > OPTX_MAX_N for n in sizes):
        _say(opts, f"   (optimistix is not run above N={_size(OPTX_MAX_N)}: time budget)")
    _say(opts, f"   peak RSS after N={_size(sizes[-1])} ({label}): {_peak_rss_mib():,.0f} MiB")
    _say_trial_budget(opts, rows, loops, dtype)
    _say_targets(opts, rows, loops, label, _growth(opts, model, sizes, dtype))


def bench_batch(opts: BenchOptions) -> None:
    """curve_fit_batch against loops of scipy's and our curve_fit and optimistix under vmap."""
    try:
        from scipy.optimize import curve_fit as scipy_fit
    except ImportError:
        scipy_fit = None
    sizes = tuple(sorted(set(opts.sizes or (QUICK_SIZES if opts.quick else BATCH_SIZES))))
    _say(
        opts,
        "== batch: N Gaussian peaks a*exp(-(x-mu)^2/(2 s^2)) + c, 100 points on "
        "linspace(-5, 5), p0 = [2, 0, 1, 0], lm",
    )
    _say(opts, "   true a, mu, s, c and the noise level vary per fit; fits a second are N / warm")
    _say(opts, "   median; 'first s' = our first call at that N, 'compiles' = XLA compilations in")
    _say(opts, "   it (engine programs and small gathers), 'buckets' = the padded batch sizes its")
    _say(opts, "   chunks ran at (each piece of batch_size fits starts at its size); 'x scipy',")
    _say(opts, "   'x loop' = ours against a Python loop of scipy's / our curve_fit (fits/s from")
    _say(opts, f"   a sample of {LOOP_SAMPLE} fits); 'x optx' = optimistix's time / ours, same N")
    if scipy_fit is None:
        _say(opts, "   scipy is not installed: the scipy loop is skipped")
    optx_run, optx_note = optimistix_fit(np.float64)
    if optx_run is None:
        _say(opts, f"   optimistix skipped: {optx_note}")
    for dtype in (np.float64, np.float32):
        _bench_dtype(opts, dtype, sizes, scipy_fit)
    bench_batch_watch(opts, gauss_model(), gauss_data)
