"""nlsq_stream.notebook: FitWidget's state after event sequences (a fit, a batch of fits), its
throttle, its Stop button (through the widget's message handler and through the kernel's routing
hook; for a fit and for a batch), and the notebook detection behind ``default_display``. No
browser and no kernel here (see test_notebooks.py and test_browser.py for those)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import anyio
import numpy as np
import pytest
from conftest import (
    SLOW_TOLS,
    assert_no_leftover_tasks,
    decay_data,
    decay_model,
    live_tasks,
    slow_args,
    slow_residual,
)

pytest.importorskip("anywidget", reason="the notebook extra is not installed")
pytest.importorskip("ipywidgets", reason="the notebook extra is not installed")

import comm
import jax.numpy as jnp

import nlsq_stream as ns
from nlsq_stream.events import (
    BatchFinished,
    BatchProgress,
    BatchStarted,
    FitFailed,
    FitFinished,
    FitStarted,
    Iteration,
)
from nlsq_stream.notebook import MAX_POINTS, FitWidget
from nlsq_stream.sinks import ConsoleSink, default_display, in_notebook, widget

X, Y, P0 = decay_data()
LONG = slow_args(20_000)  # ~5000 iterations, about a second when not stopped
TIMEOUT = 60
FIT = "fit-test"
XSS = "<img src=x onerror=alert(1)>"


def started(t=100.0, names=("a", "b"), max_nfev=300, model="decay"):
    return FitStarted(FIT, "trf", len(names), 50, names, np.ones(len(names)), t, max_nfev, model)


def iteration(i, cost, t, params=(1.0, 2.0)):
    return Iteration(
        FIT,
        i,
        i + 1,
        cost,
        None if i == 0 else 0.1,
        None if i == 0 else 0.2,
        1e-3,
        np.array(params),
        t,
    )


def finished(status=1, nit=3, t=102.0, message="`gtol` termination condition is satisfied."):
    result = {
        "x": np.array([2.0, 0.5]),
        "cost": 0.01,
        "optimality": 1e-9,
        "nfev": nit + 1,
        "njev": nit + 1,
        "nit": nit,
        "status": status,
        "message": message,
        "success": status > 0,
    }
    return FitFinished(FIT, result, t)


def stop_message(fit_id=None):
    """What ipykernel hands the widget's comm when the frontend's Stop button is clicked."""
    content = {"type": "stop"} if fit_id is None else {"type": "stop", "fit_id": fit_id}
    return {
        "content": {"comm_id": "x", "data": {"method": "custom", "content": content}},
        "buffers": [],
    }


# -- state after event sequences ---------------------------------------------------------------


@pytest.mark.anyio
async def test_state_after_a_converged_fit(anyio_backend):
    w = FitWidget(auto_display=False)
    assert (w.status, w.status_style, w.running) == ("waiting", "info", False)
    await w.send(started())
    assert (w.fit_id, w.model_name, w.method) == (FIT, "decay", "trf")
    assert w.param_names == ["a", "b"] and w.params == [1.0, 1.0]
    assert (w.status, w.status_style, w.running, w.max_nfev) == ("running", "info", True, 300)
    await w.send_batch([iteration(0, 10.0, 100.5), iteration(1, 1.0, 101.0)])
    assert (w.iteration, w.nfev, w.cost) == (1, 2, 1.0)
    assert w.costs == [[0, 10.0], [1, 1.0]]
    assert w.params == [1.0, 2.0]
    assert w.elapsed == pytest.approx(1.0) and w.rate == pytest.approx(1.0)
    await w.send_batch([iteration(2, 0.1, 101.5), iteration(3, 0.01, 101.9), finished()])
    assert (w.status, w.status_style, w.running) == ("converged", "success", False)
    assert (w.iteration, w.nfev, w.cost, w.optimality) == (3, 4, 0.01, 1e-9)
    assert w.params == [2.0, 0.5]  # the result's best parameters
    assert w.costs == [[0, 10.0], [1, 1.0], [2, 0.1], [3, 0.01]]
    assert w.elapsed == pytest.approx(2.0) and w.rate == pytest.approx(1.5)
    assert w.message == "`gtol` termination condition is satisfied."


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "text", "style"),
    [(-2, "stopped", "warning"), (0, "not converged", "danger"), (2, "converged", "success")],
)
async def test_status_text_and_colour(anyio_backend, status, text, style):
    w = FitWidget(auto_display=False)
    await w.send_batch([started(), iteration(0, 1.0, 100.1), finished(status, nit=0)])
    assert (w.status, w.status_style, w.running) == (text, style, False)


@pytest.mark.anyio
async def test_failed_fit_shows_the_error(anyio_backend):
    w = FitWidget(auto_display=False)
    await w.send_batch([started(), FitFailed(FIT, "ValueError", "model returned NaN", 101.0)])
    assert (w.status, w.status_style, w.running) == ("failed", "danger", False)
    assert w.message == "ValueError: model returned NaN"


@pytest.mark.anyio
async def test_user_text_is_kept_verbatim(anyio_backend):
    """Names and messages reach the frontend as data; the ES module renders them as text."""
    w = FitWidget(auto_display=False)
    await w.send_batch([started(names=(XSS, "b"), model=XSS), finished(message=XSS)])
    assert w.param_names == [XSS, "b"] and w.model_name == XSS and w.message == XSS
    js = (Path(widget.__file__).parent / "_static" / "fit_widget.js").read_text()
    code = "\n".join(line for line in js.splitlines() if not line.lstrip().startswith("//"))
    assert "innerHTML" not in code and "outerHTML" not in code and "insertAdjacentHTML" not in code


@pytest.mark.anyio
async def test_a_reused_widget_starts_fresh(anyio_backend):
    w = FitWidget(auto_display=False)
    await w.send_batch([started(), iteration(0, 5.0, 100.1), finished(-2, nit=0)])
    await w.send_batch([started(t=200.0, names=("k",)), iteration(0, 3.0, 200.5)])
    assert w.param_names == ["k"] and w.costs == [[0, 3.0]]
    assert (w.status, w.running, w.stop_requested) == ("running", True, False)


@pytest.mark.anyio
async def test_old_log_without_max_nfev_or_model(anyio_backend):
    w = FitWidget(auto_display=False)
    await w.send(FitStarted(FIT, "lm", 1, 5, ("k",), np.zeros(1), 1.0))
    assert (w.max_nfev, w.model_name) == (0, "")


@pytest.mark.anyio
async def test_nonfinite_costs_are_left_off_the_log_plot(anyio_backend):
    w = FitWidget(auto_display=False)
    await w.send_batch([started(), iteration(0, float("nan"), 100.1), iteration(1, 0.0, 100.2)])
    await w.send_batch([iteration(2, float("inf"), 100.3), iteration(3, 2.0, 100.4)])
    assert w.costs == [[3, 2.0]] and w.cost == 2.0


# -- throttling and the cost curve's size -------------------------------------------------------


@pytest.mark.anyio
async def test_updates_are_throttled_and_the_terminal_state_always_arrives(anyio_backend):
    w = FitWidget(auto_display=False, max_rate=20)
    t0 = time.monotonic()
    await w.send(started())
    i = 0
    while time.monotonic() - t0 < 0.5:
        await w.send(iteration(i, 1.0 / (i + 1), 100.0 + i))
        i += 1
    await w.send(finished(nit=i - 1))
    wall = time.monotonic() - t0
    # FitStarted and the terminal event go at once; iterations at most 20 a second.
    assert w.updates <= 20 * wall + 3, (w.updates, wall)
    assert w.status == "converged" and w.iteration == i - 1


@pytest.mark.anyio
async def test_the_cost_curve_is_thinned_to_max_points(anyio_backend):
    w = FitWidget(auto_display=False, max_rate=1e9)
    n = 5 * MAX_POINTS + 7
    await w.send_batch([started(), *(iteration(i, 1.0 + 1.0 / (i + 1), 100.0) for i in range(n))])
    its = [p[0] for p in w.costs]
    assert len(its) <= MAX_POINTS + 1
    assert its[0] == 0 and its[-1] == n - 1  # the start and the newest point are always there
    assert all(a < b for a, b in itertools.pairwise(its))
    assert len(its) > MAX_POINTS // 4


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="max_rate"):
        FitWidget(max_rate=0)
    with pytest.raises(TypeError, match="max_rate"):
        FitWidget(max_rate="fast")
    with pytest.raises(TypeError, match="title"):
        FitWidget(title=3)


# -- as a sink in real fits ---------------------------------------------------------------------


@pytest.mark.usefixtures("no_leftover_threads")
def test_sync_curve_fit_feeds_the_widget():
    w = FitWidget(auto_display=False)
    popt, _ = ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[w])
    assert (w.status, w.status_style, w.running) == ("converged", "success", False)
    assert w.param_names == ["a", "b", "c"] and w.model_name == "decay_model"
    np.testing.assert_allclose(w.params, popt)
    assert w.max_nfev == 400 and 0 < w.nfev <= w.max_nfev  # method lm: 100 (n + 1)
    # latest policy: a fit that ends within one flush may show only its last iteration
    assert w.costs and w.costs[-1][0] == w.iteration


@pytest.mark.anyio
@pytest.mark.usefixtures("no_leftover_threads")
async def test_a_fast_long_fit_sends_at_most_20_updates_a_second(anyio_backend):
    before = live_tasks()
    w = FitWidget(auto_display=False)
    t0 = time.monotonic()
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(
            slow_residual, [1.0], args=LONG, sinks=[w], **SLOW_TOLS
        ) as stream:
            async for _ in stream:
                pass
    wall = time.monotonic() - t0
    assert stream.result.nit > 1000
    assert w.updates <= 20 * wall + 3, (w.updates, wall)
    assert w.iteration == stream.result.nit and w.status == "converged"
    await assert_no_leftover_tasks(before)


# -- the Stop button ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.usefixtures("no_leftover_threads")
async def test_stop_button_message_stops_the_fit(anyio_backend):
    """The frontend's message, through the comm's handler (as ipykernel delivers it)."""
    before = live_tasks()
    w = FitWidget(auto_display=False)
    with anyio.fail_after(TIMEOUT):
        async with ns.least_squares_stream(
            slow_residual, [1.0], args=LONG, sinks=[w], **SLOW_TOLS
        ) as stream:
            n = 0
            async for ev in stream:
                n += isinstance(ev, Iteration)
                if n == 2:
                    while not w.running:  # the widget has seen FitStarted
                        await anyio.sleep(0.005)
                    w.comm.handle_msg(stop_message())
    assert stream.result.status == -2 and "stopped" in stream.result.message
    assert stream.result.nit < 4000
    assert (w.status, w.status_style, w.stop_requested) == ("stopped", "warning", True)
    np.testing.assert_allclose(w.params, stream.result.x)
    await assert_no_leftover_tasks(before)


def test_stop_without_a_fit_is_a_no_op():
    w = FitWidget(auto_display=False)
    assert w.stop() is False
    w.comm.handle_msg(stop_message("fit-unknown"))
    assert w.status == "waiting"


class RoutingComm(comm.DummyComm):
    """Stands in for ipykernel 7's comm: the shell-channel thread asks it where a message goes."""

    def _reply_subshell_for(self, data, default):
        return default


@pytest.mark.usefixtures("no_leftover_threads")
def test_stop_acts_in_the_kernels_routing_hook_while_the_cell_blocks(monkeypatch):
    """A sync fit blocks this (the cell's) thread; another thread -- ipykernel's shell-channel
    thread -- routes the Stop message, and that alone stops the fit."""
    monkeypatch.setattr(comm, "create_comm", lambda **kw: RoutingComm(**kw))
    w = FitWidget(auto_display=False)
    assert isinstance(w.comm, RoutingComm)
    routed: list[object] = []

    def shell_channel_thread() -> None:
        deadline = time.monotonic() + TIMEOUT
        while w.iteration < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        data = stop_message()["content"]["data"]
        routed.append(w.comm._reply_subshell_for(data, "subshell-1"))
        routed.append(w.comm._reply_subshell_for({"method": "update", "state": {}}, None))

    helper = threading.Thread(target=shell_channel_thread)
    helper.start()
    try:
        res = ns.least_squares(slow_residual, [1.0], args=LONG, sinks=[w], **SLOW_TOLS)
    finally:
        helper.join()
    assert routed == ["subshell-1", None]  # routing itself is unchanged
    assert res.status == -2 and res.nit < 4000
    assert w.status == "stopped"


# -- a batch of fits ----------------------------------------------------------------------------

BATCH = "batch-test"
BX = np.linspace(-5.0, 5.0, 60)
BP0 = [2.0, 0.0, 1.0, 0.0]


def gauss(x, a, mu, s, c):
    return a * jnp.exp(-0.5 * ((x - mu) / s) ** 2) + c


def spectra(n, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-1, 1, (n, 1))
    return 2.0 * np.exp(-0.5 * (BX - mu) ** 2) + 0.05 * rng.standard_normal((n, BX.size))


def batch_started(n=400, t=100.0, batch_id=BATCH):
    return BatchStarted(batch_id, n, "trf", 4, 60, ("a", "mu", "s", "c"), t, "gauss")


def progress(i, converged, failed, elapsed, n=400, q=(0.1, 0.2, 0.5, 1.0, 3.0)):
    running = n - converged - failed
    return BatchProgress(
        BATCH, i, n, running, converged, failed, np.array(q), 10 * i, elapsed, 100.0 + elapsed
    )


def batch_finished(counts, n=400, elapsed=2.0):
    return BatchFinished(BATCH, n, counts, elapsed, 100.0 + elapsed)


@pytest.mark.anyio
async def test_state_after_a_batch(anyio_backend):
    w = FitWidget(auto_display=False, max_rate=1e9)
    assert w.view == "fit"
    await w.send(batch_started())
    assert (w.view, w.fit_id, w.model_name, w.method, w.n_fits) == (
        "batch",
        BATCH,
        "gauss",
        "trf",
        400,
    )
    assert (w.status, w.status_style, w.running, w.n_running) == ("running", "info", True, 400)
    assert w.batch_progress == [] and w.eta is None
    await w.send_batch([progress(1, 0, 0, 0.5), progress(3, 100, 4, 1.0)])
    assert (w.iteration, w.n_running, w.n_converged, w.n_failed, w.nfev) == (3, 296, 100, 4, 30)
    assert w.fits_per_second == pytest.approx(104.0)
    assert w.eta == pytest.approx(296 / 104.0)
    assert w.cost == 0.5  # the median
    assert w.batch_progress == [
        [1, 0.5, 0, 0, 0.1, 0.2, 0.5, 1.0, 3.0],
        [3, 1.0, 100, 4, 0.1, 0.2, 0.5, 1.0, 3.0],
    ]
    # no cost yet: NaN quantiles go as None (JSON null)
    await w.send(progress(4, 100, 4, 1.1, q=(np.nan,) * 5))
    assert w.batch_progress[-1][4:] == [None] * 5 and w.cost is None
    await w.send_batch([progress(5, 398, 2, 1.9), batch_finished({"2": 390, "1": 8, "-3": 2})])
    assert (w.status, w.status_style, w.running) == ("failed", "danger", False)
    assert (w.n_running, w.n_converged, w.n_failed, w.n_stopped) == (0, 398, 2, 0)
    assert w.counts == {"2": 390, "1": 8, "-3": 2} and w.eta is None
    assert w.elapsed == 2.0 and w.fits_per_second == pytest.approx(200.0)
    assert w.message == "398/400 converged in 2.00 s (ftol: 390, gtol: 8, not finite: 2)"
    assert len(w.batch_progress) == 4 and w.view == "batch"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("counts", "status", "style", "stopped"),
    [
        ({"1": 10, "2": 390}, "converged", "success", 0),
        ({"2": 100, "-2": 300}, "stopped", "warning", 300),
        ({"2": 399, "0": 1}, "failed", "danger", 0),  # out of budget
        ({"2": 390, "-4": 10}, "failed", "danger", 0),
    ],
)
async def test_batch_status_text_and_colour(anyio_backend, counts, status, style, stopped):
    w = FitWidget(auto_display=False)
    await w.send_batch([batch_started(), progress(1, 0, 0, 0.5), batch_finished(counts)])
    assert (w.status, w.status_style, w.running, w.n_stopped) == (status, style, False, stopped)
    assert w.n_converged + w.n_failed + w.n_stopped == 400


@pytest.mark.anyio
async def test_a_fit_after_a_batch_switches_back_and_a_batch_after_a_fit_starts_fresh(
    anyio_backend,
):
    w = FitWidget(auto_display=False)
    await w.send_batch([started(), iteration(0, 5.0, 100.1), finished(nit=0)])
    await w.send_batch([batch_started(t=200.0), progress(1, 10, 0, 0.5)])
    assert (w.view, w.fit_id, w.status, w.params) == ("batch", BATCH, "running", [])
    assert w.costs == [] and w.max_nfev == 0
    await w.send(batch_finished({"1": 400}))
    await w.send_batch([started(t=300.0, names=("k",)), iteration(0, 3.0, 300.5)])
    assert (w.view, w.fit_id, w.status, w.running) == ("fit", FIT, "running", True)
    assert w.param_names == ["k"] and w.costs == [[0, 3.0]] and w.batch_progress == []
    await w.send(batch_started(n=7, batch_id="batch-2"))
    assert (w.view, w.n_fits, w.n_converged, w.counts) == ("batch", 7, 0, {})


@pytest.mark.anyio
async def test_per_fit_events_of_the_batch_shown_are_left_out(anyio_backend):
    w = FitWidget(auto_display=False)
    per_fit = FitFinished(f"{BATCH}/3", finished().result, 101.0)
    await w.send_batch([batch_started(), progress(1, 400, 0, 0.5), per_fit])
    await w.send(batch_finished({"1": 400}))
    assert (w.view, w.fit_id, w.status, w.params) == ("batch", BATCH, "converged", [])


@pytest.mark.anyio
async def test_a_batch_that_raised_shows_the_error(anyio_backend):
    w = FitWidget(auto_display=False)
    await w.send_batch([batch_started(), FitFailed(BATCH, "RuntimeError", "boom", 101.0)])
    assert (w.view, w.status, w.status_style, w.running) == ("batch", "failed", "danger", False)
    assert w.message == "RuntimeError: boom"


@pytest.mark.anyio
async def test_joining_a_batch_mid_way_shows_it(anyio_backend):
    """A replayed log cut before its BatchStarted: the batch view from its progress."""
    w = FitWidget(auto_display=False)
    await w.send_batch([progress(5, 100, 0, 1.0), batch_finished({"1": 400})])
    assert (w.view, w.fit_id, w.n_fits, w.status) == ("batch", BATCH, 400, "converged")
    assert len(w.batch_progress) == 1


@pytest.mark.anyio
async def test_batch_progress_is_thinned_to_max_points(anyio_backend):
    w = FitWidget(auto_display=False, max_rate=1e9)
    n = 5 * MAX_POINTS + 7
    events = [progress(2 * i + 1, i * 400 // n, 0, 0.01 * (i + 1)) for i in range(n)]
    await w.send_batch([batch_started(), *events])
    its = [row[0] for row in w.batch_progress]
    assert MAX_POINTS // 4 < len(its) <= MAX_POINTS + 1
    assert its[0] == 1 and its[-1] == 2 * n - 1  # the first and the newest are always there
    assert all(a < b for a, b in itertools.pairwise(its))


@pytest.mark.anyio
async def test_batch_updates_are_throttled_and_start_and_end_always_arrive(anyio_backend):
    w = FitWidget(auto_display=False, max_rate=20)
    t0 = time.monotonic()
    await w.send(batch_started())
    assert w.updates == 1  # at once
    i = 0
    while time.monotonic() - t0 < 0.5:
        await w.send(progress(i + 1, min(i, 399), 0, 0.01 * (i + 1)))
        i += 1
    await w.send(batch_finished({"1": 400}))
    wall = time.monotonic() - t0
    assert w.updates <= 20 * wall + 3, (w.updates, wall)
    assert w.status == "converged" and w.batch_progress[-1][0] == i  # none lost


@pytest.mark.usefixtures("no_leftover_threads")
def test_curve_fit_batch_feeds_the_widget():
    w = FitWidget(auto_display=False)
    y = spectra(300)
    res = ns.curve_fit_batch(gauss, BX, y, p0=BP0, trials=2, sinks=[w])
    assert res.success.all()
    assert (w.view, w.status, w.status_style, w.running) == ("batch", "converged", "success", False)
    assert w.fit_id.startswith("batch-") and w.model_name == "gauss"
    assert w.param_names == ["a", "mu", "s", "c"]
    assert (w.n_fits, w.n_converged, w.n_failed, w.n_running) == (300, 300, 0, 0)
    assert w.counts == {str(k): v for k, v in res.counts().items()}
    assert w.message.startswith("300/300 converged in ")
    assert w.batch_progress, "the batch's last progress always arrives"
    assert w.batch_progress[-1][2] == 300  # converged at the last progress event
    assert len(w.batch_progress[-1]) == 9


@pytest.mark.anyio
@pytest.mark.usefixtures("no_leftover_threads")
async def test_stop_button_message_stops_a_batch(anyio_backend):
    """The frontend's Stop message names the batch shown; every running fit ends with -2."""
    before = live_tasks()
    w = FitWidget(auto_display=False)
    y = spectra(64, seed=13)
    with anyio.fail_after(TIMEOUT):
        async with ns.fit_stream_batch(
            gauss, BX, y, p0=BP0, trials=1, ftol=1e-15, xtol=1e-15, gtol=None, sinks=[w]
        ) as stream:
            async for ev in stream:
                if isinstance(ev, BatchProgress) and not w.stop_requested:
                    while w.fit_id != stream.fit_id:  # the widget has seen BatchStarted
                        await anyio.sleep(0.005)
                    w.comm.handle_msg(stop_message(stream.fit_id))
    res = stream.result
    assert isinstance(ev, BatchFinished) and ev.stopped
    stopped = res.status == -2
    assert stopped.any() and np.isfinite(res.popt[stopped]).all()
    assert (w.status, w.status_style, w.stop_requested) == ("stopped", "warning", True)
    assert w.n_stopped == int(stopped.sum()) and w.n_running == 0
    await assert_no_leftover_tasks(before)


@pytest.mark.usefixtures("no_leftover_threads")
def test_a_batch_stops_in_the_kernels_routing_hook_while_the_cell_blocks(monkeypatch):
    """``curve_fit_batch(sinks=[widget])`` blocks this thread; the shell-channel thread routes
    the Stop message (naming the batch the widget shows) and that alone stops the batch."""
    monkeypatch.setattr(comm, "create_comm", lambda **kw: RoutingComm(**kw))
    w = FitWidget(auto_display=False)
    shown: list[str] = []

    def shell_channel_thread() -> None:
        deadline = time.monotonic() + TIMEOUT
        while not (w.view == "batch" and w.running) and time.monotonic() < deadline:
            time.sleep(0.005)
        shown.append(w.fit_id)
        data = {"method": "custom", "content": {"type": "stop", "fit_id": w.fit_id}}
        w.comm._reply_subshell_for(data, None)

    helper = threading.Thread(target=shell_channel_thread)
    helper.start()
    try:
        res = ns.curve_fit_batch(
            gauss,
            BX,
            spectra(64, seed=13),
            p0=BP0,
            trials=1,
            ftol=1e-15,
            xtol=1e-15,
            gtol=None,
            sinks=[w],
        )
    finally:
        helper.join()
    assert shown[0].startswith("batch-")
    assert (res.status == -2).any()
    assert (w.status, w.n_stopped) == ("stopped", int((res.status == -2).sum()))


# -- default display and detection -------------------------------------------------------------


def test_outside_jupyter_the_default_display_is_the_console_table():
    assert in_notebook() is False
    assert isinstance(default_display(), ConsoleSink)


def fake_ipython(shell_name="ZMQInteractiveShell", config=None):
    shell_cls = type(shell_name, (), {})
    shell = shell_cls()
    shell.config = {"IPKernelApp": {}} if config is None else config
    return types.SimpleNamespace(get_ipython=lambda: shell)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (fake_ipython(), True),
        (fake_ipython(config={}), False),  # IPython with ZMQ but not under IPKernelApp
        (fake_ipython("TerminalInteractiveShell"), False),
        (types.SimpleNamespace(get_ipython=lambda: None), False),
    ],
)
def test_notebook_detection(monkeypatch, module, expected):
    monkeypatch.setitem(sys.modules, "IPython", module)
    assert in_notebook() is expected
    assert isinstance(default_display(), FitWidget if expected else ConsoleSink)


def test_in_a_kernel_without_the_notebook_extra_the_console_table_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython())
    monkeypatch.setitem(sys.modules, "nlsq_stream.sinks.widget", None)  # import fails
    assert isinstance(default_display(), ConsoleSink)


def test_verbose_in_a_notebook_shows_the_widget(monkeypatch):
    from nlsq_stream.stream.pipeline import with_display

    monkeypatch.setitem(sys.modules, "IPython", fake_ipython())
    (display,) = with_display([], 2, default_display)
    assert isinstance(display, FitWidget)
    given = FitWidget(auto_display=False)
    assert with_display([given], 2, default_display) == [given]  # not a second one
    assert default_display.kind() is FitWidget


def test_a_display_of_a_kind_already_given_is_not_made(monkeypatch):
    """A face compares kinds before it makes the default display: a widget made only to be
    compared would open a model in the notebook's front end."""
    from nlsq_stream.stream.pipeline import with_display

    made = []

    class Counting:
        def kind(self):
            return ConsoleSink

        def __call__(self):
            made.append(ConsoleSink())
            return made[-1]

    given = ConsoleSink()
    assert with_display([given], 2, Counting()) == [given]
    assert made == []
    assert with_display([], 0, Counting()) == [] and made == []
    (shown,) = with_display([], 2, Counting())
    assert made == [shown]
    # A plain callable (no kind) still works: it is made, compared and dropped.
    assert with_display([given], 2, ConsoleSink) == [given]
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython())
    widget = FitWidget(auto_display=False)
    made_widgets = []
    monkeypatch.setattr(FitWidget, "__init__", lambda self, *a, **k: made_widgets.append(1))
    assert with_display([widget], 2, default_display) == [widget]
    assert made_widgets == []


def test_importing_the_package_does_not_import_the_widget_stack():
    code = (
        "import sys, nlsq_stream, nlsq_stream.sinks; "
        "print(sorted(m for m in ('anywidget', 'ipywidgets', 'IPython', 'nlsq_stream.notebook', "
        "'nlsq_stream.sinks.widget') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
