"""The sync face's inline path: when every sink can run in the caller's thread (``inline =
True`` and a synchronous ``write_batch``: the console table, JSON lines, logging), a watched fit
calls them there, between chunks, with no hub, thread or event loop. It must show exactly what
the sink-loop path shows, detach and report a failing sink the same way, and leave no thread."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings

import numpy as np
import pytest
from conftest import SLOW_TOLS, decay_data, decay_model, slow_args, slow_residual

import nlsq_stream as ns
from nlsq_stream import FitFinished, FitStarted, Iteration, SinkError
from nlsq_stream.events import EventBatch
from nlsq_stream.sinks import ConsoleSink, JsonlSink, LoggingSink
from nlsq_stream.stream import pipeline

pytestmark = pytest.mark.usefixtures("no_leftover_threads")

X, Y, P0 = decay_data(500)


async def _async_null(event):
    """An async sink: its presence puts every sink of the fit in the sink loop."""


def _sink_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("nlsq_stream")]


def _stripped(path) -> list[dict]:
    """The JSON lines of ``path``, without what differs between two runs of a fit."""
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        d.pop("time")
        d.pop("fit_id")
        out.append(d)
    return out


def _watch(tmp_path, name, extra, **kw):
    table, path = io.StringIO(), tmp_path / f"{name}.jsonl"
    records: list[logging.LogRecord] = []
    logger = logging.getLogger(f"test_inline.{name}")
    logger.setLevel(logging.DEBUG)
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    sinks = [ConsoleSink(table), JsonlSink(path, "w"), LoggingSink(logger), *extra]
    try:
        res = kw.pop("face")(sinks=sinks, **kw)
    finally:
        logger.removeHandler(handler)
    fit_id = records[0].nlsq_event.fit_id
    logged = [(r.levelname, r.getMessage().replace(fit_id, "FIT")) for r in records]
    return res, table.getvalue(), _stripped(path), logged


@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_inline_and_sink_loop_paths_show_the_same(tmp_path, verbose):
    """The same fit, its sinks inline and (with an async sink beside them) in the sink loop:
    the same table text, the same JSON lines (times and fit ids aside), the same log records."""

    def face(sinks):
        return ns.least_squares(
            lambda p: decay_model(X, *p) - Y, P0, method="trf", verbose=verbose, sinks=sinks
        )

    a = _watch(tmp_path, f"inline{verbose}", [], face=face)
    b = _watch(tmp_path, f"loop{verbose}", [_async_null], face=face)
    assert a[1] == b[1] and a[1].count("\n") > 4
    assert a[2] == b[2] and a[2][0]["type"] == "FitStarted" and a[2][-1]["type"] == "FitFinished"
    assert a[3] == b[3]
    np.testing.assert_array_equal(a[0].x, b[0].x)
    assert a[0].sink_errors == b[0].sink_errors == []


def test_inline_json_lines_replay_to_the_events_a_subscriber_sees(tmp_path):
    """The JSON lines written from the rows (no Iteration built) are the events' own JSON."""
    path = tmp_path / "fit.jsonl"
    got: list = []

    class Collect:
        inline = True

        def write_batch(self, events):
            got.extend(events)

    ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[JsonlSink(path, "w"), Collect()])
    assert [ev.to_json() for ev in got] == path.read_text().splitlines()
    assert [type(e) for e in got[:2]] == [FitStarted, Iteration]


def test_no_thread_is_started_when_every_sink_is_inline():
    seen: list[tuple[str, int, list[str]]] = []

    class Probe:
        inline = True

        def write_batch(self, events):
            for ev in events:
                seen.append((type(ev).__name__, threading.active_count(), _sink_threads()))

    deadline = threading.Event()
    while _sink_threads() and not deadline.wait(0.05):  # an earlier test's loop winding down
        pass
    before = threading.active_count()
    started = threading.Thread.start
    calls: list[str] = []

    def start(self, *a, **k):
        calls.append(self.name)
        return started(self, *a, **k)

    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        res = ns.least_squares(
            lambda p: decay_model(X, *p) - Y,
            P0,
            verbose=2,
            sinks=[Probe(), ConsoleSink(io.StringIO())],
        )
    finally:
        threading.Thread.start = started  # type: ignore[method-assign]
    assert res.success and calls == []
    assert seen[0][0] == "FitStarted" and seen[-1][0] == "FitFinished"
    # No thread of ours while the sinks ran (a thread left by an earlier test may still end
    # meanwhile, so the count may drop; it must never grow).
    assert all(count <= before and not sink_threads for _, count, sink_threads in seen)


class _Failing:
    inline = True

    def __init__(self, after: int) -> None:
        self.after, self.calls, self.closed = after, 0, 0

    def write_batch(self, events):
        self.calls += 1
        if self.calls > self.after:
            raise OSError("disk full")

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("after", [0, 1])
def test_a_failing_inline_sink_is_detached_and_warned(after):
    """It raises on its first (or second) batch: it is detached and closed once, the fit and
    the other sinks go on and lose nothing, ``sink_errors`` and one SinkError say so."""
    bad, table = _Failing(after), io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ns.least_squares(
            lambda p: decay_model(X, *p) - Y, P0, sinks=[bad, ConsoleSink(table)]
        )
    assert res.success and bad.calls == after + 1 and bad.closed == 1
    assert len(res.sink_errors) == 1
    assert res.sink_errors[0].startswith("sink _Failing raised OSError: disk full; it was detached")
    sink_warnings = [w for w in caught if issubclass(w.category, SinkError)]
    assert [str(w.message) for w in sink_warnings] == res.sink_errors
    assert sink_warnings[0].filename == __file__  # points at the caller
    lines = table.getvalue().splitlines()
    assert len(lines) == res.nit + 4 and lines[-1].startswith("Function evaluations")


def test_a_failing_close_is_reported():
    class BadClose:
        inline = True

        def write_batch(self, events):
            pass

        def close(self):
            raise ValueError("no fsync")

    with pytest.warns(SinkError, match="failed to close: ValueError: no fsync"):
        res = ns.least_squares(lambda p: decay_model(X, *p) - Y, P0, sinks=[BadClose()])
    assert res.sink_errors == ["sink BadClose failed to close: ValueError: no fsync"]


def test_mixing_inline_and_async_sinks_runs_them_all_in_the_sink_loop():
    threads: set[str] = set()
    got: list = []

    class Inline:
        inline = True

        def write_batch(self, events):
            threads.add(threading.current_thread().name)

        async def send_batch(self, events):
            threads.add(threading.current_thread().name)
            got.extend(events)

    async def collect(event):
        got.append(event)

    ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[Inline(), collect])
    assert threads == {"nlsq_stream-sinks"}
    assert sum(isinstance(e, FitFinished) for e in got) == 2


def test_an_inline_sink_sees_event_batches_and_can_stop_the_fit():
    """``stop_fit`` from an inline sink (in the fit's own thread) ends the fit at the next chunk
    boundary with the best parameters so far, as from anywhere else."""
    kinds: list[type] = []

    class StopAtFirstIteration:
        inline = True

        def write_batch(self, events):
            kinds.append(type(events))
            for ev in events:
                if isinstance(ev, Iteration):
                    ns.stop_fit(ev.fit_id)

    res = ns.least_squares(
        slow_residual, [3.0], args=slow_args(200), sinks=[StopAtFirstIteration()], **SLOW_TOLS
    )
    assert res.status == -2 and 0 < res.nit < 5000
    assert set(kinds) == {EventBatch} or all(issubclass(k, EventBatch) for k in kinds)
    assert not pipeline._LIVE


def test_subscribe_sees_a_fit_whose_sinks_are_inline():
    """``subscribe()`` follows every fit: the inline path still hands it the fit's batches."""
    import anyio

    async def main():
        async with ns.subscribe() as events:
            popt, _ = ns.curve_fit(
                decay_model, X, Y, p0=P0, verbose=2, sinks=[ConsoleSink(io.StringIO())]
            )
            got = []
            with anyio.fail_after(10):
                async for ev in events:
                    got.append(ev)
                    if isinstance(ev, FitFinished):
                        return popt, got

    popt, got = anyio.run(main)
    assert isinstance(got[0], FitStarted) and len({e.fit_id for e in got}) == 1
    np.testing.assert_array_equal(got[-1].result.x, popt)
