"""Reliability: model errors, cancellation, load, a 1M-event soak and crash safety.

Every test that starts a fit runs under ``no_leftover_threads``; every async test runs on asyncio
and on trio. Run with ``-s`` to see the soak's memory figures.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import anyio
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from conftest import (
    SLOW_TOLS,
    assert_no_leftover_tasks,
    decay_data,
    decay_model,
    live_tasks,
    runtime_failing_model,
    slow_args,
    slow_residual,
)

import nlsq_stream as ns
from nlsq_stream.events import (
    FitFailed,
    FitFinished,
    FitStarted,
    Iteration,
    event_from_json,
)
from nlsq_stream.replay import iter_events
from nlsq_stream.sinks import JsonlSink

pytestmark = pytest.mark.usefixtures("no_leftover_threads")

X, Y, P0 = decay_data()
TIMEOUT = 60
# ~5000 iterations of ~2.5 ms each: about 12 s when nobody stops it, so a fit that is still
# running a second after a cancel was *not* stopped.
LONG = slow_args(200_000)


class Collect:
    """A lossless sink that keeps every event."""

    def __init__(self) -> None:
        self.events: list = []
        self.closed = 0

    async def send(self, event) -> None:
        self.events.append(event)

    async def aclose(self) -> None:
        self.closed += 1


def check_order(evs: list, terminal=(FitFinished, FitFailed)) -> list[Iteration]:
    """FitStarted first, strictly increasing iterations, exactly one terminal event, last."""
    assert evs, "no events"
    assert isinstance(evs[0], FitStarted), evs[0]
    assert isinstance(evs[-1], terminal), evs[-1]
    assert sum(isinstance(e, (FitFinished, FitFailed)) for e in evs) == 1
    assert sum(isinstance(e, FitStarted) for e in evs) == 1
    iters = [e for e in evs if isinstance(e, Iteration)]
    assert len(iters) == len(evs) - 2
    its = [e.iteration for e in iters]
    assert all(a < b for a, b in itertools.pairwise(its)), its
    assert len({e.fit_id for e in evs}) == 1
    return iters


def fit_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("nlsq_stream-fit-")]


def jsonl_events(path) -> list:
    return [event_from_json(line) for line in path.read_text().splitlines()]


# =============================================================================================
# 1. Model errors
# =============================================================================================


def raising_model(x, a, b, c):
    raise ValueError("bad model: cannot trace this")


class RaiseOnSolverTrace:
    """Passes validation (the first trace), raises when the solver traces it.

    A fresh instance per fit: the compiled solver is cached per model, so a reused instance would
    not be traced again.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, a, b, c):
        self.calls += 1
        if self.calls > 1:
            raise ValueError("bad model: refuses the solver's trace")
        return decay_model(x, a, b, c)


# decay_data's fit from p0 = [1, 1, 0] tries b = 0.3585 as its first trial point (scipy and ours),
# then converges to b = 0.7. NAN_WALL makes that first trial non-finite; WALL_BEFORE_OPTIMUM
# makes everything below b = 0.75 non-finite, so the optimum is out of reach.
NAN_WALL = 0.5
WALL_BEFORE_OPTIMUM = 0.75


def nan_mid_fit_model(x, a, b, c):
    return jnp.where(b < NAN_WALL, jnp.nan, decay_model(x, a, b, c))


def inf_mid_fit_model(x, a, b, c):
    return jnp.where(b < NAN_WALL, jnp.inf, decay_model(x, a, b, c))


def nan_wall_model(x, a, b, c):
    return jnp.where(b < WALL_BEFORE_OPTIMUM, jnp.nan, decay_model(x, a, b, c))


def nan_at_start_model(x, a, b, c):
    return jnp.where(b > 0.9, jnp.nan, decay_model(x, a, b, c))  # p0 has b = 1


MID_FIT_MODELS = {"nan": (nan_mid_fit_model, NAN_WALL), "inf": (inf_mid_fit_model, NAN_WALL)}


def scipy_reference(wall: float, bad: float = np.nan, **kw):
    """scipy.optimize.least_squares (trf) on the same problem, residuals non-finite below wall."""

    def res(p):
        r = p[0] * np.exp(-p[1] * X) + p[2] - Y
        return np.full_like(r, bad) if p[1] < wall else r

    return scipy.optimize.least_squares(res, P0, method="trf", **kw)


# The default tolerances, ours and scipy's.
FTOL = XTOL = GTOL = 1e-8


def decay_jac(x: np.ndarray) -> np.ndarray:
    e = np.exp(-x[1] * X)
    return np.stack([e, -x[0] * X * e, np.ones_like(X)], axis=1)


def stop_radius(status: int, x: np.ndarray, cost: float) -> float:
    """How far from the minimum a trf fit of decay_data that stopped with ``status`` can be.

    gtol (1): ||J'f||_inf < gtol, so the distance is <= ||(J'J)^-1|| ||J'f|| <= sqrt(n) gtol /
    sigma_min^2. xtol (3): the last step was < xtol (xtol + ||x||); the fit converges fast here (a
    small-residual problem, cond(J) ~ 8), so the next step, the distance left, is shorter still.
    ftol (2): the last step gained < ftol cost, and the quadratic model gives a distance up to
    sqrt(2 ftol cost) / sigma_min. (J at the point; sigma_min ~ 7 for decay_data.)
    """
    sv = np.linalg.svd(decay_jac(x), compute_uv=False)
    return {
        1: np.sqrt(x.size) * GTOL / sv[-1] ** 2,
        2: np.sqrt(2 * FTOL * cost) / sv[-1],
        3: XTOL * (XTOL + np.linalg.norm(x)),
    }[status]


def check_non_finite_run(evs: list, scipy_res, initial_cost: float, converged: bool = True) -> None:
    """Rejected non-finite trials never surface: every reported point is finite, costs fall.

    Not ``converged``: both ran out of evaluations (status 0) on the same path, so nfev agrees
    exactly, and x to 1e-6 (rounding amplified by at most cond(J) ~ 8 per evaluation over 10).
    ``converged``: both converged, and to the same minimum, but *which* of gtol, xtol or ftol fires
    first there (and so whether one more evaluation is made) is decided by the last bits of the
    arithmetic, which differ between CPUs: compare the point, not the reason.
    """
    iters = check_order(evs, FitFinished)
    for ev in iters:
        assert np.isfinite(ev.cost) and np.all(np.isfinite(ev.params)), ev
    costs = [ev.cost for ev in iters]
    assert all(b <= a for a, b in itertools.pairwise(costs)), costs
    assert costs[0] == pytest.approx(initial_cost, rel=1e-12)
    fin = evs[-1].result
    x = np.asarray(fin["x"])
    assert np.isfinite(fin["cost"]) and fin["cost"] == iters[-1].cost
    if not converged:
        assert fin["status"] == scipy_res.status == 0
        assert fin["nfev"] == scipy_res.nfev
        assert fin["cost"] == pytest.approx(scipy_res.cost, rel=1e-6)
        np.testing.assert_allclose(x, scipy_res.x, rtol=1e-6)
        return
    assert fin["status"] > 0 and scipy_res.status > 0, (fin["status"], scipy_res.status)
    assert abs(fin["nfev"] - scipy_res.nfev) <= 1, (fin["nfev"], scipy_res.nfev)
    # Each point lies within its stop_radius of the minimum, so they lie within the sum of each
    # other; the cost, flat at the minimum, then differs by at most sigma_max^2 d^2 / 2 (second
    # order), plus the rounding of a sum of m squares (m eps relative).
    d = stop_radius(fin["status"], x, fin["cost"]) + stop_radius(
        scipy_res.status, scipy_res.x, scipy_res.cost
    )
    assert np.linalg.norm(x - scipy_res.x) <= d, (x, scipy_res.x, d)
    sigma_max = np.linalg.norm(decay_jac(x), 2)
    cost_tol = sigma_max**2 * d**2 / 2 + X.size * np.finfo(float).eps * scipy_res.cost
    assert abs(fin["cost"] - scipy_res.cost) <= cost_tol, (fin["cost"], scipy_res.cost, cost_tol)


INITIAL_COST = float(0.5 * np.sum((decay_model(X, *P0) - Y) ** 2))


# --- (a) a model that raises while traced --------------------------------------------------


def test_model_raising_on_every_trace_fails_before_anything_starts(capsys):
    threads = set(threading.enumerate())
    sink = Collect()
    with pytest.raises(ValueError, match="bad model: cannot trace this"):
        ns.curve_fit(raising_model, X, Y, p0=P0, verbose=2, sinks=[sink])
    with pytest.raises(ValueError, match="bad model: cannot trace this"):
        ns.fit_stream(raising_model, X, Y, P0, sinks=[sink])
    # validation traces the model: the error is raised before any fit (or thread) starts, so no
    # sink is ever entered and no event is published
    assert sink.events == [] and sink.closed == 0
    assert set(threading.enumerate()) == threads
    assert capsys.readouterr().out == ""


def test_model_raising_in_the_solver_trace_sync(capsys):
    sink = Collect()
    with pytest.raises(ValueError, match="bad model: refuses the solver's trace"):
        ns.curve_fit(RaiseOnSolverTrace(), X, Y, p0=P0, verbose=2, sinks=[sink])
    assert [type(e) for e in sink.events] == [FitStarted, FitFailed]
    assert sink.events[-1].error_type == "ValueError"
    assert "bad model: refuses the solver's trace" in sink.events[-1].message
    assert sink.closed == 1
    # the default console display (verbose=2) is a sink too: it got the failure
    out = capsys.readouterr().out
    assert "Fit failed: ValueError: bad model: refuses the solver's trace" in out


@pytest.mark.anyio
async def test_model_raising_in_the_solver_trace_stream(anyio_backend, tmp_path):
    before = live_tasks()
    sink, path = Collect(), tmp_path / "fit.jsonl"
    evs = []
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(ns.FitError, match="bad model: refuses the solver's trace") as info:
            async with ns.fit_stream(
                RaiseOnSolverTrace(), X, Y, P0, sinks=[sink, JsonlSink(path)]
            ) as stream:
                async for ev in stream:
                    evs.append(ev)
    assert isinstance(info.value.__cause__, ValueError)
    assert [type(e) for e in evs] == [FitStarted, FitFailed]
    for got in (sink.events, jsonl_events(path)):
        assert [type(e) for e in got] == [FitStarted, FitFailed]
        assert got[-1].fit_id == stream.fit_id
        assert "bad model: refuses the solver's trace" in got[-1].message
    assert stream.result is None
    await assert_no_leftover_tasks(before)


def test_model_raising_at_run_time_sync(capsys):
    """An error raised *inside* the compiled fit crosses XLA, which does not keep its type: the
    caller gets XLA's RuntimeError, whose message (and every sink's FitFailed) names the cause."""
    sink = Collect()
    with pytest.raises(RuntimeError, match="OSError: bad model: sensor offline at run time"):
        ns.curve_fit(runtime_failing_model, X, Y, p0=P0, verbose=2, sinks=[sink])
    assert [type(e) for e in sink.events] == [FitStarted, FitFailed]
    assert "OSError: bad model: sensor offline at run time" in sink.events[-1].message
    assert "bad model: sensor offline at run time" in capsys.readouterr().out


# --- (b) a model that turns NaN/inf mid-fit ---------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_trial_points_are_rejected_like_scipy_sync(kind, capsys):
    model, wall = MID_FIT_MODELS[kind]
    ref = scipy_reference(wall, np.nan if kind == "nan" else np.inf)
    # scipy: one rejected trial, then it converges (in 8 evaluations, give or take the last one)
    assert ref.status > 0 and abs(ref.nfev - 8) <= 1
    sink = Collect()
    popt, _ = ns.curve_fit(model, X, Y, p0=P0, method="trf", verbose=2, sinks=[sink])
    check_non_finite_run(sink.events, ref, INITIAL_COST)
    np.testing.assert_array_equal(popt, sink.events[-1].result["x"])
    assert sink.events[-1].result["success"]
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == sink.events[-1].result["message"]
    assert "nan" not in "\n".join(out[1:-2]).lower()  # no non-finite row in the table


def test_lm_also_survives_non_finite_trial_points():
    """method='lm' (MINPACK in scipy, which copes badly with NaN) must still land on the optimum."""
    sink = Collect()
    popt, _ = ns.curve_fit(nan_mid_fit_model, X, Y, p0=P0, method="lm", sinks=[sink])
    ref = scipy_reference(NAN_WALL)
    iters = check_order(sink.events, FitFinished)
    assert all(np.isfinite(e.cost) for e in iters)
    assert sink.events[-1].result["success"]
    np.testing.assert_allclose(popt, ref.x, rtol=1e-5)


def test_non_finite_wall_exhausting_max_nfev_is_a_clear_failure_sync(capsys):
    ref = scipy_reference(WALL_BEFORE_OPTIMUM, max_nfev=10)
    assert ref.status == 0 and not ref.success
    sink = Collect()
    with pytest.raises(RuntimeError, match="Optimal parameters not found: The maximum number"):
        ns.curve_fit(
            nan_wall_model, X, Y, p0=P0, method="trf", max_nfev=10, verbose=2, sinks=[sink]
        )
    check_non_finite_run(sink.events, ref, INITIAL_COST, converged=False)
    fin = sink.events[-1].result
    assert not fin["success"] and "maximum number of function evaluations" in fin["message"]
    assert capsys.readouterr().out.splitlines()[-2] == fin["message"]


def test_nan_at_the_initial_point_sync(capsys):
    sink = Collect()
    with pytest.raises(ValueError, match="not finite at the initial point"):
        ns.curve_fit(nan_at_start_model, X, Y, p0=P0, verbose=2, sinks=[sink])
    evs = sink.events
    assert isinstance(evs[0], FitStarted) and isinstance(evs[-1], FitFailed)
    assert evs[-1].error_type == "ValueError"
    assert "not finite at the initial point" in evs[-1].message
    # at most the (non-finite) iteration-0 row comes in between
    assert all(isinstance(e, Iteration) and e.iteration == 0 for e in evs[1:-1])
    assert "Fit failed: ValueError: Residuals are not finite" in capsys.readouterr().out


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["nan", "inf"])
async def test_non_finite_trial_points_are_rejected_like_scipy_stream(anyio_backend, kind):
    before = live_tasks()
    model, wall = MID_FIT_MODELS[kind]
    ref = scipy_reference(wall, np.nan if kind == "nan" else np.inf)
    sink = Collect()
    evs = []
    with anyio.fail_after(TIMEOUT):
        async with ns.fit_stream(model, X, Y, P0, method="trf", sinks=[sink]) as stream:
            async for ev in stream:
                evs.append(ev)
    for got in (evs, sink.events):
        check_non_finite_run(got, ref, INITIAL_COST)
    assert stream.result.success and stream.result.status == evs[-1].result["status"]
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_non_finite_wall_exhausting_max_nfev_stream(anyio_backend):
    before = live_tasks()
    ref = scipy_reference(WALL_BEFORE_OPTIMUM, max_nfev=10)
    sink = Collect()
    evs = []
    with anyio.fail_after(TIMEOUT):
        # not converging is a result, not an error: the stream ends normally with status 0
        async for ev in ns.fit_stream(
            nan_wall_model, X, Y, P0, method="trf", max_nfev=10, sinks=[sink]
        ):
            evs.append(ev)
    for got in (evs, sink.events):
        check_non_finite_run(got, ref, INITIAL_COST, converged=False)
        assert not got[-1].result["success"]
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_nan_at_the_initial_point_stream(anyio_backend, tmp_path):
    before = live_tasks()
    sink, path = Collect(), tmp_path / "fit.jsonl"
    evs = []
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(ns.FitError, match="not finite at the initial point") as info:
            async for ev in ns.fit_stream(
                nan_at_start_model, X, Y, P0, sinks=[sink, JsonlSink(path)]
            ):
                evs.append(ev)
    assert isinstance(info.value.__cause__, ValueError)
    for got in (evs, sink.events, jsonl_events(path)):
        assert isinstance(got[0], FitStarted) and isinstance(got[-1], FitFailed)
        assert "not finite at the initial point" in got[-1].message
        assert all(isinstance(e, Iteration) and e.iteration == 0 for e in got[1:-1])
    await assert_no_leftover_tasks(before)


# =============================================================================================
# 2. Cancellation
# =============================================================================================


def assert_stopped_file(path, fit_id: str) -> None:
    """The JsonlSink flushed: the file ends with a terminal FitFinished (status -2)."""
    evs = jsonl_events(path)
    check_order(evs, FitFinished)
    assert evs[0].fit_id == fit_id
    assert evs[-1].stopped and evs[-1].result["status"] == -2


def assert_stopped_quickly(stream, cancelled_at: float) -> float:
    took = time.monotonic() - cancelled_at
    assert not fit_threads(), f"the solver thread still runs {took:.2f} s after the cancel"
    assert took < 1.0, f"the solver took {took:.2f} s to stop"
    res = stream.result
    assert res is not None and res.status == -2 and not res.success
    assert res.nit < 4000  # a full fit is ~4900 iterations
    return took


@pytest.mark.anyio
async def test_cancel_scope_cancel_in_the_loop_stops_the_solver(anyio_backend, tmp_path):
    before = live_tasks()
    path = tmp_path / "fit.jsonl"
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(
            slow_residual, [1.0], args=LONG, sinks=[JsonlSink(path)], **SLOW_TOLS
        ) as stream:
            with anyio.CancelScope() as scope:
                async for ev in stream:
                    if isinstance(ev, Iteration) and ev.iteration >= 5:
                        cancelled_at = time.monotonic()
                        scope.cancel()
            assert scope.cancelled_caught
            assert_stopped_quickly(stream, cancelled_at)
    assert_stopped_file(path, stream.fit_id)
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_cancelling_the_consumer_task_from_outside(anyio_backend, tmp_path):
    """A plain ``async for`` in a task that a sibling cancels while it waits for events."""
    before = live_tasks()
    path = tmp_path / "fit.jsonl"
    stream = ns.least_squares_stream(
        slow_residual, [1.0], args=LONG, sinks=[JsonlSink(path)], **SLOW_TOLS
    )
    running = anyio.Event()
    seen = []

    async def consume():
        async for ev in stream:
            seen.append(ev)
            if isinstance(ev, Iteration) and ev.iteration >= 5:
                running.set()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await running.wait()
            cancelled_at = time.monotonic()
            tg.cancel_scope.cancel()
    assert tg.cancel_scope.cancelled_caught
    assert_stopped_quickly(stream, cancelled_at)
    assert_stopped_file(path, stream.fit_id)
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_fail_after_while_reading_a_long_fit(anyio_backend, tmp_path):
    before = live_tasks()
    path = tmp_path / "fit.jsonl"
    sink = Collect()
    deadline = None
    with pytest.raises(TimeoutError):
        with anyio.fail_after(TIMEOUT) as scope:
            async with ns.least_squares_stream(
                slow_residual, [1.0], args=LONG, sinks=[JsonlSink(path), sink], **SLOW_TOLS
            ) as stream:
                async for ev in stream:
                    if deadline is None and isinstance(ev, Iteration):
                        # armed once the solver runs (its compile time is not the point here)
                        deadline = anyio.current_time() + 0.3
                        scope.deadline = deadline
    late = anyio.current_time() - deadline
    assert not fit_threads()
    assert late < 1.0, f"fail_after's deadline passed {late:.2f} s before the fit was stopped"
    assert stream.result.status == -2
    assert_stopped_file(path, stream.fit_id)
    check_order(sink.events, FitFinished)
    assert sink.events[-1].stopped and sink.closed == 1
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_cancel_in_the_loop_body_with_async_with(anyio_backend, tmp_path):
    """The cancel arrives while the body awaits something else: ``async with`` still stops it."""
    before = live_tasks()
    path = tmp_path / "fit.jsonl"
    with anyio.fail_after(TIMEOUT):
        with anyio.CancelScope() as scope:
            async with ns.least_squares_stream(
                slow_residual, [1.0], args=LONG, sinks=[JsonlSink(path)], **SLOW_TOLS
            ) as stream:
                async for ev in stream:
                    if isinstance(ev, Iteration) and ev.iteration >= 5:
                        cancelled_at = time.monotonic()
                        scope.cancel()
                    await anyio.sleep(0.001)  # the cancel is delivered here, not in the stream
    assert scope.cancelled_caught
    assert_stopped_quickly(stream, cancelled_at)
    assert_stopped_file(path, stream.fit_id)
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_cancel_in_the_loop_body_of_a_plain_async_for(anyio_backend):
    """Cancelled at an await in the loop body (not inside the stream's receive), nothing calls
    the stream; it is dropped, and its finalizer stops the fit."""
    before = live_tasks()
    fit_id = None
    try:
        with anyio.fail_after(TIMEOUT):
            with anyio.CancelScope() as scope:
                # no name bound to the stream: once the loop is left, nothing but the solver's
                # own thread refers to it
                async for ev in ns.least_squares_stream(
                    slow_residual, [1.0], args=LONG, **SLOW_TOLS
                ):
                    fit_id = ev.fit_id
                    if isinstance(ev, Iteration) and ev.iteration >= 5:
                        cancelled_at = time.monotonic()
                        scope.cancel()
                    await anyio.sleep(0.001)  # the cancel is delivered here
        assert scope.cancelled_caught
        name = f"nlsq_stream-{fit_id}"
        while any(t.name == name for t in threading.enumerate()):
            assert time.monotonic() - cancelled_at < 1.0, "the solver still runs 1 s after"
            await anyio.sleep(0.01)
    finally:  # whatever happened, leave nothing running for the next tests
        if fit_id is not None:
            ns.stop_fit(fit_id)
        for t in threading.enumerate():
            if t.name == f"nlsq_stream-{fit_id}":
                t.join(TIMEOUT)
    await assert_no_leftover_tasks(before)


# =============================================================================================
# 3. Load: 200 concurrent streams in one event loop
# =============================================================================================


def gaussian(x, a, mu, s, c):
    return a * jnp.exp(-((x - mu) ** 2) / (2 * s**2)) + c


def rational(x, a, b, c):
    return (a + b * x) / (1 + c * x)


def line_sine(x, a, b, c, d):
    return a * x + b + c * jnp.sin(d * x)


LOAD_MODELS = [
    (decay_model, (0.0, 4.0), np.array([2.0, 0.7, 0.3])),
    (gaussian, (-3.0, 3.0), np.array([1.5, 0.2, 0.8, 0.1])),
    (rational, (0.0, 5.0), np.array([1.0, 2.0, 0.5])),
    (line_sine, (0.0, 10.0), np.array([0.3, 1.0, 0.8, 1.3])),
]
LOAD_SIZES = [50, 200, 1000]
N_STREAMS = 200


def load_case(i: int):
    """Stream i's model, size, own truth, own noisy data and own start."""
    rng = np.random.default_rng(10_000 + i)
    f, (lo, hi), base = LOAD_MODELS[i % len(LOAD_MODELS)]
    m = LOAD_SIZES[(i // len(LOAD_MODELS)) % len(LOAD_SIZES)]
    truth = base * (1 + 0.2 * rng.uniform(-1, 1, base.size))
    x = np.linspace(lo, hi, m)
    y = np.asarray(f(x, *truth)) + 1e-3 * rng.standard_normal(m)
    p0 = truth * (1 + 0.1 * rng.uniform(-1, 1, base.size))
    return f, x, y, p0, truth


@pytest.mark.anyio
async def test_200_concurrent_streams(anyio_backend):
    before = live_tasks()
    finished: dict[int, str] = {}
    watched: dict[str, list] = {}

    async def one(i: int) -> None:
        f, x, y, p0, truth = load_case(i)
        evs = []
        async with ns.fit_stream(f, x, y, p0) as stream:
            async for ev in stream:
                assert ev.fit_id == stream.fit_id, (i, ev.fit_id, stream.fit_id)
                evs.append(ev)
        iters = check_order(evs, FitFinished)
        assert iters[0].iteration == 0
        res = stream.result
        assert res.success, (i, res.message)
        assert evs[-1].result["status"] == res.status
        np.testing.assert_array_equal(iters[-1].params, res.x)
        np.testing.assert_allclose(res.popt, truth, rtol=2e-2, atol=2e-2, err_msg=f"stream {i}")
        finished[i] = stream.fit_id

    async def watch(sub, done: anyio.Event) -> None:
        """A subscriber to every fit at once: the hub keeps each fit's events in order."""
        terminals = 0
        async for ev in sub:
            watched.setdefault(ev.fit_id, []).append(ev)
            if isinstance(ev, (FitFinished, FitFailed)):
                terminals += 1
                if terminals == N_STREAMS:
                    done.set()
                    return

    t0 = time.monotonic()
    with anyio.fail_after(240):
        async with ns.subscribe() as sub:
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, sub, done)
                async with anyio.create_task_group() as fits:
                    for i in range(N_STREAMS):
                        fits.start_soon(one, i)
                await done.wait()
    took = time.monotonic() - t0
    print(f"\n[load] {N_STREAMS} concurrent fit_stream's on {anyio_backend}: {took:.1f} s")
    assert sorted(finished) == list(range(N_STREAMS))
    assert len(set(finished.values())) == N_STREAMS
    assert set(watched) == set(finished.values())
    for evs in watched.values():
        check_order(evs, FitFinished)
    await assert_no_leftover_tasks(before)


# =============================================================================================
# 4. Soak: 1,000,000 Iteration events through a JsonlSink
# =============================================================================================

SOAK_EVENTS = 1_000_000
SOAK_ROWS = 1000  # rows per published batch: 6 head columns + 3 parameters
SOAK_MAX_LAG = 50_000  # paced producer: at most this many events ahead of the sink

SOAK_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys, threading, time
    import numpy as np
    from nlsq_stream.stream.hub import HUB, Batch
    from nlsq_stream.stream.pipeline import hub_channel
    from nlsq_stream.stream.runner import SinkRunner
    from nlsq_stream.events import FitFinished, FitStarted
    from nlsq_stream.sinks import JsonlSink

    path, n, rows, max_lag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def hwm():  # VmHWM: this process image's peak RSS (ru_maxrss survives exec, VmHWM does not)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    hwm0 = hwm()
    base = rss()
    peak = [base]
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fit_id = "fit-soak"
    sink = JsonlSink(path, mode="w")
    t0 = time.monotonic()
    runner = SinkRunner([sink], fit_id)
    channel = hub_channel(fit_id)  # what a fit's XLA callback feeds
    with runner:
        HUB.publish(Batch(fit_id, [FitStarted(fit_id, "trf", 3, 100, ("a", "b", "c"),
                                              np.zeros(3), time.time())]))
        ones = np.ones(rows)
        for b in range(n // rows):
            it = np.arange(b * rows, (b + 1) * rows, dtype=np.float64)
            block = np.column_stack([it, it + 1, 1.0 / (it + 1), 1e-3 * ones, 1e-2 * ones,
                                     1e-4 * ones, ones, 0.5 * it, -ones])
            channel.on_rows(block, rows)
            if max_lag:  # a producer that never runs more than max_lag events ahead
                while sink.lines_written < (b + 1) * rows - max_lag:
                    time.sleep(0.005)
        published = time.monotonic() - t0
        result = {"x": np.zeros(3), "cost": 0.0, "optimality": 0.0, "nfev": n, "njev": n,
                  "nit": n - 1, "status": 1, "message": "soak", "success": True}
        HUB.publish(Batch(fit_id, [FitFinished(fit_id, result, time.time())]))
        drained = runner.wait(600)
    sampling.set()
    sampler.join()
    deadline = time.monotonic() + 2.0  # the shared sink loop ends ~0.1 s after its last fit
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({
        "drained": drained,
        "errors": runner.errors,
        "lines_written": sink.lines_written,
        "publish_s": published,
        "total_s": time.monotonic() - t0,
        "rss_base_mb": base / 2**20,
        "rss_peak_growth_mb": (peak[0] - base) / 2**20,
        "hwm_before_mb": hwm0 / 2**20,
        "hwm_after_mb": hwm() / 2**20,
        "threads": [t.name for t in threading.enumerate()],
    }))
    """
)


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    """Two fresh processes at once (clean peak-RSS figures): a producer paced to the sink's speed,
    and a burst producer that publishes all 1M rows as fast as it can."""
    d = tmp_path_factory.mktemp("soak")
    script = d / "soak.py"
    script.write_text(SOAK_SCRIPT)
    runs = {}
    for mode, lag in (("paced", SOAK_MAX_LAG), ("burst", 0)):
        path = d / f"{mode}.jsonl"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), str(SOAK_EVENTS), str(SOAK_ROWS), str(lag)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[mode] = (proc, path)
    out = {}
    for mode, (proc, path) in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        stats = json.loads(stdout.strip().splitlines()[-1])
        stats["path"] = path
        out[mode] = stats
        print(
            f"\n[soak:{mode}] {SOAK_EVENTS:,} Iteration events -> JsonlSink: published in "
            f"{stats['publish_s']:.2f} s, drained in {stats['total_s']:.2f} s; RSS growth "
            f"(sampled) {stats['rss_peak_growth_mb']:.1f} MB over a base of "
            f"{stats['rss_base_mb']:.1f} MB; peak RSS (VmHWM) {stats['hwm_before_mb']:.1f} -> "
            f"{stats['hwm_after_mb']:.1f} MB"
        )
    return out


def check_soak_file(path) -> None:
    """Lossless and in order: FitStarted, iterations 0..N-1 exactly once each, FitFinished."""
    n = 0
    key = b'"iteration":'
    with open(path, "rb") as f:
        first = f.readline()
        assert isinstance(event_from_json(first), FitStarted)
        last = None
        for line in f:
            if not line.startswith(b'{"schema":1,"type":"Iteration"'):
                last = line
                break
            start = line.index(key) + len(key)
            it = int(line[start : line.index(b",", start)])
            assert it == n, f"expected iteration {n}, got {it}"
            if n % 100_000 == 0:  # spot-check full decoding
                ev = event_from_json(line)
                assert isinstance(ev, Iteration) and ev.iteration == n and ev.nfev == n + 1
                np.testing.assert_array_equal(ev.params, [1.0, 0.5 * n, -1.0])
            n += 1
        assert f.read() == b"", "lines after the terminal event"
    assert n == SOAK_EVENTS
    assert last is not None and isinstance(event_from_json(last), FitFinished)


@pytest.mark.parametrize("mode", ["paced", "burst"])
def test_soak_one_million_events_lossless(soak, mode):
    stats = soak[mode]
    assert stats["drained"] and stats["errors"] == []
    assert stats["lines_written"] == SOAK_EVENTS + 2  # FitStarted + 1M Iterations + FitFinished
    assert stats["threads"] == ["MainThread"]  # the sinks' loop ended once idle
    check_soak_file(stats["path"])


def test_soak_memory_stays_bounded_when_the_sink_keeps_up(soak):
    growth = soak["paced"]["rss_peak_growth_mb"]
    assert growth < 300, f"RSS grew by {growth:.0f} MB"


def test_soak_memory_stays_bounded_when_the_producer_outruns_the_sink(soak):
    growth = soak["burst"]["rss_peak_growth_mb"]
    assert growth < 300, f"RSS grew by {growth:.0f} MB"


# =============================================================================================
# 5. Crash safety: SIGKILL a process in the middle of a fit that writes a JsonlSink
# =============================================================================================

CRASH_SCRIPT = textwrap.dedent(
    r"""
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import nlsq_stream as ns

    m = 100_000  # ~5000 iterations of ~1 ms: several seconds
    w = np.full(m, 1.0 / np.sqrt(m))

    def slow_model(x, a):  # conftest's slow_residual as a curve_fit model
        h = x.shape[0] // 2
        return jnp.concatenate([x[:h] * (a + 1.0), x[h:] * (0.9999 * a**2 + a - 1.0)])

    ns.curve_fit(slow_model, np.concatenate([w, w]), np.zeros(2 * m), p0=[1.0], method="trf",
                 ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=100_000,
                 sinks=[ns.sinks.JsonlSink(sys.argv[1], mode="w")])
    print("the fit finished before it was killed", flush=True)
    """
)
CRASH_MIN_LINES = 50


@pytest.fixture(scope="module")
def crashed_log(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    script, path = d / "crash.py", d / "fit.jsonl"
    script.write_text(CRASH_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= CRASH_MIN_LINES:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the child ended early: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    assert b"finished" not in out
    return path


def test_sigkill_leaves_only_complete_lines_or_a_torn_last_line(crashed_log):
    data = crashed_log.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    assert len(complete) >= CRASH_MIN_LINES
    evs = [event_from_json(line) for line in complete]  # every complete line parses
    assert isinstance(evs[0], FitStarted)
    assert not any(isinstance(e, (FitFinished, FitFailed)) for e in evs)  # killed mid-fit
    its = [e.iteration for e in evs[1:]]
    assert its == list(range(len(its)))  # lossless up to the kill
    print(f"\n[crash] {len(complete)} complete lines, torn tail of {len(tail)} bytes")
    # the sync reader agrees: a torn tail is reported, never raised
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(iter_events(crashed_log))
    assert got == evs
    msgs = [str(w.message) for w in caught if issubclass(w.category, ns.ReplayWarning)]
    if tail:
        assert len(msgs) == 1 and "torn" in msgs[0] and f":{len(lines)}:" in msgs[0], msgs
    else:
        assert msgs == []


@pytest.mark.anyio
async def test_replay_of_a_killed_fit(anyio_backend, crashed_log, tmp_path):
    before = live_tasks()
    # the killed log as it is, and the same log torn in the middle of its last line
    torn = tmp_path / "torn.jsonl"
    data = crashed_log.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1
    torn.write_bytes(data[: cut + (len(data) - cut) // 2])
    n_torn = data[:cut].count(b"\n") + 1  # the torn line's number
    for path, must_tear in ((crashed_log, False), (torn, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with anyio.fail_after(TIMEOUT):
                evs = [ev async for ev in ns.replay(path)]
        assert isinstance(evs[0], FitStarted)
        its = [e.iteration for e in evs[1:]]
        assert all(isinstance(e, Iteration) for e in evs[1:])
        assert all(a < b for a, b in itertools.pairwise(its))
        msgs = [str(w.message) for w in caught if issubclass(w.category, ns.ReplayWarning)]
        if must_tear:
            assert len(msgs) == 1, msgs
            assert str(path) in msgs[0] and f":{n_torn}:" in msgs[0] and "torn" in msgs[0]
        else:
            assert all("torn" in m for m in msgs) and len(msgs) <= 1
    await assert_no_leftover_tasks(before)
