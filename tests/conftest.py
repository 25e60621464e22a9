"""Shared test setup: float64 JAX (as scipy), and where NIST's reference files live."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

from nlsq_stream.stream.runner import _SinkLoop

jax.config.update("jax_enable_x64", True)

# Hypothesis draws the same examples on every run and every machine ("fixed": derandomize, no
# example database), so a failure found once, in CI or by a user running README's command, is
# found again by that command. "explore" draws fresh random examples, for hunting; a failure
# there prints the ``--hypothesis-seed`` (and ``@reproduce_failure`` blob) that replays it.
# Choose with HYPOTHESIS_PROFILE=explore or pytest's --hypothesis-profile=explore. Loaded here, at
# the top of conftest, because test modules build their ``settings(...)`` objects at import time
# and those inherit from the profile loaded then. The pytest header names the profile in force.
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fixed", derandomize=True, database=None, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

# CI clones the repository next to a read-only copy of shared/; tests read NIST's files there.
NIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nist"


def _cpu_paths() -> str:
    """Which instruction-set paths the numerical libraries take in this run.

    Results are compared with scipy's down to the last bits in places, and those bits differ
    between CPUs (XLA's, numpy's and OpenBLAS' kernels are chosen per CPU). .ci/run runs the
    numerical tests a second time on other paths (XLA_FLAGS=--xla_cpu_max_isa=...,
    NPY_DISABLE_CPU_FEATURES, OPENBLAS_CORETYPE); this line shows which were in force.
    """
    xla = os.environ.get("XLA_FLAGS") or "unset (the host's best ISA)"
    try:
        from numpy._core._multiarray_umath import (
            __cpu_baseline__,
            __cpu_dispatch__,
            __cpu_features__,
        )

        simd = "+".join([*__cpu_baseline__, *(f for f in __cpu_dispatch__ if __cpu_features__[f])])
    except ImportError:  # a numpy without these (private) names
        simd = "?"
    try:
        import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, so that it is listed)
        from threadpoolctl import threadpool_info

        blas = ", ".join(
            f"{i.get('architecture')} ({Path(i['filepath']).parent.name.removesuffix('.libs')})"
            for i in threadpool_info()
            if i.get("internal_api") == "openblas"
        )
    except ImportError:
        blas = "? (threadpoolctl not installed)"
    return f"cpu paths: XLA_FLAGS={xla}; numpy SIMD {simd}; OpenBLAS {blas or 'none loaded'}"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the hypothesis profile (and seed, if one is given), so any failure can be replayed,
    and the CPU paths the numerical libraries take (see _cpu_paths)."""
    seed = config.getoption("hypothesis_seed", None)
    return [
        f"hypothesis: profile {settings.get_current_profile_name()!r} -> "
        f"{settings.default.show_changed()}"
        + (f"; --hypothesis-seed={seed}" if seed is not None else ""),
        _cpu_paths(),
    ]


# ---------------------------------------------------------------------------------------------
# Streaming tests: both async backends, and proof that nothing (thread, task) is left behind.
# ---------------------------------------------------------------------------------------------

# Threads that belong to the test harness, not to nlsq_stream: anyio's pytest plugin drives trio
# in guest mode, whose blocking I/O wait runs in a worker of trio's thread cache ("Trio thread N");
# that worker idles up to 10 s after the test's trio run ended. nlsq_stream itself never uses trio
# threads (its fit runs in a plain ``threading.Thread``, its sinks in a shared asyncio loop thread),
# so ignoring them cannot hide a leak of ours.
HARNESS_THREAD_PREFIXES = ("Trio thread ",)
THREAD_GRACE_S = 2.0


def _live_threads() -> set[threading.Thread]:
    # ``threading._DummyThread`` stands for a thread Python did not start: here, a worker of XLA's
    # own pool that ran a host callback of the user's model (a ``pure_callback``). XLA keeps its
    # pool for the life of the process; nlsq_stream starts and joins only real Thread objects.
    return {
        t
        for t in threading.enumerate()
        if t.is_alive()
        and not t.name.startswith(HARNESS_THREAD_PREFIXES)
        and not isinstance(t, threading._DummyThread)
    }


# The shared sink loop ends IDLE_S seconds after its last fit (1 s, so that fits in a row reuse
# it). Tests prove that it ends, and that nothing else is left, after every test; with the default
# each of them would wait a second for it, so they run with a tenth of that.
# ``test_stream.py::test_the_sink_loop_outlives_a_pause_then_ends`` checks the default itself.
PRODUCTION_IDLE_S = _SinkLoop.IDLE_S
TEST_IDLE_S = 0.1


@pytest.fixture(autouse=True, scope="session")
def _short_sink_loop_idle() -> Iterator[None]:
    _SinkLoop.IDLE_S = TEST_IDLE_S
    try:
        yield
    finally:
        _SinkLoop.IDLE_S = PRODUCTION_IDLE_S


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every ``@pytest.mark.anyio`` test runs on asyncio and on trio."""
    return request.param


@pytest.fixture
def no_leftover_threads():
    """Fail the test if it leaves a thread running (after up to ``THREAD_GRACE_S`` of polling).

    The set of live threads after the test must equal the set before it; the failure message names
    the leftover threads. Applied to the streaming modules with ``pytestmark``.
    """
    before = _live_threads()
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    while True:
        after = _live_threads()
        if after == before or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    leftover = sorted(t.name for t in after - before)
    gone = sorted(t.name for t in before - after)
    assert after == before, f"threads left behind: {leftover}; threads that vanished: {gone}"


def _current_task() -> object:
    try:
        return asyncio.current_task()
    except RuntimeError:  # not in asyncio: trio
        import trio

        return trio.lowlevel.current_task()


def live_tasks() -> set[object]:
    """Every task alive in the running event loop except the calling one (asyncio or trio).

    On trio, tasks are found by walking the task tree from the root task through every nursery.
    """
    try:
        loop_tasks = asyncio.all_tasks()
    except RuntimeError:  # no running asyncio loop: we are on trio
        import trio

        found: set[object] = set()
        stack = [trio.lowlevel.current_root_task()]
        while stack:
            task = stack.pop()
            found.add(task)
            for nursery in task.child_nurseries:
                stack.extend(nursery.child_tasks)
        tasks: set[object] = found
    else:
        tasks = {t for t in loop_tasks if not t.done()}
    tasks.discard(_current_task())
    return tasks


async def assert_no_leftover_tasks(before: set[object], grace: float = THREAD_GRACE_S) -> None:
    """Await at the end of an async test: no task may outlive the test body.

    ``before`` is ``live_tasks()`` taken at the start of the test. Tasks that are about to end get
    up to ``grace`` seconds (the loop keeps running meanwhile).
    """
    import anyio

    deadline = time.monotonic() + grace
    while True:
        extra = live_tasks() - before
        if not extra or time.monotonic() > deadline:
            break
        await anyio.sleep(0.01)
    names = sorted(
        (t.get_name() if isinstance(t, asyncio.Task) else getattr(t, "name", repr(t)))
        for t in extra
    )
    assert not extra, f"tasks left behind: {names}"


# Small fits shared by the streaming modules: module-level functions, so that every module reuses
# the same compiled solvers.


@jax.custom_jvp
def _flaky_sensor(a):
    def host(a):
        raise OSError("bad model: sensor offline at run time")

    return jax.pure_callback(host, jax.ShapeDtypeStruct((), a.dtype), a)


@_flaky_sensor.defjvp
def _flaky_sensor_jvp(primals, tangents):
    return _flaky_sensor(primals[0]), tangents[0]


def runtime_failing_model(x, a, b, c):
    """Traces fine (validation passes); its host callback raises once the compiled fit runs."""
    import jax.numpy as jnp

    return _flaky_sensor(a) * jnp.exp(-b * x) + c


def decay_model(x, a, b, c):
    """a exp(-b x) + c, the curve_fit model of the streaming tests."""
    import jax.numpy as jnp

    return a * jnp.exp(-b * x) + c


def decay_data(m: int = 2000, seed: int = 0):
    """``(x, y, p0)`` for ``decay_model``: a 6-iteration fit from ``p0 = [1, 1, 0]``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 4.0, m)
    y = 2.0 * np.exp(-0.7 * x) + 0.3 + 0.01 * rng.standard_normal(m)
    return x, y, np.array([1.0, 1.0, 0.0])


def slow_residual(p, w, lam):
    """Dennis & Schnabel's slow Gauss-Newton example, repeated over a weight vector ``w``.

    Residuals ``w (x + 1)`` and ``w (lam x^2 + x - 1)``: the minimum at x = 0 has a large residual,
    so Gauss-Newton (and TRF) converges only linearly, with rate ``lam``. ``lam = 0.9999`` with
    tight tolerances takes about 5000 iterations; ``w``'s length sets the cost of one iteration.
    """
    import jax.numpy as jnp

    x = p[0]
    return jnp.concatenate([w * (x + 1.0), w * (lam * x**2 + x - 1.0)])


def slow_args(m: int, lam: float = 0.9999):
    import numpy as np

    return (np.full(m, 1.0 / np.sqrt(m)), lam)


SLOW_TOLS = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=100_000)


@contextlib.contextmanager
def count_compiles():
    """Yield a list collecting the names of backend-compile events fired inside the block."""
    events: list[str] = []

    def listener(name: str, secs: float, **kwargs: object) -> None:
        if "backend_compile" in name:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
