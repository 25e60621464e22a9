"""``nlsq-stream bench``: ratios measured side by side in one process.

Everything compared runs in the same process, interleaved in a shuffled order round by round, after
a warm-up, and the figures are medians, so that a noisy machine slows both sides of a ratio alike.

* ``solver``: ``y = a exp(-b x) + c`` from ``p0 = [1, 1, 0]`` against ``scipy.optimize.curve_fit``.
* ``emit``: the cost of watching a fit (``verbose=2`` into a console sink writing to
  ``os.devnull``, against ``verbose=0``), and how late a live ``fit_stream`` consumer sees each
  iteration.
* ``batch``: ``curve_fit_batch`` on N Gaussian peaks (N = 1e2 ... 1e5) against Python loops of
  scipy's and our ``curve_fit`` and against optimistix's Levenberg-Marquardt under ``jax.vmap``,
  in float64 and float32.
* ``cold``: the first fit of a fresh process, without and with the persistent compile cache
  (fresh subprocesses).
* ``stop``: how long ``stream.stop()`` takes to end a running fit.
* ``dask``: the Gaussian batch in this process against ``fit_blocks`` on a 2-worker
  ``LocalCluster``, and the cost of a block (needs the dask extra; not part of ``all``).

Latency and stop use a fit that runs as long as asked: ``y = x a^4`` fitted to zeros. Its Jacobian
vanishes at the solution, so Gauss-Newton converges only linearly (``a`` shrinks by a quarter per
iteration) and with ``gtol`` off the fit runs to ``max_nfev``; the number of points sets the time
per iteration.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from .batch import bench_batch
from .cold import bench_cold
from .common import BenchOptions, _ms, _say
from .emit import bench_emit_overhead
from .latency import bench_emit_latency, bench_slow_consumer, bench_stop
from .solver import bench_solver


def run_bench(which: str, opts: BenchOptions) -> int:
    """Run one benchmark (or ``all``) and print its report; returns the exit code."""

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
    if which in ("batch", "all"):
        bench_batch(opts)
    if which in ("cold", "all"):
        bench_cold(opts)
    if which in ("stop", "all"):
        bench_stop(opts)
    if which in ("slow", "all"):
        bench_slow_consumer(opts)
    if which == "dask":  # not in "all": it needs the dask extra and starts worker processes
        from .dask import bench_dask

        bench_dask(opts)
    load = f" (load average {os.getloadavg()[0]:.2f})" if hasattr(os, "getloadavg") else ""
    _say(opts, f"done in {time.perf_counter() - t0:.1f} s{load}")
    return 0
