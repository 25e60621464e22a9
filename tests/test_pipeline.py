"""The sync face: curve_fit(verbose=2) from plain code and from inside a running event loop."""

from __future__ import annotations

import asyncio

import jax.numpy as jnp
import numpy as np
import pytest
import trio

from nlsq_stream import curve_fit, least_squares
from nlsq_stream.sinks import HEADER


def model(x, a, b, c):
    return a * jnp.exp(-b * x) + c


X = np.linspace(0, 5, 500)
Y = 2.5 * np.exp(-1.3 * X) + 0.5 + 0.01 * np.cos(9 * X)


def _check_table(out: str, nit: int) -> None:
    lines = out.strip("\n").splitlines()
    assert lines[0] == HEADER
    rows = lines[1 : 1 + nit + 1]
    assert [int(r[:15]) for r in rows] == list(range(nit + 1))
    assert lines[-1].startswith("Function evaluations ")


@pytest.mark.parametrize("runner", ["asyncio", "trio"])
def test_sync_face_works_inside_a_running_event_loop(capsys, runner, no_leftover_threads):
    """Jupyter runs cells inside an event loop; the sync face must not need that loop."""

    async def main():
        return curve_fit(model, X, Y, p0=[1.0, 1.0, 0.0], verbose=2, full_output=True)

    popt, _, info, _, _ = asyncio.run(main()) if runner == "asyncio" else trio.run(main)
    _check_table(capsys.readouterr().out, info["nit"])
    ref, _ = curve_fit(model, X, Y, p0=[1.0, 1.0, 0.0])
    np.testing.assert_array_equal(popt, ref)


def test_least_squares_verbose_prints_the_same_table(capsys, no_leftover_threads):
    res = least_squares(lambda p: model(X, *p) - Y, [1.0, 1.0, 0.0], verbose=2)
    _check_table(capsys.readouterr().out, res.nit)
    assert res.sink_errors == []


def test_a_watched_fit_leaves_nothing_for_the_garbage_collector(no_leftover_threads):
    """Every object of a watched fit is freed by reference counting. Objects left in reference
    cycles would make frequent watched fits run Python's cyclic GC (measured before this was
    fixed: a gen-0 collection every ~20 fits at ~0.1 ms, and a 39 ms full one per ~3000)."""
    import gc
    import io

    from nlsq_stream.sinks import ConsoleSink

    def fit():
        curve_fit(model, X, Y, p0=[1.0, 1.0, 0.0], verbose=2, sinks=[ConsoleSink(io.StringIO())])

    fit()  # compile and warm up
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            fit()
        gc.collect()
        ours = [
            type(o).__qualname__
            for o in gc.garbage
            if type(o).__module__.startswith(("nlsq_stream", "anyio", "asyncio", "_asyncio"))
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []


class _Table:
    """The console table behind a sink that runs inline (``inline=True``) or in the sink loop,
    noting in ``order`` when it gets the fit's start (the inline path's watcher setup)."""

    def __init__(self, out, inline: bool, order: list[str]) -> None:
        from nlsq_stream.sinks import ConsoleSink

        self.table, self.inline, self.order = ConsoleSink(out), inline, order

    def write_batch(self, events):
        if self.inline and type(events[0]).__name__ == "FitStarted":
            self.order.append("watchers")
        self.table.write_batch(events)

    async def send_batch(self, events):
        self.table.write_batch(events)


@pytest.mark.parametrize("inline", [True, False])
def test_watchers_are_set_up_while_the_first_program_runs(monkeypatch, inline, no_leftover_threads):
    """For a problem seen before, the sinks' setup (the sink loop's, or an inline sink getting
    the start) waits until the fit's first program has been dispatched (it then overlaps the
    device's work); a new problem announces its start, and so sets the watchers up, before it
    compiles."""
    import io

    from nlsq_stream.solver import engine
    from nlsq_stream.stream import emitter, runner

    order: list[str] = []
    first_chunk, enter = engine.first_chunk, runner.SinkRunner.__enter__

    def dispatch(*args, **kwargs):
        order.append("dispatch")
        return first_chunk(*args, **kwargs)

    def entered(self):
        order.append("watchers")
        return enter(self)

    monkeypatch.setattr(engine, "first_chunk", dispatch)
    monkeypatch.setattr(runner.SinkRunner, "__enter__", entered)

    def fit(x):
        out = io.StringIO()
        sink = _Table(out, inline, order)
        curve_fit(model, x, 2.0 * np.exp(-x) + 0.5, p0=[1.0, 1.0, 0.0], sinks=[sink])
        return out.getvalue()

    x = np.linspace(0, 5, 321 + inline)  # a size no other test uses: the first fit is new
    monkeypatch.setattr(emitter, "_MEMORY", type(emitter._MEMORY)())
    first = fit(x)
    assert order[:2] == ["watchers", "dispatch"]  # new: the start is shown before compiling
    fit(x)  # this fit is short (two trials, one per chunk): its per-trial time is known now
    order.clear()
    again = fit(x)
    assert order == ["dispatch", "watchers"]  # one chunk, dispatched before the setup
    for out in (first, again):
        _check_table(out, len(out.strip().splitlines()) - 4)


def test_a_failing_watcher_setup_is_raised_and_leaves_nothing_behind(
    monkeypatch, no_leftover_threads
):
    from nlsq_stream.stream import pipeline, runner

    def broken(self):
        raise OSError("no loop for the sinks")

    monkeypatch.setattr(runner.SinkRunner, "__enter__", broken)
    with pytest.raises(OSError, match="no loop for the sinks"):
        curve_fit(model, X, Y, p0=[1.0, 1.0, 0.0], sinks=[_Table(None, False, [])])

    def no_start(prep, fit_id):
        raise OSError("no start event")

    monkeypatch.setattr(pipeline, "started_event", no_start)
    with pytest.raises(OSError, match="no start event"):  # the inline path's setup
        curve_fit(model, X, Y, p0=[1.0, 1.0, 0.0], verbose=2)
    assert not pipeline._LIVE
