"""A live fit widget for Jupyter: cost curve, parameters, status, and a Stop button.

``FitWidget`` is an anywidget (install the extra: ``pip install "nlsq_stream[notebook]"``) and a
sink. Pass it in ``sinks=[FitWidget()]``, or let ``verbose`` pick it: inside a Jupyter kernel
``curve_fit(..., verbose=2)`` and ``fit_stream(..., verbose=2)`` show a ``FitWidget`` instead of
the console table (see :data:`nlsq_stream.sinks.default_display`). It shows the iteration count
with progress against ``max_nfev``, the cost against the iteration on a log scale (drawn by the
widget's own ES module as SVG), the current parameters named from the model's signature, the
elapsed time and rate, and the final status in colour (green converged, orange stopped, red
failed or out of budget).

**A batch of fits** (``curve_fit_batch(..., verbose=2)``, ``fit_stream_batch``, or
``sinks=[FitWidget()]``) switches the widget to its batch view on ``BatchStarted``: the model's
name and the number of fits, the converged fits against elapsed seconds (a line), the cost
quantiles over the progress events (min-max band light, 10-90 % band darker, median line, log
scale), the counts (converged / failed / running), fits a second and ETA, and the same Stop
button, which stops the whole batch (``stop_fit(batch_id)``: every running fit ends with status
-2 and its best parameters). ``BatchFinished`` shows the final counts and the status in colour:
green when every fit converged, orange when the batch was stopped, red when some fit failed.
Per-fit ``FitFinished`` events of the batch (``per_fit_events=True``) are left out; the next
single fit (``FitStarted``) switches back to the fit view.

Its subscription has the ``latest`` policy and it sends the frontend at most ``max_rate`` (20)
updates a second, whatever the fit's speed: between updates it sleeps, and meanwhile the hub keeps
only the newest Iteration for it. FitStarted, BatchStarted and the terminal state (FitFinished,
FitFailed, BatchFinished) always reach the frontend at once. The cost curve, and a batch's
progress series, keep at most ``MAX_POINTS`` points (older ones are thinned, the newest kept).

**The Stop button while a cell blocks.** ``curve_fit(..., verbose=2)`` blocks the cell's thread
until the fit ends, and ipykernel handles the frontend's widget messages (comm messages on the
shell channel) on that same main thread, so a plain ``on_msg`` handler would run only after the
fit (ipykernel #646). JupyterLab >= 4.4 sends each comm's messages on a kernel subshell, but
ipykernel 7.4 routes them back to the shell that last published on the comm -- the main shell, for
a widget shown by a cell -- so they wait all the same (seen with ipykernel 7.4, JupyterLab 4.6).

So the Stop message is handled *off the blocked thread*. ipykernel 7 receives every shell message
on its shell-channel thread, which asks the target comm where to route it
(``comm._reply_subshell_for(data, default)``). ``FitWidget`` wraps that hook on its own comm: for
a Stop message it calls :func:`nlsq_stream.stop_fit` right there, which only sets a
``threading.Event``, and then routes the message unchanged, so the regular handler still runs
later (harmlessly). The fit sees the request between two chunks of its compiled loop, ends with
status -2 and keeps its best parameters. Nothing is polled, no message is consumed, reordered or
replayed, and other messages are untouched. The hook is private to ipykernel, so
``tests/test_notebooks.py`` pins the behaviour on a real kernel (a Stop sent while
``curve_fit(verbose=2)`` blocks must end the fit early) and ``tests/test_browser.py`` clicks the
button in JupyterLab. Where the hook is missing (an older ipykernel), Stop acts once the kernel is
free to read messages: await ``fit_stream`` in the cell (ipykernel >= 7.4 dispatches comm messages
while an async cell awaits) or run it as a background task (``asyncio.create_task``); the kernel's
interrupt button stops a blocking fit the same way (best parameters kept, then
``KeyboardInterrupt``).

>>> from nlsq_stream.notebook import FitWidget          # doctest: +SKIP
>>> popt, pcov = curve_fit(model, x, y, p0=p0, sinks=[FitWidget()])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio
import anywidget
import traitlets

from .._control import stop_fit
from ..events import (
    BatchFinished,
    BatchProgress,
    BatchStarted,
    Event,
    FitFailed,
    FitFinished,
    FitStarted,
    Iteration,
)
from .kernel import in_notebook

__all__ = ["MAX_POINTS", "FitWidget", "in_notebook"]

MAX_POINTS = 500  # cost-curve (or batch-progress) points kept (and sent) at most
_STATIC = Path(__file__).with_name("_static")

# status -> colour class (tqdm.notebook bar styles; "warning" for a fit stopped on request)
_STATUS_STYLE: dict[str, str] = {
    "waiting": "info",
    "running": "info",
    "converged": "success",
    "stopped": "warning",
    "not converged": "danger",
    "failed": "danger",
}


def _is_stop(data: Any) -> bool:
    """True for the frontend's Stop message (anywidget's ``model.send({type: "stop"})``)."""
    if not isinstance(data, dict) or data.get("method") != "custom":
        return False
    content = data.get("content")
    return isinstance(content, dict) and content.get("type") == "stop"


def _stop_target(content: dict[str, Any], default: str) -> str:
    """The fit a Stop message names (the one shown when it was clicked), else ``default``."""
    fit_id = content.get("fit_id")
    return fit_id if isinstance(fit_id, str) and fit_id else default


def _finite(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class _Thinned:
    """A series sent to the frontend, bounded: the points whose key (an int that grows) is on the
    stride, which doubles whenever more than ``MAX_POINTS`` are kept, plus the newest point."""

    def __init__(self) -> None:
        self.stride = 1
        self.kept: list[tuple[int, list[Any]]] = []
        self.tail: tuple[int, list[Any]] | None = None
        self.n = 0  # points appended

    def append(self, point: list[Any]) -> None:
        """Add ``point`` keyed by its index in the series."""
        self.add(self.n, point)
        self.n += 1

    def add(self, key: int, point: list[Any]) -> None:
        kept = self.kept
        if kept and kept[-1][0] == key:
            kept[-1] = (key, point)
        elif key % self.stride == 0:
            kept.append((key, point))
            self.tail = None
            if len(kept) > MAX_POINTS:
                self.stride *= 2
                self.kept = [p for p in kept if p[0] % self.stride == 0]
        else:
            self.tail = (key, point)

    def points(self) -> list[list[Any]]:
        tail = [list(self.tail[1])] if self.tail else []
        return [list(p) for _, p in self.kept] + tail


def _batch_status(counts: dict[str, int]) -> str:
    """A finished batch's status word: converged (all), stopped (on request), else failed."""
    if all(int(k) > 0 for k, n in counts.items() if n):
        return "converged"
    return "stopped" if counts.get("-2", 0) else "failed"


# a batch's final counts, status -> words (BatchResult's statuses)
_COUNT_WORDS: dict[str, str] = {
    "1": "gtol",
    "2": "ftol",
    "3": "xtol",
    "4": "ftol & xtol",
    "0": "out of budget",
    "-2": "stopped",
    "-3": "not finite",
    "-4": "too few points",
}


def _batch_summary(ev: BatchFinished) -> str:
    """``"398/400 converged in 1.23 s (ftol: 390, gtol: 8, not finite: 2)"``."""
    items = sorted(ev.counts.items(), key=lambda kv: -int(kv[0]))
    parts = ", ".join(f"{_COUNT_WORDS.get(k, 'status ' + k)}: {n}" for k, n in items if n)
    return f"{ev.n_converged}/{ev.n_fits} converged in {ev.elapsed:.2f} s ({parts})"


class FitWidget(anywidget.AnyWidget):
    """Live view of a fit in a notebook, and a sink that feeds it. Reusable for several fits.

    :param max_rate: most frontend updates a second (default 20).
    :param title: text shown above the plot; default the model's name.
    :param auto_display: display the widget when a fit starts unless it was displayed already
        (default True; only inside a Jupyter kernel).

    >>> w = FitWidget()                                      # doctest: +SKIP
    >>> popt, pcov = curve_fit(model, x, y, p0=p0, sinks=[w])  # doctest: +SKIP
    >>> w.status, w.params                                   # doctest: +SKIP
    ('converged', [2.0, 0.7, 0.3])
    """

    _esm = (_STATIC / "fit_widget.js").read_text(encoding="utf-8")
    _css = (_STATIC / "fit_widget.css").read_text(encoding="utf-8")

    policy: Literal["lossless", "latest"] = "latest"
    sink_kind: ClassVar[type]

    fit_id = traitlets.Unicode("").tag(sync=True)
    title = traitlets.Unicode("").tag(sync=True)
    model_name = traitlets.Unicode("").tag(sync=True)
    method = traitlets.Unicode("").tag(sync=True)
    param_names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    params = traitlets.List(traitlets.Float(allow_none=True)).tag(sync=True)
    iteration = traitlets.Int(0).tag(sync=True)
    nfev = traitlets.Int(0).tag(sync=True)
    max_nfev = traitlets.Int(0).tag(sync=True)
    cost = traitlets.Float(None, allow_none=True).tag(sync=True)
    optimality = traitlets.Float(None, allow_none=True).tag(sync=True)
    costs = traitlets.List(traitlets.List()).tag(sync=True)  # [[iteration, cost], ...]
    elapsed = traitlets.Float(0.0).tag(sync=True)
    rate = traitlets.Float(0.0).tag(sync=True)  # iterations a second
    status = traitlets.Unicode("waiting").tag(sync=True)
    status_style = traitlets.Unicode("info").tag(sync=True)
    message = traitlets.Unicode("").tag(sync=True)
    running = traitlets.Bool(False).tag(sync=True)
    stop_requested = traitlets.Bool(False).tag(sync=True)
    # a batch of fits (view "batch"): counts, rates and the progress series
    view = traitlets.Unicode("fit").tag(sync=True)  # "fit" or "batch"
    n_fits = traitlets.Int(0).tag(sync=True)
    n_running = traitlets.Int(0).tag(sync=True)
    n_converged = traitlets.Int(0).tag(sync=True)
    # ended without converging; while running stopped fits included, at the end in n_stopped
    n_failed = traitlets.Int(0).tag(sync=True)
    n_stopped = traitlets.Int(0).tag(sync=True)
    fits_per_second = traitlets.Float(0.0).tag(sync=True)
    eta = traitlets.Float(None, allow_none=True).tag(sync=True)  # seconds left
    counts = traitlets.Dict().tag(sync=True)  # BatchFinished's {status: fits}
    # [[iteration, elapsed, n_converged, n_failed, cost min, 10 %, median, 90 %, max], ...]
    batch_progress = traitlets.List(traitlets.List()).tag(sync=True)

    def __init__(
        self, *, max_rate: float = 20.0, title: str = "", auto_display: bool = True
    ) -> None:
        if isinstance(max_rate, bool) or not isinstance(max_rate, (int, float)):
            raise TypeError(f"`max_rate` must be a number, got {type(max_rate).__name__}")
        if not (math.isfinite(max_rate) and max_rate > 0):
            raise ValueError(f"`max_rate` must be a positive finite number, got {max_rate!r}")
        if not isinstance(title, str):
            raise TypeError(f"`title` must be a str, got {type(title).__name__}")
        super().__init__(title=title)
        self.max_rate = float(max_rate)
        self.auto_display = bool(auto_display)
        self.updates = 0  # frontend updates sent (each one a single state message)
        self._displayed = False
        self._last_flush = -math.inf
        self._state: dict[str, Any] = {}
        self._t0: float | None = None
        self._reset_series()
        self.on_msg(self._on_custom_msg)
        self._route_stop_off_main_thread()

    def _reset_series(self) -> None:
        self._costs = _Thinned()  # the cost curve, keyed by iteration
        self._progress = _Thinned()  # a batch's progress, keyed by the progress event's index
        self._batch_id = ""  # the batch shown (its per-fit events are left out)

    # -- the Stop button -----------------------------------------------------------------------
    def stop(self, fit_id: str | None = None) -> bool:
        """Ask the fit this widget shows (or ``fit_id``) to stop, as the Stop button does.

        Returns :func:`~nlsq_stream.stop_fit`'s answer: False when that fit is not running.
        """
        fit_id = self.fit_id if fit_id is None else fit_id
        if not fit_id:
            return False
        if fit_id == self.fit_id:
            self.stop_requested = True
        return stop_fit(fit_id)

    def _on_custom_msg(self, _widget: Any, content: Any, _buffers: Sequence[bytes]) -> None:
        if isinstance(content, dict) and content.get("type") == "stop":
            self.stop(_stop_target(content, self.fit_id))

    def _route_stop_off_main_thread(self) -> None:
        """Make a Stop click act while the cell's thread is blocked (see the module docstring)."""
        comm = getattr(self, "comm", None)
        route = getattr(comm, "_reply_subshell_for", None)
        if comm is None or route is None:
            return

        def reply_subshell_for(data: Any, default: Any) -> Any:
            if _is_stop(data):
                fit_id = _stop_target(data["content"], self.fit_id)  # a str: safe to read here
                if fit_id:
                    stop_fit(fit_id)
            return route(data, default)

        comm._reply_subshell_for = reply_subshell_for

    # -- display ---------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        self._displayed = True
        return super()._repr_mimebundle_(**kwargs)

    def _maybe_display(self) -> None:
        if self.auto_display and not self._displayed and in_notebook():
            from IPython.display import display

            display(self)

    # -- the sink --------------------------------------------------------------------------------
    async def send(self, event: Event) -> None:
        await self.send_batch([event])

    async def send_batch(self, events: Sequence[Event]) -> None:
        """Fold ``events`` into the view; push it to the frontend at most ``max_rate`` times a
        second (at once for FitStarted and the terminal event)."""
        urgent = False
        for ev in events:
            urgent = self.apply(ev) or urgent
        if not self._state:
            return
        if not urgent:
            wait = self._last_flush + 1.0 / self.max_rate - time.monotonic()
            if wait > 0:
                # While we sleep the hub keeps only the newest Iteration for us (policy latest).
                await anyio.sleep(wait)
        self.flush()

    def apply(self, ev: Event) -> bool:
        """Fold one event into the pending state; True when it must reach the frontend at once."""
        if isinstance(ev, FitStarted):
            self._on_started(ev)
            return True
        if isinstance(ev, (BatchStarted, BatchProgress, BatchFinished)):
            return self._apply_batch(ev)
        if self._batch_id and ev.fit_id.rpartition("/")[0] == self._batch_id:
            return False  # one fit of the batch shown (per_fit_events): the batch view says it
        if self._t0 is None:  # joined mid-fit (e.g. a replayed log without its start)
            self._t0 = ev.time
        elapsed = max(ev.time - self._t0, 0.0)
        if isinstance(ev, Iteration):
            self._add_cost(ev.iteration, ev.cost)
            self._state.update(
                fit_id=ev.fit_id,
                iteration=ev.iteration,
                nfev=ev.nfev,
                cost=_finite(ev.cost),
                optimality=_finite(ev.optimality),
                params=[_finite(v) for v in ev.params.tolist()],
                costs=self._series(),
                elapsed=elapsed,
                rate=ev.iteration / elapsed if elapsed > 0 else 0.0,
                running=True,
                view="fit",
            )
            return False
        if isinstance(ev, FitFinished):
            self._on_finished(ev, elapsed)
            return True
        if isinstance(ev, FitFailed):
            self._state.update(
                fit_id=ev.fit_id,
                elapsed=elapsed,
                status="failed",
                status_style=_STATUS_STYLE["failed"],
                message=f"{ev.error_type}: {ev.message}",
                running=False,
            )
            self._t0 = None
            return True
        return False

    def _on_started(self, ev: FitStarted) -> None:
        """A new fit: reset the series and show its start (and the widget, if not shown yet)."""
        self._t0 = ev.time
        self._reset_series()
        self._state.update(
            fit_id=ev.fit_id,
            model_name=ev.model or "",
            method=ev.method,
            param_names=[str(n) for n in ev.param_names],
            params=[_finite(v) for v in ev.x0.tolist()],
            iteration=0,
            nfev=0,
            max_nfev=int(ev.max_nfev or 0),
            cost=None,
            optimality=None,
            costs=[],
            elapsed=0.0,
            rate=0.0,
            status="running",
            status_style=_STATUS_STYLE["running"],
            message="",
            running=True,
            stop_requested=False,
            view="fit",
            batch_progress=[],
        )
        self._maybe_display()

    # -- a batch of fits -------------------------------------------------------------------------
    def _apply_batch(self, ev: BatchStarted | BatchProgress | BatchFinished) -> bool:
        if isinstance(ev, BatchStarted):
            self._on_batch_started(ev)
            return True
        if ev.batch_id != self._batch_id:  # joined mid-batch (e.g. a replayed log)
            self._batch_id = ev.batch_id
            self._progress = _Thinned()
            self._state.update(view="batch", fit_id=ev.batch_id, n_fits=ev.n_fits)
        if isinstance(ev, BatchProgress):
            self._on_batch_progress(ev)
            return False
        self._on_batch_finished(ev)
        return True

    def _on_batch_started(self, ev: BatchStarted) -> None:
        """A new batch: the batch view, its series reset (and the widget shown, if not yet)."""
        self._t0 = None
        self._reset_series()
        self._batch_id = ev.batch_id
        self._state.update(
            view="batch",
            fit_id=ev.batch_id,
            model_name=ev.model or "",
            method=ev.method,
            param_names=[str(n) for n in ev.param_names],
            params=[],
            n_fits=ev.n_fits,
            n_running=ev.n_fits,
            n_converged=0,
            n_failed=0,
            n_stopped=0,
            fits_per_second=0.0,
            eta=None,
            counts={},
            batch_progress=[],
            iteration=0,
            nfev=0,
            max_nfev=0,
            cost=None,
            optimality=None,
            costs=[],
            elapsed=0.0,
            rate=0.0,
            status="running",
            status_style=_STATUS_STYLE["running"],
            message="",
            running=True,
            stop_requested=False,
        )
        self._maybe_display()

    def _on_batch_progress(self, ev: BatchProgress) -> None:
        q = [_finite(v) for v in ev.cost_quantiles.tolist()]
        row = [ev.iteration, float(ev.elapsed), ev.n_converged, ev.n_failed, *q]
        self._progress.append(row)
        self._state.update(
            iteration=ev.iteration,
            n_running=ev.n_running,
            n_converged=ev.n_converged,
            n_failed=ev.n_failed,
            nfev=ev.nfev,
            cost=q[2] if len(q) > 2 else None,
            elapsed=float(ev.elapsed),
            fits_per_second=ev.fits_per_second,
            eta=_finite(ev.eta),
            batch_progress=self._progress.points(),
        )

    def _on_batch_finished(self, ev: BatchFinished) -> None:
        """The final counts and the status in colour (green all converged, orange stopped, red
        some failed)."""
        counts = {str(k): int(n) for k, n in ev.counts.items()}
        stopped = counts.get("-2", 0)
        status = _batch_status(counts)
        self._state.update(
            n_running=0,
            n_converged=ev.n_converged,
            n_failed=ev.n_fits - ev.n_converged - stopped,
            n_stopped=stopped,
            counts=counts,
            elapsed=float(ev.elapsed),
            # fits that ended on their own (not stopped) a second, as BatchProgress counts them
            fits_per_second=(ev.n_fits - stopped) / ev.elapsed if ev.elapsed > 0 else 0.0,
            eta=None,
            batch_progress=self._progress.points(),
            status=status,
            status_style=_STATUS_STYLE[status],
            message=_batch_summary(ev),
            running=False,
        )

    def _on_finished(self, ev: FitFinished, elapsed: float) -> None:
        """The fit's result: last cost point, final parameters, status in colour."""
        st = self._state
        r = ev.result
        nit = int(r.get("nit", st.get("iteration", self.iteration)))
        cost = r.get("cost")
        if cost is not None:
            self._add_cost(nit, float(cost))
        status = ev.status
        text = "stopped" if status == -2 else "converged" if status > 0 else "not converged"
        if "x" in r:
            st["params"] = [_finite(v) for v in list(r["x"])]
        st.update(
            fit_id=ev.fit_id,
            iteration=nit,
            nfev=int(r.get("nfev", st.get("nfev", self.nfev))),
            cost=_finite(cost),
            optimality=_finite(r.get("optimality")),
            costs=self._series(),
            elapsed=elapsed,
            rate=nit / elapsed if elapsed > 0 else 0.0,
            status=text,
            status_style=_STATUS_STYLE[text],
            message=str(r.get("message", "")),
            running=False,
            view="fit",
        )
        self._t0 = None

    def _add_cost(self, iteration: int, cost: float) -> None:
        if math.isfinite(cost) and cost > 0:  # the plot is log-scaled
            self._costs.add(int(iteration), [int(iteration), float(cost)])

    def _series(self) -> list[list[float]]:
        return self._costs.points()

    def flush(self) -> None:
        """Send the pending state to the frontend now, in one message."""
        st, self._state = self._state, {}
        if not st:
            return
        with self.hold_sync():
            for k, v in st.items():
                setattr(self, k, v)
        self._last_flush = time.monotonic()
        self.updates += 1

    async def aclose(self) -> None:
        self.flush()


# ``verbose`` adds no second widget when one is given; instances' classes are per-instance
# subclasses (traitlets' add_traits), so the kind is named here.
FitWidget.sink_kind = FitWidget
