"""``bench cold``: the first fit of a fresh process, without and with the compile cache.

Each measurement is a new Python process (``sys.executable``) that imports the package, starts
the backend, and times its first 1e3-point ``curve_fit`` (silent, lm), compile included: the
cost a script or a test run pays before its first result. Three kinds of process run in rounds,
in a new temporary cache folder each round: one without the cache, then two with it on
(``enable_compile_cache``), the first of which fills the folder and the second reads it. The
target is on the ratio of the second cached process's first fit to the first's (the one that
fills the folder), with a 95 % interval over the rounds. 'loaded' counts the reading process's
solver programs loaded whole (``solver.program_cache``: no tracing, lowering or compile); 'jax
hits' its programs found in JAX's persistent cache (traced and lowered, not compiled).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from .common import BenchOptions, _say, _verdict, child_env, ratio_interval

COLD_TARGET = 0.3  # second process's first fit / first process's first fit

# What each fresh process runs: argv[1] is the cache folder, or "" for no cache.
_CHILD = """
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import jax.monitoring
import nlsq_stream
from nlsq_stream.benchmarks.common import P0, exp_data, exp_model
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
if sys.argv[1]:
    nlsq_stream.enable_compile_cache(sys.argv[1])
jax.numpy.zeros(1).block_until_ready()  # the backend's start is not part of the first fit
x, y = exp_data(1000)
model = exp_model()
t = time.perf_counter()
nlsq_stream.curve_fit(model, x, y, p0=P0)
first = time.perf_counter() - t
t = time.perf_counter()
nlsq_stream.curve_fit(model, x, y, p0=P0)
second = time.perf_counter() - t
hits = sum(e == "/jax/compilation_cache/cache_hits" for e in events)
from nlsq_stream.solver import program_cache
loaded = program_cache.counts["loaded"]
print(json.dumps(dict(first=first, second=second, hits=hits, loaded=loaded)))
"""


def first_fit_in_new_process(cache: str) -> dict[str, Any]:
    """Run ``_CHILD`` in a fresh interpreter: its first and second fit (s) and cache hits."""
    env = child_env()
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, cache],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def bench_cold(opts: BenchOptions) -> None:
    """First fits of fresh processes: no cache, cache filled, cache read; the ratio's target."""
    rounds = opts.reps(5, 2)
    _say(opts, "== cold start: the first 1e3 fit (lm, silent) of a fresh process, compile included")
    _say(opts, f"   {rounds} rounds of three processes, a new cache folder each round; seconds")
    _say(
        opts,
        f"   {'round':>5} {'no cache':>9} {'filling':>9} {'reading':>9} {'loaded':>7} "
        f"{'jax hits':>8}",
    )
    plain: list[float] = []
    filling: list[float] = []
    reading: list[float] = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="nlsq_stream_cold_") as folder:
            a = first_fit_in_new_process("")
            b = first_fit_in_new_process(folder)
            c = first_fit_in_new_process(folder)
        plain.append(a["first"])
        filling.append(b["first"])
        reading.append(c["first"])
        _say(
            opts,
            f"   {r + 1:>5} {a['first']:>9.3f} {b['first']:>9.3f} {c['first']:>9.3f} "
            f"{c['loaded']:>7} {c['hits']:>8}",
        )
    ratio = statistics.median(reading) / statistics.median(filling)
    lo, hi = ratio_interval(filling, reading)
    plain_ratio = statistics.median(reading) / statistics.median(plain)
    _say(
        opts,
        f"   medians: no cache {statistics.median(plain):.3f} s, filling the cache "
        f"{statistics.median(filling):.3f} s, reading it {statistics.median(reading):.3f} s",
    )
    _say(opts, "   targets:")
    _say(
        opts,
        f"   second process's first fit / first process's (cache on) <= {COLD_TARGET}: "
        f"{ratio:.3f} ({lo:.3f}-{hi:.3f})  {_verdict(ratio <= COLD_TARGET)}",
    )
    _say(opts, f"   (against a process without the cache: {plain_ratio:.3f})")
