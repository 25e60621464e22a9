"""Runs a validated fit watched: emitter -> hub -> sinks (the sync face's machinery).

``execute`` runs a :class:`~nlsq_stream.solver.fit.PreparedFit` on the device, with an emission
channel when watched; ``run_sync`` is what ``curve_fit(..., verbose=2)`` and
``least_squares(..., sinks=[...])`` use: the sinks run in a shared background event loop (see
``runner._SinkLoop``), the fit runs in the calling thread, and the call returns only after every
sink has drained. It works inside Jupyter too, where the caller's thread already runs an event loop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .. import _control
from .._exceptions import SinkError
from .._result import OptimizeResult
from ..events import Event, FitFailed, FitFinished, FitStarted
from ..solver import fit as solver_fit
from ..solver.fit import PreparedFit
from .emitter import Channel, Emitter, run_chunks
from .hub import HUB, Batch
from .runner import SinkRunner, detached_message, sink_name

try:  # signal's C module: the same handlers, without signal's enum conversion (an exception each)
    import _signal as _raw_signal
except ImportError:  # pragma: no cover - not CPython
    _raw_signal = signal


def started_event(prep: PreparedFit, fit_id: str) -> FitStarted:
    """The FitStarted event of ``prep`` run as ``fit_id``."""
    return FitStarted(
        fit_id=fit_id,
        method=prep.config_kw["method"],
        n_params=int(prep.x0.size),
        n_residuals=prep.n_residuals,
        param_names=prep.param_names,
        x0=np.asarray(prep.x0, dtype=np.float64),
        time=time.time(),
        max_nfev=int(prep.max_nfev),
        model=model_name(prep.problem),
    )


def model_name(problem: Any) -> str | None:
    """The user's model (``curve_fit``) or residual function (``least_squares``) name, if any."""
    fn = getattr(problem, "model", None) or getattr(problem, "fun", None)
    if fn is None:
        return None
    name = getattr(fn, "__name__", None) or getattr(type(fn), "__name__", None)
    return str(name) if name is not None else None


def new_fit_id() -> str:
    """``fit-`` and 12 hex digits: a random prefix per process and a counter (``uuid4``, a
    system call for random bytes, took ~40 µs of a watched 1e5-point fit on a loaded machine)."""
    return f"fit-{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFF:06x}"


def _new_id_prefix() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = uuid.uuid4().hex[:6], itertools.count()


_ID_PREFIX, _ID_COUNTER = "", itertools.count()
_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked process numbers its own fits


def result_summary(res: OptimizeResult) -> OptimizeResult:
    """The JSON-friendly part of a result, as FitFinished carries it (an OptimizeResult too)."""
    return OptimizeResult(
        x=np.asarray(res.x, dtype=np.float64),
        cost=float(res.cost),
        optimality=float(res.optimality),
        nfev=int(res.nfev),
        njev=int(res.njev),
        nit=int(res.nit),
        status=int(res.status),
        message=str(res.message),
        success=bool(res.success),
    )


def execute(prep: PreparedFit, level: int = 0, channel: Channel | None = None) -> OptimizeResult:
    """Run the fit on the device; with ``level`` > 0 its records flow through ``channel`` (the fit
    runs in chunks, see ``emitter.run_chunks``), else it is the solver's one silent program."""
    if level == 0 or channel is None:
        return solver_fit.solve(prep)
    config = prep.config(emitter=Emitter(level))
    key = (prep.problem, config, prep.x0.shape, prep.n_residuals, prep.x0.dtype.str)
    vectors, scalars, data = prep.inputs()
    with _ctrl_c_stops(channel):
        v, fun, jac = run_chunks(channel, prep.problem, config, vectors, scalars, data, key)
    return prep.result(config, v, fun, jac)


@contextlib.contextmanager
def _ctrl_c_stops(channel: Channel) -> Iterator[None]:
    """While a watched fit runs in the main thread, Ctrl-C asks it to stop (best parameters so
    far) instead of raising at once; the KeyboardInterrupt is re-raised once the sinks drained.
    A second Ctrl-C raises at once. The fit runs in chunks of about 40 ms and the handler runs
    between them, so the stop is prompt. Another thread, or a handler that is not Python's
    default, is left alone (``emitter.run_chunks`` still turns a KeyboardInterrupt into a stop).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or _raw_signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if channel.keyboard_interrupt is not None:
            raise KeyboardInterrupt
        channel.on_keyboard_interrupt(KeyboardInterrupt())

    previous = _raw_signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        _raw_signal.signal(signal.SIGINT, previous)


class HubChannel(Channel):
    """A channel whose rows go to the hub as lazily decoded Iteration events.

    ``started`` (the FitStarted event, when this channel publishes it) goes out with the first
    rows, or at once for a problem that may compile first; the last rows go out with the
    terminal event (``finish``). A short fit thus reaches its watchers in one hand-off.

    ``setup``, when given, subscribes the watchers and returns the FitStarted event. It runs
    once, before anything is published, and as late as that allows: when the fit's first program
    has been dispatched (``dispatched``), so that it overlaps the device's work, or earlier if
    the start is announced first (a problem that compiles).
    """

    def __init__(
        self,
        fit_id: str,
        started: FitStarted | None = None,
        setup: Callable[[], FitStarted] | None = None,
    ) -> None:
        super().__init__()
        self.fit_id = fit_id
        self._started = started
        self._setup = setup

    def _ready(self) -> None:
        setup, self._setup = self._setup, None
        if setup is not None:
            self._started = setup()

    def _head(self) -> list[Event]:
        self._ready()
        started, self._started = self._started, None
        return [] if started is None else [started]

    def dispatched(self) -> None:
        self._ready()

    def publish(self, batch: Batch) -> None:
        """Hand ``batch`` to the watchers: here, to the hub."""
        HUB.publish(batch)

    def send(self, rows: np.ndarray, t: float) -> None:
        self.publish(Batch(self.fit_id, self._head(), rows=rows, time=t))

    def announce(self) -> None:
        head = self._head()
        if head:
            self.publish(Batch(self.fit_id, head))

    def finish(self, *tail: Event) -> None:
        """Publish what is left (the start, the held-back last rows), then ``tail`` (ending with
        the terminal event)."""
        held, self._held = self._held, None
        rows, t = held if held is not None else (None, 0.0)
        self.publish(Batch(self.fit_id, self._head(), rows=rows, time=t, tail=list(tail)))


def is_inline(sink: Any) -> bool:
    """Can ``sink`` run in the caller's thread? It says so: ``inline = True`` and a synchronous
    ``write_batch(events)`` (see ``sinks/__init__.py``)."""
    return getattr(sink, "inline", False) is True and callable(getattr(sink, "write_batch", None))


class InlineChannel(HubChannel):
    """A channel that hands each batch straight to inline sinks, in the thread that runs the fit:
    no hub, thread or event loop (the sync face, when every sink is inline).

    A batch goes out between two chunks, while the device runs the next one (see
    ``emitter.run_chunks``); the start goes out as soon as the first program is dispatched
    (``dispatched``), so that its lines too overlap the device's work. A sink that raises is
    detached and closed, its error kept in ``errors``, as ``runner.SinkRunner`` does. The hub
    still gets the batches while something subscribes to every fit (``subscribe()``).
    """

    def __init__(
        self, fit_id: str, sinks: Sequence[Any], setup: Callable[[], FitStarted] | None = None
    ) -> None:
        super().__init__(fit_id, setup=setup)
        self.sinks = list(sinks)
        self.errors: list[str] = []

    def dispatched(self) -> None:
        self.announce()

    def publish(self, batch: Batch) -> None:
        for sink in self.sinks:
            try:
                sink.write_batch(batch)
            except Exception as e:
                self.errors.append(detached_message(sink_name(sink), e))
                self.sinks = [s for s in self.sinks if s is not sink]
                self._close(sink)
        if HUB.has_subscribers(self.fit_id):
            HUB.publish(batch)

    def finish(self, *tail: Event) -> None:
        super().finish(*tail)
        self.close()

    def close(self) -> None:
        """Close every sink still attached (after the terminal event, or when leaving early)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            self._close(sink)

    def _close(self, sink: Any) -> None:
        close = getattr(sink, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:
                self.errors.append(
                    f"sink {sink_name(sink)} failed to close: {type(e).__name__}: {e}"
                )


_LIVE: weakref.WeakValueDictionary[str, HubChannel] = weakref.WeakValueDictionary()  # watched fits


def hub_channel(
    fit_id: str,
    started: FitStarted | None = None,
    setup: Callable[[], FitStarted] | None = None,
) -> HubChannel:
    """The channel of a watched fit (see :class:`HubChannel`), known to ``stop_fit``."""
    return _live(HubChannel(fit_id, started, setup))


def _live(channel: HubChannel) -> HubChannel:
    _LIVE[channel.fit_id] = channel
    _control.register(channel.fit_id, channel.stop_requested)
    return channel


def publish_terminal(fit_id: str, res: OptimizeResult | None, error: BaseException | None) -> None:
    """Publish the fit's terminal event, after whatever its channel still holds."""
    if error is None and res is not None:
        terminal: Event = FitFinished(fit_id, result_summary(res), time.time())
    else:
        terminal = FitFailed(fit_id, type(error).__name__, describe(error), time.time())
    channel = _LIVE.pop(fit_id, None)
    _control.unregister(fit_id)
    if channel is not None:
        channel.finish(terminal)
    else:
        HUB.publish(Batch(fit_id, [terminal]))


def publish_end(fit_id: str, tail: Sequence[Event]) -> None:
    """End the watch of ``fit_id`` (no longer stoppable) and publish ``tail``, which ends with the
    terminal event, after whatever its channel still holds."""
    channel = _LIVE.pop(fit_id, None)
    _control.unregister(fit_id)
    if channel is not None:
        channel.finish(*tail)
    else:
        HUB.publish(Batch(fit_id, list(tail)))


def describe(error: BaseException | None) -> str:
    """A message naming the cause, carried across XLA (which does not chain callback errors)."""
    if error is None:
        return ""
    msg = str(error) or type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause) not in msg:
        msg = f"{msg} (caused by {type(cause).__name__}: {cause})"
    return msg


Display = Callable[[], Any]  # makes the default display sink (``sinks.default_display``)


def with_display(sinks: Sequence[Any], verbose: int, display: Display | None) -> list[Any]:
    """``sinks`` plus, when ``verbose``, the sink ``display()`` makes (the console table, or the
    notebook widget inside Jupyter), unless a sink of that kind is already given (e.g.
    ``ConsoleSink(file=...)`` to send the table elsewhere). The face passes ``display`` in: the
    stream stage knows no sink by name. A ``display`` with a ``kind()`` method (the class of
    what it makes) is called only when its sink is added."""
    out = list(sinks)
    if not verbose or display is None:
        return out
    kind = getattr(display, "kind", None)
    shown = None if kind is not None else display()
    wanted = kind() if kind is not None else _kind(shown)
    if not any(_kind(s) is wanted for s in out):
        out.insert(0, shown if shown is not None else display())
    return out


def _kind(sink: Any) -> type:
    # A widget's class is a per-instance subclass (traitlets' add_traits); it names its kind.
    kind: type = getattr(sink, "sink_kind", None) or type(sink)
    return kind


def run_sync(
    prep: PreparedFit, sinks: Sequence[Any] = (), display: Display | None = None
) -> OptimizeResult:
    """The sync face: silent when not watched; else, when every sink can run in the caller's
    thread (``is_inline``: the console table, JSON lines, logging), an ``InlineChannel`` that
    calls them between chunks; else the pipeline ``fit_stream`` uses, the sinks in the shared
    sink loop (``runner.SinkRunner``), set up by the channel once the fit's first program is
    dispatched, so that host work overlaps the device's instead of delaying its start.
    """
    if not sinks and not prep.verbose:
        return execute(prep)

    level = prep.verbose or 2
    fit_id = new_fit_id()
    watchers = with_display(sinks, prep.verbose, display)
    runners: list[SinkRunner] = []
    if all(is_inline(s) for s in watchers):
        channel: HubChannel = _live(
            InlineChannel(fit_id, watchers, lambda: started_event(prep, fit_id))
        )
    else:

        def setup() -> FitStarted:
            runner = SinkRunner(watchers, fit_id)
            runner.__enter__()
            runners.append(runner)
            return started_event(prep, fit_id)

        channel = hub_channel(fit_id, setup=setup)
    res: OptimizeResult | None = None
    error: BaseException | None = None
    try:
        try:
            res = execute(prep, level, channel)
        except BaseException as e:
            error = e
        publish_terminal(fit_id, res, error)  # sets the watchers up if nothing did yet
        for runner in runners:
            runner.wait()
    finally:
        close_watch(channel, runners)
    errors = warn_sink_errors(channel, runners)
    if error is not None:
        raise error  # the fit's, or the watchers' setup's
    if channel.keyboard_interrupt is not None:  # the fit stopped and the sinks have drained
        raise channel.keyboard_interrupt
    assert res is not None
    res["sink_errors"] = errors
    return res


def close_watch(channel: HubChannel, runners: Sequence[SinkRunner]) -> None:
    """The end of a sync face's watch: an inline channel closes its sinks (a no-op after the
    terminal event), the sink runners are left."""
    if isinstance(channel, InlineChannel):
        channel.close()
    for runner in runners:
        runner.__exit__(None, None, None)


def warn_sink_errors(channel: HubChannel, runners: Sequence[SinkRunner]) -> list[str]:
    """Every sink failure of a sync face's watch, each issued as one ``SinkError`` warning that
    points at the face's caller; returned for the result."""
    errors = [failure for runner in runners for failure in runner.errors]
    if isinstance(channel, InlineChannel):
        errors += channel.errors
    for failure in errors:
        warnings.warn(failure, SinkError, stacklevel=4)
    return errors


def check_sinks(sinks: Sequence[Any] | None) -> list[Any]:
    """Validate ``sinks`` before anything starts: each must be callable or have ``send``,
    ``send_batch`` or (an inline sink) ``write_batch``."""
    if sinks is None:
        return []
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Sequence):
        raise TypeError(f"`sinks` must be a list of sinks, got {type(sinks).__name__}")
    for i, s in enumerate(sinks):
        if not (callable(s) or hasattr(s, "send") or hasattr(s, "send_batch") or is_inline(s)):
            raise TypeError(
                f"`sinks[{i}]` must be an async callable sink(event), an object with an async "
                f"`send(event)` method, or an inline sink (``inline = True`` and "
                f"``write_batch(events)``), got {type(s).__name__}"
            )
        policy = getattr(s, "policy", "lossless")
        if policy not in ("lossless", "latest"):
            raise ValueError(f"`sinks[{i}].policy` must be 'lossless' or 'latest', got {policy!r}")
    return list(sinks)
