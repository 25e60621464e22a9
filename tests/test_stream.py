"""fit_stream / least_squares_stream: event order, results, stop, early exit, failures."""

from __future__ import annotations

import itertools
import threading
import time
import warnings

import anyio
import numpy as np
import pytest
from conftest import (
    PRODUCTION_IDLE_S,
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
from nlsq_stream.events import FitFailed, FitFinished, FitStarted, Iteration
from nlsq_stream.stream.hub import HUB
from nlsq_stream.stream.runner import _SinkLoop

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_leftover_threads")]

X, Y, P0 = decay_data()
LONG = slow_args(20_000)  # ~5000 iterations, about a second when not stopped
TIMEOUT = 60


def check_order(evs: list, terminal=FitFinished) -> list[Iteration]:
    """FitStarted first, Iterations strictly increasing, exactly one terminal event, last."""
    assert isinstance(evs[0], FitStarted)
    assert isinstance(evs[-1], terminal)
    assert sum(isinstance(e, (FitFinished, FitFailed)) for e in evs) == 1
    assert sum(isinstance(e, FitStarted) for e in evs) == 1
    iters = [e for e in evs if isinstance(e, Iteration)]
    assert len(iters) == len(evs) - 2
    its = [e.iteration for e in iters]
    assert all(a < b for a, b in itertools.pairwise(its)), its
    assert len({e.fit_id for e in evs}) == 1
    return iters


def hub_subscribers() -> int:
    return len(HUB._subs)


async def test_fit_stream_async_with(anyio_backend):
    before, subs = live_tasks(), hub_subscribers()
    popt_ref, pcov_ref = ns.curve_fit(decay_model, X, Y, p0=P0)
    evs = []
    with anyio.fail_after(TIMEOUT):
        async with ns.fit_stream(decay_model, X, Y, p0=P0) as stream:
            assert isinstance(stream, ns.FitStream)
            async for ev in stream:
                evs.append(ev)
                if isinstance(ev, FitFinished):
                    assert stream.result is not None  # set before the terminal event arrives
    iters = check_order(evs)
    res = stream.result
    assert [e.iteration for e in iters] == list(range(res.nit + 1))  # lossless: every iteration
    assert evs[0].fit_id == stream.fit_id
    np.testing.assert_allclose(res.popt, popt_ref, rtol=1e-10)
    np.testing.assert_allclose(res.pcov, pcov_ref, rtol=1e-6)
    np.testing.assert_array_equal(iters[-1].params, res.x)
    assert iters[-1].cost == res.cost and iters[-1].nfev == res.nfev
    fin = evs[-1].result
    assert fin["status"] == res.status and fin["nit"] == res.nit and fin["success"]
    np.testing.assert_array_equal(fin["x"], res.x)
    assert stream.skipped == 0
    assert hub_subscribers() == subs
    await assert_no_leftover_tasks(before)


async def test_fit_stream_plain_async_for(anyio_backend):
    before, subs = live_tasks(), hub_subscribers()
    popt_ref, _ = ns.curve_fit(decay_model, X, Y, p0=P0)
    stream = ns.fit_stream(decay_model, X, Y, P0)
    evs = []
    with anyio.fail_after(TIMEOUT):
        async for ev in stream:
            evs.append(ev)
    check_order(evs)
    np.testing.assert_allclose(stream.result.popt, popt_ref, rtol=1e-10)
    # iterating a finished stream again yields nothing
    with anyio.fail_after(TIMEOUT):
        assert [ev async for ev in stream] == []
    assert hub_subscribers() == subs
    await assert_no_leftover_tasks(before)


async def test_least_squares_stream(anyio_backend):
    before = live_tasks()
    w, lam = slow_args(100, lam=0.9)
    ref = ns.least_squares(slow_residual, [1.0], args=(w, lam), **SLOW_TOLS)
    evs = []
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(
            slow_residual, [1.0], args=(w, lam), **SLOW_TOLS
        ) as stream:
            async for ev in stream:
                evs.append(ev)
    iters = check_order(evs)
    res = stream.result
    assert res.nit == ref.nit > 10
    assert [e.iteration for e in iters] == list(range(res.nit + 1))
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-10, atol=1e-14)
    assert evs[0].param_names == ("x[0]",) and evs[0].method == "trf"
    assert evs[0].n_residuals == 200
    await assert_no_leftover_tasks(before)


async def test_stop_ends_the_fit_with_status_minus_2(anyio_backend):
    before = live_tasks()
    evs = []
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(slow_residual, [1.0], args=LONG, **SLOW_TOLS) as stream:
            async for ev in stream:
                evs.append(ev)
                if len(evs) == 3:
                    stream.stop()
                    stream.stop()  # idempotent
    iters = check_order(evs)
    fin = evs[-1]
    assert fin.stopped and fin.status == -2
    res = stream.result
    assert res.status == -2 and not res.success
    assert "stopped" in res.message
    assert res.nit < 4000  # a full fit takes ~5000 iterations
    assert np.all(np.isfinite(res.x))
    assert res.cost <= iters[0].cost
    assert iters[-1].iteration == res.nit  # the last iteration is still reported
    np.testing.assert_array_equal(iters[-1].params, res.x)
    await assert_no_leftover_tasks(before)


async def test_leaving_async_with_early_stops_the_fit(anyio_backend):
    before, subs = live_tasks(), hub_subscribers()
    evs = []
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(slow_residual, [1.0], args=LONG, **SLOW_TOLS) as stream:
            async for ev in stream:
                evs.append(ev)
                if len(evs) == 3:
                    break
    assert isinstance(evs[0], FitStarted) and len(evs) == 3
    res = stream.result
    assert res is not None and res.status == -2
    assert res.nit < 4000
    assert np.all(np.isfinite(res.x))
    assert not any(t.name.startswith("nlsq_stream") for t in threading.enumerate())
    assert hub_subscribers() == subs
    await assert_no_leftover_tasks(before)


async def test_exiting_before_reading_anything_stops_at_once(anyio_backend):
    before = live_tasks()
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(slow_residual, [1.0], args=LONG, **SLOW_TOLS) as stream:
            pass
    assert stream.result.status == -2
    # Stopped at one of the first flushes (a flush comes at least every 64 iterations): usually
    # at iteration 0, later only when this thread was preempted right after starting the fit.
    assert stream.result.nit < 4000
    await assert_no_leftover_tasks(before)


async def test_cancelling_the_consumer_stops_the_fit(anyio_backend):
    before = live_tasks()
    seen = 0
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(slow_residual, [1.0], args=LONG, **SLOW_TOLS) as stream:
            with anyio.CancelScope() as scope:
                async for _ in stream:
                    seen += 1
                    if seen == 3:
                        # the next receive is cancelled. (A deadline rather than scope.cancel():
                        # anyio 4.16 passes a `reason` that the installed trio 0.22 rejects.)
                        scope.deadline = -np.inf
    assert scope.cancelled_caught
    assert stream.result.status == -2
    await assert_no_leftover_tasks(before)


async def test_stop_reaches_sinks_too(anyio_backend, tmp_path):
    before = live_tasks()
    path = tmp_path / "fit.jsonl"
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(
            slow_residual, [1.0], args=LONG, sinks=[ns.sinks.JsonlSink(path)], **SLOW_TOLS
        ) as stream:
            async for ev in stream:
                if isinstance(ev, Iteration):
                    stream.stop()
    evs = [ns.events.event_from_json(line) for line in path.read_text().splitlines()]
    check_order(evs)
    assert evs[-1].stopped
    await assert_no_leftover_tasks(before)


class StopAtSecondIteration:
    """A sink with a Stop button: it stops its fit by id, as the notebook widget does."""

    def __init__(self) -> None:
        self.iterations = 0
        self.answers: list[bool] = []

    async def send(self, event):
        if isinstance(event, Iteration):
            self.iterations += 1
            if self.iterations == 2:
                self.answers.append(ns.stop_fit(event.fit_id))


async def test_a_sink_stops_its_fit_by_id(anyio_backend):
    before = live_tasks()
    sink = StopAtSecondIteration()
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(
            slow_residual, [1.0], args=LONG, sinks=[sink], **SLOW_TOLS
        ) as stream:
            evs = [ev async for ev in stream]
    check_order(evs)
    assert sink.answers == [True]
    assert stream.result.status == -2 and evs[-1].stopped
    assert stream.result.nit < 4000
    assert ns.stop_fit(stream.fit_id) is False  # finished fits are forgotten
    await assert_no_leftover_tasks(before)


def test_stop_fit_rejects_a_non_string_id():
    with pytest.raises(TypeError, match="fit_id"):
        ns.stop_fit(3)


class RaiseOnSolverTrace:
    """A model that passes fit_stream's validation trace and raises when the solver traces it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, a, b, c):
        self.calls += 1
        if self.calls > 1:
            raise ValueError("model refused to trace: no can do")
        return decay_model(x, a, b, c)


async def test_model_raising_during_tracing(anyio_backend):
    before, subs = live_tasks(), hub_subscribers()
    model = RaiseOnSolverTrace()
    stream = ns.fit_stream(model, X, Y, P0)  # validation traces the model once: fine
    evs = []
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(ns.FitError, match="no can do") as info:
            async for ev in stream:
                evs.append(ev)
    assert [type(e) for e in evs] == [FitStarted, FitFailed]
    assert evs[-1].error_type == "ValueError"
    assert "model refused to trace: no can do" in evs[-1].message
    assert isinstance(info.value.__cause__, ValueError)
    assert stream.result is None and isinstance(stream.error, ValueError)
    assert hub_subscribers() == subs
    await assert_no_leftover_tasks(before)


async def test_model_raising_during_tracing_async_with(anyio_backend):
    before = live_tasks()
    evs = []
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(ns.FitError, match="no can do"):
            async with ns.fit_stream(RaiseOnSolverTrace(), X, Y, P0) as stream:
                async for ev in stream:
                    evs.append(ev)
    assert [type(e) for e in evs] == [FitStarted, FitFailed]
    assert stream.result is None
    await assert_no_leftover_tasks(before)


async def test_model_raising_at_run_time(anyio_backend):
    before = live_tasks()
    evs = []
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(ns.FitError, match="sensor offline at run time"):
            async for ev in ns.fit_stream(runtime_failing_model, X, Y, P0):
                evs.append(ev)
    assert [type(e) for e in evs] == [FitStarted, FitFailed]
    assert "sensor offline at run time" in evs[-1].message
    await assert_no_leftover_tasks(before)


async def _null_sink(event):
    pass


async def test_plain_async_for_left_at_the_terminal_event_cleans_up(anyio_backend):
    subs = hub_subscribers()
    stream = ns.fit_stream(decay_model, X, Y, P0, sinks=[_null_sink])

    def sink_threads():
        return [t for t in threading.enumerate() if t.name == "nlsq_stream-sinks"]

    try:
        with anyio.fail_after(TIMEOUT):
            async for ev in stream:
                if isinstance(ev, FitFinished):
                    break  # the fit is over: nothing of it should be left running
        with anyio.move_on_after(0.5):
            while hub_subscribers() != subs or sink_threads():
                await anyio.sleep(0.01)
        assert hub_subscribers() == subs, "the consumer's subscription is still in HUB"
        assert not sink_threads(), "the shared sink loop did not end once idle"
    finally:
        await stream._close()  # what exhausting the iterator would have done


# ---- a sink that raises: detached, in stream.sink_errors, and a SinkError warning ----------


class FailOn:
    """Raises on its ``n``-th event (named, so the failures can be told apart)."""

    def __init__(self, n: int, name: str) -> None:
        self.n, self.name, self.seen = n, name, 0

    async def send(self, event) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise RuntimeError(f"{self.name} exploded on purpose")


def sink_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ns.SinkError)]


async def test_a_failing_sink_warns_once_when_the_async_with_block_ends(anyio_backend):
    before = live_tasks()
    collect = []

    async def keep(event):
        collect.append(event)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with anyio.fail_after(TIMEOUT):
            async with ns.fit_stream(
                decay_model, X, Y, P0, sinks=[FailOn(2, "first"), keep, FailOn(3, "second")]
            ) as stream:
                evs = []
                async for ev in stream:
                    evs.append(ev)
                    if isinstance(ev, FitFinished):
                        break  # the stream is still open: no warning yet
                assert sink_warnings(caught) == []
                n_open = len(caught)
    check_order(evs)
    assert collect == evs  # the good sink lost nothing
    assert len(stream.sink_errors) == 2
    closing = [w for w in caught[n_open:] if issubclass(w.category, ns.SinkError)]
    got = [str(w.message) for w in closing]
    assert sorted(got) == sorted(stream.sink_errors)  # once per failing sink, on leaving
    assert any("first exploded" in m for m in got) and any("second exploded" in m for m in got)
    assert all(w.filename == __file__ for w in closing)  # it points at the caller
    await assert_no_leftover_tasks(before)


async def test_a_failing_sink_warns_under_pytest_warns_with_plain_async_for(anyio_backend):
    before = live_tasks()
    with pytest.warns(ns.SinkError, match="only exploded on purpose") as record:
        with anyio.fail_after(TIMEOUT):
            stream = ns.fit_stream(decay_model, X, Y, P0, sinks=[FailOn(1, "only")])
            evs = [ev async for ev in stream]  # exhausting the iterator closes the stream
    check_order(evs)
    assert [str(w.message) for w in record if issubclass(w.category, ns.SinkError)] == (
        stream.sink_errors
    )
    assert stream.result["sink_errors"] == stream.sink_errors
    await assert_no_leftover_tasks(before)


async def test_a_failing_sink_warns_when_the_fit_fails_too(anyio_backend):
    before = live_tasks()
    with pytest.warns(ns.SinkError, match="early exploded on purpose"):
        with anyio.fail_after(TIMEOUT):
            with pytest.raises(ns.FitError, match="sensor offline at run time"):
                async with ns.fit_stream(
                    runtime_failing_model, X, Y, P0, sinks=[FailOn(1, "early")]
                ) as stream:
                    async for _ in stream:
                        pass
    assert len(stream.sink_errors) == 1
    await assert_no_leftover_tasks(before)


async def test_good_sinks_issue_no_sink_error_warning(anyio_backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ns.SinkError)
        with anyio.fail_after(TIMEOUT):
            async with ns.fit_stream(decay_model, X, Y, P0, sinks=[_null_sink]) as stream:
                async for _ in stream:
                    pass
    assert stream.sink_errors == []


def test_the_sink_loop_outlives_a_pause_then_ends(monkeypatch):
    """With the library's own idle time, watched fits 0.3 s apart share one sink thread (a new
    one costs ~0.6 ms), and it ends between IDLE_S and 1.5 IDLE_S (the idle check's period)
    after the last fit, plus scheduling slack."""
    monkeypatch.setattr(_SinkLoop, "IDLE_S", PRODUCTION_IDLE_S)

    def sink_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "nlsq_stream-sinks"]

    ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[_null_sink])
    (first,) = sink_threads()
    time.sleep(0.3)
    ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[_null_sink])
    released = time.monotonic()
    assert sink_threads() == [first], "a pause of 0.3 s started a new sink loop"
    first.join(1.5 * PRODUCTION_IDLE_S + 2.0)
    ended = time.monotonic() - released
    assert not first.is_alive(), "the sink loop did not end once idle"
    assert PRODUCTION_IDLE_S * 0.95 <= ended, f"ended {ended:.2f} s after its last fit"


async def test_bad_arguments_raise_before_anything_starts(anyio_backend):
    threads = set(threading.enumerate())
    with pytest.raises(ValueError, match="policy"):
        ns.fit_stream(decay_model, X, Y, P0, policy="newest")
    with pytest.raises(TypeError, match="sinks"):
        ns.fit_stream(decay_model, X, Y, P0, sinks=[object()])
    with pytest.raises(ValueError, match="policy"):
        ns.least_squares_stream(slow_residual, [1.0], args=LONG, policy="all")
    with pytest.raises(TypeError):
        ns.fit_stream(decay_model, X, Y, P0, bogus=1)
    assert set(threading.enumerate()) == threads


async def test_two_streams_at_once(anyio_backend):
    before = live_tasks()
    results = {}

    async def run(name, p0):
        evs = []
        async with ns.fit_stream(decay_model, X, Y, p0) as stream:
            async for ev in stream:
                evs.append(ev)
        check_order(evs)
        results[name] = (stream.fit_id, {e.fit_id for e in evs}, stream.result.popt)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "a", P0)
            tg.start_soon(run, "b", P0 * 1.1)
    (ida, idsa, pa), (idb, idsb, pb) = results["a"], results["b"]
    assert ida != idb and idsa == {ida} and idsb == {idb}
    np.testing.assert_allclose(pa, pb, rtol=1e-6)
    await assert_no_leftover_tasks(before)
