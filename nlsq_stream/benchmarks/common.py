"""What every benchmark shares: the problems, interleaved timing, ratio intervals, output."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import jax
import jax.numpy as jnp
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


def child_env() -> dict[str, str]:
    """This environment, the cache variable removed, with this copy of the package first on
    ``PYTHONPATH`` (a child imports the package under test, not another installed copy)."""
    env = {k: v for k, v in os.environ.items() if k != "NLSQ_STREAM_COMPILE_CACHE"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


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
