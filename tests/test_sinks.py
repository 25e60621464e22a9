"""Sinks: the sync face's console table (scipy's ``verbose`` output), JSONL files, failing sinks."""

from __future__ import annotations

import json
import re
import types
import warnings

import anyio
import numpy as np
import pytest
import scipy.optimize
from conftest import (
    SLOW_TOLS,
    assert_no_leftover_tasks,
    decay_data,
    decay_model,
    live_tasks,
    slow_args,
    slow_residual,
)

import nlsq_stream as ns
from nlsq_stream.events import FitFailed, FitFinished, FitStarted, Iteration, event_from_json
from nlsq_stream.sinks import ConsoleSink, JsonlSink

pytestmark = pytest.mark.usefixtures("no_leftover_threads")

X, Y, P0 = decay_data()
COL = 15
SUMMARY = re.compile(
    r"^Function evaluations (\d+), initial cost (\S+), final cost (\S+), "
    r"first-order optimality (\S+)\.$"
)


class Collect:
    """A lossless sink that keeps every event (``send`` one at a time)."""

    def __init__(self) -> None:
        self.events: list = []
        self.closed = 0

    async def send(self, event) -> None:
        self.events.append(event)

    async def aclose(self) -> None:
        self.closed += 1


class FailOnThird:
    """Raises on its third event."""

    def __init__(self) -> None:
        self.seen = 0

    async def send(self, event) -> None:
        self.seen += 1
        if self.seen == 3:
            raise RuntimeError("sink exploded on purpose")


def decay_residual(p, x, y):
    return decay_model(x, *p) - y


def scipy_output(capsys, verbose: int) -> list[str]:
    """What scipy itself prints for a small fit: the reference for the table's format."""
    capsys.readouterr()
    scipy.optimize.least_squares(lambda p: p[0] * np.exp(-p[1] * X) + p[2] - Y, P0, verbose=verbose)
    return capsys.readouterr().out.splitlines()


def scipy_row(ev: Iteration) -> str:
    """scipy's ``print_iteration_nonlinear`` format."""
    red = " " * COL if ev.cost_reduction is None else f"{ev.cost_reduction:^15.2e}"
    step = " " * COL if ev.step_norm is None else f"{ev.step_norm:^15.2e}"
    return f"{ev.iteration:^15}{ev.nfev:^15}{ev.cost:^15.4e}{red}{step}{ev.optimality:^15.2e}"


def parse_row(line: str) -> tuple:
    assert len(line) == 6 * COL, repr(line)
    cols = [line[i : i + COL] for i in range(0, 6 * COL, COL)]
    for c in cols:  # each column is centred in its 15 characters
        if c.strip():
            left = len(c) - len(c.lstrip())
            right = len(c) - len(c.rstrip())
            assert abs(left - right) <= 1, repr(c)
    it, nfev, cost, red, step, opt = (c.strip() for c in cols)
    return (
        int(it),
        int(nfev),
        float(cost),
        None if not red else float(red),
        None if not step else float(step),
        float(opt),
    )


def check_table(lines: list[str], iterations: list[Iteration], res, header: str) -> None:
    """Header, one row per Iteration event (in order), then scipy's two summary lines."""
    assert lines[0] == header
    rows = lines[1:-2]
    assert rows == [scipy_row(ev) for ev in iterations]
    for line, ev in zip(rows, iterations, strict=True):
        it, nfev, cost, red, step, opt = parse_row(line)
        assert (it, nfev) == (ev.iteration, ev.nfev)
        assert cost == pytest.approx(ev.cost, rel=1e-4)
        assert opt == pytest.approx(ev.optimality, rel=1e-2)
        assert (red is None) == (ev.iteration == 0) == (step is None)
    assert lines[-2] == res.message
    m = SUMMARY.match(lines[-1])
    assert m, lines[-1]
    assert int(m[1]) == res.nfev
    assert m[2] == f"{iterations[0].cost:.4e}"
    assert m[3] == f"{res.cost:.4e}"
    assert m[4] == f"{res.optimality:.2e}"


def test_verbose_2_prints_scipys_table(capsys):
    ref = scipy_output(capsys, 2)
    res = ns.least_squares(decay_residual, P0, args=(X, Y), verbose=2)
    out = capsys.readouterr().out.splitlines()
    header = ref[0]
    assert header == "".join(
        f"{h:^15}"
        for h in ("Iteration", "Total nfev", "Cost", "Cost reduction", "Step norm", "Optimality")
    )
    assert len(out) == 1 + (res.nit + 1) + 2
    rows = [parse_row(line) for line in out[1:-2]]
    assert [r[0] for r in rows] == list(range(res.nit + 1))
    assert rows[-1][1] == res.nfev
    # the same lines scipy prints around its table
    assert out[0] == header
    assert SUMMARY.match(ref[-1]) and SUMMARY.match(out[-1])
    assert out[-2] == res.message


def test_curve_fit_verbose_2_rows_match_events_of_a_second_sink(capsys):
    ref_header = scipy_output(capsys, 2)[0]
    popt_plain = ns.curve_fit(decay_model, X, Y, p0=P0)[0]

    # verbose=2 alone: the default console table
    res_default = ns.curve_fit(decay_model, X, Y, p0=P0, verbose=2, full_output=True)
    out_default = capsys.readouterr().out.splitlines()
    assert out_default[0] == ref_header
    assert len(out_default) == 1 + (res_default[2]["nit"] + 1) + 2

    # the console sink and a collecting sink watch the same fit: same rows, same events
    collect = Collect()
    popt, _, info, msg, _ = ns.curve_fit(
        decay_model, X, Y, p0=P0, verbose=2, sinks=[ConsoleSink(), collect], full_output=True
    )
    out = capsys.readouterr().out.splitlines()
    np.testing.assert_allclose(popt, popt_plain, rtol=1e-12)
    evs = collect.events
    assert isinstance(evs[0], FitStarted) and isinstance(evs[-1], FitFinished)
    iters = [e for e in evs if isinstance(e, Iteration)]
    assert [e.iteration for e in iters] == list(range(info["nit"] + 1))
    assert collect.closed == 1
    summary = types.SimpleNamespace(**evs[-1].result)
    assert summary.message == msg
    check_table(out, iters, summary, ref_header)
    assert out_default == out  # the default display prints exactly what ConsoleSink prints


def test_verbose_1_prints_every_10th_iteration_and_the_last(capsys):
    """Unlike scipy (whose verbose=1 prints only the summary), verbose=1 prints a thinned table."""
    ref_header = scipy_output(capsys, 2)[0]
    w, lam = slow_args(1, lam=0.9)
    collect = Collect()
    res = ns.least_squares(
        slow_residual, [1.0], args=(w, lam), verbose=1, sinks=[ConsoleSink(), collect], **SLOW_TOLS
    )
    out = capsys.readouterr().out.splitlines()
    assert res.nit > 30
    wanted = sorted(set(range(0, res.nit + 1, 10)) | {res.nit})
    iters = [e for e in collect.events if isinstance(e, Iteration)]
    assert [e.iteration for e in iters] == wanted
    check_table(out, iters, res, ref_header)

    # and verbose=1 alone prints the same table
    res1 = ns.least_squares(slow_residual, [1.0], args=(w, lam), verbose=1, **SLOW_TOLS)
    out1 = capsys.readouterr().out.splitlines()
    assert [parse_row(r)[0] for r in out1[1:-2]] == wanted
    assert res1.nit == res.nit


def test_verbose_0_prints_nothing_and_sinks_see_every_iteration(capsys):
    collect = Collect()
    popt, _ = ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[collect])
    assert capsys.readouterr().out == ""
    iters = [e for e in collect.events if isinstance(e, Iteration)]
    res = collect.events[-1].result
    assert [e.iteration for e in iters] == list(range(res["nit"] + 1))
    np.testing.assert_array_equal(iters[-1].params, popt)


def test_plain_async_function_sink_and_param_names():
    seen = []

    async def sink(event):
        seen.append(event)

    ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[sink])
    started = seen[0]
    assert isinstance(started, FitStarted)
    assert started.param_names == ("a", "b", "c")
    assert started.n_params == 3 and started.n_residuals == X.size
    np.testing.assert_array_equal(started.x0, P0)
    assert len({e.fit_id for e in seen}) == 1


# ---- JSONL -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_jsonl_sink_is_lossless_and_parses_back(tmp_path):
    before = live_tasks()
    path = tmp_path / "fit.jsonl"
    sink = JsonlSink(path, mode="w")
    w, lam = slow_args(200, lam=0.99)
    seen = []
    with anyio.fail_after(60):
        async with ns.least_squares_stream(
            slow_residual, [1.0], args=(w, lam), sinks=[sink], **SLOW_TOLS
        ) as stream:
            async for ev in stream:
                seen.append(ev)
    assert stream.result.nit > 100
    text = path.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == len(seen) == stream.result.nit + 3 == sink.lines_written
    back = [event_from_json(line) for line in lines]
    assert back == seen
    for line in lines:
        assert json.loads(line)["schema"] == 1
    assert stream.result["sink_errors"] == []
    await assert_no_leftover_tasks(before)


def test_jsonl_sink_appends_and_truncates(tmp_path):
    path = tmp_path / "fits.jsonl"
    path.write_text("")
    ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[JsonlSink(path)])
    n1 = len(path.read_text().splitlines())
    ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[JsonlSink(path)])  # mode "a" is the default
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * n1
    evs = [event_from_json(line) for line in lines]
    ids = [e.fit_id for e in evs]
    assert len(set(ids)) == 2 and ids[:n1] == [ids[0]] * n1
    assert sum(isinstance(e, FitFinished) for e in evs) == 2

    ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[JsonlSink(path, mode="w")])
    assert len(path.read_text().splitlines()) == n1


def test_jsonl_sink_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        JsonlSink(tmp_path / "x.jsonl", mode="r")
    with pytest.raises(IsADirectoryError):
        JsonlSink(tmp_path)


# ---- failing sinks ---------------------------------------------------------------------------


def test_failing_sink_is_detached_in_the_sync_face(tmp_path):
    path = tmp_path / "fit.jsonl"
    bad = FailOnThird()
    collect = Collect()
    with pytest.warns(ns.SinkError, match="sink exploded on purpose"):
        popt, _, info, _, _ = ns.curve_fit(
            decay_model, X, Y, p0=P0, sinks=[bad, JsonlSink(path), collect], full_output=True
        )
    assert bad.seen == 3  # detached: it got nothing after it raised
    lines = path.read_text().splitlines()
    evs = [event_from_json(line) for line in lines]
    assert evs == collect.events  # the other sinks saw every event
    assert len(lines) == info["nit"] + 3
    assert isinstance(evs[-1], FitFinished)
    np.testing.assert_array_equal(evs[-1].result["x"], popt)


def test_failing_sink_result_sink_errors():
    bad = FailOnThird()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ns.least_squares(decay_residual, P0, args=(X, Y), sinks=[bad])
    assert res.success
    errs = res["sink_errors"]
    assert len(errs) == 1
    assert "FailOnThird" in errs[0] and "RuntimeError" in errs[0] and "on purpose" in errs[0]
    sink_warnings = [w for w in caught if issubclass(w.category, ns.SinkError)]
    assert len(sink_warnings) == 1
    assert sink_warnings[0].filename == __file__  # the warning points at the caller


def test_good_sinks_leave_sink_errors_empty():
    res = ns.least_squares(decay_residual, P0, args=(X, Y), sinks=[Collect()])
    assert res["sink_errors"] == []


@pytest.mark.anyio
async def test_failing_sink_is_detached_in_fit_stream(tmp_path):
    before = live_tasks()
    path = tmp_path / "fit.jsonl"
    seen = []
    # as in the sync face, a SinkError warning (issued when the async with block ends)
    with pytest.warns(ns.SinkError, match="sink exploded on purpose"), anyio.fail_after(60):
        async with ns.fit_stream(
            decay_model, X, Y, P0, sinks=[FailOnThird(), JsonlSink(path)]
        ) as stream:
            async for ev in stream:
                seen.append(ev)
    lines = path.read_text().splitlines()
    assert [event_from_json(line) for line in lines] == seen
    assert len(stream.sink_errors) == 1 and "on purpose" in stream.sink_errors[0]
    assert stream.result["sink_errors"] == stream.sink_errors
    await assert_no_leftover_tasks(before)


def test_failed_fit_reaches_sinks_as_fit_failed(tmp_path):
    def bad_model(x, a, b, c):
        if not hasattr(bad_model, "traced"):
            bad_model.traced = True  # validation traces once; the solver's trace raises
            return decay_model(x, a, b, c)
        raise ZeroDivisionError("model blew up while tracing")

    path = tmp_path / "fit.jsonl"
    collect = Collect()
    with pytest.raises(ZeroDivisionError, match="blew up"):
        ns.curve_fit(bad_model, X, Y, p0=P0, sinks=[collect, JsonlSink(path)])
    assert [type(e) for e in collect.events] == [FitStarted, FitFailed]
    failed = collect.events[-1]
    assert failed.error_type == "ZeroDivisionError" and "blew up" in failed.message
    assert [event_from_json(line) for line in path.read_text().splitlines()] == collect.events


def test_console_sink_writes_to_a_given_file(tmp_path, capsys):
    path = tmp_path / "table.txt"
    with path.open("w") as f:
        res = ns.least_squares(decay_residual, P0, args=(X, Y), sinks=[ConsoleSink(file=f)])
    assert capsys.readouterr().out == ""
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + res.nit + 1 + 2
    assert lines[-2] == res.message
